"""``mixtral serve`` against ``transformers serve --continuous-batching``: N concurrent streaming callers (the
``openai`` SDK) on the same random small Mixtral, CPU.

    pip install fastapi accelerate protobuf     # what `transformers serve` needs, beyond the dev extra
    python benchmarks/serve.py [--streams 1 4 16] [--tokens 64] [--repeats 3] [--threads 2] [--max-batch N]

Model: the one of local_cpu.py (hidden 256, 4 layers, 8 experts, 32k vocabulary), fp32, greedy. Both servers
load the same safetensors file; transformers gets a tokenizer.json converted from the same sentencepiece model
and Mixtral's chat template. Both run as separate processes with ``--threads`` torch threads, started once;
each workload runs against ours, then theirs, ``--repeats`` times. Per workload: median time to first token,
the slowest caller's time to first token, and the aggregate completion tokens/s (all callers' tokens over the
wall time). ``--max-batch`` sets our ``MIXTRAL_LOCAL_MAX_BATCH`` (default: the engine's ``MAX_BATCH`` rows; callers beyond
it wait for a row). Prints a table with the ratios (theirs over ours for times, ours over theirs for tokens/s) and
writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import tokenizers
import torch
import transformers
from local_cpu import SHAPE, _cpu_name
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from mixtral_local.engine.engine import MAX_BATCH
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

#: Mixtral-Instruct v0.1's chat template (user / assistant turns; what MixtralTokenizer.encode_chat writes)
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                 "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
TOPICS = ["a lighthouse keeper", "a storm at sea", "a lost violin", "the first snow", "a market in Lyon",
          "a broken clock", "a night train", "an old library", "a chess match", "a mountain village",
          "a paper boat", "the last bakery", "a red kite", "a quiet harbour", "a desert well", "a winter garden"]


def hf_model_dir(ours: Path, dst: Path) -> Path:
    """The checkpoint with a Hugging Face tokenizer (tokenizer.json from the same sentencepiece model)."""
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(ours / name, dst / name)
    pieces = SentencePieceExtractor(str(ours / "tokenizer.model")).extract(tokenizers.models.BPE)
    tok = transformers.LlamaTokenizer(vocab=pieces["vocab"], merges=pieces["merges"], legacy=True,
                                      bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(dst)
    return dst


def same_prompts(ours: Path, hf: Path) -> list[int]:
    """Every prompt's length, after checking that both servers' tokenizers give the same ids for it."""
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    mine = MixtralTokenizer.from_pretrained(ours)
    lengths = []
    for topic in TOPICS:
        messages = [{"role": "user", "content": f"Write a short story about {topic}."}]
        ids = mine.encode_chat(messages)
        other = theirs.apply_chat_template(messages, tokenize=True)
        if ids != list(other["input_ids"] if hasattr(other, "keys") else other):
            raise RuntimeError(f"the two servers would read {topic!r} differently: {ids} != {other}")
        lengths.append(len(ids))
    return lengths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(command: list[str], port: int, threads: int, env: dict[str, str]) -> Iterator[str]:
    """A server process, up (``/health`` answers) until the block ends; yields its /v1 base URL."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{command[:3]} exited:\n{log.read().decode()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command[:3]} did not come up") from None
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


async def one(client: openai.AsyncOpenAI, model: str, topic: str, tokens: int, start: float) -> tuple[float, int]:
    """One streaming caller: (seconds to its first text, completion tokens)."""
    first, pieces, usage = None, 0, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Write a short story about {topic}."}],
        max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            pieces += 1
    return first if first is not None else float("nan"), usage if usage is not None else pieces


