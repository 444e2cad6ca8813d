"""``client.chat.completions.stream(...)``: a stream of events, as openai-python's streaming helper gives.

    with client.chat.completions.stream(messages=..., response_format=Answer) as stream:
        for event in stream:
            if event.type == "content.delta":
                show(event.parsed)            # the JSON so far, parsed leniently: a dict growing key by key
        answer = stream.get_final_completion().choices[0].message.parsed   # an Answer

Every chunk is a ``ChunkEvent``; beside it come ``content.delta`` (the text so far, and with a
``response_format`` the partial JSON parsed), ``tool_calls.function.arguments.delta`` (a call's arguments so
far, parsed the same way), ``logprobs.content.delta``, and the ``.done`` event of each when the part ends:
content when the choice finishes or a tool call begins, a call when the next begins or the choice finishes.
The events are the same on every backend, because they are made from the chunks ``create(stream=True)``
yields. ``StreamEvents`` (pure) turns chunks into events; the two stream classes feed it from a ``Stream`` /
``AsyncStream``, whose accumulator gives the snapshot and the final completion.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeAlias, TypeVar

import pydantic_core
from pydantic import BaseModel

from ._parse import parse_choice, parsed
from ._streaming import AsyncStream, Stream
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    ParsedChatCompletion,
)

__all__ = [
    "AsyncChatCompletionStream",
    "AsyncChatCompletionStreamManager",
    "ChatCompletionStream",
    "ChatCompletionStreamEvent",
    "ChatCompletionStreamManager",
    "ChunkEvent",
    "ContentDeltaEvent",
    "ContentDoneEvent",
    "FunctionToolCallArgumentsDeltaEvent",
    "FunctionToolCallArgumentsDoneEvent",
    "LogprobsContentDeltaEvent",
    "LogprobsContentDoneEvent",
    "StreamEvents",
]

FormatT = TypeVar("FormatT", bound=BaseModel)  # the response_format class (Any for a format dict or none)


def partial_json(text: str) -> Any:
    """The JSON value ``text`` opens, parsed leniently (an unfinished string or number as far as it goes, an
    unclosed object with the keys so far); None when it is no JSON (yet)."""
    if not text.strip():
        return None
    try:
        return pydantic_core.from_json(text, allow_partial="trailing-strings")
    except ValueError:
        return None


def _whole_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    """Every chunk as it came; ``snapshot`` is the completion merged so far (built when read)."""

    chunk: ChatCompletionChunk
    _snapshot: Callable[[], ChatCompletion] = field(repr=False)
    type: Literal["chunk"] = "chunk"

    @property
    def snapshot(self) -> ChatCompletion:
        return self._snapshot()


@dataclass(frozen=True, slots=True)
class ContentDeltaEvent:
    """A piece of a choice's text: ``delta``, the text so far (``snapshot``), and with a ``response_format``
    the JSON so far parsed leniently (``parsed``: dicts and lists, None before the JSON opens)."""

    delta: str
    snapshot: str
    parsed: Any = None
    choice_index: int = 0
    type: Literal["content.delta"] = "content.delta"


@dataclass(frozen=True, slots=True)
class ContentDoneEvent(Generic[FormatT]):
    """A choice's whole text; ``parsed`` is the ``response_format`` class's instance (or, for a JSON format
    given as a dict, the JSON value; None without a format)."""

    content: str
    parsed: FormatT | None = None
    choice_index: int = 0
    type: Literal["content.done"] = "content.done"


@dataclass(frozen=True, slots=True)
class FunctionToolCallArgumentsDeltaEvent:
    """A piece of a tool call's arguments: ``arguments_delta``, the JSON so far (``arguments``) and that JSON
    parsed leniently (``parsed_arguments``). ``index`` is the call's place in the choice's ``tool_calls``."""

    name: str
    index: int
    arguments: str
    parsed_arguments: Any
    arguments_delta: str
    choice_index: int = 0
    type: Literal["tool_calls.function.arguments.delta"] = "tool_calls.function.arguments.delta"


@dataclass(frozen=True, slots=True)
class FunctionToolCallArgumentsDoneEvent:
    """A tool call's whole arguments, and their JSON value (None when they are not JSON)."""

    name: str
    index: int
    arguments: str
    parsed_arguments: Any
    choice_index: int = 0
    type: Literal["tool_calls.function.arguments.done"] = "tool_calls.function.arguments.done"


