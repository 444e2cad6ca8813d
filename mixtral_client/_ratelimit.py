"""Client-side pacing of requests: stay under a host's requests-per-minute limit instead of meeting its 429s.

    client = MixtralClient(provider="nvidia", rate_limit=40)          # or MIXTRAL_RATE_LIMIT=40
    shared = RateLimiter(40); a = MixtralClient(..., rate_limit=shared); b = AsyncMixtralClient(..., rate_limit=shared)

A ``RateLimiter`` is a token bucket: ``burst`` requests may start at once, then one every ``60 /
requests_per_minute`` seconds. Each request takes its slot before it is sent (a slot in the future is a wait,
reserved in order of arrival, so concurrent callers queue fairly and no one spins). The wait is part of the
request's ``timeout.total``: the request goes out with what is left, and one that would wait past its total
deadline raises ``APITimeoutError`` at once, having sent nothing and given its slot back. Retries inside one
request take no new slot (they follow the host's ``Retry-After``). One limiter may pace several clients, sync and
async alike: it holds a lock only to do the arithmetic, never while waiting.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace

import anyio

from ._exceptions import APITimeoutError, ConfigurationError
from ._request import ChatRequest
from ._timeouts import Timeout

__all__ = ["RateLimiter", "as_limiter"]


class RateLimiter:
    """At most ``requests_per_minute`` request starts a minute, after a first ``burst`` (default 1)."""

    def __init__(self, requests_per_minute: float, *, burst: int = 1) -> None:
        if isinstance(requests_per_minute, bool) or not isinstance(requests_per_minute, int | float) \
                or not math.isfinite(requests_per_minute) or requests_per_minute <= 0:
            raise ConfigurationError(f"rate_limit: requests per minute must be a number > 0, got {requests_per_minute!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigurationError(f"rate_limit: burst must be an integer >= 1, got {burst!r}")
        self.requests_per_minute = float(requests_per_minute)
        self.burst = burst
        self._interval = 60.0 / self.requests_per_minute
        self._lock = threading.Lock()
        self._tat = 0.0  # the theoretical arrival time of the next request (GCRA); in the past: the bucket is full

    def __repr__(self) -> str:
        return f"RateLimiter({self.requests_per_minute:g}, burst={self.burst})"

    def reserve(self, limit: float | None, provider: str) -> float:
        """Take the next slot; the seconds to wait for it (``APITimeoutError``, slot untaken, past ``limit``)."""
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat, now)
            wait = max(0.0, tat - (self.burst - 1) * self._interval - now)
            if limit is not None and wait > limit:
                raise APITimeoutError(
                    f"rate_limit: the next request slot is {wait:.1f} s away, past the {limit:g} s total deadline "
                    f"({self.requests_per_minute:g} requests a minute); nothing was sent", provider=provider)
            self._tat = tat + self._interval
        return wait


def as_limiter(value: float | RateLimiter | None, env_value: str | None) -> RateLimiter | None:
    """``rate_limit=`` (a number of requests a minute, or a shared ``RateLimiter``), else ``MIXTRAL_RATE_LIMIT``."""
    if isinstance(value, RateLimiter) or value is None and not env_value:
        return value
    if value is None:
        assert env_value is not None
        try:
            value = float(env_value)
        except ValueError:
            raise ConfigurationError(f"MIXTRAL_RATE_LIMIT must be a number of requests a minute, got {env_value!r}") \
                from None
    return RateLimiter(value)


def _after(request: ChatRequest, waited: float) -> ChatRequest:
    """``request`` with ``waited`` seconds taken from its total deadline."""
    timeout = request.options.timeout
    if not waited or timeout.total is None:
        return request
    left = Timeout(connect=timeout.connect, idle=timeout.idle, total=max(timeout.total - waited, 0.001))
    return replace(request, options=replace(request.options, timeout=left))


def pace(limiter: RateLimiter, request: ChatRequest) -> ChatRequest:
    """Wait (blocking) for ``request``'s slot; the request with what is left of its deadline."""
    wait = limiter.reserve(request.options.timeout.total, request.provider.name)
    if wait:
        time.sleep(wait)
    return _after(request, wait)


async def apace(limiter: RateLimiter, request: ChatRequest) -> ChatRequest:
    """``pace`` for the async client (the event loop goes on while it waits)."""
    wait = limiter.reserve(request.options.timeout.total, request.provider.name)
    if wait:
        await anyio.sleep(wait)
    return _after(request, wait)
