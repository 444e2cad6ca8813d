"""Concurrent streams on the local backend: our continuous batching vs transformers' (CPU).

    python benchmarks/local_concurrency.py [--streams 1 4 16] [--tokens 64] [--repeats 3] [--threads N]

N requests arrive at once, each a different prompt, greedy, ``--tokens`` new tokens each. Measured from the
moment they are sent to the moment the last one finishes: aggregate throughput (all generated tokens / wall
time) and, for ours, the median time to first token. Side by side, in one run, alternating, each contender
in a fresh process (as an app would run it alone: on CPU, torch's OpenMP pools in other threads of the same
process would slow every contender):

- ``mixtral_local``: N concurrent streams through ``AsyncMixtralClient(provider="local")``, the path an
  async web app takes; the engine decodes them in one running batch.
- ``thread per request``: the same engine, each request generated alone in its own thread, as the local
  backend did before continuous batching.
- ``transformers CB``: transformers' continuous batching (``init_continuous_batching``: paged KV cache,
  one persistent manager, warmed up first), the same token ids, EOS off.

Model: the random small Mixtral of ``local_cpu.py`` (hidden 256, 4 layers, 8 experts), fp32. The
checkpoint is written once; each process loads it.
Prints a table and writes benchmarks/results/local_concurrency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import torch
import transformers
from local_cpu import SHAPE, _cpu_name
from transformers import GenerationConfig

from mixtral_client import AsyncMixtralClient
from mixtral_local.backend import LocalOptions, _engine_for
from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

KINDS = ("ours", "threads", "transformers")
TOPICS = ("a lighthouse keeper", "a storm at sea", "a lost cat", "the first snow", "a clockmaker", "a long train",
          "a mountain village", "an old library", "a desert well", "a kite festival", "a night market",
          "a glass factory", "a river ferry", "a beekeeper", "a radio operator", "a map of the stars")


def _messages(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})."}]
            for i in range(n)]


async def _ours(client: AsyncMixtralClient, messages: list[list[dict[str, str]]], tokens: int,
                ) -> tuple[float, float, int]:
    start = time.perf_counter()
    counts: list[int] = []
    firsts: list[float] = []

    async def one(msgs: list[dict[str, str]]) -> None:
        stream = await client.chat.completions.create(messages=msgs, stream=True, temperature=0, max_tokens=tokens)
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                counts.append(chunk.usage.completion_tokens)
        firsts.append(first if first is not None else time.perf_counter() - start)

    async with anyio.create_task_group() as tg:
        for msgs in messages:
            tg.start_soon(one, msgs)
    wall = time.perf_counter() - start
    return sum(counts) / wall, statistics.median(firsts), sum(counts)


def _thread_per_request(engine: Engine, prompts: list[list[int]], tokens: int) -> tuple[float, int]:
    counts = [0] * len(prompts)

    def one(i: int) -> None:
        counts[i] = engine.generate([prompts[i]], SamplingParams(temperature=0, max_tokens=tokens))[0].completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start), sum(counts)


def _transformers_cb(manager: Any, prompts: list[list[int]], tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    ids = manager.add_requests(prompts, max_new_tokens=tokens)
    done: dict[str, Any] = {}
    while len(done) < len(ids):
        result = manager.get_result(timeout=120)
        if result is None:
            raise RuntimeError("transformers' continuous batching returned no result within 120 s")
        if result.is_finished():
            done[result.request_id] = result
    count = sum(len(r.generated_tokens) for r in done.values())
    return count / (time.perf_counter() - start), count


def _worker(kind: str, path: Path, streams: list[int], tokens: int) -> list[dict[str, float]]:
    """One contender in this (fresh) process: its own OpenMP pools only, as in an app that runs it alone."""
    tokenizer = MixtralTokenizer.from_pretrained(path)
    warm = _messages(2)
    out = []
    if kind == "transformers":
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=tokens)
        manager = hf.init_continuous_batching(generation_config=config)
        manager.warmup()
        manager.start()
        try:
            _transformers_cb(manager, [tokenizer.encode_chat(m) for m in warm], 4)
            for n in streams:
                tok_s, _ = _transformers_cb(manager, [tokenizer.encode_chat(m) for m in _messages(n)], tokens)
                out.append({"streams": n, "tok_s": tok_s})
        finally:
            manager.stop(block=True, timeout=10)
        return out
    options = {"dtype": "float32", "device": "cpu", "max_batch": max(streams), "progress": False}
    client = AsyncMixtralClient(provider="local", model_path=str(path), local_options=options)
    if kind == "ours":
        anyio.run(_ours, client, warm, 4)
        for n in streams:
            tok_s, ttft, _ = anyio.run(_ours, client, _messages(n), tokens)
            out.append({"streams": n, "tok_s": tok_s, "ttft_s": ttft})
        return out
    engine = _engine_for(LocalOptions.from_config(client.config))  # loaded the same way, then one thread each
    _thread_per_request(engine, [tokenizer.encode_chat(m) for m in warm], 4)
    for n in streams:
        tok_s, _ = _thread_per_request(engine, [tokenizer.encode_chat(m) for m in _messages(n)], tokens)
        out.append({"streams": n, "tok_s": tok_s})
    return out


def _stall(path: Path, chunk: int, tokens: int) -> dict[str, float]:
    """4 streams decode; a 3,000-token prompt arrives. The longest gap between two tokens of the running
    streams after it arrives, and the long request's time to first token, with prefill chunks of ``chunk``."""
    from mixtral_local.engine import engine as engine_module

    engine_module.PREFILL_CHUNK = chunk
    options = {"dtype": "float32", "device": "cpu", "progress": False}
    client = AsyncMixtralClient(provider="local", model_path=str(path), local_options=options)
    engine = _engine_for(LocalOptions.from_config(client.config))
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode_chat(m) for m in _messages(4)]
    text = " ".join(f"Line {i}: the keeper counts the ships that pass the light." for i in range(200))
    long_prompt = tokenizer.encode_chat([{"role": "user", "content": text}])[:3000]
    engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm up
    stamps: list[list[float]] = [[] for _ in prompts]
    tickets = [engine.submit(p, SamplingParams(temperature=0, max_tokens=tokens)) for p in prompts]

    def consume(i: int) -> None:
        for _ in tickets[i]:
            stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    while len(stamps[0]) < 20:
        time.sleep(0.001)
    arrived = time.perf_counter()
    first = next(iter(engine.submit(long_prompt, SamplingParams(temperature=0, max_tokens=4))))
    ttft = time.perf_counter() - arrived
    for t in threads:
        t.join()
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b > arrived]
    del first
    return {"chunk": chunk, "long_prompt_tokens": len(long_prompt), "max_gap_s": max(gaps),
            "long_ttft_s": ttft}


