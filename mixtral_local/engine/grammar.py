"""Constrained decoding: the tokens a request may sample next come from a grammar (llguidance).

``response_format`` and tool calls become a grammar (``json_grammar``, ``tool_calls_grammar``: required calls,
or under ``tool_choice="auto"`` calls when the answer opens with the marker and text or JSON otherwise).
Each row that has one holds a ``Constraint``: before sampling, every token the grammar cannot take next
gets a logit of -inf; after sampling, the token is fed to the matcher. End of sequence is allowed only
where the grammar may end, and once the grammar can take nothing more it is the only token left, so a
constrained answer ends where its JSON ends, and what it says parses (unless ``max_tokens`` or a stop
string cuts it short, as on OpenAI).

The JSON is written with fixed separators (``", "`` and ``": "``, the way Mixtral writes JSON) and no other
whitespace, so a model cannot loop on blanks. An answer may open with one space: the first token of a
Mixtral answer carries sentencepiece's "▁", which the text drops.

llguidance (MIT; Microsoft's guidance-ai, the engine behind vLLM's, SGLang's and llama.cpp's structured
output) is imported on first use: ``import mixtral_local`` does not need it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import llguidance

    from mixtral_local.tokenizer import MixtralTokenizer

__all__ = ["Constraint", "GrammarError", "check_grammar", "json_grammar", "token_table", "tool_calls_grammar"]

#: how JSON is written under a grammar: fixed separators, no free whitespace
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SPACE = 0x2581  # sentencepiece's word-boundary mark, "▁"


class GrammarError(ValueError):
    """A schema or grammar that cannot constrain decoding; the message says why."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - llguidance is part of the [local] extra
        raise GrammarError("structured output on the local backend needs llguidance: "
                           "pip install 'mixtral-sdk[local]' (or llguidance)") from None
    return llguidance


def _json_rule(schema: Mapping[str, Any], lenient: bool) -> str:
    options = {**_JSON_STYLE, "lenient": lenient}
    schema = dict(schema)
    schema["x-guidance"] = {**options, **schema.get("x-guidance", {})}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def json_grammar(schema: Mapping[str, Any] | None, *, lenient: bool = False) -> str:
    """A grammar for an answer that is one JSON value: any object (``schema=None``: JSON mode) or one that
    follows ``schema``. ``lenient``: keywords llguidance cannot enforce are ignored instead of refused."""
    body = _json_rule({"type": "object"} if schema is None else schema, lenient)
    return _llguidance().LLMatcher.grammar_from_lark(f'start: " "? answer\nanswer: {body}\n')


def tool_calls_grammar(functions: Sequence[Mapping[str, Any]], *, marker: str, one: bool, required: bool = True,
                       otherwise: Mapping[str, Any] | None = None, lenient: bool = False) -> str:
    """A grammar for an answer that is ``marker`` and a JSON list of calls, each ``{"name", "arguments"}``
    of one of ``functions`` (OpenAI function dicts), its arguments following that function's parameters
    schema; ``one``: exactly one call. Schemas are read leniently: a tool is never refused for a keyword.

    ``required=False`` (``tool_choice="auto"``): the answer may instead be text that does not open with
    ``marker`` (an answer that opens with it must be calls that parse), or, with ``otherwise`` (a
    ``response_format``'s schema, read as ``json_grammar`` reads it), one JSON value that follows it.
    """
    calls = []
    for fn in functions:
        parameters = fn.get("parameters") or {"type": "object"}
        calls.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": parameters},
                      "required": ["name", "arguments"], "additionalProperties": False})
    items: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                             "minItems": 1}
    if one:
        items["maxItems"] = 1
    calls_rule = f"calls: {_json_rule(items, lenient=True)}\n"
    if required:
        lark = f'start: " "? {json.dumps(marker + " ")} calls\n' + calls_rule
    else:  # the opening space is part of the marker's lexeme, so the lexer follows it and TEXT side by side
        lark = f"start: OPEN calls | other\nOPEN: / ?{re.escape(marker)} /\n" + calls_rule
        if otherwise is not None:
            lark += f'other: " "? answer\nanswer: {_json_rule(otherwise, lenient)}\n'
        else:  # any text but one that opens (after blanks) with the marker
            lark += f"other: TEXT\nTEXT: /(.|\\n)*/ & ~/\\s*{re.escape(marker)}(.|\\n)*/\n"
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def check_grammar(grammar: str) -> None:
    """Raise ``GrammarError`` with llguidance's reason when ``grammar`` is not usable."""
    reason = _unusable(grammar)
    if reason is not None:
        raise GrammarError(reason)


