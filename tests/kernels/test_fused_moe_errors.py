"""fused_moe refuses inputs the kernels cannot take, with a ValueError that says why (checked before launch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mixtral_local.kernels.fused_moe import fused_moe

M, H, INTER, E = 5, 12, 20, 4


def _inputs() -> dict[str, object]:
    return {
        "hidden": torch.randn(M, H),
        "w13": torch.randn(E, 2 * INTER, H),
        "w2": torch.randn(E, H, INTER),
        "router_logits": torch.randn(M, E),
        "top_k": 2,
    }


BAD_INPUTS = {
    "hidden not 2-D": ({"hidden": torch.randn(1, M, H)}, "hidden must be 2-D"),
    "w13 not 3-D": ({"w13": torch.randn(2 * INTER, H)}, "w13 and w2 must be 3-D"),
    "w2 not 3-D": ({"w2": torch.randn(H, INTER)}, "w13 and w2 must be 3-D"),
    "w13 rows odd": ({"w13": torch.randn(E, 2 * INTER + 1, H)}, "rows are odd"),
    "w13 hidden size": ({"w13": torch.randn(E, 2 * INTER, H + 1)}, "does not match hidden size"),
    "w2 shape": ({"w2": torch.randn(E, H, INTER + 1)}, "w2 must be"),
    "w2 experts": ({"w2": torch.randn(E + 1, H, INTER)}, "w2 must be"),
    "router_logits tokens": ({"router_logits": torch.randn(M + 1, E)}, "router_logits must be"),
    "router_logits experts": ({"router_logits": torch.randn(M, E + 1)}, "router_logits must be"),
    "top_k zero": ({"top_k": 0}, "top_k must be"),
    "top_k above E": ({"top_k": E + 1}, "top_k must be"),
    "top_k not int": ({"top_k": 2.0}, "top_k must be"),
    "hidden float64": (
        {"hidden": torch.randn(M, H, dtype=torch.float64)},
        "float16, bfloat16 or float32",
    ),
    "weights of another dtype": ({"w2": torch.randn(E, H, INTER, dtype=torch.float16)}, "must share a dtype"),
    "integer router_logits": ({"router_logits": torch.zeros(M, E, dtype=torch.long)}, "floating point"),
    "device mismatch": ({"router_logits": torch.randn(M, E, device="meta")}, "one device"),
    "hidden strided columns": ({"hidden": torch.randn(H, M).t()}, "hidden must be contiguous in its last"),
    "w13 strided columns": ({"w13": torch.randn(E, H, 2 * INTER).transpose(1, 2)}, "w13 must be contiguous"),
    "w2 strided columns": ({"w2": torch.randn(E, INTER, H).transpose(1, 2)}, "w2 must be contiguous"),
}


@pytest.mark.parametrize(("change", "reason"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_raises_value_error_with_reason(change, reason):
    args = _inputs() | change
    with pytest.raises(ValueError, match=reason):
        fused_moe(**args)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"BLOCK_SIZE_M": 24, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16}, "BLOCK_SIZE_M must be a power of two"),
        ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16}, "BLOCK_SIZE_N must be"),
        ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 8}, "BLOCK_SIZE_K must be"),
        ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32}, "incomplete MoE config"),
        (
            {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "split_k": 2},
            "unknown MoE config keys",
        ),
    ],
    ids=["block_m not power of two", "block_n below 32", "block_k below 16", "missing key", "unknown key"],
)
def test_bad_config_raises_value_error_with_reason(config, reason):
    with pytest.raises(ValueError, match=reason):
        fused_moe(**_inputs(), config=config)


@pytest.mark.usefixtures("interpreter")  # checked once the inputs are known to launch
def test_chunk_smaller_than_one_token_raises_value_error():
    with pytest.raises(ValueError, match="max_chunk_slots must hold"):
        fused_moe(**_inputs(), max_chunk_slots=1)


def test_cpu_tensors_without_interpreter_raise_value_error():
    code = (
        "import torch\n"
        "from mixtral_local.kernels.fused_moe import fused_moe\n"
        "try:\n"
        "    fused_moe(torch.randn(2, 8), torch.randn(2, 16, 8), torch.randn(2, 8, 8), torch.randn(2, 2), 1)\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "fused_moe needs CUDA tensors" in done.stdout, done.stderr
