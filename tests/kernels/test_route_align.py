"""route_align_kernel (routing + alignment in one program) gives what reference.route + moe_align give.

Run on CPU through Triton's interpreter. The alignment must match position for position (both sort stably
by expert); the slot weights to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from mixtral_local.kernels.fused_moe import (
    FUSED_ROUTE_MAX_SLOTS,
    MoEAlignment,
    empty_alignment,
    fused_moe,
    moe_align,
    route_align_launch,
)
from mixtral_local.kernels.reference import moe_reference, route

pytestmark = pytest.mark.usefixtures("interpreter")


def _fused(logits: torch.Tensor, top_k: int, block_m: int) -> tuple[torch.Tensor, MoEAlignment]:
    m, n_experts = logits.shape
    align = empty_alignment(m * top_k, n_experts, block_m, "cpu")
    for buffer in align:
        buffer.fill_(-7)  # poison: every position must be written by the kernel
    weights = torch.full((m * top_k,), float("nan"))
    route_align_launch(logits, top_k, block_m, weights, align)()
    return weights, align


def _expected(logits: torch.Tensor, top_k: int, block_m: int) -> tuple[torch.Tensor, MoEAlignment]:
    weights, ids = route(logits, top_k)
    return weights.reshape(-1), moe_align(ids, logits.shape[1], block_m)


def _assert_same(logits: torch.Tensor, top_k: int, block_m: int) -> None:
    weights, align = _fused(logits, top_k, block_m)
    want_weights, want = _expected(logits, top_k, block_m)
    assert align.sorted_slots.tolist() == want.sorted_slots.tolist()
    assert align.block_expert.tolist() == want.block_expert.tolist()
    assert align.num_padded.tolist() == want.num_padded.tolist()
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block_m", [4, 16, 64])
@pytest.mark.parametrize(("n_experts", "top_k"), [(8, 2), (8, 1), (4, 3), (5, 2)])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_matches_torch_route_and_align(m, n_experts, top_k, block_m):
    logits = torch.randn(m, n_experts, generator=torch.Generator().manual_seed(m * 31 + n_experts))
    _assert_same(logits, top_k, block_m)


def test_largest_fused_call_matches():
    m = FUSED_ROUTE_MAX_SLOTS // 2  # every slot of top-2 in the one program
    _assert_same(torch.randn(m, 8, generator=torch.Generator().manual_seed(9)), 2, 16)


def test_routing_skewed_to_one_expert_matches():
    logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(10))
    logits[:, 3] += 30.0  # every token's first choice: expert 3's run spans several blocks
    logits[:37, 6] += 15.0  # nearly every token's second
    _assert_same(logits, 2, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_logits_of_any_float_dtype_are_routed_in_fp32(dtype):
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(11)).to(dtype)
    _assert_same(logits, 2, 16)


def test_strided_logits_are_read_through_their_strides():
    wide = torch.randn(8, 12, generator=torch.Generator().manual_seed(12))
    _assert_same(wide[:, 2:10], 2, 16)  # row stride 12
    _assert_same(torch.randn(8, 7, generator=torch.Generator().manual_seed(13)).t(), 2, 4)  # column-major


def test_fused_moe_matches_the_reference_on_both_sides_of_the_fused_routing_limit(make_moe_inputs):
    m = FUSED_ROUTE_MAX_SLOTS // 2 + 3  # top-2: over the limit, so routing runs in torch ops
    hidden, w13, w2, logits = make_moe_inputs(m, 21, 19, 8, seed=14)
    config = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16}
    expected = moe_reference(hidden, w13, w2, logits, 2)
    torch.testing.assert_close(
        fused_moe(hidden, w13, w2, logits, 2, config=config), expected, atol=1e-5, rtol=1e-5
    )
    chunked = fused_moe(hidden, w13, w2, logits, 2, config=config, max_chunk_slots=FUSED_ROUTE_MAX_SLOTS)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)  # first chunk fused, second too