async def workload(url: str, model: str, streams: int, tokens: int) -> dict[str, float]:
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600,
                                  http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64))) as client:
        start = time.perf_counter()
        done = await asyncio.gather(*(one(client, model, TOPICS[i % len(TOPICS)], tokens, start)
                                      for i in range(streams)))
        wall = time.perf_counter() - start
    firsts = [f for f, _ in done]
    total = sum(n for _, n in done)
    return {"ttft_median_s": statistics.median(firsts), "ttft_max_s": max(firsts), "wall_s": wall,
            "tokens": total, "tok_s": total / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-batch", type=int, help="our MIXTRAL_LOCAL_MAX_BATCH (default: the engine's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    suffix = f"_max_batch{args.max_batch}" if args.max_batch else ""
    out = args.out or Path(__file__).parent / "results" / f"serve{suffix}.json"
    cli = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")

    with tempfile.TemporaryDirectory() as tmp:
        ours_dir = write_tiny_checkpoint(Path(tmp) / "ours", seed=0, **SHAPE)
        hf_dir = hf_model_dir(ours_dir, Path(tmp) / "hf")
        prompt_tokens = same_prompts(ours_dir, hf_dir)
        ours_port, hf_port = free_port(), free_port()
        ours_cmd = [sys.executable, "-m", "mixtral_client", "serve", "--model-path", str(ours_dir),
                    "--port", str(ours_port), "--model-name", "mixtral"]
        hf_cmd = [cli, "serve", str(hf_dir), "--port", str(hf_port), "--host", "127.0.0.1", "--continuous-batching",
                  "--device", "cpu", "--dtype", "float32"]
        local = {"MIXTRAL_LOCAL_DTYPE": "float32", "MIXTRAL_LOCAL_DEVICE": "cpu", "MIXTRAL_LOCAL_PROGRESS": "0"}
        if args.max_batch:
            local["MIXTRAL_LOCAL_MAX_BATCH"] = str(args.max_batch)
        runs: dict[str, dict[int, list[dict[str, float]]]] = {"mixtral_serve": {}, "transformers_serve": {}}
        with server(ours_cmd, ours_port, args.threads, local) as ours_url, \
                server(hf_cmd, hf_port, args.threads, {}) as hf_url:
            targets = {"mixtral_serve": (ours_url, "mixtral"), "transformers_serve": (hf_url, str(hf_dir))}
            for url, model in targets.values():  # warm up: first requests compile, allocate, fill caches
                asyncio.run(workload(url, model, 2, 8))
            for _ in range(args.repeats):
                for streams in args.streams:
                    for name, (url, model) in targets.items():
                        runs[name].setdefault(streams, []).append(asyncio.run(workload(url, model, streams,
                                                                                      args.tokens)))

    def med(name: str, streams: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[name][streams])

    table = []
    for streams in args.streams:
        row: dict[str, Any] = {"streams": streams}
        for key in ("ttft_median_s", "ttft_max_s", "tok_s", "tokens"):
            row[key] = {name: med(name, streams, key) for name in runs}
        row["ttft_median_ratio"] = row["ttft_median_s"]["transformers_serve"] / row["ttft_median_s"]["mixtral_serve"]
        row["ttft_max_ratio"] = row["ttft_max_s"]["transformers_serve"] / row["ttft_max_s"]["mixtral_serve"]
        row["tok_s_ratio"] = row["tok_s"]["mixtral_serve"] / row["tok_s"]["transformers_serve"]
        table.append(row)
    result = {
        "command": f"python benchmarks/serve.py --streams {' '.join(map(str, args.streams))} --tokens {args.tokens} "
                   f"--repeats {args.repeats} --threads {args.threads}"
                   + (f" --max-batch {args.max_batch}" if args.max_batch else ""),
        "max_batch": args.max_batch or MAX_BATCH,
        "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": SHAPE, "dtype": "float32", "new_tokens": args.tokens,
        "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)],
        "table": table, "runs": {name: {str(k): v for k, v in r.items()} for name, r in runs.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'streams':>7} | {'first token, median (ms)':>28} | {'slowest first token (ms)':>28} | "
          f"{'tokens/s, all callers':>26}")
    print(f"{'':>7} | {'ours':>8} {'theirs':>8} {'ratio':>9} | {'ours':>8} {'theirs':>8} {'ratio':>9} | "
          f"{'ours':>7} {'theirs':>7} {'ratio':>9}")
    for row in table:
        t, m, s = row["ttft_median_s"], row["ttft_max_s"], row["tok_s"]
        print(f"{row['streams']:>7} | {t['mixtral_serve'] * 1e3:>8.1f} {t['transformers_serve'] * 1e3:>8.1f} "
              f"{row['ttft_median_ratio']:>8.2f}x | {m['mixtral_serve'] * 1e3:>8.1f} "
              f"{m['transformers_serve'] * 1e3:>8.1f} {row['ttft_max_ratio']:>8.2f}x | "
              f"{s['mixtral_serve']:>7.1f} {s['transformers_serve']:>7.1f} {row['tok_s_ratio']:>8.2f}x")
    print(f"(ratios: theirs / ours for times, ours / theirs for tokens/s; {result['cpu']}, {args.threads} threads, "
          f"fp32, our max_batch {result['max_batch']}, transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
