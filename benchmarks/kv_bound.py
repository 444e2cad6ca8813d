"""Requests under a KV-cache bound: admitting each for what it needs now and setting rows aside when they
outgrow the bound, against admitting each for all it may reach (prompt + max_tokens), as a static
reservation does (this engine's first policy, ``LOOKAHEAD`` as large as the context).

    python benchmarks/kv_bound.py [--requests 12] [--tokens 300] [--cap 2000] [--bound-rows 3] [--repeats 3]
                                  [--threads N]

Model: the random small Mixtral of local_cpu.py (fp32, CPU). All requests are queued at once, greedy, with
``max_tokens=--cap`` (a generous cap, as callers set; 0: none, so up to the context), and each ends by a stop
string after 20% to 100% of ``--tokens`` tokens (chosen from its answer alone, so the lengths vary as real
answers do). The bound holds ``--bound-rows`` requests at their cap (the context without one), so a static
reservation runs that many at a time. Reported per policy (median of
the repeats; the two alternate): wall time until every answer is done, tokens/s, decode steps, the most rows
in one step, rows set aside. The answers are checked equal across the policies. Prints a table and writes
benchmarks/results/kv_bound.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from local_cpu import SHAPE, _cpu_name

from mixtral_local.engine import Engine, KVCache, SamplingParams
from mixtral_local.engine import engine as engine_module
from mixtral_local.engine.engine import _Batch
from mixtral_local.loader import load_model
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

POLICIES = {"need now + set aside": engine_module.LOOKAHEAD, "whole reach (static)": 10**9}


def _stops(model: Any, tokenizer: MixtralTokenizer, prompts: list[list[int]], tokens: int) -> list[str]:
    """For each prompt, a stop string its greedy answer first meets after 20% to 100% of ``tokens`` tokens."""
    engine = Engine(model, tokenizer, prefix_cache=0)
    stops = []
    for i, prompt in enumerate(prompts):
        ids = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=tokens))[0].token_ids
        text = tokenizer.decode(ids)
        cut = int(tokens * (0.2 + 0.8 * i / max(len(prompts) - 1, 1)))
        for at in range(cut, 0, -1):
            start = len(tokenizer.decode(ids[:at]))
            piece = text[start:start + 4]
            if len(piece) == 4 and text.find(piece) == start:
                stops.append(piece)
                break
        else:
            raise RuntimeError(f"no stop string found for prompt {i}")
    engine.scheduler.shutdown()
    return stops


def _run(model: Any, tokenizer: MixtralTokenizer, prompts: list[list[int]], params: list[SamplingParams],
         cells: int, lookahead: int) -> dict[str, Any]:
    engine_module.LOOKAHEAD = lookahead
    per_position = KVCache.nbytes(model.config, 1, 1, torch.float32)
    engine = Engine(model, tokenizer, max_batch=len(prompts), prefix_cache=0, kv_cache_bytes=cells * per_position)
    peak, aside = [0], [0]
    hook = model.register_forward_pre_hook(lambda _m, args: peak.__setitem__(0, max(peak[0], int(args[0].shape[0]))))
    original = _Batch.set_aside

    def counting(self: _Batch) -> Any:
        out = original(self)
        aside[0] += len(out)
        return out

    _Batch.set_aside = counting  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        with engine.scheduler._cond:  # every request is waiting when the batch thread first looks
            tickets = [engine.submit(p, s) for p, s in zip(prompts, params, strict=True)]
        answers = []
        for ticket in tickets:
            for _ in ticket:
                pass
            answers.append(list(ticket.row.tokens))
        wall = time.perf_counter() - started
        generated = sum(len(a) for a in answers)
    finally:
        _Batch.set_aside = original  # type: ignore[method-assign]
        hook.remove()
        engine.scheduler.shutdown()
    return {"wall_s": wall, "tokens_s": generated / wall, "tokens": generated, "steps": engine.scheduler.steps,
            "peak_rows": peak[0], "set_aside": aside[0], "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--cap", type=int, default=2000, help="max_tokens of every request (0: none)")
    parser.add_argument("--bound-rows", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kv_bound.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default_lookahead = engine_module.LOOKAHEAD
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, seed=0, **SHAPE)
        tokenizer = MixtralTokenizer.from_pretrained(path)
        model = load_model(path, dtype="float32", device="cpu", progress=False)
        prompts = [tokenizer.encode_chat([{"role": "user", "content": f"Question {i}: tell me about rivers."}])
                   for i in range(args.requests)]
        reach = max(len(p) for p in prompts) + args.cap if args.cap else SHAPE["max_position_embeddings"]
        cells = args.bound_rows * reach
        stops = _stops(model, tokenizer, prompts, args.tokens)
        params = [SamplingParams(temperature=0, max_tokens=args.cap or None, stop=(stop,)) for stop in stops]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in POLICIES}
        try:
            _run(model, tokenizer, prompts[:2], params[:2], cells, default_lookahead)  # warm up
            for _ in range(args.repeats):
                for name, lookahead in POLICIES.items():
                    runs[name].append(_run(model, tokenizer, prompts, params, cells, lookahead))
        finally:
            engine_module.LOOKAHEAD = default_lookahead
    first = [r["answers"] for rs in runs.values() for r in rs]
    assert all(a == first[0] for a in first), "the policies gave different answers"
    table = {name: {key: statistics.median(r[key] for r in rs) for key in
                    ("wall_s", "tokens_s", "steps", "peak_rows", "set_aside")} for name, rs in runs.items()}
    ours, static = table["need now + set aside"], table["whole reach (static)"]
    result = {
        "command": f"python benchmarks/kv_bound.py --requests {args.requests} --tokens {args.tokens} "
                   f"--cap {args.cap} --bound-rows {args.bound_rows} --repeats {args.repeats} "
                   f"--threads {args.threads}",
        "stops": stops, "tokens_generated": runs["need now + set aside"][0]["tokens"],
        "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "model": SHAPE, "bound_cells": cells, "lookahead": default_lookahead, "policies": table,
        "tokens_s_ratio": ours["tokens_s"] / static["tokens_s"],
        "runs": {name: [{k: v for k, v in r.items() if k != "answers"} for r in rs] for name, rs in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'policy':<24}{'wall s':>9}{'tokens/s':>10}{'steps':>8}{'peak rows':>11}{'set aside':>11}")
    for name, row in table.items():
        print(f"{name:<24}{row['wall_s']:>9.2f}{row['tokens_s']:>10.1f}{row['steps']:>8.0f}{row['peak_rows']:>11.0f}"
              f"{row['set_aside']:>11.0f}")
    print(f"tokens/s: {result['tokens_s_ratio']:.2f}x the static reservation's ({args.requests} requests, "
          f"max_tokens {args.cap or 'none'}, answers of {result['tokens_generated']} tokens in all; a bound of "
          f"{cells} positions = {args.bound_rows} requests at their cap; same answers)")


if __name__ == "__main__":
    main()
