"""MoE kernels: ``moe_reference`` (pure torch, any device) and ``fused_moe`` (Triton, CUDA).

Both share one signature::

    moe(hidden [M, H], w13 [E, 2I, H], w2 [E, H, I], router_logits [M, E], top_k) -> [M, H]

Importing this package needs torch alone; triton is imported only when the fused kernel is asked for.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Literal

import torch

from .reference import moe_reference, route

__all__ = ["MoEBackend", "MoEFn", "moe_reference", "resolve_moe_backend", "route"]

MoEFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
MoEBackend = Literal["auto", "torch", "triton"]


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
