"""Fixtures for ``mixtral serve``: the real ASGI app under a real uvicorn on 127.0.0.1, in a thread of its own,
and the official ``openai`` SDK as the caller (what users point at the server)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from mixtral_client import AsyncMixtralClient  # noqa: E402
from mixtral_client.server import create_app  # noqa: E402


@contextlib.contextmanager
def running(client: AsyncMixtralClient, **app_options: Any) -> Iterator[str]:
    """``create_app(client, ...)`` served by uvicorn on a free 127.0.0.1 port; yields its ``/v1`` base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(client, **app_options), log_level="warning", ws="none",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def openai_client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60, http_client=httpx.Client())


def async_openai_client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60,
                              http_client=httpx.AsyncClient())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = pytest.importorskip("mixtral_local.tiny")
    return Path(tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-serve"), seed=0))


LOCAL = {"local_options": {"dtype": "float32", "device": "cpu"}}


@pytest.fixture(scope="module")
def local_url(tiny_dir: Path) -> Iterator[str]:
    """One server over the tiny local checkpoint for the module (the weights load at its start-up)."""
    with running(AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL)) as url:
        yield url


@pytest.fixture
def proxy() -> Iterator[Callable[..., str]]:
    """``proxy(upstream_url, **client_args)``: a server over an OpenAI-compatible host at ``upstream_url``."""
    stack = contextlib.ExitStack()

    def start(upstream: str, *, provider: str = "openai", **client_args: Any) -> str:
        client = AsyncMixtralClient(provider, base_url=upstream, api_key="upstream-key", env={}, max_retries=0,
                                    **client_args)
        return stack.enter_context(running(client))

    with stack:
        yield start
