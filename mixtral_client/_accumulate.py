"""Merging stream chunks into one ``ChatCompletion`` (pure; used by every backend's streams).

Tool-call fragments are keyed by their ``index``. Hosts that send ``index: null`` are tolerated: a
fragment with a new ``id`` opens a new call, a fragment with a known ``id`` continues that call, and a
fragment with neither continues the last call of its choice, unless its position says otherwise: it
is not the first entry of its delta (several whole calls in one delta), or it carries a function name
while the last call already has one (a name only ever opens a call).
"""

from __future__ import annotations

from typing import Any

from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    ChoiceLogprobs,
    FunctionCall,
    Logprobs,
    ToolCall,
    Usage,
    new_tool_call_id,
)

__all__ = ["ChunkAccumulator", "whole_call_deltas"]


def whole_call_deltas(calls: list[ToolCall]) -> list[ChoiceDeltaToolCall]:
    """Whole tool calls as the stream deltas that ``ChunkAccumulator`` merges back into them (one per index)."""
    return [
        ChoiceDeltaToolCall(index=i, id=c.id, type=c.type,
                            function=ChoiceDeltaToolCallFunction(name=c.function.name, arguments=c.function.arguments))
        for i, c in enumerate(calls)
    ]


class _ToolCallParts:
    __slots__ = ("arguments", "extra", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: list[str] = []
        self.arguments: list[str] = []
        self.extra: dict[str, Any] = {}


class _ChoiceParts:
    __slots__ = ("by_id", "by_index", "calls", "content", "finish_reason", "logprobs", "role")

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: list[Logprobs] = []
        self.calls: list[_ToolCallParts] = []
        self.by_index: dict[int, _ToolCallParts] = {}
        self.by_id: dict[str, _ToolCallParts] = {}

    def tool_call(self, delta: ChoiceDeltaToolCall, position: int) -> _ToolCallParts:
        """The call a fragment belongs to; ``position`` is the fragment's place in its delta's list."""
        if delta.index is not None:
            parts = self.by_index.get(delta.index)
            if parts is None:
                parts = self.by_index[delta.index] = self._new()
        elif delta.id is not None and delta.id in self.by_id:
            parts = self.by_id[delta.id]
        elif delta.id is not None or not self.calls or position > 0 or self._names_another(delta):
            parts = self._new()
        else:
            parts = self.calls[-1]
        if delta.id is not None and parts.id is None:
            parts.id = delta.id
            self.by_id[delta.id] = parts
        return parts

    def _names_another(self, delta: ChoiceDeltaToolCall) -> bool:
        return bool(delta.function and delta.function.name and self.calls[-1].name)

    def _new(self) -> _ToolCallParts:
        parts = _ToolCallParts()
        self.calls.append(parts)
        return parts


class ChunkAccumulator:
    """Feed chunks with ``add``; read the merged completion with ``completion()`` at any time."""

    __slots__ = ("_choices", "created", "extra", "id", "model", "request_id", "usage")

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceParts] = {}
        self.id = ""
        self.model = ""
        self.created = 0
        self.usage: Usage | None = None
        self.extra: dict[str, Any] = {}
        self.request_id: str | None = None

    def add(self, chunk: ChatCompletionChunk) -> None:
        if not self.id and chunk.id:
            self.id = chunk.id
        if self.request_id is None:
            self.request_id = chunk._request_id
        if not self.model and chunk.model:
            self.model = chunk.model
        if not self.created and chunk.created:
            self.created = chunk.created
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.model_extra:
            for key, value in chunk.model_extra.items():
                if key != "error":
                    self.extra[key] = value
        for choice in chunk.choices:
            parts = self._choices.get(choice.index)
            if parts is None:
                parts = self._choices[choice.index] = _ChoiceParts()
            delta = choice.delta
            if delta.role:
                parts.role = delta.role
            if delta.content:
                parts.content.append(delta.content)
            if choice.finish_reason is not None:
                parts.finish_reason = choice.finish_reason
            if choice.logprobs is not None:
                parts.logprobs.append(choice.logprobs)
            if delta.tool_calls:
                for position, call in enumerate(delta.tool_calls):
                    into = parts.tool_call(call, position)
                    if call.type:
                        into.type = call.type
                    fn = call.function
                    if fn is not None:
                        if fn.name:
                            into.name.append(fn.name)
                        if fn.arguments:
                            into.arguments.append(fn.arguments)

    def calls(self, index: int) -> list[tuple[str, str]]:
        """Choice ``index``'s tool calls so far, in order: (name, arguments) of each."""
        parts = self._choices.get(index)
        return [("".join(c.name), "".join(c.arguments)) for c in parts.calls] if parts is not None else []

    def completion(self) -> ChatCompletion:
        choices = []
        for index in sorted(self._choices):
            parts = self._choices[index]
            for c in parts.calls:
                if c.id is None:  # made up once, so every completion() of this stream agrees
                    c.id = new_tool_call_id()
            calls = [
                ToolCall(
                    id=c.id,
                    type=c.type or "function",
                    function=FunctionCall(name="".join(c.name), arguments="".join(c.arguments)),
                )
                for i, c in enumerate(parts.calls)
            ]
            message = ChatCompletionMessage(
                role=parts.role or "assistant",
                content="".join(parts.content) if parts.content or not calls else None,
                tool_calls=calls or None,
            )
            logprobs = _merge_logprobs(parts.logprobs)
            choices.append(Choice(index=index, message=message, finish_reason=parts.finish_reason, logprobs=logprobs))
        completion = ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage, **self.extra
        )
        completion._request_id = self.request_id
        return completion


def _merge_logprobs(pieces: list[Logprobs]) -> Logprobs | None:
    """The chunks' log probabilities as one: ``content`` (and ``refusal``) lists joined in order. When a host's
    pieces are not all of OpenAI's shape (some kept as dicts), the result is a dict of those lists."""
    if not pieces:
        return None
    typed = all(isinstance(p, ChoiceLogprobs) for p in pieces)
    merged: dict[str, list[Any]] = {"content": []}
    for piece in pieces:
        fields = piece if isinstance(piece, dict) else piece.model_dump(exclude_none=True)
        for name in ("content", "refusal"):
            items = fields.get(name)
            if isinstance(items, list):
                merged.setdefault(name, []).extend(items)
    return ChoiceLogprobs.model_validate(merged) if typed else merged
