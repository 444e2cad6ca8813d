"""The shipped tile tables build for Hopper (sm_90a) without a GPU, into the code a fast kernel needs.

``python -m mixtral_local.kernels.aot`` compiles the kernels with triton's ptxas and reads the cubin with its
cuobjdump. It runs in a child process: this one has TRITON_INTERPRET=1 (see conftest.py), under which the
kernels are built for the interpreter and cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from mixtral_local.kernels.aot import MIXTRAL_TABLE, shipped_devices  # noqa: E402
from mixtral_local.kernels.configs import MoEConfig, load_config_table  # noqa: E402

REPO = Path(__file__).parents[2]
SHARED_LIMIT = 232_448  # bytes one program may take on an H100/H200


def _tools_present() -> bool:
    from triton import knobs

    return all(Path(tool.path).is_file() for tool in (knobs.nvidia.ptxas, knobs.nvidia.cuobjdump))


pytestmark = pytest.mark.skipif(not _tools_present(), reason="triton's wheel ships no ptxas/cuobjdump here")


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    cache = tmp_path_factory.mktemp("triton-cache")  # shared by this module's builds

    def run(*args: str) -> tuple[int, list[dict], str]:
        out = tmp_path_factory.mktemp("aot") / "builds.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
            "TRITON_CACHE_DIR": str(cache)
        }
        command = [
            sys.executable,
            "-W",
            "ignore",
            "-m",
            "mixtral_local.kernels.aot",
            *args,
            "--json",
            str(out),
        ]
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
        return done.returncode, json.loads(out.read_text())["builds"], done.stdout

    return run


def _shipped_configs() -> set[MoEConfig]:
    return {
        config
        for device in shipped_devices()
        for config in load_config_table(*MIXTRAL_TABLE, device).values()
    }


def test_every_shipped_config_builds_for_sm90a_pipelined_without_spills(aot):
    rc, builds, table = aot("--distinct", "--device", "heuristic", *shipped_devices())
    assert rc == 0, table
    assert len(shipped_devices()) >= 2  # the H100 and H200 tables

    built = {MoEConfig.from_dict(b["config"]) for b in builds}
    assert _shipped_configs() <= built
    assert {b["kernel"] for b in builds} == {"route_align_kernel", "w13_silu_kernel", "w2_weighted_kernel"}
    for b in builds:
        if not b["gemm"]:  # the routing program: one small block, no loop to pipeline, no MMA
            assert b["stack_bytes"] == 0 and b["problems"] == [], b
            continue
        config = MoEConfig.from_dict(b["config"])
        where = f"{b['kernel']} {b['config']}"
        assert b["arch"] == "sm_90a"
        assert b["shared_bytes"] <= SHARED_LIMIT, where
        assert b["stack_bytes"] == 0 and b["opcodes"]["LDL"] == b["opcodes"]["STL"] == 0, where
        assert b["pipelined"], where  # every shipped config has num_stages > 1
        if config.USE_TMA:  # operand tiles come through the tensor-memory accelerator, not cp.async
            assert b["opcodes"]["UTMALDG"] > 0, where
        else:
            assert b["opcodes"]["LDGSTS"] > 0, where
        if config.BLOCK_SIZE_M >= 64:  # big tiles: Hopper's warpgroup MMA
            assert b["opcodes"]["HGMMA"] > 0, where
        else:  # decode tiles are too thin for wgmma; mma.sync reads them at memory speed
            assert b["opcodes"]["HMMA"] > 0, where
        assert b["problems"] == [], where


def test_a_tile_too_big_for_shared_memory_is_flagged(aot):
    config = {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 128, "num_warps": 8, "num_stages": 4}
    rc, builds, table = aot("--config", json.dumps(config), "--m", "4096")

    assert rc == 1, table
    assert [b["kernel"] for b in builds] == ["w13_silu_kernel", "w2_weighted_kernel"]  # M=4096: torch routing
    for b in builds:
        assert b["shared_bytes"] > SHARED_LIMIT
        assert any("shared memory" in problem for problem in b["problems"])


def test_one_stage_builds_no_async_copies(aot):
    config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "num_warps": 4, "num_stages": 1}
    rc, builds, table = aot("--config", json.dumps(config), "--m", "256")

    assert rc == 0, table
    assert [b["kernel"] for b in builds] == [
        "w13_silu_kernel",
        "w2_weighted_kernel",
    ]  # 512 slots: torch routing
    for b in builds:
        assert not b["pipelined"] and b["opcodes"]["LDGSTS"] == 0, b
        assert b["opcodes"]["HGMMA"] > 0, b


def test_compiling_refuses_interpreted_kernels():
    from mixtral_local.kernels import _triton_moe
    from mixtral_local.kernels.aot import compile_moe

    if not _triton_moe.interpreted():
        pytest.skip("kernels are compiled in this process")
    config = MoEConfig(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_moe(1, config, dtype=torch.float16)


_CACHE_HIT_CHILD = """
import json, sys
from pathlib import Path
import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from benchmarks.tune_moe import precompile
from mixtral_local.kernels import aot
from mixtral_local.kernels.configs import MoEConfig