@dataclass(frozen=True, slots=True)
class LogprobsContentDeltaEvent:
    """The log probabilities of a chunk's tokens (``content``), and every one so far (``snapshot``)."""

    content: list[ChatCompletionTokenLogprob]
    snapshot: list[ChatCompletionTokenLogprob]
    choice_index: int = 0
    type: Literal["logprobs.content.delta"] = "logprobs.content.delta"


@dataclass(frozen=True, slots=True)
class LogprobsContentDoneEvent:
    content: list[ChatCompletionTokenLogprob]
    choice_index: int = 0
    type: Literal["logprobs.content.done"] = "logprobs.content.done"


ChatCompletionStreamEvent: TypeAlias = (
    ChunkEvent | ContentDeltaEvent | ContentDoneEvent[Any] | FunctionToolCallArgumentsDeltaEvent
    | FunctionToolCallArgumentsDoneEvent | LogprobsContentDeltaEvent | LogprobsContentDoneEvent
)


class _Choice:
    """What the events of one choice have shown so far."""

    __slots__ = ("arguments", "content", "content_done", "current_call", "finished", "logprobs")

    def __init__(self) -> None:
        self.content = ""
        self.content_done = False
        self.logprobs: list[ChatCompletionTokenLogprob] | None = None
        self.arguments: list[str] = []  # each call's arguments as last shown
        self.current_call: int | None = None  # the call whose done event is still to come
        self.finished = False


class StreamEvents:
    """Chunks in (``feed``, after the stream's accumulator has taken them), events out (pure).

    ``response_format`` is the class ``parse()`` would take, a ``response_format`` dict, or None: with one, the
    text is parsed as JSON as it grows, and validated (a class) or loaded (a JSON format) when it is done.
    """

    def __init__(self, stream: Stream | AsyncStream, response_format: Any = None) -> None:
        self._accumulator = stream._accumulator  # the stream's own merge: the snapshots and the final completion
        self._model = response_format if isinstance(response_format, type) else None
        self._json = response_format is not None and (
            self._model is not None or response_format.get("type") in ("json_object", "json_schema"))
        self._choices: dict[int, _Choice] = {}

    def snapshot(self) -> ChatCompletion:
        return self._accumulator.completion()

    def feed(self, chunk: ChatCompletionChunk) -> list[ChatCompletionStreamEvent]:
        events: list[ChatCompletionStreamEvent] = [ChunkEvent(chunk, self.snapshot)]
        for choice in chunk.choices:
            state = self._choices.get(choice.index)
            if state is None:
                state = self._choices[choice.index] = _Choice()
            delta = choice.delta
            if delta.content:
                state.content += delta.content
                events.append(ContentDeltaEvent(delta.content, state.content,
                                                partial_json(state.content) if self._json else None, choice.index))
            logprobs = choice.logprobs
            if isinstance(logprobs, ChoiceLogprobs) and logprobs.content:
                state.logprobs = [*(state.logprobs or []), *logprobs.content]
                events.append(LogprobsContentDeltaEvent(logprobs.content, state.logprobs, choice.index))
            if delta.tool_calls:
                events.extend(self._call_events(choice.index, state))
            if choice.finish_reason is not None and not state.finished:
                state.finished = True
                events.extend(self._content_done(choice.index, state))
                events.extend(self._call_done(choice.index, state))
                if state.logprobs is not None:
                    events.append(LogprobsContentDoneEvent(state.logprobs, choice.index))
        return events

    def _call_events(self, index: int, state: _Choice) -> Iterator[ChatCompletionStreamEvent]:
        """Events for every call whose arguments grew (or that began) with this chunk."""
        for position, (name, arguments) in enumerate(self._accumulator.calls(index)):
            if position == len(state.arguments):  # a call begins: the text, and the call before it, are done
                yield from self._content_done(index, state)
                yield from self._call_done(index, state)
                state.arguments.append("")
                state.current_call = position
            before = state.arguments[position]
            if arguments != before:
                state.arguments[position] = arguments
                yield FunctionToolCallArgumentsDeltaEvent(name, position, arguments, partial_json(arguments),
                                                          arguments[len(before):], index)

    def _content_done(self, index: int, state: _Choice) -> Iterator[ChatCompletionStreamEvent]:
        if state.content_done or not state.content:
            return
        state.content_done = True
        parsed: Any = None
        if self._model is not None:
            completion = self.snapshot()
            choice = next(i for i, c in enumerate(completion.choices) if c.index == index)
            parsed = parse_choice(completion, choice, self._model)  # raises StructuredOutputError
        elif self._json:
            parsed = _whole_json(state.content)
        yield ContentDoneEvent(state.content, parsed, index)

    def _call_done(self, index: int, state: _Choice) -> Iterator[ChatCompletionStreamEvent]:
        position, state.current_call = state.current_call, None
        if position is None:
            return
        name, arguments = self._accumulator.calls(index)[position]
        yield FunctionToolCallArgumentsDoneEvent(name, position, arguments, _whole_json(arguments), index)

    def final(self) -> ParsedChatCompletion[Any]:
        """The merged completion; each message's ``parsed`` is set when a class was given."""
        completion = self.snapshot()
        if self._model is not None:  # the same validation as parse()
            return parsed(completion, self._model)
        result: ParsedChatCompletion[Any] = ParsedChatCompletion.model_validate(completion.model_dump())
        result._request_id = completion._request_id
        return result


