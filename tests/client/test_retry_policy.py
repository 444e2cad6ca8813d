"""The retry policy as pure decisions: what is retried and how long to wait (no network, no sleeping)."""

from __future__ import annotations

import email.utils
import time

import pytest
import tenacity

from mixtral_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InvalidRequestError,
    RetryPolicy,
)
from mixtral_client._exceptions import status_error_for
from mixtral_client._retry import parse_retry_after
from mixtral_client._timeouts import Deadline

POLICY = RetryPolicy()


def status_error(status: int, headers: dict[str, str] | None = None, *, code: str | int | None = None,
                 message: str = "m") -> APIStatusError:
    return status_error_for(status)(message, status_code=status, headers=headers, code=code)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retried(status: int) -> None:
    assert POLICY.should_retry(status_error(status))


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 413, 422])
def test_statuses_that_cannot_succeed_are_not_retried(status: int) -> None:
    assert not POLICY.should_retry(status_error(status))


def test_connection_errors_and_timeouts_are_retried() -> None:
    assert POLICY.should_retry(APIConnectionError("reset"))
    assert POLICY.should_retry(APITimeoutError("slow"))


def test_other_exceptions_are_not_retried() -> None:
    assert not POLICY.should_retry(ValueError("bug"))
    assert not POLICY.should_retry(InvalidRequestError("bad", param="x"))


def test_error_without_status_is_not_retried() -> None:
    assert not POLICY.should_retry(APIStatusError("odd chunk", status_code=None))


@pytest.mark.parametrize("code", ["insufficient_quota", "quota_exceeded", "billing_hard_limit_reached"])
def test_quota_exhausted_429_is_not_retried(code: str) -> None:
    assert not POLICY.should_retry(status_error(429, code=code))


def test_429_whose_message_says_quota_exceeded_is_not_retried() -> None:
    assert not POLICY.should_retry(status_error(429, message="You exceeded your current quota, please check"))


def test_x_should_retry_overrides_the_status() -> None:
    assert POLICY.should_retry(status_error(400, {"x-should-retry": "true"}))
    assert not POLICY.should_retry(status_error(503, {"x-should-retry": "false"}))


@pytest.mark.parametrize(("retry", "low", "high"), [(1, 0.375, 0.5), (2, 0.75, 1.0), (3, 1.5, 2.0), (4, 3.0, 4.0),
                                                   (5, 6.0, 8.0), (9, 6.0, 8.0)])
def test_backoff_doubles_with_jitter_up_to_the_cap(retry: int, low: float, high: float) -> None:
    delays = {POLICY.backoff(retry) for _ in range(200)}

    assert all(low <= d <= high for d in delays)
    assert len(delays) > 1, "jittered"


def test_retry_after_ms_is_read_first() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25


def test_retry_after_seconds() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    when = email.utils.formatdate(now + 30, usegmt=True)

    assert parse_retry_after({"retry-after": when}, now=now) == pytest.approx(30.0)


def test_retry_after_in_the_past_or_negative_is_zero() -> None:
    past = email.utils.formatdate(time.time() - 60, usegmt=True)

    assert parse_retry_after({"retry-after": past}) == 0.0
    assert parse_retry_after({"retry-after": "-4"}) == 0.0


def test_unreadable_retry_after_is_ignored() -> None:
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after-ms": "x"}) is None
    assert parse_retry_after({}) is None


def test_wait_obeys_retry_after_within_the_cap() -> None:
    assert POLICY.wait_for(status_error(429, {"retry-after": "7"}), 1) == 7.0


def test_wait_falls_back_to_backoff_beyond_the_cap_or_without_header() -> None:
    assert POLICY.wait_for(status_error(429, {"retry-after": "3600"}), 1) <= 0.5
    assert POLICY.wait_for(APIConnectionError("x"), 2) <= 1.0


def attempts(policy: RetryPolicy, errors: list[BaseException], total: float | None = None) -> int:
    """How many attempts tenacity makes when each attempt raises the next error (no real sleeping)."""
    calls = 0

    def attempt() -> None:
        nonlocal calls
        error = errors[min(calls, len(errors) - 1)]
        calls += 1
        raise error

    retrying = policy.retrying(Deadline(total)).copy(sleep=lambda _: None)
    with pytest.raises(type(errors[-1])):
        retrying(attempt)
    return calls


def test_max_retries_bounds_attempts() -> None:
    assert attempts(RetryPolicy(max_retries=2), [APIConnectionError("x")]) == 3
    assert attempts(RetryPolicy(max_retries=0), [APIConnectionError("x")]) == 1


def test_non_retryable_error_stops_at_once() -> None:
    assert attempts(RetryPolicy(max_retries=5), [status_error(400)]) == 1


def test_retry_after_beyond_the_cap_stops() -> None:
    assert attempts(RetryPolicy(max_retries=5), [status_error(429, {"retry-after": "120"})]) == 1


def test_no_retry_when_the_wait_would_pass_the_total_deadline() -> None:
    assert attempts(RetryPolicy(max_retries=5), [status_error(503, {"retry-after": "2"})], total=1.0) == 1


def test_retrying_reraises_the_last_error_itself() -> None:
    error = status_error(500)
    with pytest.raises(APIStatusError) as info:
        RetryPolicy(max_retries=1).retrying(Deadline(None)).copy(sleep=lambda _: None)(
            lambda: (_ for _ in ()).throw(error))

    assert info.value is error
    assert not isinstance(info.value, tenacity.RetryError)
