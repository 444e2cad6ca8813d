"""The retry policy: which errors are retried, how long to wait, when to give up.

One ``RetryPolicy`` builds both tenacity's ``Retrying`` (sync, ``time.sleep``) and ``AsyncRetrying``
(``anyio.sleep``, so it runs under asyncio and trio). Decisions are pure functions of the exception.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import tenacity

from ._exceptions import APIConnectionError, APIStatusError
from ._timeouts import Deadline

__all__ = ["RetryPolicy", "parse_retry_after"]

_T = TypeVar("_T")

_RETRY_STATUSES = frozenset({408, 409, 429})
_QUOTA_CODES = frozenset({"insufficient_quota", "quota_exceeded", "billing_hard_limit_reached"})


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, then ``retry-after`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def _quota_exhausted(error: APIStatusError) -> bool:
    code = error.code
    if isinstance(code, str) and code.lower() in _QUOTA_CODES:
        return True
    return "quota" in error.message.lower() and "exceed" in error.message.lower()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    #: a Retry-After longer than this is not obeyed: the error is raised instead
    max_retry_after: float = 60.0

    def should_retry(self, error: BaseException) -> bool:
        if isinstance(error, APIStatusError):
            verdict = error.headers.get("x-should-retry")
            if verdict == "true":
                return True
            if verdict == "false":
                return False
            status = error.status_code
            if status is None or status == 402:
                return False
            if status == 429 and _quota_exhausted(error):
                return False
            return status in _RETRY_STATUSES or status >= 500
        return isinstance(error, APIConnectionError)

    def backoff(self, retry_number: int) -> float:
        """Exponential backoff with jitter for the ``retry_number``-th retry (1-based)."""
        delay: float = min(self.initial_delay * 2.0 ** (retry_number - 1), self.max_delay)
        return delay * (1.0 - 0.25 * random.random())

    def wait_for(self, error: BaseException | None, retry_number: int) -> float:
        if isinstance(error, APIStatusError):
            after = parse_retry_after(error.headers)
            if after is not None and after <= self.max_retry_after:
                return after
        return self.backoff(retry_number)

    # -- tenacity glue ------------------------------------------------------------------------------

    def _kwargs(self, deadline: Deadline) -> dict[str, Any]:
        def retry(state: tenacity.RetryCallState) -> bool:
            outcome = state.outcome
            error = outcome.exception() if outcome is not None and outcome.failed else None
            return error is not None and self.should_retry(error)

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome is not None else None
            return self.wait_for(error, state.attempt_number)

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number > self.max_retries:
                return True
            error = state.outcome.exception() if state.outcome is not None else None
            if isinstance(error, APIStatusError):
                after = parse_retry_after(error.headers)
                if after is not None and after > self.max_retry_after:
                    return True
            left = deadline.remaining()
            return left is not None and left <= (state.upcoming_sleep or 0.0)

        return {"retry": retry, "wait": wait, "stop": stop, "reraise": True}

    def retrying(self, deadline: Deadline) -> tenacity.Retrying:
        return tenacity.Retrying(sleep=time.sleep, **self._kwargs(deadline))

    def async_retrying(self, deadline: Deadline) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(sleep=anyio.sleep, **self._kwargs(deadline))

    # The first attempt runs without tenacity (building and entering a ``Retrying`` costs more than the rest
    # of the client's per-request work). A failure that should be retried enters the tenacity loop, which
    # sees that same failure as its attempt 1, so waits, stops and the error raised are exactly as if
    # tenacity had run every attempt.

    def call(self, deadline: Deadline, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)``, retried under this policy."""
        try:
            return fn(*args)
        except BaseException as exc:
            if not self.should_retry(exc):
                raise
            first = exc
        pending = [first]

        def attempt(*args: Any) -> _T:
            if pending:
                raise pending.pop()
            return fn(*args)

        return self.retrying(deadline)(attempt, *args)

    async def acall(self, deadline: Deadline, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """``await fn(*args)``, retried under this policy."""
        try:
            return await fn(*args)
        except BaseException as exc:
            if not self.should_retry(exc):
                raise
            first = exc
        pending = [first]

        async def attempt(*args: Any) -> _T:
            if pending:
                raise pending.pop()
            return await fn(*args)

        result: _T = await self.async_retrying(deadline)(attempt, *args)
        return result
