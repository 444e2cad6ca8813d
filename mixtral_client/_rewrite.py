"""What stands between ``create()`` and a backend when the host lacks a feature: request rewrites (pure).

A rewrite (``ToolPrompt`` for tools, ``FormatPrompt`` for ``response_format``) turns a request into one the
host takes, and the host's answer back into what the caller asked for. ``Rewrites.for_request`` picks the
ones a request needs, in order; answers pass through them in the same order (tool calls are read before the
JSON is cut out of the text that is left).

A stream is rewritten chunk by chunk by a ``ChunkRewrite``: ``feed`` returns the chunks to pass on now
(text may be held back), ``end`` what is still held when the chunks stop. When the backend fails, what was
held goes out as the text it is before the error is raised, so the caller's ``error.partial`` has it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from ._exceptions import APIError
from ._request import ChatRequest
from .types import ChatCompletion, ChatCompletionChunk, ChoiceDelta, ChunkChoice

__all__ = ["ChunkRewrite", "Rewrite", "Rewrites", "aclose_chunks", "close_chunks", "held_chunk", "passing",
           "rewrite_astream", "rewrite_stream"]


class ChunkRewrite(Protocol):
    def feed(self, chunk: ChatCompletionChunk) -> list[ChatCompletionChunk]: ...

    def end(self, failed: bool) -> list[ChatCompletionChunk]: ...


class Rewrite(Protocol):
    @property
    def request(self) -> ChatRequest:
        """The request as it is sent."""

    def completion(self, completion: ChatCompletion) -> ChatCompletion: ...

    def chunks(self) -> ChunkRewrite: ...


def passing(chunk: ChatCompletionChunk, choices: list[ChunkChoice]) -> list[ChatCompletionChunk]:
    """``chunk`` with its rewritten ``choices``, less those left with nothing to say; no chunk at all when
    everything it carried is held (a usage chunk always passes)."""
    kept = [c for c in choices if c.delta != ChoiceDelta() or c.finish_reason is not None or c.logprobs is not None]
    if not kept and chunk.choices and chunk.usage is None:
        return []
    return [chunk.model_copy(update={"choices": kept})]


def held_chunk(last: ChatCompletionChunk | None, choices: Sequence[Mapping[str, Any]]) -> list[ChatCompletionChunk]:
    """One chunk giving what was held when the chunks ended (none when nothing was), named as ``last``."""
    if last is None or not choices:
        return []
    held = ChatCompletionChunk(id=last.id, created=last.created, model=last.model, choices=list(choices))
    held._request_id = last._request_id
    return [held]


def rewrite_stream(chunks: Iterator[ChatCompletionChunk], rewrite: ChunkRewrite) -> Iterator[ChatCompletionChunk]:
    try:
        for chunk in chunks:
            yield from rewrite.feed(chunk)
    except APIError:
        yield from rewrite.end(failed=True)  # the caller's Stream merges it into error.partial
        raise
    else:
        yield from rewrite.end(failed=False)
    finally:
        close_chunks(chunks)


def close_chunks(chunks: Iterator[ChatCompletionChunk]) -> None:
    """Close a chunk generator that a wrapper leaves early (a plain iterator has nothing to close)."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


async def aclose_chunks(chunks: AsyncIterator[ChatCompletionChunk]) -> None:
    """Close an async chunk generator, even inside a cancelled scope: a cancelled caller still releases the
    connection (or the local batch row) behind it."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


async def rewrite_astream(chunks: AsyncIterator[ChatCompletionChunk],
                          rewrite: ChunkRewrite) -> AsyncIterator[ChatCompletionChunk]:
    try:
        async for chunk in chunks:
            for out in rewrite.feed(chunk):
                yield out
    except APIError:
        for held in rewrite.end(failed=True):
            yield held
        raise
    else:
        for tail in rewrite.end(failed=False):
            yield tail
    finally:
        await aclose_chunks(chunks)


@dataclass(frozen=True, slots=True)
class Rewrites:
    """The rewrites one request needs (often none) and the request as it goes to the backend."""

    request: ChatRequest
    steps: tuple[Rewrite, ...]
    asked: ChatRequest | None = None  # the request as the caller made it, when a step rewrote it

    @classmethod
    def for_request(cls, request: ChatRequest) -> Rewrites:
        asked = request
        from ._format import FormatPrompt
        from ._tools import ToolPrompt

        steps: list[Rewrite] = []
        tools = ToolPrompt.for_request(request)
        if tools is not None:
            steps.append(tools)
            request = tools.request
        fmt = FormatPrompt.for_request(request, tools_callable=bool(tools and tools.tools))
        if fmt is not None:
            steps.append(fmt)
            request = fmt.request
        return cls(request, tuple(steps), asked if steps else None)

    def completion(self, completion: ChatCompletion) -> ChatCompletion:
        for step in self.steps:
            completion = step.completion(completion)
        return completion

    def stream(self, chunks: Iterator[ChatCompletionChunk]) -> Iterator[ChatCompletionChunk]:
        for step in self.steps:
            chunks = rewrite_stream(chunks, step.chunks())
        return chunks

    def astream(self, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[ChatCompletionChunk]:
        for step in self.steps:
            chunks = rewrite_astream(chunks, step.chunks())
        return chunks
