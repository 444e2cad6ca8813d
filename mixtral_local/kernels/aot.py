"""Compile the fused-MoE kernels for a GPU ahead of time, on a machine without one, and read what ptxas made.

A launch specialises its arguments before compiling (an int equal to 1 becomes a constant, one divisible by
16 is marked so, pointers are marked 16-byte aligned), and those marks decide whether loads vectorise and
the K loop is software-pipelined. ``compile_moe`` builds the launches exactly as ``fused_moe`` does, over
meta tensors of the real shapes, and compiles them for the target (sm_90a for an H100 or H200) through the
JIT's own ``warmup``, with a driver that only names the target: the specialisation, and the cache key, are
a real launch's. The report reads the cubin with the ``cuobjdump`` that ships in triton's wheel:

- shared memory per program, registers per thread and stack bytes (register spills go there);
- SASS opcode counts: HGMMA (Hopper's warpgroup tensor-core MMA), HMMA (the older mma.sync), LDGSTS (the
  asynchronous global-to-shared copies of a pipelined loop), UTMALDG (tensor-memory-accelerator loads, with
  ``USE_TMA``: one per operand and stage), LDL/STL (local-memory traffic).

It proves that a tile table builds and that the code is the kind a fast kernel needs; only a GPU can say
how fast it runs (``benchmarks/moe_kernel.py``). Run it as a script::

    python -m mixtral_local.kernels.aot --json build.json          # every shipped table, every M
    python -m mixtral_local.kernels.aot --config '{"BLOCK_SIZE_M": 64, ...}' --m 256
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget

from ._triton_moe import interpreted
from .configs import CONFIG_DIR, MoEConfig, config_file_name, heuristic_config, load_config_table
from .fused_moe import (
    FUSED_ROUTE_MAX_SLOTS,
    KernelLaunch,
    chunk_scratch,
    empty_alignment,
    moe_launches,
    route_align_launch,
)

__all__ = [
    "MAX_SHARED_BYTES",
    "KernelBuild",
    "compile_launch",
    "compile_moe",
    "main",
    "moe_call_launches",
    "shipped_devices",
    "warm_launch",
    "warm_moe",
]

# Shared memory one program may take on Hopper (227 KiB; the other 1 KiB of 228 is the system's).
MAX_SHARED_BYTES = {90: 232_448}

MIXTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "n_experts": 8, "top_k": 2}
#: (E, N, K, dtype) of Mixtral's tile tables, as ``load_config_table`` and ``config_file_name`` take them
MIXTRAL_TABLE = (MIXTRAL["n_experts"], MIXTRAL["intermediate_size"], MIXTRAL["hidden_size"], torch.bfloat16)

#: descriptor loads per K step of each kernel with USE_TMA: x, gate and up tiles; act and w2 tiles
_TMA_LOADS_PER_STEP = {"w13_silu_kernel": 3, "w2_weighted_kernel": 2}

_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class KernelBuild:
    """What ptxas made of one kernel for one config: resources and SASS opcode counts."""

    kernel: str
    arch: int
    m: int
    config: MoEConfig  # the GEMM tiles of the call (the routing program has fixed launch options)
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    stack_bytes: int
    opcodes: collections.Counter[str] = field(repr=False)
    tma: bool = False  # the launch reads its operand tiles through tensor descriptors

    @property
    def gemm(self) -> bool:
        """One of the two grouped GEMMs (not the routing program, which has no loop to pipeline)."""
        return self.kernel != "route_align_kernel"

    @property
    def pipelined(self) -> bool:
        """The K loop's loads run stages ahead: cp.async copies (LDGSTS) or, with TMA, more UTMALDG than one
        per operand (the pipeliner peels ``num_stages - 1`` steps of loads ahead of the loop)."""
        if self.tma:
            return self.opcodes["UTMALDG"] > _TMA_LOADS_PER_STEP.get(self.kernel, 1)
        return self.opcodes["LDGSTS"] > 0

    def problems(self) -> list[str]:
        """What would make this build fail to launch or run slowly on the target; empty when it looks right."""
        found = []
        limit = MAX_SHARED_BYTES.get(self.arch)
        if limit is not None and self.shared_bytes > limit:
            found.append(
                f"needs {self.shared_bytes} B of shared memory, over the {limit} B a program may take"
            )
        if self.stack_bytes or self.opcodes["LDL"] or self.opcodes["STL"]:
            found.append(f"spills registers to local memory ({self.stack_bytes} B of stack)")
        if not self.gemm:
            return found
        if self.num_stages > 1 and not self.pipelined:
            copies = "UTMALDG beyond one per operand" if self.tma else "LDGSTS"
            found.append(f"num_stages={self.num_stages} but the K loop is not pipelined (no {copies})")
        if self.tma and self.arch >= 90 and self.opcodes["UTMALDG"] == 0:
            found.append("USE_TMA but no UTMALDG: the tiles do not go through the TMA unit")
        if self.opcodes["HGMMA"] + self.opcodes["HMMA"] == 0:
            found.append("uses no tensor-core MMA (neither HGMMA nor HMMA)")
        if self.arch == 90 and self.config.BLOCK_SIZE_M >= 64 and self.opcodes["HGMMA"] == 0:
            found.append(f"BLOCK_SIZE_M={self.config.BLOCK_SIZE_M} yet no HGMMA: Hopper's wgmma is not used")
        return found

    def to_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "arch": f"sm_{self.arch}a" if self.arch == 90 else f"sm_{self.arch}",
            "m": self.m,
            "config": self.config.to_dict(),
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "shared_bytes": self.shared_bytes,
            "registers": self.registers,
            "stack_bytes": self.stack_bytes,
            "gemm": self.gemm,
            "pipelined": self.pipelined,
            "tma": self.tma,
            "opcodes": {
                op: self.opcodes[op] for op in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "LDL", "STL")
            },
            "problems": self.problems(),
        }


class _CompileOnlyDriver:
    """What ``JITFunction.run`` asks of the active driver when it only compiles (``warmup``): a target."""

    def __init__(self, target: GPUTarget) -> None:
        self._target = target

    def get_current_target(self) -> GPUTarget:
        return self._target

    def get_current_device(self) -> int:
        return _DEVICE

    def get_current_stream(self, device: int | None = None) -> int:  # noqa: ARG002 (the driver API's)
        return 0


_DEVICE = 0


@contextlib.contextmanager
def _compiling_for(target: GPUTarget, kernel: Any) -> Iterator[None]:
    """Make ``kernel.warmup`` compile for ``target`` whatever GPU this machine has, or none.

    The kernel's per-device binder caches the target it was made for, so it is dropped before and after.
    The driver that was active comes back after (None, on a machine without a GPU: none was made).
    """
    from triton.runtime.driver import driver

    previous = getattr(driver, "_active", None)  # reset_active() would make a driver, and none exists here
    kernel.device_caches.pop(_DEVICE, None)
    driver.set_active(_CompileOnlyDriver(target))
    try:
        yield
    finally:
        driver.set_active(previous)
        kernel.device_caches.pop(_DEVICE, None)


def warm_launch(launch: KernelLaunch, arch: int) -> Any:
    """Compile one launch for ``sm_<arch>`` through the JIT's own ``warmup``, and return the CompiledKernel.

    The specialisation, options and cache key are the ones a real launch of these arguments computes, so
    the cubin lands in triton's cache where the JIT on that GPU will look (``benchmarks/tune_moe.py``
    compiles its candidates this way, many at once, before it times them).
    """
    with _compiling_for(GPUTarget("cuda", arch, 32), launch.kernel):
        return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.constexprs, **launch.options)


def _read_cubin(cubin: bytes) -> tuple[tuple[int, int], collections.Counter[str]]:
    """((registers, stack bytes), SASS opcode counts) of a one-kernel cubin, via triton's cuobjdump."""
    from triton import knobs

    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)

        def dump(flag: str) -> str:
            return subprocess.run(
                [cuobjdump, flag, str(path)], capture_output=True, text=True, check=True
            ).stdout

        resources = _RESOURCES.search(dump("--dump-resource-usage"))
        sass = dump("--dump-sass")
    if resources is None:
        raise RuntimeError("cuobjdump printed no resource usage for the cubin")
    opcodes = collections.Counter(match.group(1) for match in _SASS_LINE.finditer(sass))
    return (int(resources.group(1)), int(resources.group(2))), opcodes


