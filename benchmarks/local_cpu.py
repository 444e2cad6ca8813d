"""Decode speed of the local backend vs transformers' ``generate`` on the same random small Mixtral (CPU).

    python benchmarks/local_cpu.py [--tokens 128] [--repeats 5] [--threads N]

Model: hidden 256, 4 layers, 8 experts (top-2, width 896), 8 query / 2 KV heads, 32k vocabulary, fp32,
batch 1, greedy. Decode tokens/s = (tokens - 1) / (time of the last token - time of the first), so the
prefill is left out on both sides; runs alternate between the two; reported: the ratio of the median
tokens/s, and the median of the per-pair ratios (each run against the other backend's run right after it).
Prints a table and writes benchmarks/results/local_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.loader import load_model
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

SHAPE = {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
         "vocab_size": 32000, "max_position_embeddings": 4096}
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


class _Clock(BaseStreamer):
    """Records when transformers emits each new token (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        del value  # only the time matters
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _ours(engine: Engine, prompt: list[int], tokens: int) -> float:
    times = [time.perf_counter() for _ in engine.stream([prompt], SamplingParams(temperature=0, max_tokens=tokens))]
    return (len(times) - 1) / (times[-1] - times[0])


def _transformers(model: Any, prompt: list[int], tokens: int) -> float:
    clock = _Clock()
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                       streamer=clock, pad_token_id=2)
    times = clock.times[1:]
    return (len(times) - 1) / (times[-1] - times[0])


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "local_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, seed=0, **SHAPE)
        tokenizer = MixtralTokenizer.from_pretrained(path)
        engine = Engine(load_model(path, dtype="float32", device="cpu", progress=False), tokenizer)
        hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompt = tokenizer.encode_chat(PROMPT)
        _ours(engine, prompt, 8), _transformers(hf, prompt, 8)  # warm up
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(_ours(engine, prompt, args.tokens))
            theirs.append(_transformers(hf, prompt, args.tokens))

    result = {
        "command": f"python benchmarks/local_cpu.py --tokens {args.tokens} --repeats {args.repeats} "
                   f"--threads {args.threads}",
        "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": SHAPE, "dtype": "float32", "batch": 1,
        "prompt_tokens": len(prompt), "new_tokens": args.tokens,
        "mixtral_local_tok_s": statistics.median(ours), "transformers_tok_s": statistics.median(theirs),
        "runs": {"mixtral_local": ours, "transformers": theirs},
    }
    result["speedup"] = result["mixtral_local_tok_s"] / result["transformers_tok_s"]
    # each of our runs against the transformers run right after it: robust to a machine shared with others
    result["paired_speedup_median"] = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'backend':<28}{'decode tok/s (median)':>24}{'runs':>40}")
    for name, runs in (("mixtral_local", ours), (f"transformers {transformers.__version__}", theirs)):
        print(f"{name:<28}{statistics.median(runs):>24.1f}{' '.join(f'{r:.0f}' for r in runs):>40}")
    print(f"speedup: {result['speedup']:.2f}x (ratio of medians), {result['paired_speedup_median']:.2f}x "
          f"(median of paired runs)  ({result['cpu']}, {args.threads} threads, fp32, batch 1)")


if __name__ == "__main__":
    main()
