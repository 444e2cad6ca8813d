"""Benchmark fused_moe against moe_reference and transformers' Mixtral experts, at Mixtral's shapes.

    PYTHONUNBUFFERED=1 python3 benchmarks/moe_kernel.py --out $OUT      # one GPU run, all M
    python3 benchmarks/moe_kernel.py --smoke                            # CPU, interpreter, tiny shapes

For every M: bf16 correctness of fused_moe and moe_reference against an fp32 reference, the time of
fused_moe, moe_reference and each transformers experts implementation ("eager", "batched_mm", "grouped_mm"),
and fused_moe's achieved bandwidth (bytes of the experts actually touched, plus activations) and TFLOP/s,
set against a device copy and a bf16 matmul measured in the same run. fused_moe and moe_reference are timed
from router logits (routing included); transformers' experts modules are timed given the routing, since
their MoE block routes outside them. An implementation that fails or would not fit in memory is reported,
not fatal. Writes ``moe-<gpu>.json`` and ``moe-<gpu>.md`` under ``--out`` and prints the table.

``--int8`` adds int8 weight-only experts (``quantize_rows``: int8 weights, a bf16 scale per output row): the
fused kernel's ``W_INT8`` build timed at every M beside its bf16 build, its bandwidth over the int8 bytes it
touches, and its error against an fp32 reference on the dequantized weights. A second table, not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIXTRAL_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]
SMOKE_MS = [1, 4, 17, 64]
HF_IMPLS = ["eager", "batched_mm", "grouped_mm"]
BW_TARGET, BW_AIM, BW_MAX_M = 0.75, 0.90, 16  # share of copy bandwidth required at M <= 16
MM_TARGET, MM_AIM, MM_MIN_M = 0.60, 0.75, 4096  # share of bf16 matmul rate required at M >= 4096


@dataclass
class Shapes:
    h: int
    inter: int
    n_experts: int
    top_k: int
    dtype_name: str
    device: str


@dataclass
class Row:
    m: int
    experts_touched: int
    bytes_touched: int
    flops: float
    err_fused: float
    err_reference: float
    correct: bool
    on_gpu: bool
    times_ms: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    int8: dict[str, float] = field(default_factory=dict)  # with --int8: ms, bytes, err, err_reference


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results directory")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, fp32, tiny shapes")
    parser.add_argument("--m", type=int, nargs="+", help="token counts (default: Mixtral's list, or smoke's)")
    parser.add_argument("--impls", nargs="*", default=HF_IMPLS, help="transformers experts implementations")
    parser.add_argument(
        "--time-budget-s", type=float, default=1.0, help="timing budget per implementation and M"
    )
    parser.add_argument("--int8", action="store_true", help="also time int8 weight-only experts (a second table)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], device: str, budget_s: float) -> float:
    """Median milliseconds of ``fn``; on CUDA with events, the L2 flushed before each call."""
    import torch

    fn()  # warm up (compiles Triton kernels)
    if device != "cuda":
        start = time.perf_counter()
        fn()
        reps = max(1, min(5, int(budget_s / max(time.perf_counter() - start, 1e-6))))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    # larger than any L2, and long enough to zero (~0.3 ms) that the host has queued fn's launches before the
    # GPU reaches them: the events then time the GPU's work, not Python's launch overhead
    flush = torch.empty(2**30, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    reps = max(5, min(200, int(budget_s * 1e3 / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def _copy_gbps(device: str, dtype: object, budget_s: float) -> float:
    import torch

    n = 2**29 if device == "cuda" else 2**22  # 1 GiB of bf16 on GPU
    src = torch.ones(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, budget_s)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _matmul_tflops(device: str, dtype: object, budget_s: float) -> float:
    import torch

    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: a @ b, device, budget_s)
    return 2 * n**3 / ms / 1e9


# ---------------------------------------------------------------- peers


def _hf_experts(w13: object, w2: object, shapes: Shapes) -> object:
    """transformers' MixtralExperts holding our weights (no copy)."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(
        hidden_size=shapes.h,
        intermediate_size=shapes.inter,
        num_local_experts=shapes.n_experts,
        num_experts_per_tok=shapes.top_k,
    )
    with torch.device("meta"):
        experts = MixtralExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return experts


def _hf_runner(
    experts: object, impl: str, hidden: object, ids: object, weights: object
) -> Callable[[], object]:
    def run() -> object:
        experts.config._experts_implementation = impl  # type: ignore[attr-defined]
        return experts(hidden, ids, weights)  # type: ignore[operator]

    return run


def _free_bytes(device: str) -> int:
    import torch

    if device != "cuda":
        return 2**34
    free, _ = torch.cuda.mem_get_info()
    return free


