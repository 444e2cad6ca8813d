"""Deadlines: connect, idle (between content events) and total (across every attempt)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ._exceptions import InvalidRequestError

__all__ = ["DEFAULT_TIMEOUT", "NO_TIMEOUT", "Deadline", "Timeout", "coerce_timeout"]


@dataclass(frozen=True, slots=True)
class Timeout:
    """Seconds, or ``None`` for no limit.

    - ``connect``: to open a TCP/TLS connection.
    - ``idle``: the longest wait between two content events of a stream (keep-alive comments do not count),
      and the longest wait for a non-streaming answer's first byte when ``total`` is ``None``.
    - ``total``: the whole call, every retry and backoff sleep included.
    """

    connect: float | None = 10.0
    idle: float | None = 60.0
    total: float | None = 600.0

    def __post_init__(self) -> None:
        for name in ("connect", "idle", "total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidRequestError(f"timeout {name} must be > 0 or None, got {value!r}", param="timeout")


DEFAULT_TIMEOUT = Timeout()
#: local weights' default: no deadline (a long answer on a CPU may take many minutes); one given is honoured
NO_TIMEOUT = Timeout(connect=None, idle=None, total=None)


def coerce_timeout(value: float | Timeout | None, default: Timeout = DEFAULT_TIMEOUT) -> Timeout:
    """``None`` -> the default; a number -> that many seconds as the total deadline (and a cap on the others)."""
    if value is None:
        return default
    if isinstance(value, Timeout):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"timeout must be a number of seconds or a Timeout, got {value!r}", param="timeout")
    seconds = float(value)
    return Timeout(
        connect=min(seconds, default.connect) if default.connect else seconds,
        idle=min(seconds, default.idle) if default.idle else seconds,
        total=seconds,
    )


class Deadline:
    """The total deadline of one call, started when the call starts."""

    __slots__ = ("_end",)

    def __init__(self, total: float | None) -> None:
        self._end = None if total is None else time.monotonic() + total

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        return self._end - time.monotonic()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def cap(self, seconds: float | None) -> float | None:
        """The smaller of ``seconds`` and what is left (never below a millisecond)."""
        left = self.remaining()
        if left is None:
            return seconds
        left = max(left, 0.001)
        return left if seconds is None else min(seconds, left)
