"""What structured output costs on the local backend: llguidance (ours) against xgrammar (vLLM's and SGLang's
default grammar engine), on Mixtral's real tokenizer, in one run.

    python benchmarks/structured_output.py [--repeats 5]     # needs xgrammar installed for the peer column

Per grammar (JSON mode, a person schema, a required call of one of two tools), both engines are fed the
same token sequence, a valid answer tokenized with Mixtral's tokenizer (with no leading "▁", which
xgrammar's JSON would refuse), and time, per token:
- **mask**: computing the set of allowed next tokens (llguidance: ``compute_logit_bias``, as our engine
  calls it; xgrammar: ``fill_next_token_bitmask``), then accepting the token;
- **mask + apply**: the same, plus masking a [32000] fp32 logits row (ours: ``Constraint.mask``, the engine's
  own path; xgrammar: ``apply_token_bitmask_inplace``).
Also once per grammar: the time to compile it and start a matcher (what a request pays before its first
token; xgrammar's compile cache is off, so a schema seen before would cost it nothing), and once per engine
the tokenizer table (paid once per process). **request** = compile + tokens x (mask + apply): the grammar's
whole cost to one answer of that length.

The end-to-end row runs the engine on a small random Mixtral (hidden 256, 4 layers, 8 experts, CPU, greedy):
tokens/s with the person schema against the same number of tokens unconstrained. A real Mixtral step takes
tens of milliseconds on an H100, so the per-token mask time is what to hold against that.
Medians over ``--repeats``. Prints a table; writes benchmarks/results/structured_output.json.
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

from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.engine.grammar import (
    Constraint,
    _TokenizerWrapper,
    json_grammar,
    token_table,
    tool_calls_grammar,
)
from mixtral_local.loader import load_model
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "structured_output.json"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "email": {"type": "string"},
    "tags": {"type": "array", "items": {"enum": ["admin", "staff", "guest"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False},
}, "required": ["name", "age", "email", "tags", "address"], "additionalProperties": False}
PERSON_TEXT = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["admin", "staff"],
                          "address": {"city": "London", "zip": "W1 4AB"}})
TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}},
    {"name": "search_flights", "parameters": {"type": "object", "properties": {
        "origin": {"type": "string"}, "destination": {"type": "string"}, "date": {"type": "string"},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["origin", "destination", "date", "passengers"], "additionalProperties": False}},
]
CALLS_TEXT = "[TOOL_CALLS] " + json.dumps([{"name": "search_flights", "arguments": {
    "origin": "Berlin", "destination": "Lisbon", "date": "2026-12-03", "passengers": 2}}])
MIXED_TEXT = json.dumps({"id": 7, "items": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-22", "qty": 1,
                         "price": 120.0}], "note": "leave at the door", "gift": False, "coupon": None})


def _calls_schema() -> dict[str, Any]:
    calls = [{"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for fn in TOOLS]
    return {"type": "array", "items": {"anyOf": calls}, "minItems": 1}


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


class Ours:
    name = "llguidance (mixtral_local)"

    def __init__(self, tok: MixtralTokenizer) -> None:
        started = time.perf_counter()
        self.table = token_table(tok)
        self.table_s = time.perf_counter() - started

    def grammar(self, kind: str) -> Any:
        if kind == "json_object":
            return json_grammar(None)
        if kind == "person":
            return json_grammar(PERSON)
        return tool_calls_grammar(TOOLS, marker="[TOOL_CALLS]", one=False)

    def start(self, grammar: Any) -> Any:
        return Constraint(self.table, grammar)

    def step(self, matcher: Any, token: int, logits: torch.Tensor | None) -> None:
        if logits is None:
            matcher._matcher.compute_logit_bias()
        else:
            matcher.mask(logits)
        matcher.accept(token)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: MixtralTokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        started = time.perf_counter()
        vocab = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_FALLBACK, vocab_size=tok.vocab_size,
                                 stop_token_ids=[tok.eos_id], add_prefix_space=True)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.table_s = time.perf_counter() - started
        self.bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)

    def grammar(self, kind: str) -> Any:
        if kind == "json_object":
            return self.compiler.compile_builtin_json_grammar()
        if kind == "person":
            return self.compiler.compile_json_schema(json.dumps(PERSON), any_whitespace=False, separators=(", ", ": "))
        g = self.xgr.Grammar  # the tool-call answer: the marker, then the calls' JSON
        calls = g.from_json_schema(json.dumps(_calls_schema()), any_whitespace=False, separators=(", ", ": "))
        return self.compiler.compile_grammar(g.concat(g.from_ebnf('root ::= "[TOOL_CALLS] "'), calls))

    def start(self, grammar: Any) -> Any:
        return self.xgr.GrammarMatcher(grammar)

    def step(self, matcher: Any, token: int, logits: torch.Tensor | None) -> None:
        matcher.fill_next_token_bitmask(self.bitmask)
        if logits is not None:
            self.xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self.bitmask)
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")


def run_engine(engine: Any, kind: str, tokens: list[int], repeats: int) -> dict[str, Any]:
    grammar = engine.grammar(kind)
    compile_s, mask_s, apply_s = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        matcher = engine.start(engine.grammar(kind))
        compile_s.append(time.perf_counter() - started)
        matcher = engine.start(grammar)
        started = time.perf_counter()
        for token in tokens:
            engine.step(matcher, token, None)
        mask_s.append((time.perf_counter() - started) / len(tokens))
        matcher = engine.start(grammar)
        logits = torch.randn(32000)
        started = time.perf_counter()
        for token in tokens:
            engine.step(matcher, token, logits.clone())
        apply_s.append((time.perf_counter() - started) / len(tokens))
    out = {"compile_us": _median_us(compile_s), "mask_us": _median_us(mask_s), "mask_apply_us": _median_us(apply_s)}
    out["request_ms"] = (out["compile_us"] + len(tokens) * out["mask_apply_us"]) / 1e3
    return out


def end_to_end(tok: MixtralTokenizer, repeats: int) -> dict[str, Any]:
    shape = {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 2, "head_dim": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
             "max_position_embeddings": 4096}
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(load_model(write_tiny_checkpoint(Path(tmp) / "m", **shape), dtype="float32", device="cpu"),
                        tok)
    prompt = tok.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    grammar = json_grammar(PERSON)
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, grammar=grammar))  # warm up
    constrained, free, counts = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        done = engine.generate([prompt], SamplingParams(temperature=0.7, seed=1, max_tokens=300, grammar=grammar))[0]
        constrained.append((time.perf_counter() - started) / done.completion_tokens)
        counts.append(done.completion_tokens)
        started = time.perf_counter()
        plain = engine.generate([prompt], SamplingParams(temperature=0.7, seed=1, max_tokens=done.completion_tokens))[0]
        free.append((time.perf_counter() - started) / plain.completion_tokens)
    return {"tokens": statistics.median(counts), "constrained_ms_per_token": statistics.median(constrained) * 1e3,
            "free_ms_per_token": statistics.median(free) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = MixtralTokenizer.from_pretrained(None)
    engines: list[Any] = [Ours(tok)]
    try:
        engines.append(Xgrammar(tok))
    except ImportError:
        print("xgrammar is not installed: the peer column stays empty (pip install xgrammar)")
    workloads = [("json_object", MIXED_TEXT), ("person", PERSON_TEXT), ("tool_call", CALLS_TEXT)]
    rows: list[dict[str, Any]] = []
    for kind, text in workloads:
        tokens = _TokenizerWrapper(tok)(text)  # as the answer's continuation: no leading "▁"
        for engine in engines:
            rows.append({"grammar": kind, "engine": engine.name, "tokens": len(tokens),
                         **run_engine(engine, kind, tokens, args.repeats)})
    e2e = end_to_end(tok, args.repeats)

    print(f"\n{'grammar':<12} {'engine':<27} {'tokens':>6} {'compile us':>11} {'mask us/tok':>12} {'+apply us/tok':>14} "
          f"{'request ms':>11}")
    for r in rows:
        print(f"{r['grammar']:<12} {r['engine']:<27} {r['tokens']:>6} {r['compile_us']:>11.0f} {r['mask_us']:>12.1f} "
              f"{r['mask_apply_us']:>14.1f} {r['request_ms']:>11.2f}")
    print("\ntokenizer table: " + ", ".join(f"{e.name} {e.table_s * 1e3:.0f} ms" for e in engines))
    ratios = {}
    if len(engines) == 2:
        for kind, _ in workloads:
            ours, peer = (next(r for r in rows if r["grammar"] == kind and r["engine"] == e.name) for e in engines)
            ratios[kind] = {"mask": ours["mask_us"] / peer["mask_us"], "mask_apply": ours["mask_apply_us"] / peer["mask_apply_us"],
                            "compile": ours["compile_us"] / peer["compile_us"],
                            "request": ours["request_ms"] / peer["request_ms"]}
            print(f"ours / xgrammar, {kind}: mask {ratios[kind]['mask']:.2f}x, mask+apply "
                  f"{ratios[kind]['mask_apply']:.2f}x, compile {ratios[kind]['compile']:.2f}x, "
                  f"request {ratios[kind]['request']:.2f}x (lower is faster)")
    print(f"\nend to end (small random Mixtral, CPU, {e2e['tokens']:.0f} tokens): constrained "
          f"{e2e['constrained_ms_per_token']:.2f} ms/token, free {e2e['free_ms_per_token']:.2f} ms/token "
          f"(+{e2e['constrained_ms_per_token'] - e2e['free_ms_per_token']:.2f} ms)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    versions: dict[str, str] = {"torch": torch.__version__}
    for module in ("llguidance", "xgrammar"):
        try:
            from importlib.metadata import version

            versions[module] = version(module)
        except Exception:
            pass
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "platform": platform.platform(),
                                   "python": platform.python_version(), "versions": versions, "commit": commit,
                                   "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows,
                                   "ratios": ratios, "end_to_end": e2e}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
