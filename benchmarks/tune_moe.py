"""Tune fused_moe's tiles on this GPU and write the JSON table the launcher reads.

    PYTHONUNBUFFERED=1 python3 benchmarks/tune_moe.py                        # Mixtral, bf16, all M buckets
    python3 benchmarks/tune_moe.py --m 1 2 4 8 16 --stop-after-s 300          # a subset, within a time limit
    python3 benchmarks/tune_moe.py --from-bench $OUT/moe-h100.json            # the M values the benchmark failed
    python3 benchmarks/tune_moe.py --smoke --out /tmp/tune                     # CPU interpreter, tiny

For each M it times the table's current config, then every candidate tile config that fits the GPU's shared
memory, then the ``--tma-round`` fastest again with ``USE_TMA=1`` (operand tiles through Hopper's TMA unit),
and keeps the fastest. Compiling dominates a sweep (two to three kernels of seconds each per
candidate, timing takes a fifth of a second), so first every candidate of every M is compiled into triton's
cache by ``--jobs`` processes at once, through the JIT's own ``warmup`` for this GPU's target
(``mixtral_local.kernels.aot.warm_moe``): the timed launches then find their kernels built. Candidates whose
build takes more shared memory than a program may have are dropped without a launch.

The table goes to ``--out`` (default: ``$MIXTRAL_MOE_CONFIG_DIR`` when set, else the package's ``configs/``
folder) as ``E=..,N=..,K=..,dtype=..,device=<GPU>.json``; entries for M values not tuned in this run are kept
from an existing file (a new file starts from the table in use), so the buckets can be tuned over several
runs. Written after every M.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
M_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
PRECOMPILE_SHARE = 0.5  # of --stop-after-s that compiling ahead may take; the JIT compiles what is left


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--m", type=int, nargs="+", default=M_BUCKETS)
    parser.add_argument(
        "--from-bench",
        type=Path,
        metavar="JSON",
        help="tune the M values this benchmarks/moe_kernel.py report judged FAIL (instead of --m)",
    )
    parser.add_argument("--hidden", type=int, default=4096, help="H (K of the table)")
    parser.add_argument("--inter", type=int, default=14336, help="I (N of the table)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=None, help="table directory (default: see above)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop a bucket's sweep after this long")
    parser.add_argument(
        "--stop-after-s", type=float, default=None, help="end the whole run after this long (table kept)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes compiling the candidates ahead of timing (0: the JIT compiles each as it is timed)",
    )
    parser.add_argument(
        "--tma-round",
        type=int,
        default=4,
        help="time the N fastest configs of each M again with USE_TMA=1 (0: no TMA variants)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes, 3 configs"
    )
    return parser.parse_args(argv)


def candidates(m: int, top_k: int, n_experts: int, smem_bytes: int, elem: int) -> list[dict[str, int]]:
    """Tile configs worth timing for M tokens: block heights near the tokens per expert, fitting in smem."""
    tokens_per_expert = max(1, m * top_k // n_experts)
    if tokens_per_expert >= 256:  # compute-bound: big tiles only
        space = ((64, 128), (128, 256), (64, 128), (1, 16), (4, 8), (3, 4, 5))
    else:  # bandwidth-bound: thin tiles, deep pipelines
        block_ms = tuple(b for b in (16, 32, 64, 128) if b <= max(16, 2 * tokens_per_expert))
        space = (block_ms, (32, 64, 128, 256), (64, 128, 256), (1,), (4, 8), (2, 3, 4, 5))
    out = []
    for bm, bn, bk, group, warps, stages in itertools.product(*space):
        if stages * (bm * bk + bk * bn) * elem > smem_bytes:  # A and B tiles per pipeline stage
            continue
        if bm * bn > 128 * 256 or (bm * bn >= 128 * 128 and warps < 8):  # accumulator registers
            continue
        out.append(dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=group,
                        num_warps=warps, num_stages=stages))  # fmt: skip
    return out


def failing_ms(report: dict[str, Any]) -> list[int]:
    """The M values a ``benchmarks/moe_kernel.py`` report judged FAIL for a reason tiles can change.

    A row that is wrong (``incorrect``) is a bug for the tests, not the tuner: it is left out.
    """
    found = []
    for row in report.get("rows", []):
        verdict, reasons = row["verdict"]
        if verdict == "FAIL" and any(reason != "incorrect" for reason in reasons):
            found.append(int(row["m"]))
    return found


class Precompiler:
    """Processes that compile fused-MoE calls into triton's cache ahead of timing; use it in ``with``.

    The workers are spawned, not forked (the caller may hold a CUDA context), and touch no GPU: they compile
    for ``sm_<arch>`` through ``mixtral_local.kernels.aot.warm_moe``. They stay up between ``build`` calls.
    """

    def __init__(self, shape: dict[str, Any], arch: int, jobs: int) -> None:
        self.shape, self.arch = shape, arch
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))

    def __enter__(self) -> Precompiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def build(
        self, plan: Sequence[tuple[int, Any]], timeout_s: float | None
    ) -> dict[tuple[int, Any], int | None]:
        """Compile each (M, MoEConfig) of ``plan``; {(M, config): most shared bytes of its kernels, or None
        where the build failed}. Pairs not built within ``timeout_s``, or lost with a worker, are missing
        (the JIT builds them when they are timed); the builds left over are cancelled."""
        from mixtral_local.kernels.aot import warm_moe

        built: dict[tuple[int, Any], int | None] = {}
        try:
            futures = {
                self.pool.submit(warm_moe, m, config, arch=self.arch, **self.shape): (m, config)
                for m, config in plan
            }
        except BrokenProcessPool:
            print("  the compile processes are gone: the JIT compiles each candidate as it is timed")
            return built
        try:
            for future in as_completed(futures, timeout=timeout_s):
                m, config = futures[future]
                try:
                    built[m, config] = future.result()
                except BrokenProcessPool:  # the pool, not the config, failed: leave it to the JIT
                    print(f"  compile process lost while building M={m} {config}")
                except Exception as err:  # a config that does not compile is no candidate
                    print(f"  build failed: M={m} {config}: {type(err).__name__}: {err}"[:300])
                    built[m, config] = None
        except FuturesTimeout:
            print(f"  compiling ahead stopped at its time limit: {len(built)} of {len(plan)} built")
            for future in futures:
                future.cancel()
        return built


def precompile(
    plan: Sequence[tuple[int, Any]], shape: dict[str, Any], arch: int, jobs: int, timeout_s: float | None
) -> dict[tuple[int, Any], int | None]:
    """``Precompiler.build`` once, in a pool of ``jobs`` processes made for it."""
    with Precompiler(shape, arch, jobs) as pool:
        return pool.build(plan, timeout_s)


def _cache_entries() -> int:
    """Kernels in triton's on-disk cache (one folder each)."""
    from triton import knobs

    folder = Path(knobs.cache.dir)
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def _time_configs(
    m: int,
    configs: Sequence[Any],
    run: Callable[..., object],
    shared: dict[tuple[int, Any], int | None],
    smem: int,
    until: float,
    device: str,
    time_ms: Callable[[Callable[[], object], str, float], float],
) -> list[tuple[float, Any]]:
    """(ms, config) of each config that builds, fits and runs, timed in order until ``until`` (monotonic)."""
    timed = []
    for i, config in enumerate(configs):
        if time.monotonic() > until:
            print(f"M={m}: time is up after {i} of {len(configs)} configs")
            break
        built = shared.get((m, config), 0)
        if built is None or built > smem:  # did not build, or will not launch: no need to try
            continue
        try:
            timed.append((time_ms(functools.partial(run, config=config), device, 0.2), config))
        except Exception as err:  # out of resources, compile failure: not a candidate here
            print(f"M={m}: skip {config.to_dict()}: {type(err).__name__}")
    return timed


