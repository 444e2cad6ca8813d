"""Deadlines on local weights: none by default, and a ``timeout`` given is honoured (idle and total, counted
from when the request is queued), raising ``APITimeoutError`` and taking the row out of the batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mixtral_client import APITimeoutError, AsyncMixtralClient, MixtralClient, Timeout
from mixtral_client._timeouts import NO_TIMEOUT
from mixtral_local import backend as backend_module
from mixtral_local.engine import Engine

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
LOCAL = {"dtype": "float32", "device": "cpu"}


@pytest.fixture
def client(tiny_dir: Path) -> Iterator[MixtralClient]:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, local_options=LOCAL) as c:
        yield c


def engine_of(client: MixtralClient | AsyncMixtralClient) -> Engine:
    engine = client._backend._core._engine  # type: ignore[union-attr]
    assert engine is not None
    return engine


def idle_rows(engine: Engine, timeout: float = 5.0) -> bool:
    """No request is left in the engine's batch within ``timeout`` (the timed-out one was taken out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = engine.stats()
        if load["decoding"] == load["prefilling"] == load["waiting"] == 0:
            return True
        time.sleep(0.01)
    return False


def test_local_weights_have_no_deadline_unless_one_is_given(tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, local_options=LOCAL) as c:
        assert c.config.timeout == NO_TIMEOUT
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, local_options=LOCAL, timeout=5) as c:
        assert c.config.timeout == Timeout(connect=5, idle=5, total=5)


def test_a_total_deadline_stops_a_long_answer_and_frees_its_row(client: MixtralClient) -> None:
    client.chat.completions.create(messages=MESSAGES, max_tokens=2)  # loaded and warm
    started = time.monotonic()
    with pytest.raises(APITimeoutError, match=r"total deadline \(0.3 s\)"):
        client.chat.completions.create(messages=MESSAGES, max_tokens=900, timeout=0.3)
    assert time.monotonic() - started < 2
    assert idle_rows(engine_of(client), timeout=0.5)  # at once: letting it run to its end takes seconds


def test_a_stream_that_times_out_keeps_what_it_gave(client: MixtralClient) -> None:
    client.chat.completions.create(messages=MESSAGES, max_tokens=2)
    seen = []
    with pytest.raises(APITimeoutError) as info:
        with client.chat.completions.create(messages=MESSAGES, max_tokens=900, timeout=0.3, stream=True) as s:
            for chunk in s:
                seen.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    partial = info.value.partial
    assert partial is not None and partial.choices[0].message.content == "".join(seen) != ""


def test_an_idle_deadline_covers_the_wait_for_a_row(client: MixtralClient) -> None:
    client.chat.completions.create(messages=MESSAGES, max_tokens=2)
    engine = engine_of(client)
    with engine.scheduler._cond:  # the batch thread cannot take the request: no token comes
        started = time.monotonic()
        with pytest.raises(APITimeoutError, match=r"no token from the local model for 0.2 s \(idle deadline\)"):
            client.chat.completions.create(messages=MESSAGES, max_tokens=5,
                                           timeout=Timeout(idle=0.2, total=None))
        assert 0.2 <= time.monotonic() - started < 1.5
    assert client.chat.completions.create(messages=MESSAGES, max_tokens=3).choices[0].finish_reason == "length"


def test_a_first_load_is_not_counted(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend_module.clear_engine_cache()
    real: Callable[..., Any] = backend_module._engine_for

    def slow(*args: Any) -> Any:
        time.sleep(0.6)
        return real(*args)

    monkeypatch.setattr(backend_module, "_engine_for", slow)
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, local_options=LOCAL) as c:
        answer = c.chat.completions.create(messages=MESSAGES, max_tokens=3, timeout=0.4)
    assert answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_async_deadlines_total_and_idle(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, local_options=LOCAL) as c:
        await c.chat.completions.create(messages=MESSAGES, max_tokens=2)
        with anyio.fail_after(3):
            with pytest.raises(APITimeoutError, match="total deadline"):
                await c.chat.completions.create(messages=MESSAGES, max_tokens=900, timeout=0.3)
        engine = engine_of(c)
        assert await anyio.to_thread.run_sync(idle_rows, engine, 0.5)
        gate = threading.Event()  # the batch thread waits at it before taking requests: no token comes
        take = engine.scheduler._take_waiting
        monkeypatch.setattr(engine.scheduler, "_take_waiting", lambda *args: gate.wait() and take(*args))
        try:
            with anyio.fail_after(3):
                with pytest.raises(APITimeoutError, match="idle deadline"):
                    stream = await c.chat.completions.create(messages=MESSAGES, max_tokens=5, stream=True,
                                                             timeout=Timeout(idle=0.2, total=None))
                    async with stream:
                        async for _ in stream:
                            pass
        finally:
            gate.set()
        answer = await c.chat.completions.create(messages=MESSAGES, max_tokens=3)
        assert answer.choices[0].finish_reason == "length"