# ---------------------------------------------------------------- one M


def _failure(err: Exception) -> str:
    """A failed implementation's note in the table: the exception's type and first line."""
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"


def _bench_m(m: int, shapes: Shapes, weights: dict[str, object], args: argparse.Namespace) -> Row:
    import torch

    from mixtral_local.kernels.fused_moe import fused_moe
    from mixtral_local.kernels.reference import moe_reference, route

    dtype = getattr(torch, shapes.dtype_name)
    gen = torch.Generator(device=shapes.device).manual_seed(m)
    hidden = torch.randn(m, shapes.h, device=shapes.device, generator=gen).to(dtype)
    logits = torch.randn(m, shapes.n_experts, device=shapes.device, generator=gen)
    w13, w2 = weights["w13"], weights["w2"]
    route_w, route_ids = route(logits, shapes.top_k)

    exact = moe_reference(hidden.float(), weights["w13_f32"], weights["w2_f32"], logits, shapes.top_k)
    fused_out = fused_moe(hidden, w13, w2, logits, shapes.top_k)
    ref_out = moe_reference(hidden, w13, w2, logits, shapes.top_k)
    err_fused = (fused_out.float() - exact).abs().max().item()
    err_ref = (ref_out.float() - exact).abs().max().item()
    correct = bool(torch.isfinite(fused_out).all()) and err_fused <= 2 * err_ref + 1e-3
    del fused_out, ref_out

    touched = int(torch.unique(route_ids).numel())
    elem = torch.tensor([], dtype=dtype).element_size()
    per_expert = 3 * shapes.inter * shapes.h * elem
    row = Row(
        m=m,
        experts_touched=touched,
        bytes_touched=touched * per_expert + 2 * m * shapes.h * elem,
        flops=2.0 * m * shapes.top_k * 3 * shapes.inter * shapes.h,
        err_fused=err_fused,
        err_reference=err_ref,
        correct=correct,
        on_gpu=shapes.device == "cuda",
    )

    runners: dict[str, Callable[[], object]] = {
        "fused_moe": lambda: fused_moe(hidden, w13, w2, logits, shapes.top_k),
        "moe_reference": lambda: moe_reference(hidden, w13, w2, logits, shapes.top_k),
    }
    experts = weights.get("hf_experts")
    for impl in args.impls:
        name = f"hf_{impl}"
        if isinstance(experts, str):
            row.notes[name] = experts
            continue
        gathered = m * shapes.top_k * per_expert  # batched_mm gathers one weight copy per slot
        if impl == "batched_mm" and gathered > 0.6 * _free_bytes(shapes.device):
            row.notes[name] = f"skipped: would gather {gathered / 1e9:.0f} GB of weights"
            continue
        runners[name] = _hf_runner(experts, impl, hidden, route_ids, route_w)

    for name, fn in runners.items():
        try:
            with torch.inference_mode():
                if name.startswith("hf_"):  # a peer that computes something else would not be a peer
                    err = (fn().float() - exact).abs().max().item()  # type: ignore[attr-defined]
                    if not err <= 4 * err_ref + 1e-3:
                        row.notes[name] = f"wrong result (max err {err:.2e})"
                        continue
                row.times_ms[name] = time_ms(fn, shapes.device, args.time_budget_s)
        except Exception as err:  # a peer that fails is reported, not fatal
            row.notes[name] = _failure(err)
            if shapes.device == "cuda":
                torch.cuda.empty_cache()
    if "w13_q" in weights:
        _bench_int8(row, hidden, logits, shapes, weights, args)
    return row


def _bench_int8(row: Row, hidden: object, logits: object, shapes: Shapes, weights: dict[str, object],
                args: argparse.Namespace) -> None:
    """Time the fused kernel's int8 build, and measure its error against fp32 on the dequantized weights."""
    import torch

    from mixtral_local.kernels.fused_moe import fused_moe
    from mixtral_local.kernels.reference import moe_reference

    q13, s13, q2, s2 = (weights[k] for k in ("w13_q", "w13_s", "w2_q", "w2_s"))
    k = shapes.top_k
    exact = moe_reference(hidden.float(), weights["w13_dq"], weights["w2_dq"], logits, k)  # type: ignore[attr-defined]
    out = fused_moe(hidden, q13, q2, logits, k, w13_scale=s13, w2_scale=s2)
    ref = moe_reference(hidden, q13, q2, logits, k, w13_scale=s13, w2_scale=s2)
    row.int8["err"] = (out.float() - exact).abs().max().item()
    row.int8["err_reference"] = (ref.float() - exact).abs().max().item()
    del out, ref, exact
    per_expert = 3 * shapes.inter * shapes.h + 3 * shapes.inter * 2  # int8 weights and bf16 row scales
    elem = hidden.element_size()  # type: ignore[attr-defined]
    row.int8["bytes"] = row.experts_touched * per_expert + 2 * row.m * shapes.h * elem
    try:
        with torch.inference_mode():
            row.int8["ms"] = time_ms(lambda: fused_moe(hidden, q13, q2, logits, k, w13_scale=s13, w2_scale=s2),
                                     shapes.device, args.time_budget_s)
    except Exception as err:  # reported, not fatal
        row.notes["fused_int8"] = _failure(err)


