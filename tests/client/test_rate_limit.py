"""``rate_limit=``: requests paced under a requests-per-minute limit, on a real loopback server that records when
each request arrived (sync and async, shared limiters, deadlines)."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest

from mixtral_client import APITimeoutError, AsyncMixtralClient, ConfigurationError, MixtralClient, RateLimiter
from tests.client.conftest import completion
from tests.loopback import Conn, Received

MESSAGES = [{"role": "user", "content": "Hi"}]


def recording(arrivals: list[float]):
    def handle(req: Received, conn: Conn) -> None:
        arrivals.append(time.monotonic())
        conn.respond(200, completion())
    return handle


def gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]


def test_requests_are_spaced_by_the_limit(serve) -> None:
    arrivals: list[float] = []
    server = serve(recording(arrivals))
    with httpx.Client() as http, MixtralClient(base_url=server.url, api_key="k", http_client=http,
                                                rate_limit=600) as client:  # one every 0.1 s
        for _ in range(4):
            client.chat.completions.create(messages=MESSAGES)
    assert len(arrivals) == 4 and min(gaps(arrivals)) >= 0.09


def test_a_burst_goes_at_once_then_the_pace_holds(serve) -> None:
    arrivals: list[float] = []
    server = serve(recording(arrivals))
    limiter = RateLimiter(120, burst=3)  # one every 0.5 s after 3 at once
    with MixtralClient(base_url=server.url, api_key="k", rate_limit=limiter) as client:
        for _ in range(5):
            client.chat.completions.create(messages=MESSAGES)
    assert arrivals[2] - arrivals[0] < 0.4 and min(gaps(arrivals)[2:]) >= 0.45


def test_concurrent_async_callers_queue_fairly(serve) -> None:
    arrivals: list[float] = []
    server = serve(recording(arrivals))

    async def main() -> float:
        async with AsyncMixtralClient(base_url=server.url, api_key="k", rate_limit=600) as client:
            started = time.monotonic()
            async with anyio.create_task_group() as group:
                for _ in range(5):
                    group.start_soon(lambda: client.chat.completions.create(messages=MESSAGES))
            return time.monotonic() - started

    elapsed = anyio.run(main, backend="trio")
    arrivals.sort()
    assert len(arrivals) == 5 and min(gaps(arrivals)) >= 0.09 and elapsed >= 0.38


def test_one_limiter_paces_several_clients(serve) -> None:
    arrivals: list[float] = []
    server = serve(recording(arrivals))
    shared = RateLimiter(600)
    with MixtralClient(base_url=server.url, api_key="k", rate_limit=shared) as a, \
            MixtralClient(base_url=server.url, api_key="k", rate_limit=shared) as b:
        for client in (a, b, a.with_options(max_retries=0), b):
            client.chat.completions.create(messages=MESSAGES)
    assert min(gaps(arrivals)) >= 0.09


def test_a_wait_past_the_deadline_raises_at_once_and_sends_nothing(serve) -> None:
    arrivals: list[float] = []
    server = serve(recording(arrivals))
    with MixtralClient(base_url=server.url, api_key="k", rate_limit=6) as client:  # one every 10 s
        client.chat.completions.create(messages=MESSAGES)
        started = time.monotonic()
        with pytest.raises(APITimeoutError, match="rate_limit: the next request slot is 10.0 s away"):
            client.chat.completions.create(messages=MESSAGES, timeout=2)
        assert time.monotonic() - started < 0.5 and len(arrivals) == 1


def test_the_wait_is_taken_from_the_total_deadline(serve) -> None:
    seen: list[Any] = []

    def slow(req: Received, conn: Conn) -> None:
        seen.append(req)
        if len(seen) > 1:  # the first answers at once, the second after 0.5 s
            conn.pause(0.5)
        conn.respond(200, completion())

    server = serve(slow)
    with MixtralClient(base_url=server.url, api_key="k", rate_limit=120, max_retries=0) as client:  # every 0.5 s
        client.chat.completions.create(messages=MESSAGES)
        # waits ~0.5 s for its slot, then has ~0.4 s of its 0.9 s left: the 0.5 s answer is too slow
        with pytest.raises(APITimeoutError):
            client.chat.completions.create(messages=MESSAGES, timeout=0.9)
    assert len(seen) == 2


def test_the_limit_from_the_environment_and_bad_values() -> None:
    with MixtralClient(provider="nvidia", env={"NVIDIA_API_KEY": "k", "MIXTRAL_RATE_LIMIT": "40"}) as client:
        limiter = client.chat.completions._limiter
        assert isinstance(limiter, RateLimiter) and limiter.requests_per_minute == 40
    with MixtralClient(provider="nvidia", env={"NVIDIA_API_KEY": "k"}) as client:
        assert client.chat.completions._limiter is None
    for bad in (0, -3, float("inf"), True):
        with pytest.raises(ConfigurationError, match="requests per minute"):
            MixtralClient(provider="nvidia", env={"NVIDIA_API_KEY": "k"}, rate_limit=bad)
    with pytest.raises(ConfigurationError, match="MIXTRAL_RATE_LIMIT"):
        MixtralClient(provider="nvidia", env={"NVIDIA_API_KEY": "k", "MIXTRAL_RATE_LIMIT": "fast"})
    with pytest.raises(ConfigurationError, match="burst"):
        RateLimiter(10, burst=0)
