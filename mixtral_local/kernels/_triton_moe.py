"""The two Triton kernels of the fused MoE: grouped GEMMs over token slots sorted by expert.

A *slot* is one (token, top-k choice) pair: slot ``s`` is token ``s // top_k``'s ``s % top_k``-th expert.
``moe_align`` (in ``fused_moe.py``) sorts the slots by expert and pads each expert's run to ``BLOCK_M``, so a
block of ``BLOCK_M`` sorted positions belongs to one expert (``block_expert[pid_m]``); padding positions hold
``num_slots`` and are masked. Only blocks below ``num_padded`` do work: an expert with no token owns no block,
and the programs of the spare blocks at the tail of the grid return before touching a weight.

    _w13_silu_kernel:   act[s, :]  = SiLU(x[s // top_k] @ w1[e].T) * (x[s // top_k] @ w3[e].T)   [slots, I]
    _w2_weighted_kernel: out[s, :] = weight[s] * (act[s] @ w2[e].T)                              [slots, H]

w13 is stacked [E, 2I, H]: gate rows (w1) are ``0..I-1``, up rows (w3) ``I..2I-1``. A w13 program reads
``BLOCK_N // 2`` gate rows and the ``BLOCK_N // 2`` up rows that pair with them, so the activation is formed
in registers and only [slots, I] ever reaches memory; ``BLOCK_N`` counts the w13 rows a program reads, which
keeps the register footprint of a tile the same as in the unfused w13 GEMM of vLLM's tuned configs.

Pointer offsets that scale with an expert, token or slot index are computed in int64: ``expert * stride_e``
passes 2**31 elements for large experts.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["interpreted", "w13_silu_kernel", "w2_weighted_kernel"]


@triton.jit
def _block_coords(num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program; GROUP_M m-blocks share each n-sweep so their weight tiles stay in L2."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_m_blocks - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _block_rows(pid_m, sorted_slots_ptr, block_expert_ptr, num_slots, BLOCK_M: tl.constexpr):
    """(expert, slot ids [BLOCK_M] int64, which rows are real slots) of sorted block ``pid_m``."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return expert, slots, slots < num_slots


@triton.jit
def w13_silu_kernel(
    x_ptr,  # [M, H] hidden
    w_ptr,  # [E, 2I, H] w13
    act_ptr,  # [slots, I] out
    sorted_slots_ptr,  # [num_m_blocks * BLOCK_M] slot ids, padding = num_slots
    block_expert_ptr,  # [num_m_blocks] expert of each block, -1 past the end
    num_padded_ptr,  # [1] sorted positions in use
    num_m_blocks,
    num_slots,
    top_k,
    N,  # I: columns of act
    K,  # H
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_am,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # w13 rows per program: BLOCK_N // 2 gate rows + as many up rows
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    HALF_N: tl.constexpr = BLOCK_N // 2
    pid_m, pid_n = _block_coords(num_m_blocks, N, HALF_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, slots, row_ok = _block_rows(pid_m, sorted_slots_ptr, block_expert_ptr, num_slots, BLOCK_M)
    tokens = slots // top_k
    offs_n = pid_n * HALF_N + tl.arange(0, HALF_N).to(tl.int64)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk
    gate_ptrs = w_ptrs + offs_n[None, :] * stride_wn  # [BLOCK_K, HALF_N], rows n of w13[e]
    up_ptrs = w_ptrs + (offs_n + N)[None, :] * stride_wn  # rows n + I

    acc_gate = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        gate = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_gate = tl.dot(x, gate, acc_gate)
        acc_up = tl.dot(x, up, acc_up)
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk

    act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SiLU(gate) * up, in fp32
    act_ptrs = act_ptr + slots[:, None] * stride_am + offs_n[None, :] * stride_an
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def w2_weighted_kernel(
    act_ptr,  # [slots, I]
    w_ptr,  # [E, H, I] w2
    out_ptr,  # [slots, H]
    slot_weight_ptr,  # [slots] fp32 routing weight of each slot
    sorted_slots_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_m_blocks,
    num_slots,
    N,  # H
    K,  # I
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_m_blocks, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, slots, row_ok = _block_rows(pid_m, sorted_slots_ptr, block_expert_ptr, num_slots, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = act_ptr + slots[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    weight = tl.load(slot_weight_ptr + slots, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + slots[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def interpreted() -> bool:
    """Whether these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return not isinstance(w13_silu_kernel, JITFunction)
