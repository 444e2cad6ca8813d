"""First token of a request that finds the engine idle: the batch thread still waiting for work (``IDLE_S``,
now) against a batch thread started anew for it (``IDLE_S = 0``, as before), and against a request that joins a
busy batch. Same engine, same prompt, CPU.

    python benchmarks/idle_first_token.py [--requests 15] [--gap 0.3] [--threads 2]

Model: the one of local_cpu.py (hidden 256, 4 layers, 8 experts, 32k vocabulary), fp32, a 20-token prompt,
greedy, 4 new tokens. Each request comes ``--gap`` seconds after the previous one ended; the time runs from
``Engine.submit`` to its first token. Prints a table and writes benchmarks/results/idle_first_token.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from local_cpu import SHAPE, _cpu_name

from mixtral_local.backend import LocalOptions, _load_in_own_thread
from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.engine import scheduler as scheduler_module
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def first_token_ms(engine: Engine, prompt: list[int]) -> float:
    start = time.perf_counter()
    ticket = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=4))
    ticket.get()
    first = time.perf_counter() - start
    for _ in ticket:
        pass
    return first * 1e3


def series(engine: Engine, prompt: list[int], requests: int, gap: float) -> list[float]:
    for _ in range(3):  # warm up
        first_token_ms(engine, prompt)
    out = []
    for _ in range(requests):
        time.sleep(gap)
        out.append(first_token_ms(engine, prompt))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--gap", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "idle_first_token.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, seed=0, **SHAPE)
        tokenizer = MixtralTokenizer.from_pretrained(path)
        # loaded in a thread of its own, as the local backend loads: no OpenMP pool in this one
        model = _load_in_own_thread(LocalOptions(path, dtype="float32", device="cpu", progress=False))
        engine = Engine(model, tokenizer)
        prompt = tokenizer.encode_chat(PROMPT)
        idle_s = scheduler_module.IDLE_S
        runs = {"waiting thread": series(engine, prompt, args.requests, args.gap)}
        scheduler_module.IDLE_S = 0.0
        runs["new thread"] = series(engine, prompt, args.requests, args.gap)
        scheduler_module.IDLE_S = idle_s
        busy = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=900))  # keeps the batch running
        runs["joining a busy batch"] = series(engine, prompt, args.requests, args.gap / 6)
        busy.cancel()

    medians = {name: statistics.median(r) for name, r in runs.items()}
    result = {
        "command": f"python benchmarks/idle_first_token.py --requests {args.requests} --gap {args.gap} "
                   f"--threads {args.threads}",
        "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__, "model": SHAPE,
        "dtype": "float32", "prompt_tokens": len(prompt), "idle_s": idle_s, "median_ms": medians,
        "speedup": medians["new thread"] / medians["waiting thread"], "runs_ms": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'first token of a request':<28}{'median (ms)':>12}{'min':>8}{'max':>8}")
    for name, r in runs.items():
        print(f"{name:<28}{medians[name]:>12.1f}{min(r):>8.1f}{max(r):>8.1f}")
    print(f"waiting thread: {result['speedup']:.2f}x sooner than a new thread ({result['cpu']}, {args.threads} "
          f"threads, fp32, {len(prompt)}-token prompt, {args.gap} s idle before each)")


if __name__ == "__main__":
    main()
