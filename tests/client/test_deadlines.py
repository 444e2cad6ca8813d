"""Connect, idle and total deadlines, per client and per request, timed against a loopback server."""

from __future__ import annotations

import time

import anyio
import pytest

from mixtral_client import APITimeoutError, AsyncMixtralClient, InternalServerError, MixtralClient, Timeout
from tests.client.conftest import MESSAGES, Driver, chunk, completion, replying, streaming, text_stream
from tests.loopback import Conn, Received, in_turn, sse, unanswered_port


def keepalives_after(*first: dict, every: float = 0.1):
    """A stream that sends ``first`` chunks, then only keep-alive comments until the client leaves."""

    def handle(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(*first, done=False))
        while not conn.pause(every):
            conn.write(b": OPENROUTER PROCESSING\n\n")

    return handle


def stall(req: Received, conn: Conn) -> None:
    conn.pause(5)


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        fn(*args, **kwargs)
    return info.value, time.monotonic() - start


def test_keepalives_do_not_reset_the_idle_deadline(driver: Driver, serve) -> None:
    server = serve(keepalives_after(chunk(role="assistant"), chunk("Hello")))

    error, elapsed = timed(driver.chunks, server, timeout=Timeout(connect=1, idle=0.3, total=10))

    assert 0.3 <= elapsed < 0.9
    assert "idle" in str(error)
    assert error.partial is not None and error.partial.choices[0].message.content == "Hello"
    assert len(server.requests) == 1, "an event reached the caller: no retry"


def test_keepalives_before_the_first_chunk_hit_the_idle_deadline_and_retry(sync_or_async: Driver, serve) -> None:
    server = serve(in_turn(keepalives_after(), streaming(text_stream("second"))))

    assert sync_or_async.text(server, timeout=Timeout(connect=1, idle=0.3, total=10)) == "second"
    assert len(server.requests) == 2


def test_silent_stream_hits_the_idle_deadline(sync_or_async: Driver, serve) -> None:
    def silent(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(chunk("x"), done=False))
        conn.pause(5)

    server = serve(silent)

    _, elapsed = timed(sync_or_async.chunks, server, timeout=Timeout(connect=1, idle=0.3, total=10))

    assert 0.3 <= elapsed < 1.0


def chunks_with_keepalives(*pieces: str):
    """Each piece as its own write, each followed by a keep-alive comment in a write of its own."""

    def handle(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream"})
        for piece in pieces:
            conn.write(sse(chunk(piece), done=False))
            conn.pause(0.02)
            conn.write(b": keep-alive\n\n")
            conn.pause(0.02)
        conn.write(sse(chunk(finish="stop")))
        conn.finish()

    return handle


def test_slow_consumer_does_not_trip_the_idle_deadline(serve) -> None:
    server = serve(chunks_with_keepalives("a", "b", "c"))

    with MixtralClient(base_url=server.url, api_key="k", timeout=Timeout(connect=1, idle=0.1, total=10)) as client:
        pieces = []
        for piece in client.chat.completions.create(messages=MESSAGES, stream=True).text():
            time.sleep(0.2)  # the caller's own pace is not the host's silence
            pieces.append(piece)

    assert pieces == ["a", "b", "c"]


@pytest.mark.anyio
async def test_slow_async_consumer_does_not_trip_the_idle_deadline(serve) -> None:
    server = serve(chunks_with_keepalives("a", "b"))

    async with AsyncMixtralClient(base_url=server.url, api_key="k",
                                  timeout=Timeout(connect=1, idle=0.1, total=10)) as client:
        pieces = []
        async with await client.chat.completions.create(messages=MESSAGES, stream=True) as stream:
            async for piece in stream.text():
                await anyio.sleep(0.2)
                pieces.append(piece)

    assert pieces == ["a", "b"]


def test_total_deadline_stops_a_stream_that_keeps_sending(driver: Driver, serve) -> None:
    def forever(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream"})
        while not conn.pause(0.05):
            conn.write(sse(chunk("x"), done=False))

    server = serve(forever)

    error, elapsed = timed(driver.chunks, server, timeout=Timeout(connect=1, idle=1, total=0.4))

    assert 0.4 <= elapsed < 0.9
    assert "total deadline" in str(error)
    assert error.partial is not None and error.partial.choices[0].message.content.startswith("xx")


def test_total_deadline_spans_all_attempts(driver: Driver, serve) -> None:
    server = serve(replying(503, "busy", {"retry-after-ms": "200"}))

    start = time.monotonic()
    with pytest.raises(InternalServerError):
        driver.complete(server, client={"max_retries": 10}, timeout=Timeout(connect=1, idle=1, total=0.6))

    assert time.monotonic() - start < 0.8
    assert 2 <= len(server.requests) <= 4


def test_total_deadline_bounds_a_stalled_answer(sync_or_async: Driver, serve) -> None:
    server = serve(stall)

    _, elapsed = timed(sync_or_async.complete, server, timeout=Timeout(connect=1, idle=10, total=0.4))

    assert 0.4 <= elapsed < 0.9
    assert len(server.requests) == 1


def test_per_request_timeout_overrides_the_client_timeout(sync_or_async: Driver, serve) -> None:
    server = serve(stall)

    _, elapsed = timed(sync_or_async.complete, server, client={"timeout": Timeout(total=30), "max_retries": 0},
                       timeout=0.3)

    assert 0.3 <= elapsed < 0.9


def test_client_timeout_applies_to_every_request(sync_or_async: Driver, serve) -> None:
    server = serve(stall)

    _, elapsed = timed(sync_or_async.complete, server, client={"timeout": 0.3, "max_retries": 0})

    assert 0.3 <= elapsed < 0.9


def test_connect_deadline(sync_or_async: Driver) -> None:
    class Backlogged:
        url = ""

    with unanswered_port() as port:
        Backlogged.url = f"http://127.0.0.1:{port}/v1"
        error, elapsed = timed(sync_or_async.complete, Backlogged, client={"max_retries": 0},
                               timeout=Timeout(connect=0.3, idle=5, total=5))

    assert elapsed < 1.5
    assert "timed out" in str(error)


def test_request_after_a_timeout_works(serve) -> None:
    server = serve(in_turn(stall, replying(200, completion("fine"))))

    with MixtralClient(base_url=server.url, api_key="k", max_retries=0, timeout=0.3) as client:
        with pytest.raises(APITimeoutError):
            client.chat.completions.create(messages=MESSAGES)
        assert client.chat.completions.create(messages=MESSAGES).choices[0].message.content == "fine"
