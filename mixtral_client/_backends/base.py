"""The backend protocol: the few methods every backend (hosted HTTP, Bedrock, local) implements.

The public client validates a request into a ``ChatRequest`` and hands it to its backend; it never knows
which backend it holds. A sync client holds a ``SyncBackend``, an async client an ``AsyncBackend``.

Streams are generators of ``ChatCompletionChunk``: the client's ``Stream`` wrapper pulls the first chunk
inside ``create()`` (so a refused request raises there), accumulates what passes through it and closes
the generator on ``close()``, on an early ``break`` and on errors. A backend's stream generator must
release its resources (HTTP response, generation thread) in a ``finally`` block, and raise errors from
the tree in ``mixtral_client._exceptions``: a stream that ends early must raise, never end quietly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol, runtime_checkable

from mixtral_client._request import ChatRequest
from mixtral_client.types import ChatCompletion, ChatCompletionChunk

__all__ = ["AsyncBackend", "SyncBackend"]


@runtime_checkable
class SyncBackend(Protocol):
    def complete(self, request: ChatRequest) -> ChatCompletion:
        """One whole answer (``request.stream`` is False)."""
        ...

    def stream(self, request: ChatRequest) -> Iterator[ChatCompletionChunk]:
        """A generator of chunks (``request.stream`` is True); closing it releases everything."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncBackend(Protocol):
    async def complete(self, request: ChatRequest) -> ChatCompletion: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatCompletionChunk]:
        """An async generator of chunks; ``aclose()`` on it releases everything."""
        ...

    async def aclose(self) -> None: ...
