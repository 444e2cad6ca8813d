"""Every way of leaving a stream early returns its connection: 200 early exits through a pool of one
connection, then a normal request, all within a short deadline (a leak would hit the pool timeout)."""

from __future__ import annotations

import contextlib

import anyio
import httpx
import pytest

from mixtral_client import AsyncMixtralClient, MixtralClient, Timeout
from tests.client.conftest import MESSAGES, chunk, completion
from tests.loopback import Conn, LoopbackServer, Received, sse

ROUNDS = 200
#: for the variations on the same release path
FEWER_ROUNDS = 50
#: short enough that a leaked connection (a pool wait) fails the test quickly
DEADLINE = Timeout(connect=1.0, idle=1.0, total=2.0)


class Boom(Exception):
    pass


def endless_or_answer(req: Received, conn: Conn) -> None:
    """Streams tick forever (until the client goes away); answers a non-streaming request at once."""
    if not req.json().get("stream"):
        conn.respond(200, completion("pool ok"))
        return
    conn.start(200, {"Content-Type": "text/event-stream"})
    conn.write(sse(chunk(role="assistant"), chunk("tick"), done=False))
    while not conn.pause(0.005):
        conn.write(sse(chunk("tick"), done=False))


@pytest.fixture
def server(serve) -> LoopbackServer:
    return serve(endless_or_answer)


@pytest.fixture
def client(server: LoopbackServer):
    with httpx.Client(limits=httpx.Limits(max_connections=1)) as http, \
            MixtralClient(base_url=server.url, api_key="k", http_client=http, timeout=DEADLINE) as c:
        yield c


def assert_pool_still_usable_sync(client: MixtralClient) -> None:
    answer = client.chat.completions.create(messages=MESSAGES)
    assert answer.choices[0].message.content == "pool ok"


def test_break_inside_with_returns_the_connection(client: MixtralClient) -> None:
    for _ in range(ROUNDS):
        with client.chat.completions.create(messages=MESSAGES, stream=True) as stream:
            for _chunk in stream:
                break
    assert_pool_still_usable_sync(client)


def test_break_without_with_returns_the_connection(client: MixtralClient) -> None:
    for _ in range(FEWER_ROUNDS):
        for _chunk in client.chat.completions.create(messages=MESSAGES, stream=True):
            break
    assert_pool_still_usable_sync(client)


def test_close_without_iterating_returns_the_connection(client: MixtralClient) -> None:
    for _ in range(FEWER_ROUNDS):
        client.chat.completions.create(messages=MESSAGES, stream=True).close()
    assert_pool_still_usable_sync(client)


def test_exception_in_the_loop_returns_the_connection(client: MixtralClient) -> None:
    def fail_while_reading() -> None:
        for _chunk in client.chat.completions.create(messages=MESSAGES, stream=True):
            raise Boom

    for _ in range(FEWER_ROUNDS):
        with contextlib.suppress(Boom):
            fail_while_reading()
    assert_pool_still_usable_sync(client)


def test_default_pool_reuses_connections_after_complete_streams(serve) -> None:
    server = serve(lambda req, conn: (conn.start(200, {"Content-Type": "text/event-stream"}),
                                      conn.write(sse(chunk("a"), chunk(finish="stop"))), conn.finish()))
    with MixtralClient(base_url=server.url, api_key="k") as c:
        for _ in range(5):
            assert c.chat.completions.create(messages=MESSAGES, stream=True).get_final_completion()
    assert len(server.requests) == 5


# --------------------------------------------------------------------------- async (asyncio and trio)


@contextlib.asynccontextmanager
async def async_client(server: LoopbackServer):
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as http, \
            AsyncMixtralClient(base_url=server.url, api_key="k", http_client=http, timeout=DEADLINE) as c:
        yield c


async def assert_pool_still_usable(client: AsyncMixtralClient) -> None:
    answer = await client.chat.completions.create(messages=MESSAGES)
    assert answer.choices[0].message.content == "pool ok"


@pytest.mark.anyio
async def test_async_break_inside_async_with_returns_the_connection(server: LoopbackServer) -> None:
    async with async_client(server) as client:
        for _ in range(ROUNDS):
            async with await client.chat.completions.create(messages=MESSAGES, stream=True) as stream:
                async for _chunk in stream:
                    break
        await assert_pool_still_usable(client)


@pytest.mark.anyio
async def test_async_break_then_aclose_returns_the_connection(server: LoopbackServer) -> None:
    async with async_client(server) as client:
        for _ in range(FEWER_ROUNDS):
            stream = await client.chat.completions.create(messages=MESSAGES, stream=True)
            async for _chunk in stream:
                break
            await stream.aclose()
        await assert_pool_still_usable(client)


@pytest.mark.anyio
async def test_async_exception_in_the_loop_inside_async_with_returns_the_connection(server: LoopbackServer) -> None:
    async with async_client(server) as client:
        for _ in range(FEWER_ROUNDS):
            with contextlib.suppress(Boom):
                async with await client.chat.completions.create(messages=MESSAGES, stream=True) as stream:
                    async for _chunk in stream:
                        raise Boom
        await assert_pool_still_usable(client)


@pytest.mark.anyio
async def test_async_cancelled_while_reading_returns_the_connection(server: LoopbackServer) -> None:
    async with async_client(server) as client:
        for _ in range(FEWER_ROUNDS):
            stream = await client.chat.completions.create(messages=MESSAGES, stream=True)
            with anyio.CancelScope() as scope:
                async for _chunk in stream:
                    scope.cancel()  # the next read is cancelled, inside the stream, without `async with`
            assert scope.cancelled_caught
        await assert_pool_still_usable(client)


@pytest.mark.anyio
async def test_async_cancelled_before_the_first_chunk_returns_the_connection(serve) -> None:
    def stall_then_answer(req: Received, conn: Conn) -> None:
        if req.json().get("stream"):
            conn.start(200, {"Content-Type": "text/event-stream"})
            conn.pause(5)
        else:
            conn.respond(200, completion("pool ok"))

    server = serve(stall_then_answer)
    async with async_client(server) as client:
        for _ in range(10):
            with anyio.move_on_after(0.02):
                await client.chat.completions.create(messages=MESSAGES, stream=True)
                pytest.fail("the stalled stream produced a chunk")
        await assert_pool_still_usable(client)


def test_async_break_without_closing_is_released_by_the_asyncio_loop(server: LoopbackServer) -> None:
    # trio finalizes an abandoned stream as well, but warns (ResourceWarning): close async streams
    async def main() -> None:
        async with async_client(server) as client:
            for _ in range(20):
                async for _chunk in await client.chat.completions.create(messages=MESSAGES, stream=True):
                    break
                await anyio.sleep(0.01)  # the loop's async-generator finalizer closes the abandoned stream
            await assert_pool_still_usable(client)

    anyio.run(main, backend="asyncio")
