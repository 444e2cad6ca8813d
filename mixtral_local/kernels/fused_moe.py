"""Fused MoE on Triton: the launcher of the kernels in ``_triton_moe.py``; same signature as ``moe_reference``.

    fused_moe(hidden [M, H], w13 [E, 2I, H], w2 [E, H, I], router_logits [M, E], top_k,
              *, w13_scale=None, w2_scale=None) -> [M, H]

With ``w13_scale`` [E, 2I] and ``w2_scale`` [E, H] the weights are int8, one scale per row
(``reference.quantize_rows``); the kernels widen each weight tile and scale in their epilogues. Int8 weights
take the pointer-load path (no ``USE_TMA``).

1. route: softmax in fp32, top-k, renormalise (as ``reference.route``, so both paths pick the same experts);
2. align: sort the M * top_k slots by expert, pad each expert's run to BLOCK_M (no host sync). Up to
   ``FUSED_ROUTE_MAX_SLOTS`` slots (decode), 1 and 2 are one Triton program (``route_align_kernel``);
   above, ``reference.route`` and ``moe_align`` in torch ops, whose launch costs no longer matter there;
3. ``w13_silu_kernel``: grouped GEMM over w13 with SiLU(gate) * up in its epilogue -> act [slots, I]
   (with ``USE_TMA``, where the operands allow: every tile through a tensor descriptor, hidden's rows
   first copied into sorted order and act written by sorted position);
4. ``w2_weighted_kernel``: grouped GEMM over w2 times each slot's routing weight -> [slots, H];
5. sum the top_k rows of each token (in torch: deterministic, unlike atomic adds).

Calls of more than ``max_chunk_slots`` slots run in chunks of tokens, which bounds the scratch memory and
keeps every slot index far from int32 limits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import triton

from ._triton_moe import interpreted, route_align_kernel, w2_weighted_kernel, w13_silu_kernel
from .configs import MoEConfig, device_name, get_config
from .reference import route, scale_pair

__all__ = [
    "CHUNK_SLOTS",
    "FUSED_ROUTE_MAX_SLOTS",
    "KernelLaunch",
    "MoEAlignment",
    "chunk_scratch",
    "empty_alignment",
    "fused_moe",
    "max_m_blocks",
    "moe_align",
    "moe_launches",
    "route_align_launch",
    "sorted_rows",
    "tma_eligible",
    "tma_ready",
]

CHUNK_SLOTS = 65536
FUSED_ROUTE_MAX_SLOTS = 256  # slots routed and aligned by one program: every decode step, small prefills
_ROUTE_ALIGN_BLOCK_P = 128
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class MoEAlignment(NamedTuple):
    """Slots sorted by expert, each expert's run padded to a multiple of ``block_m``.

    sorted_slots  [num_m_blocks * block_m] int32  slot ids by expert; padding holds num_slots
    block_expert  [num_m_blocks] int32            expert owning each block; -1 for blocks past the end
    num_padded    [1] int32                       sorted positions in use (a multiple of block_m)
    """

    sorted_slots: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor

    @property
    def num_m_blocks(self) -> int:
        return self.block_expert.numel()


def moe_align(expert_ids: torch.Tensor, n_experts: int, block_m: int) -> MoEAlignment:
    """Sort the slots of ``expert_ids`` [M, top_k] by expert and pad each expert's run to ``block_m``.

    Runs on the device without a host sync: the buffers are sized by an upper bound on the blocks,
    ceil(slots / block_m) + min(E, slots), and ``num_padded`` tells the kernels where the real blocks end.
    Experts with no slot own no block.
    """
    device = expert_ids.device
    flat = expert_ids.flatten().long()  # [S]
    num_slots = flat.numel()
    num_m_blocks = max_m_blocks(num_slots, n_experts, block_m)

    counts = torch.zeros(n_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # [E] end of each expert's padded run
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, 0) - counts  # [E] start of each expert's run among sorted slots

    sorted_experts, order = torch.sort(flat, stable=True)  # order: slot ids grouped by expert
    rank = torch.arange(num_slots, device=device) - count_start[sorted_experts]
    dest = padded_start[sorted_experts] + rank
    sorted_slots = torch.full((num_m_blocks * block_m,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[dest] = order.to(torch.int32)

    block_starts = torch.arange(num_m_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)  # first expert ending after it
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return MoEAlignment(sorted_slots, block_expert, padded_end[-1:].to(torch.int32))


def _check_inputs(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Raise ValueError with the reason when the inputs cannot go to the kernels as they are."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [M, H], got shape {tuple(hidden.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 and w2 must be 3-D, got {tuple(w13.shape)} and {tuple(w2.shape)}")
    m, h = hidden.shape
    n_experts, two_i, w13_h = w13.shape
    if two_i % 2 != 0:
        raise ValueError(f"w13 must stack gate and up rows [E, 2I, H]; its {two_i} rows are odd")
    inter = two_i // 2
    if w13_h != h:
        raise ValueError(f"w13 {tuple(w13.shape)} does not match hidden size H={h}")
    if tuple(w2.shape) != (n_experts, h, inter):
        raise ValueError(f"w2 must be [E, H, I] = {(n_experts, h, inter)}, got {tuple(w2.shape)}")
    if tuple(router_logits.shape) != (m, n_experts):
        raise ValueError(f"router_logits must be [M, E] = {(m, n_experts)}, got {tuple(router_logits.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be an int in 1..{n_experts}, got {top_k!r}")
    if hidden.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"hidden dtype must be float16, bfloat16 or float32, got {hidden.dtype}")
    if scales is None and (w13.dtype != hidden.dtype or w2.dtype != hidden.dtype):
        raise ValueError(
            f"hidden, w13 and w2 must share a dtype, got {hidden.dtype}, {w13.dtype}, {w2.dtype}"
        )
    if scales is not None:
        if w13.dtype != torch.int8 or w2.dtype != torch.int8:
            raise ValueError(f"with scales, w13 and w2 must be int8, got {w13.dtype} and {w2.dtype}")
        for name, scale, rows in zip(("w13_scale", "w2_scale"), scales, (w13.shape[:2], w2.shape[:2]), strict=True):
            if tuple(scale.shape) != tuple(rows):
                raise ValueError(f"{name} must be [E, rows] = {tuple(rows)}, got {tuple(scale.shape)}")
            if not scale.dtype.is_floating_point:
                raise ValueError(f"{name} must be floating point, got {scale.dtype}")
            if scale.device != hidden.device:
                raise ValueError(f"{name} is on {scale.device}, hidden on {hidden.device}")
    if not router_logits.dtype.is_floating_point:
        raise ValueError(f"router_logits must be floating point, got {router_logits.dtype}")
    devices = {t.device for t in (hidden, w13, w2, router_logits)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = hidden.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
        raise ValueError(
            f"fused_moe needs CUDA tensors (CPU ones only under TRITON_INTERPRET=1), got {device}"
        )
    for name, t in (("hidden", hidden), ("w13", w13), ("w2", w2)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int = 2,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: MoEConfig | Mapping[str, int] | None = None,
    max_chunk_slots: int = CHUNK_SLOTS,
) -> torch.Tensor:
    """The MoE layer of ``moe_reference`` as two fused grouped GEMMs; returns [M, H] in hidden's dtype.

    ``w13_scale`` / ``w2_scale``: the row scales of int8 weights (both, or neither for float weights).
    ``config`` fixes the tiles (a ``MoEConfig`` or its dict); by default they come from the tuned table
    for this shape and GPU, chosen by M. ``max_chunk_slots`` bounds the slots (M * top_k) of one launch.
    """
    if isinstance(config, Mapping):
        config = MoEConfig.from_dict(config)
    scales = scale_pair(w13_scale, w2_scale)
    _check_inputs(hidden, w13, w2, router_logits, top_k, scales)
    if max_chunk_slots < top_k:
        raise ValueError(f"max_chunk_slots must hold one token's {top_k} slots, got {max_chunk_slots}")
    m = hidden.shape[0]
    out = torch.empty_like(hidden)
    if m == 0:
        return out

    chunk_tokens = max_chunk_slots // top_k
    for start in range(0, m, chunk_tokens):
        stop = min(start + chunk_tokens, m)
        chunk_config = config or get_config(
            stop - start, w13.shape[0], w2.shape[2], hidden.shape[1], top_k, hidden.dtype,
            device_name(hidden.device),
        )  # fmt: skip
        with _on_device(hidden.device):
            _moe_chunk(
                hidden[start:stop], w13, w2, router_logits[start:stop], top_k, chunk_config, out[start:stop],
                scales,
            )  # fmt: skip
    return out


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Launch on the inputs' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class KernelLaunch(NamedTuple):
    """One kernel launch of a chunk: ``kernel[grid](*args, **constexprs, **options)``."""

    kernel: Any  # a triton JITFunction (or its interpreted twin)
    grid: tuple[int]
    args: tuple[object, ...]
    constexprs: dict[str, int]  # the kernel's tl.constexpr arguments (tile sizes, TOP_K, ...)
    options: dict[str, int]  # num_warps, num_stages

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


def max_m_blocks(num_slots: int, n_experts: int, block_m: int) -> int:
    """Blocks of ``block_m`` sorted positions that ``num_slots`` slots can need, each expert's run padded."""
    return triton.cdiv(num_slots, block_m) + min(n_experts, num_slots)


