"""fused_moe with ``USE_TMA``: every operand tile through a tensor descriptor, on CPU through Triton's interpreter.

H = I = 40 keep every stride 16-byte aligned (the descriptor's rule) while leaving ragged tiles: with 16-wide
K steps H and I end mid-tile, 16-row gate tiles run past I into the up rows (columns never stored), 32-row
w2 tiles run past H (the descriptor reads zeros there), and blocks of 16 sorted positions hold padding rows
(a repeated token whose outputs are never stored).
"""

from __future__ import annotations

import pytest
import torch

from mixtral_local.kernels.configs import MoEConfig
from mixtral_local.kernels.fused_moe import fused_moe, tma_eligible, tma_ready

pytestmark = pytest.mark.usefixtures("interpreter")

H = INTER = 40
TMA = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "USE_TMA": 1}
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-2, "rtol": 1e-2}}


def _uses_tma(hidden, w13, w2, config) -> bool:
    return tma_eligible(MoEConfig.from_dict(config), hidden, w13, w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_descriptor_tiles_match_float64_loop(make_moe_inputs, moe_float64, m, dtype):
    hidden, w13, w2, logits = make_moe_inputs(m, H, INTER, 8, dtype, seed=m)
    assert _uses_tma(hidden, w13, w2, TMA)

    out = fused_moe(hidden, w13, w2, logits, 2, config=TMA)

    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), moe_float64(hidden, w13, w2, logits, 2), **TOL[dtype])


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_experts", [4, 8])
def test_descriptor_tiles_for_every_expert_count_and_top_k(make_moe_inputs, moe_float64, n_experts, top_k):
    hidden, w13, w2, logits = make_moe_inputs(33, H, INTER, n_experts, seed=5)
    config = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2, "USE_TMA": 1}
    out = fused_moe(hidden, w13, w2, logits, top_k, config=config)
    torch.testing.assert_close(
        out.double(), moe_float64(hidden, w13, w2, logits, top_k), atol=1e-5, rtol=1e-5
    )


def test_skewed_routing_and_idle_experts_with_descriptor_tiles(make_moe_inputs, moe_float64):
    hidden, w13, w2, logits = make_moe_inputs(64, H, INTER, 8, seed=6)
    logits[:60, 3] += 20.0  # one expert's run spans four blocks
    idle = [0, 6]
    logits[:, idle] = -1e4
    w13[idle] = float("nan")  # an idle expert's tiles are never read
    w2[idle] = float("nan")

    out = fused_moe(hidden, w13, w2, logits, 2, config=TMA)

    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), moe_float64(hidden, w13, w2, logits, 2), atol=1e-5, rtol=1e-5)


def test_weights_the_descriptor_cannot_address_take_pointer_loads(make_moe_inputs, moe_float64):
    # fp16 rows of 37 elements are 74 bytes: not 16-byte aligned, so no descriptor; same tiles, same answer
    hidden, w13, w2, logits = make_moe_inputs(17, 37, INTER, 8, torch.float16, seed=7)
    assert not tma_ready(w13)
    assert not _uses_tma(hidden, w13, w2, TMA)
    out = fused_moe(hidden, w13, w2, logits, 2, config=TMA)
    torch.testing.assert_close(out.double(), moe_float64(hidden, w13, w2, logits, 2), atol=1e-2, rtol=1e-2)


def test_an_unaligned_expert_stride_takes_pointer_loads(make_moe_inputs, moe_float64):
    hidden, w13, w2, logits = make_moe_inputs(9, H, INTER, 4, seed=8)
    stride_e = 2 * INTER * H + 1  # one spare element between experts: 4-byte, not 16-byte, steps
    storage = torch.zeros(4 * stride_e)
    spaced = storage.as_strided(w13.shape, (stride_e, H, 1))
    spaced.copy_(w13)
    assert not tma_ready(spaced) and tma_ready(w13)
    assert not _uses_tma(hidden, spaced, w2, TMA)
    out = fused_moe(hidden, spaced, w2, logits, 2, config=TMA)
    torch.testing.assert_close(out.double(), moe_float64(hidden, w13, w2, logits, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"USE_TMA": 2}, "USE_TMA must be 0 or 1"),
        ({"BLOCK_SIZE_N": 512}, "<= 256"),
        ({"BLOCK_SIZE_K": 512}, "<= 256"),
    ],
)
def test_tma_configs_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig.from_dict(TMA | change)