def compile_launch(launch: KernelLaunch, arch: int, m: int, config: MoEConfig) -> KernelBuild:
    """Compile one launch for ``sm_<arch>`` (a for 90) and read the result."""
    compiled = warm_launch(launch, arch)
    (registers, stack), opcodes = _read_cubin(compiled.asm["cubin"])
    return KernelBuild(
        kernel=launch.kernel.__name__,
        arch=arch,
        m=m,
        config=config,
        num_warps=launch.options["num_warps"],
        num_stages=launch.options["num_stages"],
        shared_bytes=int(compiled.metadata.shared),
        registers=registers,
        stack_bytes=stack,
        opcodes=opcodes,
        tma=bool(launch.constexprs.get("USE_TMA", False)),
    )


def moe_call_launches(
    m: int,
    config: MoEConfig,
    *,
    hidden_size: int = MIXTRAL["hidden_size"],
    intermediate_size: int = MIXTRAL["intermediate_size"],
    n_experts: int = MIXTRAL["n_experts"],
    top_k: int = MIXTRAL["top_k"],
    dtype: torch.dtype = torch.bfloat16,
    int8: bool = False,
) -> tuple[KernelLaunch, ...]:
    """The launches of one ``fused_moe`` call of M tokens, over meta tensors of these shapes (fp32 logits).

    The routing program first when M * top_k <= FUSED_ROUTE_MAX_SLOTS (as the launcher runs it), then w13, w2.
    ``int8``: int8 expert weights with row scales in ``dtype`` (the ``W_INT8`` build).
    """
    if interpreted():
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set: the kernels were built for the interpreter, not compiled"
        )

    def meta(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=kind, device="meta")

    num_slots = m * top_k
    block_m = config.BLOCK_SIZE_M
    align = empty_alignment(num_slots, n_experts, block_m, "meta")
    slot_weights = meta(num_slots, kind=torch.float32)
    hidden = meta(m, hidden_size)
    weights = torch.int8 if int8 else dtype
    w13 = meta(n_experts, 2 * intermediate_size, hidden_size, kind=weights)
    w2 = meta(n_experts, hidden_size, intermediate_size, kind=weights)
    scales = (meta(n_experts, 2 * intermediate_size), meta(n_experts, hidden_size)) if int8 else None
    sorted_hidden, act, per_slot = chunk_scratch(hidden, w13, w2, align, config, top_k)  # as fused_moe
    launches = moe_launches(hidden, w13, w2, slot_weights, align, config, act, per_slot, sorted_hidden, scales)
    if num_slots <= FUSED_ROUTE_MAX_SLOTS:
        logits = meta(m, n_experts, kind=torch.float32)
        launches = (route_align_launch(logits, top_k, block_m, slot_weights, align), *launches)
    return launches


