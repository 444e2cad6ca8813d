"""Kernel tests: on CPU through Triton's interpreter, and in bf16 on a GPU for the tests marked ``gpu``.

``triton.jit`` (triton's own library functions included) chooses between the compiler and the interpreter
when it decorates, so on a machine without CUDA this file turns the interpreter on before triton is imported.
It sets TRITON_INTERPRET only where CUDA is absent (nothing could run compiled kernels there anyway), so a
GPU run of the whole suite keeps compiled kernels. Should a test collected earlier in the same run have
imported triton already, the interpreter tests skip here and ``test_interpreter_rerun.py`` runs them in a
fresh process instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_ready() -> bool:
    """Our kernels and triton's own jit library (``tl.cdiv``, ...) were both built for the interpreter."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from mixtral_local.kernels import _triton_moe

    return _triton_moe.interpreted() and not isinstance(tl.cdiv, JITFunction)


@pytest.fixture
def interpreter_ready() -> bool:
    return _interpreter_ready()


@pytest.fixture
def interpreter() -> None:
    """The kernels run in the CPU interpreter in this process, or the test is skipped."""
    if _interpreter_ready():
        return
    if torch.cuda.is_available():
        pytest.skip("kernels are compiled for the GPU in this run; CPU tests need TRITON_INTERPRET=1")
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1: test_interpreter_rerun.py runs this in a fresh process"
    )


@pytest.fixture
def cuda() -> torch.device:
    """A CUDA device running compiled kernels, or the test is skipped."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mixtral_local.kernels import _triton_moe

    if _triton_moe.interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set: GPU tests need compiled kernels")
    return torch.device("cuda")


MoEInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _make_moe_inputs(
    m: int,
    h: int,
    inter: int,
    n_experts: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MoEInputs:
    """(hidden [M, H], w13 [E, 2I, H], w2 [E, H, I], router_logits [M, E] fp32), scaled so outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=gen)
    w13 = torch.randn(n_experts, 2 * inter, h, generator=gen) / h**0.5
    w2 = torch.randn(n_experts, h, inter, generator=gen) / inter**0.5
    logits = torch.randn(m, n_experts, generator=gen)
    return hidden.to(device, dtype), w13.to(device, dtype), w2.to(device, dtype), logits.to(device)


def _moe_float64_loop(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor, top_k: int
) -> torch.Tensor:
    """The MoE written out token by token in float64, independent of ``moe_reference``."""
    x, w13, w2 = hidden.double().cpu(), w13.double().cpu(), w2.double().cpu()
    inter = w2.shape[2]
    probs = torch.softmax(router_logits.double().cpu(), dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = torch.argsort(probs[t], descending=True, stable=True)[:top_k]
        total = probs[t, chosen].sum()
        for e in chosen.tolist():
            gate = w13[e, :inter] @ x[t]
            up = w13[e, inter:] @ x[t]
            out[t] += probs[t, e] / total * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.fixture
def make_moe_inputs() -> Callable[..., MoEInputs]:
    return _make_moe_inputs


@pytest.fixture
def moe_float64() -> Callable[..., torch.Tensor]:
    return _moe_float64_loop
