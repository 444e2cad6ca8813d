"""``with_raw_response``: the answer together with the HTTP response that carried it.

``client.chat.completions.with_raw_response.create(...)`` takes exactly ``create()``'s arguments and returns a
``RawResponse``: the status, the headers (rate limits, request ids, a host's own fields), the retries taken, and
``parse()`` for the ``ChatCompletion`` (or the ``Stream``), as openai-python's ``LegacyAPIResponse`` does.

The backend writes into a ``ResponseRecord`` that rides on the request's options: each attempt it sends, and
the response that answered (after a host's polling, the last poll's). A backend with no HTTP (local weights)
writes nothing: its raw response has status 200, empty headers and no ``http_response``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, Unpack, overload

import httpx
from pydantic import BaseModel

from ._streaming import AsyncStream, Stream
from .types import ChatCompletion, ChatCompletionMessageParam, ParsedChatCompletion, ParsedT

if TYPE_CHECKING:
    from ._client import AsyncCompletions, CompletionParams, Completions, ParseParams

__all__ = ["AsyncRawCompletions", "RawCompletions", "RawResponse", "ResponseRecord", "raw_response"]

T = TypeVar("T")


@dataclass(slots=True)
class ResponseRecord:
    """What the sender saw of one ``create()``: how many attempts it sent, and the response that answered."""

    attempts: int = 0
    response: httpx.Response | None = None

    def sent(self) -> None:
        self.attempts += 1


class RawResponse(Generic[T]):
    """The answer of ``with_raw_response.create()`` with the HTTP response it came in.

    ``parse()`` gives the ``ChatCompletion`` (or the open ``Stream``, whose body is read as you iterate: the
    status and headers are here before the answer is). ``http_response`` is the ``httpx.Response`` of the
    attempt that answered (None on local weights); a whole answer's body has been read and closed.
    """

    __slots__ = ("_parsed", "_record", "http_response", "request_id")

    def __init__(self, parsed: T, record: ResponseRecord, request_id: str | None) -> None:
        self._parsed = parsed
        self._record = record
        self.http_response: httpx.Response | None = record.response
        self.request_id = request_id

    @property
    def headers(self) -> httpx.Headers:
        return self.http_response.headers if self.http_response is not None else httpx.Headers()

    @property
    def status_code(self) -> int:
        return self.http_response.status_code if self.http_response is not None else 200

    @property
    def retries_taken(self) -> int:
        """Attempts before the one that answered (0 when the first did; always 0 on local weights)."""
        return max(self._record.attempts - 1, 0)

    @property
    def url(self) -> httpx.URL | None:
        return self.http_response.request.url if self.http_response is not None else None

    def parse(self) -> T:
        return self._parsed

    def __repr__(self) -> str:
        return f"<RawResponse [{self.status_code}] {type(self._parsed).__name__}>"


def raw_response(answer: T, record: ResponseRecord) -> RawResponse[T]:
    """A stream's ``request_id``; an answer's ``_request_id`` (pydantic: private)."""
    request_id = getattr(answer, "_request_id", None) if isinstance(answer, BaseModel) else \
        getattr(answer, "request_id", None)
    return RawResponse(answer, record, request_id)


class RawCompletions:
    """``client.chat.completions.with_raw_response``: the same calls, answered with a ``RawResponse``."""

    def __init__(self, completions: Completions) -> None:
        self._completions = completions

    @overload
    def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: Literal[False] = False,
               **params: Unpack[CompletionParams]) -> RawResponse[ChatCompletion]: ...

    @overload
    def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: Literal[True],
               **params: Unpack[CompletionParams]) -> RawResponse[Stream]: ...

    @overload
    def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: bool,
               **params: Unpack[CompletionParams]) -> RawResponse[ChatCompletion | Stream]: ...

    def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: bool = False,
               **params: Unpack[CompletionParams]) -> RawResponse[Any]:
        record = ResponseRecord()
        return raw_response(self._completions._create(messages, stream, params, record), record)

    def parse(self, *, messages: Sequence[ChatCompletionMessageParam], response_format: type[ParsedT],
              max_repairs: int = 0, **params: Unpack[ParseParams]) -> RawResponse[ParsedChatCompletion[ParsedT]]:
        record = ResponseRecord()
        return raw_response(self._completions._parse(messages, response_format, params, record, max_repairs), record)


class AsyncRawCompletions:
    """``async_client.chat.completions.with_raw_response``."""

    def __init__(self, completions: AsyncCompletions) -> None:
        self._completions = completions

    @overload
    async def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: Literal[False] = False,
                     **params: Unpack[CompletionParams]) -> RawResponse[ChatCompletion]: ...

    @overload
    async def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: Literal[True],
                     **params: Unpack[CompletionParams]) -> RawResponse[AsyncStream]: ...

    @overload
    async def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: bool,
                     **params: Unpack[CompletionParams]) -> RawResponse[ChatCompletion | AsyncStream]: ...

    async def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: bool = False,
                     **params: Unpack[CompletionParams]) -> RawResponse[Any]:
        record = ResponseRecord()
        return raw_response(await self._completions._create(messages, stream, params, record), record)

    async def parse(self, *, messages: Sequence[ChatCompletionMessageParam], response_format: type[ParsedT],
                    max_repairs: int = 0,
                    **params: Unpack[ParseParams]) -> RawResponse[ParsedChatCompletion[ParsedT]]:
        record = ResponseRecord()
        return raw_response(await self._completions._parse(messages, response_format, params, record, max_repairs), record)
