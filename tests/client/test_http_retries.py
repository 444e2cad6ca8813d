"""Retries over a real loopback server: what is retried, how often, and how long the client waits."""

from __future__ import annotations

import socket
import time

import pytest

from mixtral_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InternalServerError,
    RateLimitError,
    Timeout,
)
from tests.client.conftest import Driver, completion, dropping, replying, streaming, text_stream
from tests.loopback import Conn, Received, in_turn

#: a retryable failure that asks for a short wait, so the test does not sit through the backoff
QUICK = {"retry-after-ms": "10"}


def test_bounded_retries_default_to_two(driver: Driver, serve) -> None:
    server = serve(replying(500, {"error": {"message": "down"}}, QUICK))

    with pytest.raises(InternalServerError):
        driver.complete(server)

    assert len(server.requests) == 3


def test_max_retries_bounds_the_attempts(driver: Driver, serve) -> None:
    server = serve(replying(503, "busy", QUICK))

    with pytest.raises(InternalServerError):
        driver.complete(server, client={"max_retries": 4})

    assert len(server.requests) == 5


def test_max_retries_zero_sends_once(driver: Driver, serve) -> None:
    server = serve(replying(500, "down", QUICK))

    with pytest.raises(InternalServerError):
        driver.complete(server, client={"max_retries": 0})

    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_status_is_retried_until_success(status: int, serve) -> None:
    server = serve(in_turn(replying(status, {"error": {"message": "again"}}, QUICK), replying(200, completion("ok"))))

    assert Driver("sync").complete(server).choices[0].message.content == "ok"
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422])
def test_status_that_can_never_succeed_is_not_retried(status: int, driver: Driver, serve) -> None:
    server = serve(replying(status, {"error": {"code": status, "message": "no"}}, QUICK))

    with pytest.raises(APIStatusError):
        driver.complete(server)

    assert len(server.requests) == 1


def test_quota_exhausted_429_is_not_retried(driver: Driver, serve) -> None:
    body = {"error": {"code": "insufficient_quota", "message": "You exceeded your current quota"}}
    server = serve(replying(429, body, QUICK))

    with pytest.raises(RateLimitError):
        driver.complete(server)

    assert len(server.requests) == 1


def test_x_should_retry_true_retries_a_400(serve) -> None:
    server = serve(in_turn(replying(400, "odd", {"x-should-retry": "true", **QUICK}), replying(200, completion())))

    Driver("sync").complete(server)

    assert len(server.requests) == 2


def test_x_should_retry_false_stops_a_503(driver: Driver, serve) -> None:
    server = serve(replying(503, "down", {"x-should-retry": "false"}))

    with pytest.raises(InternalServerError):
        driver.complete(server)

    assert len(server.requests) == 1


def test_dropped_connection_is_retried(sync_or_async: Driver, serve) -> None:
    server = serve(in_turn(dropping, replying(200, completion("second try"))))

    assert sync_or_async.complete(server).choices[0].message.content == "second try"
    assert len(server.requests) == 2


def test_connection_refused_raises_connection_error(sync_or_async: Driver) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    class Nowhere:
        url = f"http://127.0.0.1:{port}/v1"

    with pytest.raises(APIConnectionError) as info:
        sync_or_async.complete(Nowhere(), client={"max_retries": 0})  # type: ignore[arg-type]

    assert not isinstance(info.value, APITimeoutError)
    assert info.value.partial is None


def test_read_timeout_is_retried(sync_or_async: Driver, serve) -> None:
    def stall(req: Received, conn: Conn) -> None:
        conn.pause(2)

    server = serve(in_turn(stall, replying(200, completion("after timeout"))))

    answer = sync_or_async.complete(server, timeout=Timeout(connect=1, idle=0.3, total=None))

    assert answer.choices[0].message.content == "after timeout"
    assert len(server.requests) == 2


def test_retry_after_seconds_is_honoured(driver: Driver, serve) -> None:
    server = serve(in_turn(replying(429, {"error": {"message": "slow"}}, {"Retry-After": "1"}),
                           replying(200, completion())))

    start = time.monotonic()
    driver.complete(server)
    elapsed = time.monotonic() - start

    assert 1.0 <= elapsed < 1.8
    assert len(server.requests) == 2


def test_retry_after_ms_is_preferred_to_retry_after(driver: Driver, serve) -> None:
    server = serve(in_turn(replying(503, "busy", {"retry-after-ms": "300", "Retry-After": "30"}),
                           replying(200, completion())))

    start = time.monotonic()
    driver.complete(server)
    elapsed = time.monotonic() - start

    assert 0.3 <= elapsed < 1.0


def test_retry_after_beyond_the_cap_raises_at_once(driver: Driver, serve) -> None:
    server = serve(replying(429, {"error": {"message": "come back tomorrow"}}, {"Retry-After": "86400"}))

    start = time.monotonic()
    with pytest.raises(RateLimitError):
        driver.complete(server)

    assert time.monotonic() - start < 0.5
    assert len(server.requests) == 1


def test_stream_refused_with_a_status_is_retried(driver: Driver, serve) -> None:
    server = serve(in_turn(replying(502, "<html>bad gateway</html>", QUICK), streaming(text_stream("ok"))))

    assert driver.text(server) == "ok"
    assert len(server.requests) == 2


def test_request_is_resent_identically(serve) -> None:
    server = serve(in_turn(replying(500, "down", QUICK), replying(200, completion())))

    Driver("sync").complete(server, temperature=0.5, extra_headers={"X-Trace": "t1"})

    first, second = server.requests
    assert first.body == second.body
    assert first.headers["x-trace"] == second.headers["x-trace"] == "t1"
