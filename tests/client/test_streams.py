"""The ``Stream`` / ``AsyncStream`` objects themselves: iteration, text(), final completion, closing."""

from __future__ import annotations

import pytest

from mixtral_client import AsyncMixtralClient, MixtralClient
from tests.client.conftest import MESSAGES, Driver, chunk, streaming, text_stream
from tests.loopback import LoopbackServer, sse


@pytest.fixture
def server(serve) -> LoopbackServer:
    return serve(streaming(text_stream("Hello", ", ", "world")))


def test_a_stream_is_iterated_once(server: LoopbackServer) -> None:
    with MixtralClient(base_url=server.url, api_key="k") as client:
        stream = client.chat.completions.create(messages=MESSAGES, stream=True)
        list(stream)
        with pytest.raises(RuntimeError, match="only once"):
            list(stream)


def test_text_gives_only_content_and_final_completion_still_merges(server: LoopbackServer) -> None:
    with MixtralClient(base_url=server.url, api_key="k") as client:
        stream = client.chat.completions.create(messages=MESSAGES, stream=True)
        assert list(stream.text()) == ["Hello", ", ", "world"]
        assert stream.get_final_completion().choices[0].message.content == "Hello, world"


def test_final_completion_after_iterating_is_the_same_merge(server: LoopbackServer) -> None:
    with MixtralClient(base_url=server.url, api_key="k") as client:
        with client.chat.completions.create(messages=MESSAGES, stream=True) as stream:
            chunks = list(stream)
            final = stream.get_final_completion()

    assert len(chunks) == 5
    assert final.choices[0].message.content == "Hello, world"
    assert final.choices[0].finish_reason == "stop"


def test_close_is_idempotent_and_ends_iteration(server: LoopbackServer) -> None:
    with MixtralClient(base_url=server.url, api_key="k") as client:
        stream = client.chat.completions.create(messages=MESSAGES, stream=True)
        stream.close()
        stream.close()
        assert list(stream) == []  # not even the chunk read ahead inside create()


def test_stream_of_only_done_is_empty(driver: Driver, serve) -> None:
    server = serve(streaming(b"data: [DONE]\n\n"))

    assert driver.chunks(server) == []
    assert driver.final(server).choices == []


def test_events_after_done_are_ignored(driver: Driver, serve) -> None:
    server = serve(streaming(sse(chunk("a"), chunk(finish="stop")) + sse(chunk("ignored"), done=False)))

    assert driver.text(server) == "a"


@pytest.mark.anyio
async def test_async_stream_is_iterated_once_and_text_can_be_left_early(server: LoopbackServer) -> None:
    async with AsyncMixtralClient(base_url=server.url, api_key="k") as client:
        async with await client.chat.completions.create(messages=MESSAGES, stream=True) as stream:
            async for piece in stream.text():
                assert piece == "Hello"
                break
            with pytest.raises(RuntimeError, match="only once"):
                stream.__aiter__()
        final = await stream.get_final_completion()

    assert final.choices[0].message.content == "Hello"


def _two_choices() -> bytes:
    """n=2 as hosts stream it: each chunk carries one choice, the two interleaved."""
    return sse(chunk("A1", index=0), chunk("B1", index=1), chunk("B2", index=1), chunk("A2", index=0),
               chunk(finish="stop", index=1), chunk(finish="stop", index=0))


def test_text_of_an_n2_stream_is_the_first_choice_only(serve) -> None:
    server = serve(streaming(_two_choices()))
    with MixtralClient(base_url=server.url, api_key="k") as client:
        stream = client.chat.completions.create(messages=MESSAGES, stream=True, n=2)
        assert list(stream.text()) == ["A1", "A2"]
        final = stream.get_final_completion()
    assert [c.message.content for c in final.choices] == ["A1A2", "B1B2"]


@pytest.mark.anyio
async def test_async_text_of_an_n2_stream_is_the_first_choice_only(serve) -> None:
    server = serve(streaming(_two_choices()))
    async with AsyncMixtralClient(base_url=server.url, api_key="k") as client:
        stream = await client.chat.completions.create(messages=MESSAGES, stream=True, n=2)
        async with stream:
            assert [piece async for piece in stream.text()] == ["A1", "A2"]
