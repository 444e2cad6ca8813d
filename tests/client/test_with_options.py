"""``client.with_options(...)``: a copy with other defaults that shares the original's connection pool."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mixtral_client import (
    APITimeoutError,
    AsyncMixtralClient,
    ConfigurationError,
    InternalServerError,
    MixtralClient,
    Timeout,
)
from tests.client.conftest import MESSAGES, completion, replying
from tests.loopback import Conn, Received


def test_a_copy_retries_as_told_and_the_original_as_before(serve) -> None:
    server = serve(replying(500, {"error": {"message": "down"}}, {"retry-after-ms": "1"}))
    with MixtralClient(base_url=server.url, api_key="sk-test", max_retries=2) as client:
        with pytest.raises(InternalServerError):
            client.with_options(max_retries=0).chat.completions.create(messages=MESSAGES)
        assert len(server.requests) == 1
        with pytest.raises(InternalServerError):
            client.chat.completions.create(messages=MESSAGES)
        assert len(server.requests) == 4


def test_a_copy_has_its_own_timeout(serve) -> None:
    def slow(req: Received, conn: Conn) -> None:
        conn.pause(1.5)
        conn.respond(200, completion("late"))

    server = serve(slow)
    with MixtralClient(base_url=server.url, api_key="sk-test", max_retries=0) as client:
        started = time.monotonic()
        with pytest.raises(APITimeoutError):
            client.with_options(timeout=0.2).chat.completions.create(messages=MESSAGES)
        assert time.monotonic() - started < 1.2  # the copy gave up at 0.2 s; the host answers at 1.5 s
        assert client.chat.completions.create(messages=MESSAGES).choices[0].message.content == "late"


def test_a_copy_adds_headers_shares_the_pool_and_closing_it_closes_nothing(serve) -> None:
    server = serve(replying(200, completion("ok")))
    with MixtralClient(base_url=server.url, api_key="sk-test", default_headers={"X-App": "shop"}) as client:
        copy = client.with_options(default_headers={"X-Trace": "t-1"})
        copy.chat.completions.create(messages=MESSAGES)
        client.chat.completions.create(messages=MESSAGES)
        copy.close()
        client.chat.completions.create(messages=MESSAGES)  # the pool is still open
        assert copy._backend._client is client._backend._client
        assert copy._backend.core._owned is client._backend._client  # the prebuilt-request path is kept
    first, second = server.requests[0].headers, server.requests[1].headers
    assert (first["x-app"], first["x-trace"]) == ("shop", "t-1")
    assert second["x-app"] == "shop" and "x-trace" not in second
    assert server.connections == 1  # one keep-alive connection served the copy and the original
    assert client._backend._client.is_closed


@pytest.mark.anyio
async def test_the_async_copy_too(serve) -> None:
    server = serve(replying(500, {"error": {"message": "down"}}, {"retry-after-ms": "1"}))
    async with AsyncMixtralClient(base_url=server.url, api_key="sk-test", max_retries=1) as client:
        copy = client.with_options(max_retries=0, default_headers={"X-Trace": "t-2"})
        with pytest.raises(InternalServerError):
            await copy.chat.completions.create(messages=MESSAGES)
        await copy.aclose()
        with pytest.raises(InternalServerError):
            await client.chat.completions.create(messages=MESSAGES)
        assert isinstance(copy._backend._client, httpx.AsyncClient) and not copy._backend._client.is_closed
    assert len(server.requests) == 3 and server.requests[0].headers["x-trace"] == "t-2"
    assert "x-trace" not in server.requests[1].headers


@pytest.mark.parametrize("bad", [{"timeout": -1}, {"max_retries": -1}, {"max_retries": True}, {"timeout": "5"}])
def test_bad_options_are_configuration_errors(bad: dict[str, Any]) -> None:
    with MixtralClient(base_url="http://127.0.0.1:9/v1", api_key="sk-test") as client:
        with pytest.raises(ConfigurationError):
            client.with_options(**bad)


def test_a_local_copy_shares_the_engine_and_honours_its_timeout(tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={},
                       local_options={"dtype": "float32", "device": "cpu"}) as client:
        client.chat.completions.create(messages=MESSAGES, max_tokens=2)
        copy = client.with_options(timeout=Timeout(idle=None, total=0.3))
        assert copy._backend is client._backend and copy.config.timeout.total == 0.3
        with pytest.raises(APITimeoutError, match="total deadline"):
            copy.chat.completions.create(messages=MESSAGES, max_tokens=900)
        copy.close()
        assert client.chat.completions.create(messages=MESSAGES, max_tokens=2).choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixtral_local.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)

