"""Decode speed of the local backend vs transformers' ``generate`` on the same random small Mixtral (CPU).

    python benchmarks/local_cpu.py [--tokens 128] [--repeats 5] [--threads N] [--logprobs K]

Model: hidden 256, 4 layers, 8 experts (top-2, width 896), 8 query / 2 KV heads, 32k vocabulary, fp32,
batch 1, greedy. Decode tokens/s = (tokens - 1) / (time of the last token - time of the first), so the
prefill is left out on both sides; runs alternate between the two; reported: the ratio of the median
tokens/s, and the median of the per-pair ratios (each run against the other backend's run right after it).
Prints a table and writes benchmarks/results/local_cpu.json.

``--logprobs K``: both sides also give each token's log probability and the K most likely tokens as they
decode (ours: ``SamplingParams(logprobs=K)``; transformers: a logits processor taking ``log_softmax`` and
``topk`` of each step's scores, which ``generate`` runs inside its loop), and our run without them is timed in
the same rounds, for the cost of the feature. Writes benchmarks/results/local_cpu_logprobs.json.
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


class _TopLogprobs(transformers.LogitsProcessor):
    """Each step's log probabilities and top-k, as a streaming caller of ``generate`` would take them."""

    def __init__(self, k: int) -> None:
        self.k, self.steps = k, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 (the interface)
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        top = torch.topk(logprobs, self.k)
        self.steps.append((logprobs.gather(-1, scores.argmax(-1, keepdim=True)).tolist(), top.indices.tolist(),
                           top.values.tolist()))
        return scores


def _ours(engine: Engine, prompt: list[int], tokens: int, logprobs: int | None = None) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, logprobs=logprobs)
    times = [time.perf_counter() for _ in engine.stream([prompt], params)]
    return (len(times) - 1) / (times[-1] - times[0])


def _transformers(model: Any, prompt: list[int], tokens: int, logprobs: int | None = None) -> float:
    clock = _Clock()
    processors = transformers.LogitsProcessorList([_TopLogprobs(logprobs)] if logprobs is not None else [])
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                       streamer=clock, pad_token_id=2, logits_processor=processors)
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
    parser.add_argument("--logprobs", type=int, default=None, metavar="K",
                        help="also give each token's log probability and the K most likely tokens")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.out is None:
        name = "local_cpu.json" if args.logprobs is None else "local_cpu_logprobs.json"
        args.out = Path(__file__).parent / "results" / name
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, seed=0, **SHAPE)
        tokenizer = MixtralTokenizer.from_pretrained(path)
        engine = Engine(load_model(path, dtype="float32", device="cpu", progress=False), tokenizer)
        hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompt = tokenizer.encode_chat(PROMPT)
        k = args.logprobs
        _ours(engine, prompt, 8, k), _transformers(hf, prompt, 8, k), _ours(engine, prompt, 8)  # warm up
        ours, theirs, plain = [], [], []
        for _ in range(args.repeats):
            ours.append(_ours(engine, prompt, args.tokens, k))
            theirs.append(_transformers(hf, prompt, args.tokens, k))
            if k is not None:
                plain.append(_ours(engine, prompt, args.tokens))

    result = {
        "command": f"python benchmarks/local_cpu.py --tokens {args.tokens} --repeats {args.repeats} "
                   f"--threads {args.threads}" + ("" if k is None else f" --logprobs {k}"),
        "logprobs": k,
        "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": SHAPE, "dtype": "float32", "batch": 1,
        "prompt_tokens": len(prompt), "new_tokens": args.tokens,
        "mixtral_local_tok_s": statistics.median(ours), "transformers_tok_s": statistics.median(theirs),
        "runs": {"mixtral_local": ours, "transformers": theirs},
    }
    result["speedup"] = result["mixtral_local_tok_s"] / result["transformers_tok_s"]
    # each of our runs against the transformers run right after it: robust to a machine shared with others
    result["paired_speedup_median"] = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    if plain:  # what asking for log probabilities costs us: tokens/s with them over tokens/s without
        result["runs"]["mixtral_local_without_logprobs"] = plain
        result["logprobs_cost_paired_median"] = statistics.median(a / b for a, b in zip(ours, plain, strict=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'backend':<34}{'decode tok/s (median)':>24}{'runs':>40}")
    rows = [("mixtral_local", ours), (f"transformers {transformers.__version__}", theirs)]
    if plain:
        rows = [(f"{name} (logprobs {k})", runs) for name, runs in rows] + [("mixtral_local (no logprobs)", plain)]
    for name, runs in rows:
        print(f"{name:<34}{statistics.median(runs):>24.1f}{' '.join(f'{r:.0f}' for r in runs):>40}")
    print(f"speedup: {result['speedup']:.2f}x (ratio of medians), {result['paired_speedup_median']:.2f}x "
          f"(median of paired runs)  ({result['cpu']}, {args.threads} threads, fp32, batch 1)")
    if plain:
        print(f"with logprobs / without (ours, median of paired runs): {result['logprobs_cost_paired_median']:.3f}")


if __name__ == "__main__":
    main()
