"""Requests that start alike, in one running batch: sharing a decoding row's keys and values on vs off (CPU).

    python benchmarks/shared_prefix.py [--requests 8] [--choices 4] [--answer 16] [--repeats 3] [--threads N]

Model and system prompt: those of ``prefix_cache.py`` (the random small Mixtral, fp32; a system prompt with ten
tool definitions, about 850 tokens). Three workloads, each submitted to the engine's running batch at once:

    agents    ``--requests`` requests with that system prompt and different questions (an agent serving many
              users), greedy, ``--answer`` tokens each
    short     the same with a system prompt of four tools (about 370 tokens): prompts short enough to be
              prefilled in one pass together, unless the later ones wait to start from the first
    choices   one such request with ``n=--choices`` sampled choices (``Engine.submit_all``, as the client's
              ``n`` does)

Sides, each an ``Engine(prefix_cache=0)`` so that no finished request's store plays a part:

    ours          a request about to be prefilled starts from a decoding row that shares its prompt's start
                  (prompts taken together: the later ones prefilled after the first, from its row)
    ours, off     the same engine with that sharing switched off (``_Batch.share`` made a no-op, and prompts
                  taken together prefilled in one pass): every prompt prefilled whole, as before it existed
    hf, batched   transformers ``generate()`` on the whole workload as one left-padded batch (agents), or with
                  ``num_return_sequences`` (choices): one prefill pass of every prompt

For each: the median time to first token over the requests (submission -> first token), the time until the
last request's first token, and the time until every answer is done; the sides alternate, ``--repeats``
times, and each figure is the median. Prints a table and writes benchmarks/results/shared_prefix.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from local_cpu import _cpu_name
from prefix_cache import QUESTIONS, SHAPE, SYSTEM, TOOLS
from transformers import LogitsProcessor, LogitsProcessorList

from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.engine import engine as engine_module
from mixtral_local.loader import load_model
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

T = TypeVar("T")
Workload = tuple[list[list[int]], list[SamplingParams]]
Figures = dict[str, float]  # ttft_median_ms, last_first_token_ms, done_ms


def in_own_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a short-lived thread: on CPU each thread that runs torch gets its own OpenMP pool, and while
    two pools live their workers stop spinning between operators. The main thread runs no torch, the engine's
    batch runs in its scheduler's thread (over when idle), and transformers in a thread of its own."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # its one thread ends with the block
        return pool.submit(fn).result()  # fn's exception, if any, raised here


@contextlib.contextmanager
def sharing_off() -> Iterator[None]:
    share, waves = engine_module._Batch.share, engine_module.shared_start_waves
    engine_module._Batch.share = lambda *_: None  # type: ignore[method-assign]
    engine_module.shared_start_waves = lambda rows: (list(rows), [])
    try:
        yield
    finally:
        engine_module._Batch.share = share  # type: ignore[method-assign]
        engine_module.shared_start_waves = waves


def ours(engine: Engine, work: Workload) -> Figures:
    prompts, params = work
    start = time.perf_counter()
    tickets = engine.submit_all(prompts, params)
    first: list[float] = [0.0] * len(tickets)

    def drain(i: int) -> None:
        for n, _ in enumerate(tickets[i]):
            if n == 0:
                first[i] = time.perf_counter() - start

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(tickets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = time.perf_counter() - start
    if engine.scheduler._last is not None:
        engine.scheduler._last.join()  # its OpenMP pool goes with it
    return {"ttft_median_ms": statistics.median(first) * 1e3, "last_first_token_ms": max(first) * 1e3,
            "done_ms": done * 1e3}


class _FirstCall(LogitsProcessor):
    """Records when generate() first asks for the next token's scores: the prompts have been prefilled."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        del input_ids  # only the time matters
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def hf(model: Any, work: Workload, answer: int, choices: bool) -> Figures:
    prompts, _ = work
    kwargs: dict[str, Any]
    if choices:
        ids = torch.tensor([prompts[0]])
        kwargs = {"do_sample": True, "temperature": 0.8, "num_return_sequences": len(prompts)}
        mask = torch.ones_like(ids)
    else:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])  # left-padded with EOS
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs = {"do_sample": False}
    clock = _FirstCall()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=answer, min_new_tokens=answer, pad_token_id=2,
                       logits_processor=LogitsProcessorList([clock]), **kwargs)
    done = time.perf_counter() - start
    assert clock.at is not None
    ttft = (clock.at - start) * 1e3
    return {"ttft_median_ms": ttft, "last_first_token_ms": ttft, "done_ms": done * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--answer", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shared_prefix.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        path = in_own_thread(lambda: write_tiny_checkpoint(Path(tmp), seed=0, **SHAPE))
        model = in_own_thread(lambda: load_model(path, dtype="float32", device="cpu"))
        hf_model = in_own_thread(
            lambda: transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    tokenizer = MixtralTokenizer.from_pretrained(None)
    engine = Engine(model, tokenizer, max_batch=max(args.requests, args.choices), prefix_cache=0)

    short_system = SYSTEM.split(" Tools: ")[0] + " Tools: " + json.dumps(TOOLS[:4])

    def prompt(question: str, system: str = SYSTEM) -> list[int]:
        return tokenizer.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": question}])

    greedy = SamplingParams(temperature=0, max_tokens=args.answer)
    questions = [QUESTIONS[i % len(QUESTIONS)] + f" (customer {i})" for i in range(args.requests)]
    workloads: dict[str, tuple[Workload, bool]] = {
        "agents": (([prompt(q) for q in questions], [greedy] * args.requests), False),
        "short": (([prompt(q, short_system) for q in questions], [greedy] * args.requests), False),
        "choices": (([prompt(QUESTIONS[0])] * args.choices,
                     [SamplingParams(temperature=0.8, seed=s, max_tokens=args.answer) for s in range(args.choices)]),
                    True),
    }

    def off(work: Workload) -> Figures:
        with sharing_off():
            return ours(engine, work)

    sides: dict[str, Callable[[Workload, bool], Figures]] = {
        "ours": lambda w, _c: ours(engine, w),
        "ours, off": lambda w, _c: off(w),
        "hf, batched": lambda w, c: in_own_thread(lambda: hf(hf_model, w, args.answer, c)),
    }
    for (work, choices) in workloads.values():  # warm-up, outside the timings
        for side in sides.values():
            side(([p[:64] for p in work[0][:2]], work[1][:2]), choices)
    runs: dict[str, dict[str, list[Figures]]] = {w: {s: [] for s in sides} for w in workloads}
    for _ in range(args.repeats):
        for wname, (work, choices) in workloads.items():
            for sname, side in sides.items():
                runs[wname][sname].append(side(work, choices))

    print(f"{'workload':>8} {'side':>12} {'ttft med ms':>11} {'last 1st ms':>11} {'done ms':>9} "
          f"{'ttft x':>7} {'last x':>7} {'done x':>7}")
    results: dict[str, Any] = {}
    for wname, per_side in runs.items():
        med = {s: {k: statistics.median(f[k] for f in figs) for k in figs[0]} for s, figs in per_side.items()}
        base = med["ours"]
        results[wname] = {
            "prompt_tokens": [len(p) for p in workloads[wname][0][0]],
            "median": med,
            "ratios_vs_ours": {s: {k: v / base[k] for k, v in m.items()} for s, m in med.items() if s != "ours"},
        }
        for s, m in med.items():
            print(f"{wname:>8} {s:>12} {m['ttft_median_ms']:>11.1f} {m['last_first_token_ms']:>11.1f} "
                  f"{m['done_ms']:>9.1f} {m['ttft_median_ms'] / base['ttft_median_ms']:>6.2f}x "
                  f"{m['last_first_token_ms'] / base['last_first_token_ms']:>6.2f}x "
                  f"{m['done_ms'] / base['done_ms']:>6.2f}x")
    out = {
        "command": f"python benchmarks/shared_prefix.py --requests {args.requests} --choices {args.choices} "
        f"--answer {args.answer} --repeats {args.repeats} --threads {args.threads}",
        "machine": {"cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "shape": SHAPE,
        "workloads": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
