"""Raw-prompt completions (``client.completions.create(prompt=...)``) in the chat path's types, with no I/O.

A text request travels as a ``ChatRequest`` whose ``prompt`` is set, so validation, retries, deadlines,
streams, fallbacks, pacing and tracing are the chat path's. At the two edges the shapes differ:

- a host's legacy answer (``choices[i].text``, logprobs as ``tokens`` / ``token_logprobs`` / ``top_logprobs``)
  becomes the chat shape (``message.content``, logprobs as ``content``) before it is read (``chat_shaped``),
  and a stream chunk read as a chat chunk whose choices carry ``text`` is put in it after (``chat_chunk``);
- what the caller gets is a ``Completion`` again (``completion_from_chat``, and ``TextChunks`` for the chunks
  of a stream, whose ``text_offset`` continues from one chunk to the next).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Logprobs,
)

__all__ = ["TextChunks", "chat_chunk", "chat_shaped", "completion_from_chat", "is_text_shaped"]


def is_text_shaped(body: Any) -> bool:
    """``body`` is a legacy completions answer or chunk: its choices carry ``text``, not a message or delta."""
    choices = body.get("choices") if isinstance(body, dict) else None
    return isinstance(choices, list) and any(
        isinstance(c, dict) and "text" in c and "message" not in c and "delta" not in c for c in choices)


def _chat_logprobs(legacy: Any) -> Any:
    """Legacy logprobs (parallel lists) as chat logprobs (``content``: one entry per token); anything else as
    it came."""
    if not isinstance(legacy, Mapping) or not isinstance(legacy.get("tokens"), list):
        return legacy
    tokens, values = legacy["tokens"], legacy.get("token_logprobs") or []
    tops = legacy.get("top_logprobs") or []
    content = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) else {}  # None at an echoed prompt's first token: kept
        content.append({"token": token, "logprob": values[i] if i < len(values) else None,
                        "top_logprobs": [{"token": t, "logprob": p} for t, p in top.items()]
                        if isinstance(top, Mapping) else None})
    return {"content": content}


def chat_shaped(body: dict[str, Any]) -> dict[str, Any]:
    """A legacy completions answer in the chat shape: each choice's ``text`` as the assistant message's content,
    its logprobs as chat logprobs."""
    choices = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict) or "text" not in choice:
            choices.append(choice)
            continue
        shaped = {k: v for k, v in choice.items() if k != "text"}
        text = choice["text"]
        shaped["message"] = {"role": "assistant", "content": text}
        if choice.get("logprobs") is not None:
            shaped["logprobs"] = _chat_logprobs(choice["logprobs"])
        choices.append(shaped)
    return {**body, "choices": choices}


def chat_chunk(chunk: ChatCompletionChunk) -> ChatCompletionChunk:
    """A legacy stream chunk that was read as a chat chunk (each choice's ``text`` an extra field, its legacy
    logprobs read as extra fields too) in the chat shape, without reading its JSON again."""
    choices = []
    for c in chunk.choices:
        extra = dict(c.model_extra or {})
        text = extra.pop("text", None)
        logprobs: Any = c.logprobs
        if isinstance(logprobs, ChoiceLogprobs) and logprobs.content is None and logprobs.model_extra:
            logprobs = _chat_logprobs(logprobs.model_extra)  # legacy lists, kept as extras of the chat type
        choices.append(ChunkChoice(index=c.index, delta=ChoiceDelta(content=text), finish_reason=c.finish_reason,
                                   logprobs=logprobs, **extra))
    return chunk.model_copy(update={"choices": choices})


def _legacy_logprobs(logprobs: Logprobs | None, offset: int) -> CompletionLogprobs | dict[str, Any] | None:
    """Chat logprobs as the legacy shape, ``text_offset`` counted from ``offset``; a host's other JSON as it came.
    An echoed prompt's first token has no log probability (None), so its entries travel as plain dicts."""
    entries: list[tuple[str, float | None, dict[str, float] | None]]
    if isinstance(logprobs, ChoiceLogprobs):
        entries = [(item.token, item.logprob, {top.token: top.logprob for top in item.top_logprobs})
                   for item in logprobs.content or []]
    elif isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list) and all(
            isinstance(item, Mapping) and "token" in item for item in logprobs["content"]):
        entries = [(item["token"], item.get("logprob"),
                    None if item.get("top_logprobs") is None else
                    {top["token"]: top["logprob"] for top in item["top_logprobs"]})
                   for item in logprobs["content"]]
    else:
        return logprobs
    tokens, values, tops, offsets = [], [], [], []
    for token, value, top in entries:
        tokens.append(token)
        values.append(value)
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def completion_from_chat(completion: ChatCompletion) -> Completion:
    """A whole answer as the completions API gives it (a host's extra fields are kept)."""
    extra = completion.model_extra or {}
    text = Completion(
        **{k: v for k, v in extra.items() if k != "object"}, id=completion.id, created=completion.created,
        model=completion.model, usage=completion.usage,
        choices=[CompletionChoice(index=c.index, text=c.message.content or "", finish_reason=c.finish_reason,
                                  logprobs=_legacy_logprobs(c.logprobs, 0)) for c in completion.choices],
    )
    text._request_id = completion._request_id
    return text


class TextChunks:
    """Stream chunks as completions-API chunks, one stream's worth: each choice's ``text_offset`` goes on from
    where its previous chunk's text ended. A chunk with nothing for the caller (the role alone) is None."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}  # choice index -> characters of text so far

    def convert(self, chunk: ChatCompletionChunk) -> Completion | None:
        choices = []
        for c in chunk.choices:
            text = c.delta.content or ""
            if not text and c.finish_reason is None and c.logprobs is None:
                continue
            offset = self._seen.get(c.index, 0)
            self._seen[c.index] = offset + len(text)
            choices.append(CompletionChoice(index=c.index, text=text, finish_reason=c.finish_reason,
                                            logprobs=_legacy_logprobs(c.logprobs, offset)))
        if not choices and chunk.usage is None:
            return None
        extra = chunk.model_extra or {}
        out = Completion(**{k: v for k, v in extra.items() if k != "object"}, id=chunk.id, created=chunk.created,
                         model=chunk.model, choices=choices, usage=chunk.usage)
        out._request_id = chunk._request_id
        return out