def _run_worker(kind: str, path: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    command = [sys.executable, __file__, "--worker", kind, "--path", str(path), "--tokens", str(args.tokens),
               "--threads", str(args.threads), "--streams", *map(str, args.streams)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "local_concurrency.json")
    parser.add_argument("--stall", action="store_true",
                        help="also measure how long running streams stall when a 3,000-token prompt arrives, "
                             "with and without chunked prefill")
    parser.add_argument("--worker", choices=[*KINDS, "stall-whole", "stall-chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        if args.worker.startswith("stall"):
            chunk = 512 if args.worker == "stall-chunked" else 10**9
            print(json.dumps([_stall(args.path, chunk, 400)]))
        else:
            print(json.dumps(_worker(args.worker, args.path, args.streams, args.tokens)))
        return

    runs: dict[str, list[list[dict[str, float]]]] = {kind: [] for kind in KINDS}
    stalls: dict[str, list[dict[str, float]]] = {"stall-whole": [], "stall-chunked": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, seed=0, **SHAPE)
        for _ in range(args.repeats):  # the contenders alternate, each in a fresh process
            for kind in KINDS:
                runs[kind].append(_run_worker(kind, path, args))
            if args.stall:
                for kind in stalls:
                    stalls[kind].append(_run_worker(kind, path, args)[0])

    rows: list[dict[str, Any]] = []
    for i, n in enumerate(args.streams):
        per = {kind: [run[i]["tok_s"] for run in runs[kind]] for kind in KINDS}
        row: dict[str, Any] = {
            "streams": n, "mixtral_local_tok_s": statistics.median(per["ours"]),
            "mixtral_local_ttft_s": statistics.median(run[i]["ttft_s"] for run in runs["ours"]),
            "thread_per_request_tok_s": statistics.median(per["threads"]),
            "transformers_cb_tok_s": statistics.median(per["transformers"]),
            "runs": {"mixtral_local": per["ours"], "thread_per_request": per["threads"],
                     "transformers_cb": per["transformers"]},
        }
        row["vs_transformers_cb"] = row["mixtral_local_tok_s"] / row["transformers_cb_tok_s"]
        row["vs_thread_per_request"] = row["mixtral_local_tok_s"] / row["thread_per_request_tok_s"]
        rows.append(row)
    result = {
        "command": f"python benchmarks/local_concurrency.py --streams {' '.join(map(str, args.streams))} "
                   f"--tokens {args.tokens} --repeats {args.repeats} --threads {args.threads}",
        "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": SHAPE, "dtype": "float32", "new_tokens": args.tokens,
        "rows": rows,
    }
    if args.stall:
        result["stall"] = {kind: {"max_gap_s": statistics.median(r["max_gap_s"] for r in runs_),
                                  "long_ttft_s": statistics.median(r["long_ttft_s"] for r in runs_),
                                  "runs": runs_} for kind, runs_ in stalls.items()}
        result["command"] += " --stall"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'streams':>7}{'mixtral_local tok/s':>21}{'TTFT s':>8}{'thread/request':>16}{'transformers CB':>17}"
          f"{'vs CB':>8}{'vs thread':>11}")
    for row in rows:
        print(f"{row['streams']:>7}{row['mixtral_local_tok_s']:>21.1f}{row['mixtral_local_ttft_s']:>8.2f}"
              f"{row['thread_per_request_tok_s']:>16.1f}{row['transformers_cb_tok_s']:>17.1f}"
              f"{row['vs_transformers_cb']:>7.2f}x{row['vs_thread_per_request']:>10.2f}x")
    print(f"({result['cpu']}, {args.threads} threads, fp32, {args.tokens} new tokens per stream, "
          f"transformers {transformers.__version__})")
    if args.stall:
        print(f"\n{'a 3,000-token prompt arrives':<30}{'longest gap, 4 running streams':>32}{'its TTFT':>10}")
        for kind, label in (("stall-whole", "prefilled whole"), ("stall-chunked", "prefilled in 512-token chunks")):
            row = result["stall"][kind]
            print(f"{label:<30}{row['max_gap_s'] * 1e3:>29.0f} ms{row['long_ttft_s']:>9.2f}s")


if __name__ == "__main__":
    main()
