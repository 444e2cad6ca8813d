"""Int8 weight-only experts: ``quantize_rows``, and both MoE paths given int8 weights and their row scales.

Each path with int8 weights must compute exactly what it computes with the float weights those int8 rows stand
for (``dequantize_rows``): the quantization error is the only error. The fused kernel runs in Triton's CPU
interpreter (fp32 and fp16; the interpreter's bf16 dot is broken).
"""

from __future__ import annotations

import pytest
import torch

from mixtral_local.kernels.fused_moe import fused_moe
from mixtral_local.kernels.reference import dequantize_rows, moe_reference, quantize_rows
from mixtral_local.model import moe_one_token

H, INTER = 37, 45  # odd on purpose: every tile has a ragged edge
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16}
GROUPED = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 3}


def quantized(w13, w2, scale_dtype=torch.float32):
    """(q13, s13, q2, s2) and the float weights they stand for."""
    q13, s13 = quantize_rows(w13, scale_dtype)
    q2, s2 = quantize_rows(w2, scale_dtype)
    return (q13, s13, q2, s2), (dequantize_rows(q13, s13, torch.float32), dequantize_rows(q2, s2, torch.float32))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_row_comes_back_within_half_a_step(scale_dtype):
    w = torch.randn(3, 50, 33, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 50)[:, None]
    q, scale = quantize_rows(w, scale_dtype)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == scale_dtype and scale.shape == (3, 50)
    assert int(q.abs().max()) <= 127
    err = (dequantize_rows(q, scale, torch.float32) - w).abs()
    step = scale.float()[..., None]
    # half a step, plus the little that clamping at 127 costs when the scale was rounded down
    assert bool((err <= 0.5 * step * (1 + 2**-7)).all()), float((err / step).max())
    assert int(q.abs().amax(dim=-1).min()) >= 126  # each row uses the whole range


def test_a_row_of_zeros_is_kept_exactly():
    w = torch.randn(4, 8)
    w[2] = 0
    q, scale = quantize_rows(w, torch.float32)
    assert float(scale[2]) == 1.0 and int(q[2].abs().sum()) == 0


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_experts", [4, 8])
@pytest.mark.parametrize("m", [1, 17])
def test_reference_on_int8_equals_reference_on_the_weights_they_stand_for(make_moe_inputs, m, n_experts, top_k):
    hidden, w13, w2, logits = make_moe_inputs(m, H, INTER, n_experts)
    (q13, s13, q2, s2), (f13, f2) = quantized(w13, w2)
    out = moe_reference(hidden, q13, q2, logits, top_k, w13_scale=s13, w2_scale=s2)
    torch.testing.assert_close(out, moe_reference(hidden, f13, f2, logits, top_k), atol=1e-5, rtol=1e-5)
    assert not torch.equal(f13, w13)  # the quantization did change the weights...
    loose = moe_reference(hidden, w13, w2, logits, top_k)
    assert (out - loose).abs().max() < 0.05 * loose.abs().max()  # ...by little


def test_one_token_path_on_int8_equals_reference(make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(1, H, INTER, 8)
    (q13, s13, q2, s2), _ = quantized(w13, w2, torch.bfloat16)
    scales = {"w13_scale": s13, "w2_scale": s2}
    torch.testing.assert_close(moe_one_token(hidden, q13, q2, logits, 2, **scales),
                               moe_reference(hidden, q13, q2, logits, 2, **scales), atol=1e-6, rtol=1e-6)


def test_reference_refuses_one_scale_without_the_other(make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(2, H, INTER, 4)
    (q13, s13, q2, _), _ = quantized(w13, w2)
    with pytest.raises(ValueError, match="both w13_scale and w2_scale"):
        moe_reference(hidden, q13, q2, logits, 2, w13_scale=s13)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m", [1, 3, 17, 33, 64])
def test_fused_on_int8_matches_reference(make_moe_inputs, m, dtype):
    hidden, w13, w2, logits = make_moe_inputs(m, H, INTER, 8, dtype)
    (q13, s13, q2, s2), (f13, f2) = quantized(w13.float(), w2.float(), dtype)
    out = fused_moe(hidden, q13, q2, logits, 2, w13_scale=s13, w2_scale=s2, config=SMALL)
    expected = moe_reference(hidden.float(), f13, f2, logits, 2)
    assert out.dtype == dtype and out.shape == (m, H)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_on_int8_with_skewed_routing_and_grouped_tiles(make_moe_inputs, top_k):
    hidden, w13, w2, logits = make_moe_inputs(40, H, INTER, 4, seed=3)
    logits[:, 1] += 8.0  # nearly every token goes to expert 1; some experts get none
    (q13, s13, q2, s2), (f13, f2) = quantized(w13, w2)
    out = fused_moe(hidden, q13, q2, logits, top_k, w13_scale=s13, w2_scale=s2, config=GROUPED)
    torch.testing.assert_close(out, moe_reference(hidden, f13, f2, logits, top_k), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("interpreter")
def test_fused_on_int8_in_chunks(make_moe_inputs):
    hidden, w13, w2, logits = make_moe_inputs(21, H, INTER, 8, seed=4)
    (q13, s13, q2, s2), (f13, f2) = quantized(w13, w2)
    out = fused_moe(hidden, q13, q2, logits, 2, w13_scale=s13, w2_scale=s2, config=SMALL, max_chunk_slots=10)
    torch.testing.assert_close(out, moe_reference(hidden, f13, f2, logits, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(w13_scale=None, w2_scale=None), "must share a dtype"),
        (lambda a: a.update(w2_scale=None), "both w13_scale and w2_scale"),
        (lambda a: a.update(w13=a["w13"].float()), "must be int8"),
        (lambda a: a.update(w13_scale=a["w13_scale"][:, :-1]), r"w13_scale must be \[E, rows\]"),
        (lambda a: a.update(w2_scale=a["w2_scale"][None]), r"w2_scale must be \[E, rows\]"),
        (lambda a: a.update(w2_scale=a["w2_scale"].to(torch.int32)), "w2_scale must be floating point"),
        (lambda a: a.update(w2_scale=a["w2_scale"].to("meta")), "w2_scale is on meta"),
    ],
    ids=["int8-without-scales", "one-scale", "float-weights-with-scales", "w13-scale-shape", "w2-scale-shape",
         "integer-scale", "scale-device"],
)
def test_fused_refuses_bad_int8_inputs(make_moe_inputs, change, message):
    hidden, w13, w2, logits = make_moe_inputs(3, H, INTER, 4)
    (q13, s13, q2, s2), _ = quantized(w13, w2)
    args = {"hidden": hidden, "w13": q13, "w2": q2, "router_logits": logits, "w13_scale": s13, "w2_scale": s2}
    change(args)
    with pytest.raises(ValueError, match=message):
        fused_moe(**args, top_k=2, config=SMALL)