def empty_alignment(num_slots: int, n_experts: int, block_m: int, device: torch.device | str) -> MoEAlignment:
    """Unwritten alignment buffers for ``num_slots`` slots, sized as ``moe_align`` sizes them (the
    ``route_align_kernel`` fills them; on the ``meta`` device they only carry shapes)."""
    blocks = max_m_blocks(num_slots, n_experts, block_m)
    return MoEAlignment(
        *(torch.empty(n, dtype=torch.int32, device=device) for n in (blocks * block_m, blocks, 1))
    )


def moe_launches(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slot_weights: torch.Tensor,
    align: MoEAlignment,
    config: MoEConfig,
    act: torch.Tensor,
    per_slot: torch.Tensor,
    sorted_hidden: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[KernelLaunch, KernelLaunch]:
    """The w13 and w2 launches of one chunk, arguments and all (also what ``aot.py`` compiles ahead of time).

    hidden [m, H]; slot_weights [slots] fp32; act [slots, I] and per_slot [slots, H] are the scratch outputs.
    With ``sorted_hidden`` ([positions, H], from ``sorted_rows``) every operand goes through a tensor
    descriptor (``USE_TMA``) and act is [positions, I], by sorted position; ``tma_eligible`` says when.
    ``scales`` (w13_scale, w2_scale) make it the int8-weight build (``W_INT8``).
    """
    h = hidden.shape[1]
    num_slots, inter = per_slot.shape[0], act.shape[1]
    top_k = num_slots // hidden.shape[0]
    block_m, block_n, block_k = config.BLOCK_SIZE_M, config.BLOCK_SIZE_N, config.BLOCK_SIZE_K
    x_desc = w13_desc = a_desc = w2_desc = None
    if sorted_hidden is not None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(sorted_hidden, [block_m, block_k])
        a_desc = TensorDescriptor.from_tensor(act, [block_m, block_k])
        w13_desc = TensorDescriptor.from_tensor(w13, [1, block_n // 2, block_k])
        w2_desc = TensorDescriptor.from_tensor(w2, [1, block_n, block_k])
    constexprs = {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "GROUP_M": config.GROUP_SIZE_M,
        "USE_TMA": sorted_hidden is not None,
        "W_INT8": scales is not None,
    }
    no_scale = (None, 0, 0)  # the float build never reads these
    w13_s, w2_s = [(s, *s.stride()) for s in scales] if scales is not None else [no_scale, no_scale]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    sorting = (align.sorted_slots, align.block_expert, align.num_padded)
    w13_args = (
        hidden, x_desc, w13, w13_desc, act, *sorting,
        align.num_m_blocks, num_slots, top_k, inter, h,
        hidden.stride(0), hidden.stride(1),
        w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        *w13_s,
    )  # fmt: skip
    w2_args = (
        act, a_desc, w2, w2_desc, per_slot, slot_weights, *sorting,
        align.num_m_blocks, num_slots, h, inter,
        act.stride(0), act.stride(1),
        w2.stride(0), w2.stride(1), w2.stride(2),
        per_slot.stride(0), per_slot.stride(1),
        *w2_s,
    )  # fmt: skip
    return (
        KernelLaunch(
            w13_silu_kernel,
            (align.num_m_blocks * triton.cdiv(inter, block_n // 2),),
            w13_args,
            constexprs,
            options,
        ),
        KernelLaunch(
            w2_weighted_kernel, (align.num_m_blocks * triton.cdiv(h, block_n),), w2_args, constexprs, options
        ),
    )


def tma_eligible(config: MoEConfig, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether a call with this config takes the descriptor path: the config asks (``USE_TMA``) and every
    operand meets the tensor-memory accelerator's rules (the weights as they are; the sorted hidden rows
    and act, which the launcher allocates, need rows of a multiple of 16 bytes). Int8 weights never do."""
    if w13.dtype == torch.int8:
        return False
    elem = hidden.element_size()
    rows_ok = hidden.shape[1] * elem % 16 == 0 and w2.shape[2] * elem % 16 == 0
    return bool(config.USE_TMA) and rows_ok and tma_ready(w13) and tma_ready(w2)


def sorted_rows(hidden: torch.Tensor, align: MoEAlignment, top_k: int) -> torch.Tensor:
    """hidden's row of each sorted position [positions, H] (padding positions repeat the last token)."""
    tokens = torch.clamp(align.sorted_slots // top_k, max=hidden.shape[0] - 1)
    return hidden.index_select(0, tokens)


def chunk_scratch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    align: MoEAlignment,
    config: MoEConfig,
    top_k: int,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(sorted_hidden or None, act, per_slot): what ``moe_launches`` takes besides the inputs, for one chunk.

    With the descriptor path (``tma_eligible``) hidden's rows are copied into sorted order and act is
    [positions, I], by sorted position; else act is [slots, I], by slot. per_slot is [slots, H]. On ``meta``
    tensors (``aot.py``) only the shapes are made.
    """
    num_slots = hidden.shape[0] * top_k
    sorted_hidden = sorted_rows(hidden, align, top_k) if tma_eligible(config, hidden, w13, w2) else None
    rows = num_slots if sorted_hidden is None else sorted_hidden.shape[0]
    act = torch.empty(rows, w2.shape[2], dtype=hidden.dtype, device=hidden.device)
    per_slot = torch.empty(num_slots, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    return sorted_hidden, act, per_slot


def tma_ready(weights: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``weights`` [E, rows, K]: base and outer strides 16-byte aligned
    (the tensor-memory accelerator's rule; the last dimension is contiguous, checked with the inputs)."""
    elem = weights.element_size()
    aligned = weights.device.type == "meta" or weights.data_ptr() % 16 == 0
    return aligned and all(stride * elem % 16 == 0 for stride in weights.stride()[:-1])


def route_align_launch(
    router_logits: torch.Tensor, top_k: int, block_m: int, slot_weights: torch.Tensor, align: MoEAlignment
) -> KernelLaunch:
    """The launch that routes ``router_logits`` [m, E] and aligns its slots into ``align`` and ``slot_weights``."""
    num_slots = slot_weights.numel()
    n_experts = router_logits.shape[1]
    args = (
        router_logits, slot_weights, *align,
        num_slots, n_experts, align.num_m_blocks,
        router_logits.stride(0), router_logits.stride(1),
    )  # fmt: skip
    constexprs = {
        "TOP_K": top_k,
        "BLOCK_S": triton.next_power_of_2(num_slots),
        "BLOCK_E": triton.next_power_of_2(n_experts),
        "BLOCK_M": block_m,
        "BLOCK_P": _ROUTE_ALIGN_BLOCK_P,
    }
    return KernelLaunch(route_align_kernel, (1,), args, constexprs, {"num_warps": 4, "num_stages": 1})


def _route_and_align(
    router_logits: torch.Tensor, top_k: int, block_m: int
) -> tuple[torch.Tensor, MoEAlignment]:
    """(slot weights [slots] fp32, alignment) of one chunk: one program at decode sizes, torch ops above."""
    m, n_experts = router_logits.shape
    num_slots = m * top_k
    if num_slots > FUSED_ROUTE_MAX_SLOTS:
        weights, expert_ids = route(router_logits, top_k)  # [m, k] fp32, [m, k] int64
        return weights.reshape(-1).contiguous(), moe_align(expert_ids, n_experts, block_m)
    device = router_logits.device
    align = empty_alignment(num_slots, n_experts, block_m, device)
    slot_weights = torch.empty(num_slots, dtype=torch.float32, device=device)
    route_align_launch(router_logits, top_k, block_m, slot_weights, align)()
    return slot_weights, align


def _moe_chunk(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    config: MoEConfig,
    out: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """One chunk of tokens through routing and both kernels; writes ``out`` [m, H]."""
    m, h = hidden.shape
    slot_weights, align = _route_and_align(router_logits, top_k, config.BLOCK_SIZE_M)
    sorted_hidden, act, per_slot = chunk_scratch(hidden, w13, w2, align, config, top_k)
    w13_launch, w2_launch = moe_launches(
        hidden, w13, w2, slot_weights, align, config, act, per_slot, sorted_hidden, scales
    )
    w13_launch()
    w2_launch()
    torch.sum(per_slot.view(m, top_k, h), dim=1, out=out)
