"""fused_moe on a CUDA GPU: bf16 and fp16 at Mixtral's shapes, tuned tables, int64 offsets, chunking.

Run with ``pytest tests/kernels -m gpu``; every test here skips without CUDA. Low-precision results are
judged against an fp32 reference: the kernel may err at most twice as much as ``moe_reference`` does in the
same dtype (both round the same inputs; the kernel accumulates in fp32 and rounds fewer times).
"""

from __future__ import annotations

import pytest
import torch

from mixtral_local.kernels import resolve_moe_backend
from mixtral_local.kernels.configs import device_name, get_config
from mixtral_local.kernels.fused_moe import fused_moe
from mixtral_local.kernels.reference import moe_reference

pytestmark = pytest.mark.gpu

MIXTRAL_H, MIXTRAL_I, MIXTRAL_E = 4096, 14336, 8


def _assert_no_worse_than_reference(out, hidden, w13, w2, logits, top_k):
    exact = moe_reference(hidden.float(), w13.float(), w2.float(), logits, top_k)
    ref_err = (moe_reference(hidden, w13, w2, logits, top_k).float() - exact).abs().max().item()
    err = (out.float() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, f"fused error {err:.3g} vs reference error {ref_err:.3g}"


@pytest.fixture(scope="module")
def mixtral_weights():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(MIXTRAL_E, 2 * MIXTRAL_I, MIXTRAL_H, device="cuda", generator=gen) / MIXTRAL_H**0.5
    w2 = torch.randn(MIXTRAL_E, MIXTRAL_H, MIXTRAL_I, device="cuda", generator=gen) / MIXTRAL_I**0.5
    return w13.bfloat16(), w2.bfloat16()


@pytest.mark.parametrize("m", [1, 2, 16, 64, 300, 2048])
def test_bf16_mixtral_shapes_match_reference(cuda, mixtral_weights, m):
    w13, w2 = mixtral_weights
    hidden = torch.randn(m, MIXTRAL_H, device=cuda, dtype=torch.bfloat16)
    logits = torch.randn(m, MIXTRAL_E, device=cuda)
    out = fused_moe(hidden, w13, w2, logits, 2)  # tiles from the shipped table (or the heuristic)
    _assert_no_worse_than_reference(out, hidden, w13, w2, logits, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("m", [1, 3, 17, 33, 64])
def test_odd_shapes_match_reference(cuda, make_moe_inputs, m, top_k, dtype):
    hidden, w13, w2, logits = make_moe_inputs(m, 129, 211, 8, dtype, cuda)
    _assert_no_worse_than_reference(fused_moe(hidden, w13, w2, logits, top_k), hidden, w13, w2, logits, top_k)


@pytest.mark.parametrize("use_tma", [0, 1], ids=["pointers", "tma"])
@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "num_warps": 4, "num_stages": 4},
        {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8, "num_warps": 4},
        {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8},
    ],
    ids=["decode", "medium", "prefill"],
)
def test_every_tile_shape_of_the_tables_matches_reference(cuda, make_moe_inputs, config, use_tma):
    # I = 712: gate tiles run past I into the up rows; H = 1000: K tiles end ragged
    hidden, w13, w2, logits = make_moe_inputs(257, 1000, 712, 8, torch.bfloat16, cuda)
    out = fused_moe(hidden, w13, w2, logits, 2, config=config | {"USE_TMA": use_tma})
    _assert_no_worse_than_reference(out, hidden, w13, w2, logits, 2)


@pytest.mark.parametrize("m", [1, 16, 4096])
def test_bf16_mixtral_shapes_with_tma_weight_tiles_match_reference(cuda, mixtral_weights, m):
    w13, w2 = mixtral_weights
    hidden = torch.randn(m, MIXTRAL_H, device=cuda, dtype=torch.bfloat16)
    logits = torch.randn(m, MIXTRAL_E, device=cuda)
    config = get_config(m, MIXTRAL_E, MIXTRAL_I, MIXTRAL_H, 2, torch.bfloat16, device_name(cuda))
    out = fused_moe(hidden, w13, w2, logits, 2, config=config.to_dict() | {"USE_TMA": 1})
    _assert_no_worse_than_reference(out, hidden, w13, w2, logits, 2)