def compile_moe(m: int, config: MoEConfig, *, arch: int = 90, **shape: Any) -> tuple[KernelBuild, ...]:
    """The kernels of one ``fused_moe`` call of M tokens, compiled for ``sm_<arch>`` without a GPU and read.

    ``shape`` takes ``moe_call_launches``'s keywords (Mixtral's shape by default).
    """
    return tuple(compile_launch(launch, arch, m, config) for launch in moe_call_launches(m, config, **shape))


def warm_moe(m: int, config: MoEConfig, *, arch: int = 90, **shape: Any) -> int:
    """Compile one call's kernels into triton's cache for ``sm_<arch>``; returns the most shared memory one
    of them takes (bytes), so a caller can drop a config that will not launch."""
    compiled = [warm_launch(launch, arch) for launch in moe_call_launches(m, config, **shape)]
    return max(int(kernel.metadata.shared) for kernel in compiled)


def _configs(device: str) -> dict[int, MoEConfig]:
    """{M: config} of ``device``'s shipped table for Mixtral's shape, or of the heuristic at typical M."""
    if device == "heuristic":
        e, k = MIXTRAL["n_experts"], MIXTRAL["top_k"]
        return {m: heuristic_config(m, e, k) for m in (1, 16, 64, 256, 4096)}
    table = load_config_table(*MIXTRAL_TABLE, device)
    if table is None:
        raise SystemExit(f"no shipped table for {device!r} in {CONFIG_DIR}")
    return dict(table)


