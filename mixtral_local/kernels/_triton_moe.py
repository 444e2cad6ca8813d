"""The two Triton kernels of the fused MoE: grouped GEMMs over token slots sorted by expert.

A *slot* is one (token, top-k choice) pair: slot ``s`` is token ``s // top_k``'s ``s % top_k``-th expert.
``moe_align`` (in ``fused_moe.py``) sorts the slots by expert and pads each expert's run to ``BLOCK_M``, so a
block of ``BLOCK_M`` sorted positions belongs to one expert (``block_expert[pid_m]``); padding positions hold
``num_slots`` and are masked. Only blocks below ``num_padded`` do work: an expert with no token owns no block,
and the programs of the spare blocks at the tail of the grid return before touching a weight.

    _w13_silu_kernel:   act[s, :]  = SiLU(x[s // top_k] @ w1[e].T) * (x[s // top_k] @ w3[e].T)   [slots, I]
    _w2_weighted_kernel: out[s, :] = weight[s] * (act[s] @ w2[e].T)                              [slots, H]

Before them, at decode sizes, ``route_align_kernel`` does the routing and the sort in one program (one launch
instead of the dozen small torch ops of ``reference.route`` + ``moe_align``, whose launch costs would
otherwise rival the time it takes to stream a decode step's expert weights).

w13 is stacked [E, 2I, H]: gate rows (w1) are ``0..I-1``, up rows (w3) ``I..2I-1``. A w13 program reads
``BLOCK_N // 2`` gate rows and the ``BLOCK_N // 2`` up rows that pair with them, so the activation is formed
in registers and only [slots, I] ever reaches memory; ``BLOCK_N`` counts the w13 rows a program reads, which
keeps the register footprint of a tile the same as in the unfused w13 GEMM of vLLM's tuned configs.

With ``W_INT8`` the weights are int8 with one scale per row (``reference.quantize_rows``): each weight tile is
widened to the activations' dtype before its dot, and the accumulator's columns are multiplied by their rows'
scales in the epilogue, as vLLM's int8 weight-only path does; the weights then stream at one byte each.

Pointer offsets that scale with an expert, token or slot index are computed in int64: ``expert * stride_e``
passes 2**31 elements for large experts.

With ``USE_TMA`` (a tile config's choice) every operand tile comes through a tensor descriptor instead of
pointer loads: on Hopper the tensor-memory accelerator copies it to shared memory, one instruction per tile
instead of one per vector. The weights through 3-D descriptors over [E, rows, K]. The token rows, which a
pointer load gathers, the unit cannot gather before Blackwell: so the launcher first copies hidden's rows
into sorted order ([positions, H], one ``index_select``), and w13 writes ``act`` by sorted position too, so
each block's rows are one dense tile for both kernels. The launcher uses descriptors only where every
operand meets the unit's rules (16-byte aligned base and strides), else the pointer loads with the same
tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["interpreted", "route_align_kernel", "w13_silu_kernel", "w2_weighted_kernel"]


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
    x_desc,  # with USE_TMA: descriptor of hidden's rows in sorted order [positions, H], block [BLOCK_M, BLOCK_K]
    w_ptr,  # [E, 2I, H] w13
    w_desc,  # with USE_TMA: a TensorDescriptor of w13, block [1, BLOCK_N // 2, BLOCK_K]; else None
    act_ptr,  # [slots, I] out; with USE_TMA [positions, I], row = sorted position
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
    w_scale_ptr,  # with W_INT8: [E, 2I] scale of each w13 row; else None
    stride_se,
    stride_sn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # w13 rows per program: BLOCK_N // 2 gate rows + as many up rows
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,  # operand tiles by the tensor-memory accelerator (Hopper) instead of pointer loads
    W_INT8: tl.constexpr = False,  # int8 weights, one scale per row: widened per tile, scaled in the epilogue
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
        if USE_TMA:
            # [HALF_N, BLOCK_K] tiles; past H, and past 2I for the up rows, the unit reads zeros. The last
            # gate tile of an I that is no multiple of HALF_N reads up rows: only columns >= I, never stored.
            x = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])  # the block's rows, already in sorted order
            e32 = expert.to(tl.int32)
            n0 = pid_n * HALF_N
            gate = w_desc.load([e32, n0, k * BLOCK_K]).reshape(HALF_N, BLOCK_K).T
            up = w_desc.load([e32, n0 + N, k * BLOCK_K]).reshape(HALF_N, BLOCK_K).T
        else:
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            gate = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if W_INT8:
            gate = gate.to(x.dtype)
            up = up.to(x.dtype)
        acc_gate = tl.dot(x, gate, acc_gate)
        acc_up = tl.dot(x, up, acc_up)
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk

    if W_INT8:  # a row's scale factors out of its dot product
        scale_ptrs = w_scale_ptr + expert * stride_se + offs_n * stride_sn
        acc_gate *= tl.load(scale_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_up *= tl.load(scale_ptrs + N * stride_sn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SiLU(gate) * up, in fp32
    # (two whole stores rather than one with chosen rows and mask: ptxas then keeps the pointer path's prefill
    # build at 240 registers instead of 255)
    if USE_TMA:  # rows by sorted position, so w2 reads a block's rows as one tile; padding rows too (they
        # repeat a real token): w2 reads every row of its block, so none may be left unwritten
        act_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        act_ptrs = act_ptr + act_rows[:, None] * stride_am + offs_n[None, :] * stride_an
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])
    else:
        act_ptrs = act_ptr + slots[:, None] * stride_am + offs_n[None, :] * stride_an
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def w2_weighted_kernel(
    act_ptr,  # [slots, I]
    a_desc,  # with USE_TMA: descriptor of act [positions, I] (rows by sorted position), block [BLOCK_M, BLOCK_K]
    w_ptr,  # [E, H, I] w2
    w_desc,  # with USE_TMA: a TensorDescriptor of w2, block [1, BLOCK_N, BLOCK_K]; else None
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
    w_scale_ptr,  # with W_INT8: [E, H] scale of each w2 row; else None
    stride_se,
    stride_sn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    W_INT8: tl.constexpr = False,
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
        if USE_TMA:  # zeros past H and past I; a padding row of act (a repeated token) only reaches its own
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])  # output row, which is never stored
            w = w_desc.load([expert.to(tl.int32), pid_n * BLOCK_N, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if W_INT8:
            w = w.to(a.dtype)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    weight = tl.load(slot_weight_ptr + slots, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    if W_INT8:
        scale = tl.load(w_scale_ptr + expert * stride_se + offs_n * stride_sn, mask=col_ok, other=0.0)
        acc = acc * scale.to(tl.float32)[None, :]
    out_ptrs = out_ptr + slots[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def route_align_kernel(
    logits_ptr,  # [M, E] router logits, any float dtype
    slot_weight_ptr,  # [slots] fp32 out: routing weight of each slot
    sorted_slots_ptr,  # [num_m_blocks * BLOCK_M] out: slot ids by expert, padding = num_slots
    block_expert_ptr,  # [num_m_blocks] out: expert of each block, -1 past the end
    num_padded_ptr,  # [1] out: sorted positions in use
    num_slots,  # M * TOP_K
    E,
    num_m_blocks,
    stride_lm,
    stride_le,
    TOP_K: tl.constexpr,
    BLOCK_S: tl.constexpr,  # power of two >= num_slots: the program holds every slot
    BLOCK_E: tl.constexpr,  # power of two >= E
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,  # sorted positions per step of the padding sweep
):
    """Route (fp32 softmax, top-k, renormalise) and align, as ``reference.route`` + ``moe_align``, in one program.

    Works in slot space: row ``s`` is token ``s // TOP_K`` choosing its ``s % TOP_K``-th expert. Every slot
    position is written once (real slots by the scatter, padding by the sweep), so no barrier is needed.
    """
    offs_s = tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    slot_ok = offs_s < num_slots
    e_ok = offs_e < E
    token = (offs_s // TOP_K).to(tl.int64)
    choice = offs_s % TOP_K

    ok = slot_ok[:, None] & e_ok[None, :]
    logits = tl.load(
        logits_ptr + token[:, None] * stride_lm + offs_e[None, :] * stride_le, mask=ok, other=0.0
    )
    logits = tl.where(ok, logits.to(tl.float32), float("-inf"))
    row_max = tl.where(slot_ok, tl.max(logits, axis=1), 0.0)
    exp = tl.where(ok, tl.exp(logits - row_max[:, None]), 0.0)
    probs = exp / tl.where(slot_ok, tl.sum(exp, axis=1), 1.0)[:, None]

    # the TOP_K largest of each row, in order; this row keeps the one of its own rank
    left = tl.where(e_ok[None, :], probs, -1.0)
    expert = tl.zeros((BLOCK_S,), dtype=tl.int32)
    mine = tl.zeros((BLOCK_S,), dtype=tl.float32)
    total = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for rank in tl.static_range(TOP_K):
        best = tl.max(left, axis=1)
        best_e = tl.argmax(left, axis=1)
        expert = tl.where(choice == rank, best_e, expert)
        mine = tl.where(choice == rank, best, mine)
        total += best
        left = tl.where(offs_e[None, :] == best_e[:, None], -1.0, left)
    tl.store(slot_weight_ptr + offs_s, mine / tl.where(slot_ok, total, 1.0), mask=slot_ok)

    # align: each expert's run starts at the padded sum of the runs before it; a slot's rank within its
    # expert counts the earlier slots of that expert (a stable sort by expert)
    hits = ((expert[:, None] == offs_e[None, :]) & ok).to(tl.int32)  # [BLOCK_S, BLOCK_E] one-hot
    counts = tl.sum(hits, axis=0)  # [BLOCK_E]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    rank_in_expert = tl.sum((tl.cumsum(hits, axis=0) - hits) * hits, axis=1)
    dest = tl.sum(hits * padded_start[None, :], axis=1) + rank_in_expert
    tl.store(sorted_slots_ptr + dest, offs_s, mask=slot_ok)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))

    # padding: a position is padding past its expert's slots, or past every run; blocks get their owner
    positions = num_m_blocks * BLOCK_M
    for start in range(0, positions, BLOCK_P):
        pos = start + tl.arange(0, BLOCK_P)
        owner = tl.sum(((padded_end[None, :] <= pos[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
        is_owner = offs_e[None, :] == owner[:, None]
        owner_start = tl.sum(tl.where(is_owner, padded_start[None, :], 0), axis=1)
        owner_count = tl.sum(tl.where(is_owner, counts[None, :], 0), axis=1)
        is_pad = (owner >= E) | (pos - owner_start >= owner_count)
        tl.store(sorted_slots_ptr + pos, tl.zeros_like(pos) + num_slots, mask=(pos < positions) & is_pad)
        first_of_block = (pos % BLOCK_M == 0) & (pos < positions)
        block_owner = tl.where(owner < E, owner, -1)
        tl.store(block_expert_ptr + pos // BLOCK_M, block_owner, mask=first_of_block)


def interpreted() -> bool:
    """Whether these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return not isinstance(w13_silu_kernel, JITFunction)