def test_bf16_skewed_routing_matches_reference(cuda, make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(512, 512, 384, 8, torch.bfloat16, cuda)
    logits[:500, 6] += 20.0
    _assert_no_worse_than_reference(fused_moe(hidden, w13, w2, logits, 2), hidden, w13, w2, logits, 2)


def test_expert_offsets_past_int32_are_addressed(cuda):
    h, inter, n_experts = 1024, 512, 3
    stride_e = 2**30 + 2**20  # expert 2 starts past 2**31 elements: int32 offsets would wrap
    if torch.cuda.get_device_properties(cuda).total_memory < 3 * stride_e * 2 + 2**30:
        pytest.skip("needs about 7 GB of GPU memory")
    storage = torch.zeros(3 * stride_e, device=cuda, dtype=torch.bfloat16)
    w13 = storage.as_strided((n_experts, 2 * inter, h), (stride_e, h, 1))
    w13[2] = torch.randn(2 * inter, h, device=cuda, dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(n_experts, h, inter, device=cuda, dtype=torch.bfloat16) / inter**0.5
    hidden = torch.randn(8, h, device=cuda, dtype=torch.bfloat16)
    logits = torch.zeros(8, n_experts, device=cuda)
    logits[:, 2] = 10.0  # every token to expert 2
    out = fused_moe(hidden, w13, w2, logits, 1)
    assert out.abs().max() > 0
    _assert_no_worse_than_reference(out, hidden, w13, w2, logits, 1)


def test_chunked_large_batch_matches_one_launch(cuda, make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(40000, 128, 96, 8, torch.bfloat16, cuda)  # 80000 slots
    chunked = fused_moe(hidden, w13, w2, logits, 2)  # default chunks of 65536 slots
    whole = fused_moe(hidden, w13, w2, logits, 2, max_chunk_slots=80000)
    torch.testing.assert_close(chunked, whole, atol=1e-2, rtol=1e-2)


def test_auto_backend_on_cuda_is_the_fused_kernel(cuda):
    name, fn = resolve_moe_backend("auto", cuda)
    assert (name, fn) == ("triton", fused_moe)


@pytest.mark.parametrize("m", [1, 2, 5, 16, 64, 128])
def test_fused_routing_matches_torch_routing_and_align(cuda, m):
    from mixtral_local.kernels.fused_moe import empty_alignment, moe_align, route_align_launch
    from mixtral_local.kernels.reference import route

    # fp32 logits: no ties, so the order of equal choices can't differ
    logits = torch.randn(m, MIXTRAL_E, device=cuda)
    align = empty_alignment(2 * m, MIXTRAL_E, 16, cuda)
    for buffer in align:
        buffer.fill_(-7)  # poison: every position must be written by the kernel
    weights = torch.full((2 * m,), float("nan"), device=cuda)
    route_align_launch(logits, 2, 16, weights, align)()

    want_weights, ids = route(logits, 2)
    want = moe_align(ids, MIXTRAL_E, 16)
    for got, expected in zip(align, want, strict=True):
        assert got.tolist() == expected.tolist()
    torch.testing.assert_close(weights, want_weights.reshape(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 16, 300, 2048])
def test_int8_experts_at_mixtral_shapes_match_reference(cuda, mixtral_weights, m):
    from mixtral_local.kernels.reference import dequantize_rows, quantize_rows

    w13, w2 = mixtral_weights
    (q13, s13), (q2, s2) = quantize_rows(w13, torch.bfloat16), quantize_rows(w2, torch.bfloat16)
    hidden = torch.randn(m, MIXTRAL_H, device=cuda, dtype=torch.bfloat16)
    logits = torch.randn(m, MIXTRAL_E, device=cuda)
    out = fused_moe(hidden, q13, q2, logits, 2, w13_scale=s13, w2_scale=s2)
    # against the float weights the int8 rows stand for: the kernel adds no error of its own beyond bf16's
    f13, f2 = dequantize_rows(q13, s13, torch.bfloat16), dequantize_rows(q2, s2, torch.bfloat16)
    _assert_no_worse_than_reference(out, hidden, f13, f2, logits, 2)