@functools.lru_cache(maxsize=256)  # requests repeat their schemas and tools: check each grammar once
def _unusable(grammar: str) -> str | None:
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return None
    # "at 2(9): failed to compile JSON schema: ...", then the grammar: the reason is what counts
    reason = messages[0].splitlines()[0] if messages else "invalid grammar"
    return re.sub(r"^at \d+\(\d+\): ", "", reason)


class _TokenizerWrapper:
    """What ``llguidance.LLTokenizer`` reads: each token's bytes, and exact tokenization of any text."""

    def __init__(self, tokenizer: MixtralTokenizer) -> None:
        sp = tokenizer.sp
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(tokenizer.vocab_size):
            byte = tokenizer.byte_value(i)
            if sp.IsControl(i) or sp.IsUnknown(i):
                self.tokens.append(b"\xff" + sp.id_to_piece(i).encode())  # llguidance's mark of a special token
                self.special_token_ids.append(i)
            elif byte is not None:
                self.tokens.append(bytes([byte]))
            else:
                self.tokens.append(sp.id_to_piece(i).replace(chr(_SPACE), " ").encode())
        self._sp = sp
        self._lead = sp.encode("\n")  # "▁", "\n": what precedes the text when it follows a newline

    def __call__(self, text: str | bytes) -> list[int]:
        """``text``'s tokens as they continue a sequence (sentencepiece alone would add a leading "▁")."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids: list[int] = self._sp.encode("\n" + text)
        return ids[len(self._lead):]


def token_table(tokenizer: MixtralTokenizer) -> llguidance.LLTokenizer:
    """The tokenizer's vocabulary as llguidance reads it (about 60 ms to build: build it once)."""
    llg = _llguidance()
    return llg.LLTokenizer(llg.TokenizerWrapper(_TokenizerWrapper(tokenizer)))


class Constraint:
    """One row's grammar state: ``mask()`` the logits before sampling, ``accept()`` the sampled token.

    ``lazy_marker`` (tool calls under ``tool_choice="auto"``, whose grammar is calls after the marker or any
    other text): the grammar holds while the answer may still open with the marker. Once it cannot, the
    answer is free text, and the grammar is no longer consulted: no mask costs a token's time.
    """

    def __init__(self, table: llguidance.LLTokenizer, grammar: str, *, lazy_marker: str | None = None,
                 _matcher: Any = None) -> None:
        self._matcher = _llguidance().LLMatcher(table, grammar, log_level=0) if _matcher is None else _matcher
        self._check()
        self._table, self._grammar = table, grammar
        self._marker = None if lazy_marker is None else lazy_marker.encode()
        self._opening = b""  # the answer so far, while it may still open with the marker
        self.free = False

    def fresh(self, *, lazy_marker: str | None = None) -> Constraint:
        """A new constraint for the same grammar, at its start, without compiling it again (this one must not
        have taken a token yet)."""
        return Constraint(self._table, self._grammar, lazy_marker=lazy_marker, _matcher=self._matcher.deep_copy())

    def _check(self) -> None:
        if self._matcher.is_error():  # the reason, then the matcher's state and the grammar
            raise GrammarError(f"structured output: {self._matcher.get_error().splitlines()[0]}")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [V] with every token the grammar cannot take next at -inf."""
        if self.free:
            return logits
        allowed = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8)
        self._check()
        vocab = allowed.numel()
        masked = logits.clone()
        masked[:vocab].masked_fill_(allowed.to(logits.device, non_blocking=True) == 0, float("-inf"))
        masked[vocab:] = float("-inf")  # rows past the tokenizer's vocabulary (padding in the checkpoint)
        return masked

    def accept(self, token: int) -> None:
        if self.free:
            return
        if not self._matcher.consume_token(token):
            self._check()
            raise GrammarError(f"structured output: token {token} was not allowed")
        if self._marker is not None:
            self._opening += self._table.decode_bytes([token])
            start = self._opening.lstrip()
            self.free = not (self._marker.startswith(start) or start.startswith(self._marker))

    @property
    def done(self) -> bool:
        """The grammar can take nothing more than the end of the sequence."""
        return bool(self._matcher.is_stopped())
