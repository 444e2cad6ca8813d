"""MoE kernels: ``moe_reference`` (pure torch, any device) and ``fused_moe`` (Triton, CUDA).

Both share one signature::

    moe(hidden [M, H], w13 [E, 2I, H], w2 [E, H, I], router_logits [M, E], top_k,
        *, w13_scale=None, w2_scale=None) -> [M, H]

With the two scales ([E, 2I] and [E, H]) the experts are int8, one scale per output row (``quantize_rows``).

Importing this package needs torch alone; triton is imported only when the fused kernel is asked for.
"""

from __future__ import annotations

import importlib.util
from typing import Literal, Protocol

import torch

from .reference import dequantize_rows, moe_reference, quantize_rows, route

__all__ = [
    "MoEBackend",
    "MoEFn",
    "Quantize",
    "dequantize_rows",
    "moe_reference",
    "quantize_rows",
    "resolve_moe_backend",
    "route",
]

MoEBackend = Literal["auto", "torch", "triton"]
Quantize = Literal["int8"]  # how expert weights may be stored: int8, one scale per output row


class MoEFn(Protocol):
    """What ``moe_reference`` and ``fused_moe`` both are."""

    def __call__(
        self,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        router_logits: torch.Tensor,
        top_k: int = 2,
        *,
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_moe_backend(name: str, device: torch.device | str) -> tuple[str, MoEFn]:
    """The MoE implementation for ``name`` on ``device``: ("torch" | "triton", function).

    "auto" takes the fused Triton kernel on CUDA when triton is installed, else the torch reference.
    "triton" off CUDA is refused (the interpreter is for tests, not serving).
    """
    device = torch.device(device)
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"moe_backend must be 'auto', 'torch' or 'triton', got {name!r}")
    if name == "torch" or (name == "auto" and (device.type != "cuda" or not _triton_available())):
        return "torch", moe_reference
    if device.type != "cuda":
        raise ValueError(f"moe_backend='triton' needs a CUDA device, got {device}")
    if not _triton_available():
        raise ValueError("moe_backend='triton' needs the triton package: pip install 'mixtral-sdk[kernels]'")
    from .fused_moe import fused_moe

    return "triton", fused_moe