def shipped_devices() -> list[str]:
    """The devices with a shipped table for Mixtral's shape, by file name."""
    prefix = config_file_name(*MIXTRAL_TABLE, "").removesuffix(".json")
    return sorted(
        path.name.removeprefix(prefix).removesuffix(".json") for path in CONFIG_DIR.glob(prefix + "*.json")
    )


_HEADER = (
    f"{'M':>5} {'kernel':<19} {'tile MxNxK':>12} {'w':>2} {'st':>2} {'shared':>7} {'regs':>4} {'stack':>5} "
    f"{'HGMMA':>5} {'HMMA':>5} {'LDGSTS':>6} {'UTMALDG':>7}  problems"
)


def _row(build: KernelBuild) -> str:
    c, ops = build.config, build.opcodes
    tile = f"{c.BLOCK_SIZE_M}x{c.BLOCK_SIZE_N}x{c.BLOCK_SIZE_K}" if build.gemm else "-"
    return (
        f"{build.m:>5} {build.kernel:<19} {tile:>12} {build.num_warps:>2} {build.num_stages:>2} {build.shared_bytes:>7} "
        f"{build.registers:>4} {build.stack_bytes:>5} {ops['HGMMA']:>5} {ops['HMMA']:>5} {ops['LDGSTS']:>6} "
        f"{ops['UTMALDG']:>7}  "
        f"{'; '.join(build.problems()) or '-'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixtral_local.kernels.aot",
        description="Compile the fused-MoE kernels for sm_90a without a GPU and report what ptxas made; "
        "exit 1 when a build has a problem.",
    )
    parser.add_argument("--device", nargs="+", default=None,
                        help="whose tables (config-file device names, or 'heuristic'); default: every shipped one")  # fmt: skip
    parser.add_argument(
        "--config", type=json.loads, help="one MoEConfig as JSON instead of the tables (use --m)"
    )
    parser.add_argument("--m", type=int, nargs="+", help="only these M (with --config: the M to build at)")
    parser.add_argument(
        "--distinct", action="store_true", help="build each distinct config once, at its largest M"
    )
    parser.add_argument("--int8", action="store_true", help="the int8-weight build (W_INT8) of each config")
    parser.add_argument("--json", type=Path, help="write the builds here as JSON")
    args = parser.parse_args(argv)

    if args.config is not None:
        config = MoEConfig.from_dict(args.config)
        plan = [(m, config) for m in args.m or [1]]
    else:
        plan = []
        for device in args.device or shipped_devices():
            table = _configs(device)
            plan += [(m, table[m]) for m in sorted(table) if not args.m or m in args.m]
    if args.distinct:
        largest = {config: m for m, config in sorted(plan, key=lambda item: item[0])}
        plan = sorted(((m, config) for config, m in largest.items()), key=lambda item: item[0])
    plan = list(dict.fromkeys(plan))

    rows = []
    print(_HEADER)
    for m, config in plan:
        for build in compile_moe(m, config, int8=args.int8):
            print(_row(build))
            rows.append(build.to_dict())
    if args.json:
        meta = {"triton": triton.__version__, "shape": MIXTRAL, "dtype": "bfloat16", "int8_weights": args.int8}
        args.json.write_text(json.dumps({"meta": meta, "builds": rows}, indent=2) + "\n")
    return 1 if any(row["problems"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