shape = {"hidden_size": 64, "intermediate_size": 96, "n_experts": 4, "top_k": 2, "dtype": torch.float16}
ahead = [(1, MoEConfig(16, 32, 16, num_stages=2)), (9, MoEConfig(16, 64, 32, num_stages=2))]
late = (9, MoEConfig(32, 32, 16, num_stages=2))
entries = lambda: sum(1 for _ in Path(knobs.cache.dir).iterdir())

def launch_all(m, config):
    # the launches fused_moe makes, through KernelLaunch.__call__ (a real launch, not warmup); the driver
    # only names sm_90, so the JIT finds or compiles the kernel, then fails to launch it: no GPU here
    failures = []
    for launch in aot.moe_call_launches(m, config, **shape):
        with aot._compiling_for(GPUTarget("cuda", 90, 32), launch.kernel):
            try:
                launch()
            except Exception as err:
                failures.append(type(err).__name__)
    return failures

built = precompile(ahead, shape, 90, 2, None)
after_precompile = entries()
failures = [launch_all(m, c) for m, c in ahead]
after_launches = entries()
launch_all(*late)
print(json.dumps({"built": [built[p] for p in ahead], "after_precompile": after_precompile,
                  "after_launches": after_launches, "after_late": entries(), "failures": failures}))
"""


def test_kernels_compiled_ahead_by_tune_moe_are_what_a_launch_looks_up(tmp_path):
    """tune_moe compiles its candidates in worker processes before timing them; the launches must then
    find those kernels in triton's cache (same specialisation, same key) instead of compiling again."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "TRITON_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _CACHE_HIT_CHILD],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert all(isinstance(shared, int) and 0 < shared <= SHARED_LIMIT for shared in report["built"])
    assert report["after_precompile"] >= 6  # route_align, w13 and w2 for each M
    assert report["after_launches"] == report["after_precompile"], "a launch compiled what was built ahead"
    assert report["after_late"] > report["after_launches"]  # a config not built ahead does compile
    assert all(report["failures"]), "each launch should fail only for want of a GPU"


def test_use_tma_builds_load_every_tile_through_the_tma_unit_stages_ahead(aot):
    config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "num_warps": 4, "num_stages": 3}
    rc, with_tma, table = aot("--config", json.dumps(config | {"USE_TMA": 1}), "--m", "256")
    assert rc == 0, table
    rc, without, table = aot("--config", json.dumps(config), "--m", "256")
    assert rc == 0, table
    rc, one_stage, table = aot("--config", json.dumps(config | {"USE_TMA": 1, "num_stages": 1}), "--m", "256")
    assert rc == 0, table

    loads_per_step = {"w13_silu_kernel": 3, "w2_weighted_kernel": 2}  # x, gate, up; act, w2
    for b in with_tma:  # 3 stages: the pipeliner issues two steps of loads ahead of the loop's own
        assert b["tma"] and b["pipelined"], b
        assert b["opcodes"]["UTMALDG"] == 3 * loads_per_step[b["kernel"]], b
        assert b["opcodes"]["LDGSTS"] == 0, b  # no operand is left to cp.async
        assert b["opcodes"]["HGMMA"] > 0 and b["problems"] == [], b
    for b in one_stage:
        assert b["opcodes"]["UTMALDG"] == loads_per_step[b["kernel"]] and not b["pipelined"], b
    for b in without:
        assert not b["tma"] and b["opcodes"]["UTMALDG"] == 0 and b["opcodes"]["LDGSTS"] > 0, b


@pytest.mark.parametrize(
    ("m", "config", "mma"),
    [
        (16, {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "num_warps": 4, "num_stages": 4}, "HMMA"),
        (4096, {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "num_warps": 8, "num_stages": 4},
         "HGMMA"),
    ],
    ids=["decode", "prefill"],
)
def test_int8_weight_builds_widen_in_registers_and_keep_the_tensor_cores(aot, m, config, mma):
    rc, builds, table = aot("--int8", "--config", json.dumps(config), "--m", str(m))

    assert rc == 0, table
    gemms = [b for b in builds if b["gemm"]]
    assert [b["kernel"] for b in gemms] == ["w13_silu_kernel", "w2_weighted_kernel"]
    for b in gemms:
        assert not b["tma"]  # int8 weights take the pointer loads
        assert b["stack_bytes"] == 0 and b["pipelined"], b
        assert b["opcodes"][mma] > 0, b
        assert b["problems"] == [], b
