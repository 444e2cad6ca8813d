"""``Stream`` and ``AsyncStream``: what ``create(stream=True)`` returns, for every backend.

A stream wraps a backend's chunk generator. It pulls the first chunk when it is opened (inside
``create()``, so a refused request raises there), merges every chunk that passes into a
``ChunkAccumulator``, attaches the merged-so-far completion to any ``APIError`` as ``partial``, and closes
the generator (returning its connection to the pool) when it is exhausted, closed, left through
``with``/``async with``, broken out of, or fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Self

from ._accumulate import ChunkAccumulator
from ._exceptions import APIError
from .types import ChatCompletion, ChatCompletionChunk

__all__ = ["AsyncStream", "Stream"]

_NOTHING: Any = object()


class _Chunks:
    """What both streams hold: the chunk read ahead and the accumulator."""

    _first: ChatCompletionChunk
    _accumulator: ChunkAccumulator

    @property
    def request_id(self) -> str | None:
        """The host's id for the stream's HTTP request (known once ``create()`` returns); None without one."""
        return self._first._request_id if self._first is not _NOTHING else self._accumulator.request_id


class Stream(_Chunks):
    """A synchronous stream of ``ChatCompletionChunk``; use it in ``with`` and iterate it once."""

    def __init__(self, chunks: Iterator[ChatCompletionChunk]) -> None:
        self._chunks = chunks
        self._accumulator = ChunkAccumulator()
        self._first: ChatCompletionChunk = _NOTHING
        self._closed = False
        self._consumed = False

    def _open(self) -> Self:
        try:
            self._first = next(self._chunks)
        except StopIteration:
            self._first = _NOTHING
            self._closed = True
        except BaseException:
            self.close()
            raise
        return self

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        if self._consumed:
            raise RuntimeError("a stream can be iterated only once")
        self._consumed = True
        add = self._accumulator.add
        try:
            if self._first is not _NOTHING:
                first, self._first = self._first, _NOTHING
                add(first)
                yield first
            if self._closed:
                return
            for chunk in self._chunks:
                add(chunk)
                yield chunk
        except APIError as error:
            if error.partial is None:
                error.partial = self._accumulator.completion()
            raise
        finally:
            # exhausted, broken out of (the generator is collected), or failed: release the connection
            self.close()

    def close(self) -> None:
        self._first = _NOTHING  # a closed stream yields nothing more, not even the chunk read ahead
        if not self._closed:
            self._closed = True
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def get_final_completion(self) -> ChatCompletion:
        """Read what is left of the stream and return every chunk merged (text, tool calls, usage)."""
        if not self._consumed:
            for _ in self:
                pass
        return self._accumulator.completion()

    def text(self) -> Iterator[str]:
        """Only the text deltas of the first choice (index 0; with ``n > 1`` the others are skipped)."""
        for chunk in self:
            if (piece := _first_choice_text(chunk)) is not None:
                yield piece


class AsyncStream(_Chunks):
    """An asynchronous stream of ``ChatCompletionChunk``; use it in ``async with`` and iterate it once.

    Unlike ``Stream`` it is its own iterator rather than an async generator: an async generator left
    suspended by ``break`` would be finalized by the event loop's garbage-collection hook (trio warns).
    """

    def __init__(self, chunks: AsyncIterator[ChatCompletionChunk]) -> None:
        self._chunks = chunks
        self._accumulator = ChunkAccumulator()
        self._first: ChatCompletionChunk = _NOTHING
        self._closed = False
        self._consumed = False

    async def _open(self) -> Self:
        try:
            self._first = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._first = _NOTHING
            self._closed = True
        except BaseException:
            await self.aclose()
            raise
        return self

    def __aiter__(self) -> Self:
        if self._consumed:
            raise RuntimeError("a stream can be iterated only once")
        self._consumed = True
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self._first is not _NOTHING:
            chunk, self._first = self._first, _NOTHING
        elif self._closed:
            raise StopAsyncIteration
        else:
            try:
                chunk = await self._chunks.__anext__()
            except APIError as error:
                if error.partial is None:
                    error.partial = self._accumulator.completion()
                await self.aclose()
                raise
            except BaseException:  # the end (StopAsyncIteration), a cancellation, anything else
                await self.aclose()
                raise
        self._accumulator.add(chunk)
        return chunk

    async def aclose(self) -> None:
        self._first = _NOTHING
        if not self._closed:
            self._closed = True
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def get_final_completion(self) -> ChatCompletion:
        if not self._consumed:
            async for _ in self:
                pass
        return self._accumulator.completion()

    def text(self) -> AsyncIterator[str]:
        """Only the text deltas of the first choice (index 0; with ``n > 1`` the others are skipped)."""
        return _TextDeltas(self.__aiter__())


class _TextDeltas:
    """``AsyncStream.text()``: an iterator object too, so leaving it early leaves nothing to the GC."""

    def __init__(self, stream: AsyncStream) -> None:
        self._stream = stream

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        while True:
            chunk = await self._stream.__anext__()
            if (piece := _first_choice_text(chunk)) is not None:
                return piece


def _first_choice_text(chunk: ChatCompletionChunk) -> str | None:
    """The text delta of choice 0 in ``chunk``, if any: with ``n > 1`` a chunk may carry another choice only."""
    for choice in chunk.choices:
        if choice.index == 0 and choice.delta.content:
            return choice.delta.content
    return None
