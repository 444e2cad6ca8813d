"""Shared fixtures for the hosted-client tests: a loopback server factory, chunk builders and a driver
that runs one scenario through the sync client, or the async client under asyncio or trio."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from mixtral_client import AsyncMixtralClient, ChatCompletion, ChatCompletionChunk, MixtralClient
from mixtral_client._accumulate import ChunkAccumulator
from mixtral_client._rewrite import rewrite_stream
from mixtral_client.types import Completion
from tests.loopback import Conn, Handler, LoopbackServer, Received, sse

MESSAGES = [{"role": "user", "content": "Hi"}]
PROMPT = "<s>[INST] Hi [/INST]"


# --------------------------------------------------------------------------- payload builders


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None,
          tool_calls: list[dict[str, Any]] | None = None, index: int = 0, **extra: Any) -> dict[str, Any]:
    """One OpenAI ``chat.completion.chunk`` with a single choice."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}], **extra}


def completion(content: str = "Hello", *, finish: str = "stop", **extra: Any) -> dict[str, Any]:
    """One OpenAI ``chat.completion``."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, **extra}


def text_stream(*pieces: str, done: bool = True) -> bytes:
    """An SSE body streaming ``pieces`` as content deltas, then ``finish_reason: stop``."""
    return sse(chunk(role="assistant"), *(chunk(p) for p in pieces), chunk(finish="stop"), done=done)


def split_chunks(text: str, cuts: list[int], finish: str | None = "stop") -> list[ChatCompletionChunk]:
    """``text`` streamed as content chunks cut at ``cuts`` (a role chunk first, a finish chunk last)."""
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    raw = [chunk(role="assistant"), *(chunk(p) for p in pieces if p)]
    if finish is not None:
        raw.append(chunk(finish=finish))
    return [ChatCompletionChunk.model_validate(c) for c in raw]


def merge_stream(rewrite: Any, chunks: list[ChatCompletionChunk]) -> tuple[ChatCompletion, list[str]]:
    """What a request rewrite (``ToolPrompt``, ``FormatPrompt``) makes of streamed ``chunks``: the merged completion, and each piece of text
    as it went out."""
    merged, texts = ChunkAccumulator(), []
    for out in rewrite_stream(iter(chunks), rewrite.chunks()):
        merged.add(out)
        texts.extend(c.delta.content for c in out.choices if c.delta.content)
    return merged.completion(), texts


def tool_delta(index: int | None, *, id: str | None = None, name: str | None = None,
               arguments: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    delta: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        delta.update(id=id, type="function")
    return delta


# --------------------------------------------------------------------------- handlers


def replying(status: int, body: Any, headers: dict[str, str] | None = None) -> Handler:
    def handle(req: Received, conn: Conn) -> None:
        conn.respond(status, body, headers)

    return handle


def streaming(body: bytes, *, one_byte: bool = False, headers: dict[str, str] | None = None) -> Handler:
    def handle(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream", **(headers or {})})
        conn.write(body, one_byte=one_byte)
        conn.finish()

    return handle


def cut_stream(*events: dict[str, Any]) -> Handler:
    """A stream that sends ``events`` (no ``[DONE]``), waits a moment, and drops the connection."""
    def handle(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(*events, done=False))
        conn.pause(0.05)
        conn.drop()
    return handle


def dropping(req: Received, conn: Conn) -> None:
    conn.drop()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "anyio_backend" in metafunc.fixturenames:
        metafunc.parametrize("anyio_backend", ["asyncio", "trio"], indirect=True)


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], LoopbackServer]]:
    """``serve(handler)`` starts a loopback server that is closed (and checked for handler errors) at the end."""
    servers: list[LoopbackServer] = []

    def start(handler: Handler) -> LoopbackServer:
        server = LoopbackServer(handler).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
    errors = [e for s in servers for e in s.errors]
    assert not errors, f"loopback handler failed: {errors!r}"


class Driver:
    """One scenario, three ways: ``MixtralClient``, or ``AsyncMixtralClient`` under asyncio or trio.

    ``client`` holds the client's keyword arguments; ``create`` arguments pass through. The clients get
    an ``http_client`` without TLS set up (the loopback server speaks plain HTTP): loading the CA bundle
    costs more than most of these tests.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.seen: list[ChatCompletionChunk] = []

    def __repr__(self) -> str:
        return self.mode

    @staticmethod
    @contextlib.contextmanager
    def _sync(server: LoopbackServer, client: dict[str, Any] | None) -> Iterator[MixtralClient]:
        with httpx.Client(verify=False) as http, \
                MixtralClient(**{"base_url": server.url, "api_key": "sk-test", **(client or {})}, http_client=http) as c:
            yield c

    @staticmethod
    @contextlib.asynccontextmanager
    async def _async(server: LoopbackServer, client: dict[str, Any] | None) -> AsyncIterator[AsyncMixtralClient]:
        async with httpx.AsyncClient(verify=False) as http, \
                AsyncMixtralClient(**{"base_url": server.url, "api_key": "sk-test", **(client or {})},
                                   http_client=http) as c:
            yield c

    def _run(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        return anyio.run(fn, backend=self.mode)

    def complete(self, server: LoopbackServer, *, client: dict[str, Any] | None = None,
                 **params: Any) -> ChatCompletion:
        params.setdefault("messages", MESSAGES)
        if self.mode == "sync":
            with self._sync(server, client) as c:
                return c.chat.completions.create(**params)

        async def run() -> ChatCompletion:
            async with self._async(server, client) as c:
                result: ChatCompletion = await c.chat.completions.create(**params)
                return result

        return self._run(run)

    def chunks(self, server: LoopbackServer, *, client: dict[str, Any] | None = None,
               **params: Any) -> list[ChatCompletionChunk]:
        """Every chunk of a stream; an error escapes with the chunks seen so far on ``self.seen``."""
        params.setdefault("messages", MESSAGES)
        self.seen = []
        if self.mode == "sync":
            with self._sync(server, client) as c, c.chat.completions.create(stream=True, **params) as stream:
                self.seen.extend(stream)
                return self.seen

        async def run() -> None:
            async with self._async(server, client) as c:
                async with await c.chat.completions.create(stream=True, **params) as stream:
                    async for item in stream:
                        self.seen.append(item)

        self._run(run)
        return self.seen

    def text(self, server: LoopbackServer, **kwargs: Any) -> str:
        return "".join(c.choices[0].delta.content or "" for c in self.chunks(server, **kwargs) if c.choices)

    def final(self, server: LoopbackServer, *, client: dict[str, Any] | None = None,
              **params: Any) -> ChatCompletion:
        """``get_final_completion()`` of a stream."""
        params.setdefault("messages", MESSAGES)
        if self.mode == "sync":
            with self._sync(server, client) as c, c.chat.completions.create(stream=True, **params) as stream:
                return stream.get_final_completion()

        async def run() -> ChatCompletion:
            async with self._async(server, client) as c:
                async with await c.chat.completions.create(stream=True, **params) as stream:
                    result: ChatCompletion = await stream.get_final_completion()
                    return result

        return self._run(run)

    def text_completion(self, server: LoopbackServer, *, client: dict[str, Any] | None = None,
                        **params: Any) -> Completion:
        """``client.completions.create(...)`` (a raw prompt; ``prompt`` defaults to ``PROMPT``)."""
        params.setdefault("prompt", PROMPT)
        if self.mode == "sync":
            with self._sync(server, client) as c:
                return c.completions.create(**params)

        async def run() -> Completion:
            async with self._async(server, client) as c:
                result: Completion = await c.completions.create(**params)
                return result

        return self._run(run)

    def text_chunks(self, server: LoopbackServer, *, client: dict[str, Any] | None = None,
                    **params: Any) -> tuple[list[Completion], Completion]:
        """A raw-prompt stream: its chunks, then ``get_final_completion()``; an error escapes with the chunks
        seen so far on ``self.seen``."""
        params.setdefault("prompt", PROMPT)
        self.seen = []
        if self.mode == "sync":
            with self._sync(server, client) as c, c.completions.create(stream=True, **params) as stream:
                self.seen.extend(stream)
                return self.seen, stream.get_final_completion()

        async def run() -> tuple[list[Completion], Completion]:
            async with self._async(server, client) as c:
                async with await c.completions.create(stream=True, **params) as stream:
                    async for item in stream:
                        self.seen.append(item)
                    return self.seen, await stream.get_final_completion()

        return self._run(run)

    def raw(self, server: LoopbackServer, *, client: dict[str, Any] | None = None, method: str = "create",
            **params: Any) -> RawSeen:
        """``with_raw_response.<method>(...)``: what the raw response says, and its parsed answer (a stream's
        chunks read to the end inside the client)."""
        params.setdefault("messages", MESSAGES)

        def seen(raw: Any, answer: Any) -> RawSeen:
            return RawSeen(raw.status_code, dict(raw.headers), raw.retries_taken, raw.request_id, answer,
                           raw.http_response)

        if self.mode == "sync":
            with self._sync(server, client) as c:
                raw = getattr(c.chat.completions.with_raw_response, method)(**params)
                if params.get("stream"):
                    with raw.parse() as stream:
                        return seen(raw, list(stream))
                return seen(raw, raw.parse())

        async def run() -> RawSeen:
            async with self._async(server, client) as c:
                raw = await getattr(c.chat.completions.with_raw_response, method)(**params)
                if params.get("stream"):
                    async with raw.parse() as stream:
                        return seen(raw, [chunk async for chunk in stream])
                return seen(raw, raw.parse())

        return self._run(run)


@dataclasses.dataclass
class RawSeen:
    status_code: int
    headers: dict[str, str]
    retries_taken: int
    request_id: str | None
    answer: Any  # the parsed completion, or a stream's chunks
    http_response: httpx.Response | None


@pytest.fixture(params=["sync", "asyncio", "trio"])
def driver(request: pytest.FixtureRequest) -> Driver:
    return Driver(str(request.param))


@pytest.fixture(params=["sync", "trio"])
def sync_or_async(request: pytest.FixtureRequest) -> Driver:
    """For slow, timed behaviour whose asyncio and trio paths are the same code: one run of each client."""
    return Driver(str(request.param))
