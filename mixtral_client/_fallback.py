"""Fallbacks: when a provider fails, the same request goes to the next one (pure decisions, no I/O).

    client = MixtralClient(provider="nvidia", fallbacks=["openrouter", "local"])   # or MIXTRAL_FALLBACKS

A request that its provider cannot answer, after that provider's own retries, is sent to each fallback in
turn: the messages and parameters as given, built and validated for that provider (its model id, its limits,
tools and response_format written into the prompt where it needs them). What falls back is what another
host might answer: connection failures and timeouts, 401/402/403/404/408/409/429 and 5xx statuses, and error
objects inside a 200 answer. A request the client refused (``InvalidRequestError``), a 400 or 422 (the
request itself is wrong), a structured-output failure and an error in the middle of a stream do not: a stream
falls back only while nothing has reached the caller. Each switch is logged at WARNING, and when every
provider fails, the last error is raised with a note naming the ones before it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ._exceptions import APIError, APIStatusError
from ._providers import MODEL_ALIAS

__all__ = ["falls_back", "fallback_params", "fallback_names", "switching"]

log = logging.getLogger("mixtral_client")

_ANOTHER_HOST_MAY = frozenset({401, 402, 403, 404, 408, 409, 429})


def falls_back(exc: BaseException) -> bool:
    """Whether another provider might answer what failed with ``exc`` (met before the caller got anything)."""
    if isinstance(exc, APIStatusError):
        return exc.status_code is None or exc.status_code >= 500 or exc.status_code in _ANOTHER_HOST_MAY
    return isinstance(exc, APIError)  # connection failures and timeouts, unreadable answers


def fallback_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The parameters for a fallback: a per-call ``model`` names the first provider's model, so it stays
    behind (each fallback sends its own id), unless it is the alias every provider maps."""
    if "model" not in params or params["model"] == MODEL_ALIAS:
        return params
    return {key: value for key, value in params.items() if key != "model"}


def fallback_names(given: Any, env: Mapping[str, str]) -> list[Any]:
    """``fallbacks=`` as given, else ``MIXTRAL_FALLBACKS`` (comma-separated provider names)."""
    if given is not None:
        return list(given)
    return [name.strip() for name in env.get("MIXTRAL_FALLBACKS", "").split(",") if name.strip()]


def switching(exc: APIError, failed: str, to: str) -> None:
    log.warning("%s failed (%s: %s); falling back to %s", failed, type(exc).__name__, exc, to)
