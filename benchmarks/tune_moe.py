"""Tune fused_moe's tiles on this GPU and write the JSON table the launcher reads.

    PYTHONUNBUFFERED=1 python3 benchmarks/tune_moe.py                        # Mixtral, bf16, all M buckets
    python3 benchmarks/tune_moe.py --m 1 2 4 8 16 --budget-s 240              # a subset, within a time limit
    python3 benchmarks/tune_moe.py --smoke --out /tmp/tune                     # CPU interpreter, tiny

For each M it times every candidate tile config that fits the GPU's shared memory (failures to compile are
skipped) and keeps the fastest. The table goes to ``--out`` (default: the package's ``configs/`` folder) as
``E=..,N=..,K=..,dtype=..,device=<GPU>.json``; entries for M values not tuned in this run are kept from an
existing file, so the buckets can be tuned over several runs. Written after every M.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
M_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--m", type=int, nargs="+", default=M_BUCKETS)
    parser.add_argument("--hidden", type=int, default=4096, help="H (K of the table)")
    parser.add_argument("--inter", type=int, default=14336, help="I (N of the table)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=None, help="table directory (default: package configs/)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop a bucket's sweep after this long")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.moe_kernel import time_ms
    from mixtral_local.kernels.configs import CONFIG_DIR, MoEConfig, config_file_name, device_name
    from mixtral_local.kernels.fused_moe import fused_moe

    if args.smoke:
        device, h, inter, n_experts, dtype = torch.device("cpu"), 40, 48, 4, torch.float32
        ms = [1, 9]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: tuning needs a GPU (or --smoke for the CPU interpreter)")
            return 2
        device, h, inter, n_experts = torch.device("cuda"), args.hidden, args.inter, args.experts
        dtype, ms = getattr(torch, args.dtype), args.m
    elem = torch.tensor([], dtype=dtype).element_size()
    smem = 227 * 1024
    if device.type == "cuda":
        smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", smem)

    out_dir = args.out or CONFIG_DIR
    path = out_dir / config_file_name(n_experts, inter, h, dtype, device_name(device))
    table = json.loads(path.read_text()) if path.is_file() else {}
    gen = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(n_experts, 2 * inter, h, device=device, generator=gen) / h**0.5).to(dtype)
    w2 = (torch.randn(n_experts, h, inter, device=device, generator=gen) / inter**0.5).to(dtype)

    for m in ms:
        hidden = torch.randn(m, h, device=device, generator=gen).to(dtype)
        logits = torch.randn(m, n_experts, device=device, generator=gen)
        configs = candidates(m, args.top_k, n_experts, smem, elem)
        if args.smoke:  # three distinct small tiles: the sweep's logic, not its results
            configs = [
                {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "num_stages": 1}
                for bm, bn, bk in ((16, 32, 16), (16, 64, 32), (32, 32, 16))
            ]
        best: tuple[float, dict[str, int]] | None = None
        start = time.perf_counter()
        for i, config in enumerate(configs):
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                print(f"M={m}: budget spent after {i} of {len(configs)} configs")
                break
            run = functools.partial(
                fused_moe, hidden, w13, w2, logits, args.top_k, config=MoEConfig.from_dict(config)
            )
            try:
                ms_ = time_ms(run, device.type, 0.2)
            except Exception as err:  # out of resources, compile failure: not a candidate here
                print(f"M={m}: skip {config}: {type(err).__name__}")
                continue
            if best is None or ms_ < best[0]:
                best = (ms_, config)
        if best is None:
            print(f"M={m}: no config ran")
            continue
        table[str(m)] = best[1]
        out_dir.mkdir(parents=True, exist_ok=True)
        ordered = dict(sorted(table.items(), key=lambda kv: int(kv[0])))
        path.write_text(json.dumps(ordered, indent=4) + "\n")
        print(f"M={m}: {best[0]:.4f} ms with {best[1]} ({len(configs)} candidates)", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
