"""Int8 weight-only experts against float weights on one random Mixtral (CPU): memory, decode speed, error.

    python benchmarks/int8_experts.py [--tokens 32] [--repeats 5] [--threads N]

Model: hidden 1024, 2 layers, 8 experts (top-2, width 3584), 8 query / 2 KV heads of 128, 32k vocabulary, so
that the experts are most of the weights, as in Mixtral (97%). Loaded four ways: float32, bfloat16, and each
with ``quantize="int8"``. For each: the bytes of its weights; decode tokens/s at batch 1, greedy, as in
``local_cpu.py`` ((tokens - 1) / (last token time - first), the prefill left out; the modes alternate, median
of the runs); and the relative error of its logits on a 64-token prompt against float32's. Prints a table and
writes benchmarks/results/int8_experts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from local_cpu import _cpu_name, _ours

from mixtral_local.engine import Engine
from mixtral_local.loader import load_model
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

SHAPE = {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 2, "num_local_experts": 8,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 32000}
MODES = {"float32": ("float32", None), "float32, int8 experts": ("float32", "int8"),
         "bfloat16": ("bfloat16", None), "bfloat16, int8 experts": ("bfloat16", "int8")}
PROMPT = [{"role": "user", "content": "Tell me about the sea, the wind and the boats that sail on them."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_experts.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, seed=0, **SHAPE)
        tokenizer = MixtralTokenizer.from_pretrained(path)
        models = {name: load_model(path, dtype=dt, device="cpu", quantize=q, progress=False)
                  for name, (dt, q) in MODES.items()}
    prompt = tokenizer.encode_chat(PROMPT)
    ids = torch.tensor([list(range(1, 65))])
    with torch.inference_mode():
        exact = models["float32"](ids)
        errors = {name: float((m(ids).float() - exact).norm() / exact.norm()) for name, m in models.items()}
    engines = {name: Engine(m, tokenizer, prefix_cache=0) for name, m in models.items()}
    for engine in engines.values():
        _ours(engine, prompt, 4)  # warm up
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            runs[name].append(_ours(engine, prompt, args.tokens))

    rows = []
    base = statistics.median(runs["float32"])
    for name, model in models.items():
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        tok_s = statistics.median(runs[name])
        rows.append({"mode": name, "weight_bytes": weight_bytes, "decode_tok_s": tok_s,
                     "speed_vs_float32": tok_s / base, "logits_rel_error": errors[name], "runs": runs[name]})
    full = rows[0]["weight_bytes"]
    print(f"{'mode':<26}{'weights MiB':>12}{'vs fp32':>9}{'decode tok/s':>14}{'vs fp32':>9}{'logits rel err':>16}")
    for row in rows:
        print(f"{row['mode']:<26}{row['weight_bytes'] / 2**20:>12.0f}{row['weight_bytes'] / full:>9.2f}"
              f"{row['decode_tok_s']:>14.1f}{row['speed_vs_float32']:>9.2f}{row['logits_rel_error']:>16.2e}")
    result = {
        "command": f"python benchmarks/int8_experts.py --tokens {args.tokens} --repeats {args.repeats} "
                   f"--threads {args.threads}",
        "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__, "model": SHAPE, "batch": 1,
        "prompt_tokens": len(prompt), "new_tokens": args.tokens, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}  ({result['cpu']}, {args.threads} threads)")


if __name__ == "__main__":
    main()
