"""A stream read to ``[DONE]`` hands its connection back to the pool, sync or async: the next request reuses it.

The client reads the body's end (the chunked terminator) after ``[DONE]`` for at most ``DRAIN_S``; a server
that holds the body open longer costs that much at the stream's end and the connection, nothing more.
"""

from __future__ import annotations

import time

import pytest

from mixtral_client import AsyncMixtralClient, MixtralClient, Timeout
from mixtral_client._backends.http import DRAIN_S
from tests.client.conftest import MESSAGES, chunk
from tests.loopback import Conn, LoopbackServer, Received, sse

STREAMS = 5


def answer_then_end(req: Received, conn: Conn) -> None:
    conn.start(200, {"Content-Type": "text/event-stream"})
    conn.write(sse(chunk(role="assistant"), chunk("hi"), chunk(finish_reason="stop")))
    conn.finish()


def answer_then_hold_the_body_open(req: Received, conn: Conn) -> None:
    conn.start(200, {"Content-Type": "text/event-stream"})
    conn.write(sse(chunk(role="assistant"), chunk("hi"), chunk(finish_reason="stop")))
    conn.pause(2.0)  # the terminator comes far too late
    conn.finish()


async def read_streams(server: LoopbackServer, n: int) -> list[str]:
    texts = []
    async with AsyncMixtralClient(base_url=server.url, api_key="k", timeout=Timeout(total=10.0)) as client:
        for _ in range(n):
            stream = await client.chat.completions.create(messages=MESSAGES, stream=True)
            text = ""
            async with stream:
                async for piece in stream:
                    text += piece.choices[0].delta.content or "" if piece.choices else ""
            texts.append(text)
    return texts


def read_streams_sync(server: LoopbackServer, n: int) -> list[str]:
    texts = []
    with MixtralClient(base_url=server.url, api_key="k", timeout=Timeout(total=10.0)) as client:
        for _ in range(n):
            text = ""
            with client.chat.completions.create(messages=MESSAGES, stream=True) as stream:
                for piece in stream:
                    text += piece.choices[0].delta.content or "" if piece.choices else ""
            texts.append(text)
    return texts


def test_sync_streams_read_to_the_end_share_one_connection(serve) -> None:
    server = serve(answer_then_end)
    assert read_streams_sync(server, STREAMS) == ["hi"] * STREAMS
    assert len(server.requests) == STREAMS
    assert server.connections == 1


def test_a_sync_body_held_open_after_done_costs_at_most_the_drain_time(serve) -> None:
    server = serve(answer_then_hold_the_body_open)
    started = time.monotonic()
    assert read_streams_sync(server, 2) == ["hi", "hi"]
    elapsed = time.monotonic() - started
    assert elapsed < 2 * DRAIN_S + 1.0, elapsed  # never the server's 2 s per stream
    assert server.connections == 2  # each held-open connection was dropped, not reused


@pytest.mark.anyio
async def test_streams_read_to_the_end_share_one_connection(serve) -> None:
    server = serve(answer_then_end)
    assert await read_streams(server, STREAMS) == ["hi"] * STREAMS
    assert len(server.requests) == STREAMS
    assert {req.connection_id for req in server.requests} == {server.requests[0].connection_id}
    assert server.connections == 1


@pytest.mark.anyio
async def test_a_body_held_open_after_done_costs_at_most_the_drain_time(serve) -> None:
    server = serve(answer_then_hold_the_body_open)
    started = time.monotonic()
    assert await read_streams(server, 2) == ["hi", "hi"]
    elapsed = time.monotonic() - started
    assert elapsed < 2 * DRAIN_S + 1.0, elapsed  # never the server's 2 s per stream
    assert server.connections == 2  # each held-open connection was dropped, not reused
