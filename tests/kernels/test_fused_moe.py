"""fused_moe against moe_reference and a float64 loop, on CPU through Triton's interpreter (fp32 and fp16).

The interpreter's bf16 ``tl.dot`` is broken in triton 3.9, so bf16 is covered by the GPU tests only.
Shapes are tiny and odd (H=37, I=45) so that every tile has a ragged edge.
"""

from __future__ import annotations

import pytest
import torch

from mixtral_local.kernels.fused_moe import fused_moe
from mixtral_local.kernels.reference import moe_reference

pytestmark = pytest.mark.usefixtures("interpreter")

H, INTER = 37, 45  # odd on purpose
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16}
GROUPED = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 3}
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-2, "rtol": 1e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m", [1, 3, 17, 33, 64])
def test_matches_reference(make_moe_inputs, m, dtype):
    hidden, w13, w2, logits = make_moe_inputs(m, H, INTER, 8, dtype)
    out = fused_moe(hidden, w13, w2, logits, 2, config=SMALL)
    expected = moe_reference(hidden.float(), w13.float(), w2.float(), logits, 2)
    assert out.dtype == dtype and out.shape == (m, H)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_experts", [4, 8])
def test_matches_float64_loop(make_moe_inputs, moe_float64, n_experts, top_k):
    hidden, w13, w2, logits = make_moe_inputs(33, H, INTER, n_experts, seed=1)
    out = fused_moe(hidden, w13, w2, logits, top_k, config=SMALL)
    torch.testing.assert_close(
        out.double(), moe_float64(hidden, w13, w2, logits, top_k), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("m", [17, 64])
def test_grouped_block_order_matches_float64_loop(make_moe_inputs, moe_float64, m):
    hidden, w13, w2, logits = make_moe_inputs(m, H, INTER, 8, seed=2)
    out = fused_moe(hidden, w13, w2, logits, 2, config=GROUPED)
    torch.testing.assert_close(out.double(), moe_float64(hidden, w13, w2, logits, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_skewed_routing_to_one_expert_matches_float64_loop(make_moe_inputs, moe_float64, top_k):
    hidden, w13, w2, logits = make_moe_inputs(64, H, INTER, 8, seed=3)
    logits[:61, 5] += 20.0  # 61 of 64 tokens pick expert 5 first: its run spans four 16-row blocks
    out = fused_moe(hidden, w13, w2, logits, top_k, config=SMALL)
    torch.testing.assert_close(
        out.double(), moe_float64(hidden, w13, w2, logits, top_k), atol=1e-5, rtol=1e-5
    )


def test_experts_without_tokens_never_reach_the_output(make_moe_inputs, moe_float64):
    hidden, w13, w2, logits = make_moe_inputs(17, H, INTER, 8, seed=4)
    idle = [0, 2, 6, 7]
    logits[:, idle] = -1e4  # no token routes to these experts...
    w13[idle] = float("nan")  # ...so their NaN weights must never be read into a result
    w2[idle] = float("nan")
    out = fused_moe(hidden, w13, w2, logits, 2, config=SMALL)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), moe_float64(hidden, w13, w2, logits, 2), atol=1e-5, rtol=1e-5)


def test_chunked_call_matches_one_launch(make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(33, H, INTER, 8, seed=5)
    whole = fused_moe(hidden, w13, w2, logits, 2, config=SMALL)
    chunked = fused_moe(hidden, w13, w2, logits, 2, config=SMALL, max_chunk_slots=20)  # chunks of 10 tokens
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)  # rows meet other rows in a tile


def test_inputs_with_padded_rows_match_contiguous_ones(make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(17, H, INTER, 4, seed=6)
    wide = torch.zeros(17, H + 11)
    wide[:, :H] = hidden
    out = fused_moe(wide[:, :H], w13, w2, logits, 2, config=SMALL)  # row stride H + 11
    torch.testing.assert_close(out, fused_moe(hidden, w13, w2, logits, 2, config=SMALL), atol=1e-6, rtol=1e-6)


def test_router_logits_of_another_dtype_are_routed_in_fp32(make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(3, H, INTER, 8, seed=7)
    logits = logits.to(torch.bfloat16)
    out = fused_moe(hidden, w13, w2, logits, 2, config=SMALL)
    torch.testing.assert_close(out, moe_reference(hidden, w13, w2, logits, 2), atol=1e-5, rtol=1e-5)


def test_without_config_takes_heuristic_tiles(make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(3, H, INTER, 4, seed=8)
    out = fused_moe(hidden, w13, w2, logits, 2)
    torch.testing.assert_close(out, moe_reference(hidden, w13, w2, logits, 2), atol=1e-5, rtol=1e-5)


def test_empty_batch_returns_empty_output(make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(0, H, INTER, 4)
    assert fused_moe(hidden, w13, w2, logits, 2, config=SMALL).shape == (0, H)
