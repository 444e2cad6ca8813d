"""``mixtral serve``'s ``GET /metrics``: what the server has answered, in Prometheus' text format (pure).

    mixtral_serve_requests_total{code="200",stream="true"} 12
    mixtral_serve_request_duration_seconds_bucket{stream="true",le="0.5"} 3
    mixtral_serve_tokens_total{type="completion"} 3150
    mixtral_serve_requests_in_flight 2
    mixtral_local_decoding 2                      (local weights: Engine.stats(), as /health shows it)

A request is counted when its answer is done: a whole answer when it is sent, a stream when its last event is
(or when it fails, or its caller goes away: code 499). ``code`` is the HTTP status the caller got; a stream that
fails after its first event has sent 200 and is counted under ``mixtral_serve_stream_errors_total`` too. Tokens
come from the answers' ``usage`` (a hosted stream has it only when the caller asked for it with
``stream_options.include_usage``, or the host sends it anyway).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["ServerMetrics"]

#: request duration buckets, seconds (a chat answer takes from a fraction of a second to minutes)
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Engine.stats() keys that only grow: counters; the other numeric ones are gauges
_LOCAL_COUNTERS = frozenset({"decode_steps"})


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""


class ServerMetrics:
    """Counters and a histogram of the server's answers; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._stream_errors = 0
        self._tokens = {"prompt": 0, "completion": 0}
        self._in_flight = 0
        self._buckets: dict[str, list[int]] = {s: [0] * (len(BUCKETS) + 1) for s in ("false", "true")}
        self._sums = {"false": 0.0, "true": 0.0}

    def started(self) -> float:
        with self._lock:
            self._in_flight += 1
        return time.monotonic()

    def finished(self, started: float, code: int, stream: bool, usage: Any = None, *,
                 stream_failed: bool = False) -> None:
        elapsed = time.monotonic() - started
        flag = "true" if stream else "false"
        with self._lock:
            self._in_flight -= 1
            key = (str(code), flag)
            self._requests[key] = self._requests.get(key, 0) + 1
            self._stream_errors += stream_failed
            if usage is not None:
                self._tokens["prompt"] += usage.prompt_tokens
                self._tokens["completion"] += usage.completion_tokens
            at = next((i for i, bound in enumerate(BUCKETS) if elapsed <= bound), len(BUCKETS))
            self._buckets[flag][at] += 1
            self._sums[flag] += elapsed

    def render(self, local: Mapping[str, Any] | None = None) -> str:
        """The text exposition format (version 0.0.4), with the local engine's numbers when given."""
        with self._lock:
            lines = ["# HELP mixtral_serve_requests_total Chat-completion requests answered, by HTTP status.",
                     "# TYPE mixtral_serve_requests_total counter"]
            lines += [f"mixtral_serve_requests_total{_labels(code=code, stream=flag)} {count}"
                      for (code, flag), count in sorted(self._requests.items())]
            lines += ["# HELP mixtral_serve_stream_errors_total Streams that failed after their first event.",
                      "# TYPE mixtral_serve_stream_errors_total counter",
                      f"mixtral_serve_stream_errors_total {self._stream_errors}",
                      "# HELP mixtral_serve_tokens_total Tokens in the answers' usage.",
                      "# TYPE mixtral_serve_tokens_total counter"]
            lines += [f"mixtral_serve_tokens_total{_labels(type=kind)} {count}" for kind, count in self._tokens.items()]
            lines += ["# HELP mixtral_serve_requests_in_flight Requests being answered now.",
                      "# TYPE mixtral_serve_requests_in_flight gauge",
                      f"mixtral_serve_requests_in_flight {self._in_flight}",
                      "# HELP mixtral_serve_request_duration_seconds From the request to its answer's end.",
                      "# TYPE mixtral_serve_request_duration_seconds histogram"]
            for flag, counts in self._buckets.items():
                running = 0
                for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                    running += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f"mixtral_serve_request_duration_seconds_bucket{_labels(stream=flag, le=le)} {running}")
                lines.append(f"mixtral_serve_request_duration_seconds_sum{_labels(stream=flag)} {self._sums[flag]:.6f}")
                lines.append(f"mixtral_serve_request_duration_seconds_count{_labels(stream=flag)} {running}")
        for key, value in (local or {}).items():
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, int | float):
                continue
            kind = "counter" if key in _LOCAL_COUNTERS else "gauge"
            name = f"mixtral_local_{key}" + ("_total" if kind == "counter" else "")
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
