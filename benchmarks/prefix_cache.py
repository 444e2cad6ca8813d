"""Time to first token over a growing agent conversation: prefix caching on vs off, and transformers (CPU).

    python benchmarks/prefix_cache.py [--turns 8] [--answer 24] [--repeats 3] [--threads N]

Model: the random small Mixtral of ``local_cpu.py`` (hidden 256, 4 layers, 8 experts, top-2, 32k vocabulary),
fp32, batch 1, greedy. The conversation: a system prompt with tool definitions (about 700 tokens), then
``--turns`` user turns; each turn's prompt is the whole conversation so far, and its answer (``--answer``
tokens, fixed once for all) goes back into the conversation as text. Every side generates the whole answer
of every turn; the time to first token (prompt sent -> first token out) is what is compared. Sides:

    ours         Engine with the prefix cache on (the default)
    ours, off    Engine(prefix_cache=0): every prompt prefilled whole
    hf           transformers generate(), a fresh prefill per turn (what generate() does by default)
    hf, by hand  transformers with the cache carried from turn to turn by hand (its documented pattern:
                 keep generate()'s past_key_values, crop it to the tokens the next prompt shares, pass it in)

Conversations alternate between the sides, ``--repeats`` times; per turn the median. Prints a table and
writes benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from local_cpu import SHAPE as LOCAL_CPU_SHAPE
from local_cpu import _Clock, _cpu_name
from transformers import DynamicCache

from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.engine.prefix_cache import common_prefix
from mixtral_local.loader import load_model
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

SHAPE = {**LOCAL_CPU_SHAPE, "max_position_embeddings": 8192}  # the model of local_cpu.py, longer context
TOOLS = [
    {
        "name": f"tool_{i}",
        "description": f"Looks up {what} in the shop's catalogue and returns a JSON record.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "search text"},
                "limit": {"type": "integer", "minimum": 1},
            },
            "required": ["query"],
        },
    }
    for i, what in enumerate(
        ("hammers", "nails", "screws", "paint", "ladders", "rope", "glue", "drills", "saws", "tape")
    )
]
SYSTEM = (
    "You are the assistant of a hardware shop. Call a tool when the catalogue can answer; otherwise answer "
    "in one short sentence. Tools: " + json.dumps(TOOLS)
)
QUESTIONS = [
    "Where are the hammers?",
    "Do you have galvanised nails?",
    "Which glue holds oak best?",
    "Can I rent a ladder for a day?",
    "What paint covers rust?",
    "Is there a cheaper drill?",
    "How long is the rope on aisle 4?",
    "Do you cut keys?",
    "Which tape survives outdoors?",
    "Can you order saw blades?",
    "When do you open on Sunday?",
    "Thanks, that is all.",
]


def conversation(tokenizer: MixtralTokenizer, engine: Engine, turns: int, answer: int) -> list[list[int]]:
    """The prompt of every turn; the answers (greedy, ``answer`` tokens) are generated once and re-sent as text."""
    messages: list[Any] = [{"role": "system", "content": SYSTEM}]
    prompts = []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        prompts.append(tokenizer.encode_chat(messages))
        done = engine.generate([prompts[-1]], SamplingParams(temperature=0, max_tokens=answer))[0]
        messages.append({"role": "assistant", "content": tokenizer.decode(done.token_ids).strip() or "..."})
    return prompts


def ours(engine: Engine, prompt: list[int], answer: int) -> tuple[float, int]:
    start = time.perf_counter()
    stream = engine.stream([prompt], SamplingParams(temperature=0, max_tokens=answer))
    first = next(stream)
    ttft = time.perf_counter() - start
    for _ in stream:
        pass
    return ttft, first.cached_tokens


class HF:
    """transformers generate(); ``carry``: the cache of the previous turn reused as far as the prompt shares it."""

    def __init__(self, model: Any, carry: bool) -> None:
        self.model, self.carry = model, carry
        self.cache: Any = None
        self.cached_ids: list[int] = []

    def reset(self) -> None:
        self.cache, self.cached_ids = None, []

    def __call__(self, prompt: list[int], answer: int) -> tuple[float, int]:
        clock = _Clock()
        reused = 0
        kwargs: dict[str, Any] = {}
        if self.carry:
            if self.cache is not None:
                reused = min(common_prefix(self.cached_ids, prompt), len(prompt) - 1)
                extra = self.cache.get_seq_length() - reused
                if extra > 0:  # a negative count removes tokens, in transformers 4.x and 5.x alike
                    self.cache.crop(-extra)
            kwargs = {
                "past_key_values": self.cache if self.cache is not None else DynamicCache(),
                "return_dict_in_generate": True,
            }
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=answer,
                min_new_tokens=answer,
                streamer=clock,
                pad_token_id=2,
                **kwargs,
            )
        ttft = clock.times[1] - start
        if self.carry:
            self.cache = out.past_key_values
            self.cached_ids = out.sequences[0].tolist()[: self.cache.get_seq_length()]
        return ttft, reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--answer", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefix_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(Path(tmp), seed=0, **SHAPE)
        model = load_model(path, dtype="float32", device="cpu")
        hf_model = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = MixtralTokenizer.from_pretrained(None)
    warm, cold = Engine(model, tokenizer), Engine(model, tokenizer, prefix_cache=0)
    prompts = conversation(tokenizer, cold, args.turns, args.answer)

    sides: dict[str, Callable[[list[int], int], tuple[float, int]]] = {
        "ours": lambda p, n: ours(warm, p, n),
        "ours, off": lambda p, n: ours(cold, p, n),
        "hf": HF(hf_model, carry=False),
        "hf, by hand": HF(hf_model, carry=True),
    }
    ttft: dict[str, list[list[float]]] = {name: [[] for _ in prompts] for name in sides}
    reused: dict[str, list[int]] = {name: [0] * len(prompts) for name in sides}
    for side in sides.values():  # warm-up: one turn each, outside the timings
        side(prompts[0][:64], 2)
    for _ in range(args.repeats):
        warm.prefix_cache.clear()
        for name, side in sides.items():
            if isinstance(side, HF):
                side.reset()
            for t, prompt in enumerate(prompts):
                seconds, n = side(prompt, args.answer)
                ttft[name][t].append(seconds)
                reused[name][t] = n

    med = {name: [statistics.median(times) for times in per_turn] for name, per_turn in ttft.items()}
    header = (
        f"{'turn':>4} {'prompt':>6} {'reused':>6} {'ours ms':>8} {'off ms':>8} {'hf ms':>8} {'hf hand ms':>10}"
        f" {'off/ours':>8} {'hf/ours':>8} {'hand/ours':>9}"
    )
    print(header)
    rows = []
    for t, prompt in enumerate(prompts):
        o, off, hf, hand = (med[name][t] * 1e3 for name in sides)
        rows.append(
            {
                "turn": t + 1,
                "prompt_tokens": len(prompt),
                "reused_ours": reused["ours"][t],
                "reused_hf_by_hand": reused["hf, by hand"][t],
                "ttft_ms": {n: med[n][t] * 1e3 for n in sides},
            }
        )
        print(
            f"{t + 1:>4} {len(prompt):>6} {reused['ours'][t]:>6} {o:>8.1f} {off:>8.1f} {hf:>8.1f} {hand:>10.1f}"
            f" {off / o:>7.2f}x {hf / o:>7.2f}x {hand / o:>8.2f}x"
        )
    later = range(1, len(prompts))  # the turns that can reuse something
    totals = {name: sum(med[name][t] for t in later) * 1e3 for name in sides}
    print(f"turns 2..{len(prompts)}, summed ttft: " + ", ".join(f"{n} {v:.0f} ms" for n, v in totals.items()))
    print(
        f"ratios (turns 2..): off/ours {totals['ours, off'] / totals['ours']:.2f}x, hf/ours "
        f"{totals['hf'] / totals['ours']:.2f}x, hf by hand/ours {totals['hf, by hand'] / totals['ours']:.2f}x"
    )
    result = {
        "command": f"python benchmarks/prefix_cache.py --turns {args.turns} --answer {args.answer} "
        f"--repeats {args.repeats} --threads {args.threads}",
        "machine": {
            "cpu": _cpu_name(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "shape": SHAPE,
        "turns": rows,
        "summed_ttft_ms_turns_2_on": totals,
        "ratios_turns_2_on": {
            "off/ours": totals["ours, off"] / totals["ours"],
            "hf/ours": totals["hf"] / totals["ours"],
            "hf_by_hand/ours": totals["hf, by hand"] / totals["ours"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