def _int8_table(rows: list[Row], copy_gbps: float) -> list[str]:
    head = ["M", "fused int8 ms", "fused bf16 ms", "bf16 / int8", "int8 GB/s (% copy)", "max err int8 / ref int8"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ms, bf16 = row.int8.get("ms"), row.times_ms.get("fused_moe")
        cells = [str(row.m), f"{ms:.3f}" if ms else row.notes.get("fused_int8", "-"),
                 f"{bf16:.3f}" if bf16 else "-", f"{bf16 / ms:.2f}x" if ms and bf16 else "-"]
        if ms:
            gbps = row.int8["bytes"] / ms / 1e6
            cells.append(f"{gbps:.0f} ({gbps / copy_gbps:.0%})")
        else:
            cells.append("-")
        cells.append(f"{row.int8['err']:.2e} / {row.int8['err_reference']:.2e}" if "err" in row.int8 else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------- report


def _verdict(row: Row, copy_gbps: float, mm_tflops: float) -> tuple[str, list[str]]:
    """("PASS" | "FAIL", reasons) for the acceptance rules that apply to this M (speed rules on CUDA only)."""
    fails = []
    if not row.correct:
        fails.append("incorrect")
    if not row.on_gpu:
        return ("FAIL" if fails else "correct (speed not judged off GPU)"), fails
    fused = row.times_ms.get("fused_moe")
    if fused is None:
        return "FAIL", [*fails, "fused_moe did not run"]
    if row.m <= BW_MAX_M and row.bytes_touched / fused / 1e6 < BW_TARGET * copy_gbps:
        fails.append(f"bandwidth < {BW_TARGET:.0%} of copy")
    if row.m >= MM_MIN_M and row.flops / fused / 1e9 < MM_TARGET * mm_tflops:
        fails.append(f"TFLOP/s < {MM_TARGET:.0%} of matmul")
    slower = [n for n, t in row.times_ms.items() if n.startswith("hf_") and t <= fused]
    if slower:
        fails.append("not faster than " + ", ".join(slower))
    return ("FAIL" if fails else "PASS"), fails


def _table(rows: list[Row], impls: list[str], copy_gbps: float, mm_tflops: float) -> list[str]:
    names = ["fused_moe", "moe_reference", *(f"hf_{i}" for i in impls)]
    head = ["M", "experts", *(f"{n} ms" for n in names), "fused GB/s (% copy)", "fused TFLOP/s (% mm)"]
    head += ["max err fused / ref", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.m), str(row.experts_touched)]
        for n in names:
            cells.append(f"{row.times_ms[n]:.3f}" if n in row.times_ms else row.notes.get(n, "-"))
        fused = row.times_ms.get("fused_moe")
        if fused:
            gbps, tflops = row.bytes_touched / fused / 1e6, row.flops / fused / 1e9
            cells += [f"{gbps:.0f} ({gbps / copy_gbps:.0%})", f"{tflops:.1f} ({tflops / mm_tflops:.0%})"]
        else:
            cells += ["-", "-"]
        cells.append(f"{row.err_fused:.2e} / {row.err_reference:.2e}")
        verdict, reasons = _verdict(row, copy_gbps, mm_tflops)
        cells.append(verdict + (": " + "; ".join(reasons) if reasons else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _gpu_slug(name: str) -> str:
    for family in ("H200", "H100", "A100", "L40S"):
        if family in name:
            return family.lower()
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _versions() -> dict[str, str]:
    import torch
    import triton

    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        versions["transformers"] = "not installed"
    return versions


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    sys.path.insert(0, str(REPO))
    import torch

    if args.smoke:
        shapes = Shapes(h=64, inter=96, n_experts=8, top_k=2, dtype_name="float32", device="cpu")
        gpu = "cpu-smoke"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or pass --smoke for the CPU interpreter check")
            return 2
        shapes = Shapes(h=4096, inter=14336, n_experts=8, top_k=2, dtype_name="bfloat16", device="cuda")
        gpu = torch.cuda.get_device_name()
    ms = args.m or (SMOKE_MS if args.smoke else MIXTRAL_MS)
    dtype = getattr(torch, shapes.dtype_name)

    gen = torch.Generator(device=shapes.device).manual_seed(0)
    w13_f32 = (
        torch.randn(shapes.n_experts, 2 * shapes.inter, shapes.h, device=shapes.device, generator=gen)
        / shapes.h**0.5
    )
    w2_f32 = (
        torch.randn(shapes.n_experts, shapes.h, shapes.inter, device=shapes.device, generator=gen)
        / shapes.inter**0.5
    )
    weights: dict[str, object] = {
        "w13": w13_f32.to(dtype),
        "w2": w2_f32.to(dtype),
        "w13_f32": w13_f32,
        "w2_f32": w2_f32,
    }
    if args.int8:
        from mixtral_local.kernels.reference import dequantize_rows, quantize_rows

        for name in ("w13", "w2"):
            q, scale = quantize_rows(weights[name], dtype)  # type: ignore[arg-type]
            weights[f"{name}_q"], weights[f"{name}_s"] = q, scale
            weights[f"{name}_dq"] = dequantize_rows(q, scale, torch.float32)
    try:
        weights["hf_experts"] = _hf_experts(weights["w13"], weights["w2"], shapes)
    except Exception as err:  # reported in the table
        weights["hf_experts"] = f"unavailable: {type(err).__name__}: {err}"[:120]

    copy_gbps = _copy_gbps(shapes.device, dtype, args.time_budget_s)
    mm_tflops = _matmul_tflops(shapes.device, dtype, args.time_budget_s)
    print(f"device {gpu}: copy {copy_gbps:.0f} GB/s, {shapes.dtype_name} matmul {mm_tflops:.3g} TFLOP/s")
    print("\n".join(_table([], args.impls, copy_gbps, mm_tflops)), flush=True)

    rows = []
    for m in ms:
        row = _bench_m(m, shapes, weights, args)
        rows.append(row)
        print(_table([row], args.impls, copy_gbps, mm_tflops)[-1], flush=True)

    command = "PYTHONUNBUFFERED=1 python3 " + shlex.join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
    table = _table(rows, args.impls, copy_gbps, mm_tflops)
    verdicts = [_verdict(r, copy_gbps, mm_tflops)[0] for r in rows]
    overall = "FAIL" if "FAIL" in verdicts else verdicts[0] if args.smoke else "PASS"
    report = {
        "gpu": gpu,
        "command": command,
        "versions": _versions(),
        "shapes": shapes.__dict__,
        "copy_gbps": copy_gbps,
        "matmul_tflops": mm_tflops,
        "overall": overall,
        "rows": [r.__dict__ | {"verdict": _verdict(r, copy_gbps, mm_tflops)} for r in rows],
    }
    int8_md: list[str] = []
    if args.int8:
        int8_md = [
            "",
            "## Int8 weight-only experts (not judged)",
            "",
            "The fused kernel's `W_INT8` build on the same inputs: int8 weights with a"
            f" {shapes.dtype_name} scale per output row"
            f" (`quantize_rows` of the {shapes.dtype_name} weights). Bytes are the int8 weights and scales of the experts touched"
            " plus hidden in and out; errors are against fp32 on the dequantized weights.",
            "",
            *_int8_table(rows, copy_gbps),
        ]
        print("\n".join(int8_md), flush=True)
    md = [
        f"# Fused MoE kernel benchmark: {gpu}",
        "",
        f"Command: `{command}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        f"Shapes: H {shapes.h}, I {shapes.inter}, E {shapes.n_experts}, top-{shapes.top_k}, {shapes.dtype_name}."
        f" Measured in the same run: copy {copy_gbps:.0f} GB/s, {shapes.dtype_name} matmul"
        f" {mm_tflops:.3g} TFLOP/s.",
        "",
        *table,
        "",
        f"Overall: **{overall}**. Rules: M <= {BW_MAX_M} at least {BW_TARGET:.0%} of copy bandwidth (aim"
        f" {BW_AIM:.0%}); M >= {MM_MIN_M} at least {MM_TARGET:.0%} of the matmul rate (aim {MM_AIM:.0%}); faster"
        " than every transformers implementation that ran; fused error at most twice moe_reference's"
        " (both against fp32).",
        "",
        "Bytes are the weights of the experts touched plus hidden in and out; FLOPs are 6 * slots * H * I."
        " fused_moe and moe_reference include routing; transformers' experts are given the routing.",
    ]
    summary = md[-3:]
    md += int8_md
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"moe-{_gpu_slug(gpu)}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(summary))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