def _tma_variants(fastest: Sequence[Any], timed: Sequence[tuple[float, Any]]) -> list[Any]:
    """USE_TMA=1 twins of ``fastest`` that a descriptor can tile (sides <= 256) and were not timed already."""
    seen = {config for _, config in timed}
    twins = [
        dataclasses.replace(config, USE_TMA=1)
        for config in fastest
        if not config.USE_TMA and max(config.BLOCK_SIZE_N, config.BLOCK_SIZE_K) <= 256
    ]
    return [twin for twin in dict.fromkeys(twins) if twin not in seen]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.stop_after_s if args.stop_after_s else float("inf")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.moe_kernel import time_ms
    from mixtral_local.kernels.configs import (
        MoEConfig,
        config_dirs,
        config_file_name,
        device_name,
        load_config_table,
    )
    from mixtral_local.kernels.fused_moe import fused_moe

    ms = args.m
    if args.from_bench:
        ms = failing_ms(json.loads(args.from_bench.read_text()))
        print(f"{args.from_bench} judged FAIL at M = {ms or 'none'}")
        if not ms:
            print("nothing to tune")
            return 0
    if args.smoke:
        device, h, inter, n_experts, dtype = torch.device("cpu"), 40, 48, 4, torch.float32
        ms = [1, 9]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: tuning needs a GPU (or --smoke for the CPU interpreter)")
            return 2
        device, h, inter, n_experts = torch.device("cuda"), args.hidden, args.inter, args.experts
        dtype = getattr(torch, args.dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    smem = 227 * 1024
    if device.type == "cuda":
        smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", smem)

    gpu = device_name(device)
    out_dir = args.out or config_dirs()[0]
    path = out_dir / config_file_name(n_experts, inter, h, dtype, gpu)
    current = load_config_table(n_experts, inter, h, dtype, gpu) or {}  # what the launcher uses now
    # a new file starts as a copy of the table in use: the launcher reads the first file it finds, whole
    table = (
        json.loads(path.read_text()) if path.is_file() else {str(m): c.to_dict() for m, c in current.items()}
    )

    plan: dict[int, list[MoEConfig]] = {}
    for m in ms:
        if args.smoke:  # three distinct small tiles: the sweep's logic, not its results
            dicts = [
                {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "num_stages": 1}
                for bm, bn, bk in ((16, 32, 16), (16, 64, 32), (32, 32, 16))
            ]
        else:
            dicts = candidates(m, args.top_k, n_experts, smem, elem)
        configs = [MoEConfig.from_dict(d) for d in dicts]
        if m in current:  # the incumbent is timed first and kept unless beaten
            configs = [current[m], *(c for c in configs if c != current[m])]
        plan[m] = configs

    shared: dict[tuple[int, MoEConfig], int | None] = {}
    with contextlib.ExitStack() as stack:
        pool: Precompiler | None = None
        if device.type == "cuda" and args.jobs > 0:
            shape = {
                "hidden_size": h,
                "intermediate_size": inter,
                "n_experts": n_experts,
                "top_k": args.top_k,
            }
            major, minor = torch.cuda.get_device_capability(device)
            pool = stack.enter_context(Precompiler(shape | {"dtype": dtype}, 10 * major + minor, args.jobs))
            pairs = [(m, config) for m in ms for config in plan[m]]
            budget = (deadline - time.monotonic()) * PRECOMPILE_SHARE if args.stop_after_s else None
            tick = time.monotonic()
            shared = pool.build(pairs, budget)
            print(
                f"compiled {len(shared)} of {len(pairs)} candidate calls ahead in {time.monotonic() - tick:.0f} s"
                f" ({args.jobs} processes)",
                flush=True,
            )
        cache_before = _cache_entries() if device.type == "cuda" else 0

        gen = torch.Generator(device=device).manual_seed(0)
        w13 = (torch.randn(n_experts, 2 * inter, h, device=device, generator=gen) / h**0.5).to(dtype)
        w2 = (torch.randn(n_experts, h, inter, device=device, generator=gen) / inter**0.5).to(dtype)

        for m in ms:
            if time.monotonic() > deadline:
                print(f"stopped before M={m}: --stop-after-s spent")
                break
            hidden = torch.randn(m, h, device=device, generator=gen).to(dtype)
            logits = torch.randn(m, n_experts, device=device, generator=gen)
            run = functools.partial(fused_moe, hidden, w13, w2, logits, args.top_k)
            bucket_end = time.monotonic() + args.budget_s if args.budget_s else deadline
            timed = _time_configs(
                m, plan[m], run, shared, smem, min(bucket_end, deadline), device.type, time_ms
            )
            fastest = [config for _, config in sorted(timed, key=lambda item: item[0])[: args.tma_round]]
            variants = _tma_variants(fastest, timed)
            if variants and time.monotonic() < deadline:  # round 2: the fastest again, weights through TMA
                if pool is not None:
                    left = None if args.stop_after_s is None else max(1.0, deadline - time.monotonic())
                    shared |= pool.build([(m, v) for v in variants], left)
                timed += _time_configs(m, variants, run, shared, smem, deadline, device.type, time_ms)
            if not timed:
                print(f"M={m}: no config ran")
                continue
            best_ms, best = min(timed, key=lambda item: item[0])
            table[str(m)] = best.to_dict()
            out_dir.mkdir(parents=True, exist_ok=True)
            ordered = dict(sorted(table.items(), key=lambda kv: int(kv[0])))
            path.write_text(json.dumps(ordered, indent=4) + "\n")
            incumbent = [t for t, c in timed if m in current and c == current[m]]
            was = f"; the table's config took {incumbent[0]:.4f} ms" if incumbent else ""
            print(
                f"M={m}: {best_ms:.4f} ms with {best.to_dict()} ({len(timed)} timed{was})",
                flush=True,
            )
        if device.type == "cuda":
            print(f"kernels the JIT compiled while timing: {_cache_entries() - cache_before}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