class ChatCompletionStream(Generic[FormatT]):
    """The events of one stream (iterate it once); ``get_final_completion()`` reads the rest and merges."""

    def __init__(self, stream: Stream, response_format: Any = None) -> None:
        self._stream = stream
        self._events = StreamEvents(stream, response_format)
        self._iterator = self._iterate()

    @property
    def request_id(self) -> str | None:
        return self._stream.request_id

    @property
    def current_completion_snapshot(self) -> ChatCompletion:
        return self._events.snapshot()

    def _iterate(self) -> Generator[ChatCompletionStreamEvent, None, None]:
        feed = self._events.feed
        for chunk in self._stream:
            yield from feed(chunk)

    def __iter__(self) -> Iterator[ChatCompletionStreamEvent]:
        return self._iterator  # one iterator: a loop left early can be taken up again, or finished by until_done

    def __next__(self) -> ChatCompletionStreamEvent:
        return next(self._iterator)

    def until_done(self) -> Self:
        for _ in self._iterator:
            pass
        return self

    def get_final_completion(self) -> ParsedChatCompletion[FormatT]:
        """Read the rest of the stream (as openai-python does) and merge it."""
        return self.until_done()._events.final()

    def close(self) -> None:
        self._iterator.close()
        self._stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncChatCompletionStream(Generic[FormatT]):
    """The async ``ChatCompletionStream``: its own iterator, so leaving it early leaves nothing to the GC."""

    def __init__(self, stream: AsyncStream, response_format: Any = None) -> None:
        self._stream = stream
        self._events = StreamEvents(stream, response_format)
        self._pending: list[ChatCompletionStreamEvent] = []

    @property
    def request_id(self) -> str | None:
        return self._stream.request_id

    @property
    def current_completion_snapshot(self) -> ChatCompletion:
        return self._events.snapshot()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChatCompletionStreamEvent:
        while not self._pending:
            self._pending = self._events.feed(await self._stream.__anext__())
        return self._pending.pop(0)

    async def until_done(self) -> Self:
        async for _ in self:
            pass
        return self

    async def get_final_completion(self) -> ParsedChatCompletion[FormatT]:
        """Read the rest of the stream (as openai-python does) and merge it."""
        await self.until_done()
        return self._events.final()

    async def close(self) -> None:
        self._pending = []
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class ChatCompletionStreamManager(Generic[FormatT]):
    """What ``chat.completions.stream()`` returns: the request is sent on ``with`` (so a refusal raises there)."""

    def __init__(self, open_stream: Callable[[], Stream], response_format: Any) -> None:
        self._open = open_stream
        self._format = response_format
        self._stream: ChatCompletionStream[FormatT] | None = None

    def __enter__(self) -> ChatCompletionStream[FormatT]:
        self._stream = ChatCompletionStream(self._open(), self._format)
        return self._stream

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._stream is not None:
            self._stream.close()


class AsyncChatCompletionStreamManager(Generic[FormatT]):
    """The async manager: ``async with client.chat.completions.stream(...) as stream`` (no ``await``)."""

    def __init__(self, open_stream: Callable[[], Awaitable[AsyncStream]], response_format: Any) -> None:
        self._open = open_stream
        self._format = response_format
        self._stream: AsyncChatCompletionStream[FormatT] | None = None

    async def __aenter__(self) -> AsyncChatCompletionStream[FormatT]:
        self._stream = AsyncChatCompletionStream(await self._open(), self._format)
        return self._stream

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._stream is not None:
            await self._stream.close()

