"""The one exception tree of mixtral-sdk.

Every error the SDK raises on purpose is a ``MixtralError``::

    MixtralError
    ├── ConfigurationError          missing key, unknown provider, unusable setting (raised at construction)
    ├── InvalidRequestError         a request refused client-side; nothing was sent (also a ValueError)
    │   └── UnsupportedFeatureError the provider cannot do what was asked (Bedrock's logprobs, ...)
    ├── StructuredOutputError       parse(): an answer that does not validate into the requested model
    └── APIError                    something went wrong talking to a backend
        ├── APIStatusError          the backend answered with an error (HTTP status, error chunk, error frame)
        │   ├── BadRequestError             400
        │   ├── AuthenticationError         401
        │   ├── PermissionDeniedError       403
        │   ├── NotFoundError               404
        │   ├── UnprocessableEntityError    422
        │   ├── RateLimitError              429
        │   └── InternalServerError         >= 500
        └── APIConnectionError      no usable answer: refused, reset, cut mid-stream, unreadable stream
            └── APITimeoutError     a connect, idle or total deadline passed

Other statuses (402, 409, ...) stay plain ``APIStatusError``. Errors raised by a stream carry the
completion assembled so far in ``partial``.

``status_error_for()`` is the only place a status code becomes a class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import ChatCompletion

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "InternalServerError",
    "InvalidRequestError",
    "MixtralError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "StructuredOutputError",
    "UnprocessableEntityError",
    "UnsupportedFeatureError",
    "status_error_for",
]


class MixtralError(Exception):
    """Base class of every error mixtral-sdk raises on purpose."""


class ConfigurationError(MixtralError):
    """The client cannot be built as configured (missing key, unknown provider, ...)."""


class InvalidRequestError(MixtralError, ValueError):
    """A request was refused before anything was sent. ``param`` names the offending parameter."""

    def __init__(self, message: str, *, param: str | None = None, provider: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.provider = provider


class UnsupportedFeatureError(InvalidRequestError):
    """The chosen provider does not support a requested feature (e.g. tools)."""


class StructuredOutputError(MixtralError, ValueError):
    """``chat.completions.parse()`` got an answer that is not the requested model: cut short by ``max_tokens``,
    filtered, empty, or JSON that does not validate (the pydantic error is the ``__cause__``). Nothing is
    lost: ``completion`` is the whole answer, ``choice`` the index of the choice that failed."""

    def __init__(self, message: str, *, completion: ChatCompletion, choice: int) -> None:
        super().__init__(message)
        self.completion = completion
        self.choice = choice


class APIError(MixtralError):
    """An error while talking to a backend."""

    status_code: int | None = None

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        request_id: str | None = None,
        body: Any = None,
        code: str | int | None = None,
        partial: ChatCompletion | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.request_id = request_id
        self.body = body
        self.code = code
        #: the completion assembled before a stream failed (None for non-streaming calls)
        self.partial = partial


class APIStatusError(APIError):
    """The backend answered with an error status, an error chunk or an error frame."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None,
        provider: str | None = None,
        request_id: str | None = None,
        body: Any = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
        partial: ChatCompletion | None = None,
    ) -> None:
        super().__init__(
            message, provider=provider, request_id=request_id, body=body, code=code, partial=partial
        )
        self.status_code = status_code
        self.headers: dict[str, str] = dict(headers or {})

    def __str__(self) -> str:
        where = f" from {self.provider}" if self.provider else ""
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status_code}{where}: {self.message}{rid}"


class BadRequestError(APIStatusError):
    """400."""


class AuthenticationError(APIStatusError):
    """401."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404."""


class UnprocessableEntityError(APIStatusError):
    """422."""


class RateLimitError(APIStatusError):
    """429."""


class InternalServerError(APIStatusError):
    """>= 500."""


class APIConnectionError(APIError):
    """The connection failed, was cut, or carried something unreadable."""


class APITimeoutError(APIConnectionError):
    """A connect, idle or total deadline passed."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_for(status_code: int | None) -> type[APIStatusError]:
    """The error class for an HTTP(-like) status code."""
    if status_code is None:
        return APIStatusError
    if status_code >= 500:
        return InternalServerError
    return _BY_STATUS.get(status_code, APIStatusError)
