"""The OpenAI-compatible HTTP backend (NVIDIA, OpenRouter, AIML API, any OpenAI-compatible host).

``HTTPCore`` does everything that needs no I/O: building requests, mapping statuses and error bodies
onto the error tree, parsing answers and stream events. ``HTTPBackend`` and ``AsyncHTTPBackend`` only
send, read and sleep. ``transport_errors()`` is the one place httpx exceptions become ours.

The senders drive any ``WireCore``: Bedrock's backend (``bedrock.py``) is these same senders over its
own core (Converse bodies, SigV4, event-stream frames).
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from typing import Any, Protocol

import anyio
import httpx
import pydantic

from mixtral_client._accumulate import whole_call_deltas
from mixtral_client._config import ClientConfig
from mixtral_client._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    UnsupportedFeatureError,
    status_error_for,
)
from mixtral_client._request import ChatRequest
from mixtral_client._retry import RetryPolicy
from mixtral_client._sse import ServerSentEvent, SSEDecoder
from mixtral_client._text import chat_chunk, chat_shaped, is_text_shaped
from mixtral_client._timeouts import Deadline, Timeout
from mixtral_client._version import __version__
from mixtral_client.types import ChatCompletion, ChatCompletionChunk, ChoiceDelta, ChunkChoice, Model

__all__ = ["AsyncHTTPBackend", "EventDecoder", "HTTPBackend", "HTTPCore", "WireCore", "log_request",
           "read_error", "transport_errors"]

log = logging.getLogger("mixtral_client")

_NVCF_STATUS_PATH = "/v2/nvcf/pexec/status/"
_NVCF_HOST = "https://api.nvcf.nvidia.com"
_POLL_INTERVAL = 0.25
_REDACT = frozenset({"authorization", "x-api-key", "api-key", "x-amz-security-token"})


@contextlib.contextmanager
def transport_errors(provider: str, request_id: str | None = None) -> Iterator[None]:
    """Translate httpx's transport exceptions into ``APITimeoutError`` / ``APIConnectionError``
    (``request_id``: the job already known, e.g. the pending NVCF request a poll asks about)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"{type(exc).__name__}: the {provider} request timed out", provider=provider,
                              request_id=request_id) from exc
    except (httpx.TransportError, httpx.StreamError, httpx.DecodingError) as exc:
        raise APIConnectionError(f"{type(exc).__name__}: {exc}", provider=provider,
                                 request_id=request_id) from exc


def log_request(built: httpx.Request, content: bytes) -> None:
    """Log a request at debug level, with its credentials redacted."""
    shown = {k: ("<redacted>" if k.lower() in _REDACT else v) for k, v in built.headers.items()}
    log.debug("%s %s headers=%s body=%s", built.method, built.url, shown, content[:2000].decode(errors="replace"))


class EventDecoder(Protocol):
    """Bytes in, stream events out (``SSEDecoder``, Bedrock's event-stream decoder)."""

    def feed(self, data: bytes, /) -> list[Any]: ...

    def end(self) -> list[Any]: ...


class WireCore(Protocol):
    """What the senders below need from a core: ``HTTPCore`` here, ``BedrockCore`` for Bedrock. No I/O."""

    provider: str
    policy: RetryPolicy

    def build(self, client: httpx.Client | httpx.AsyncClient, request: ChatRequest,
              deadline: Deadline) -> httpx.Request: ...

    def poll_request(self, client: httpx.Client | httpx.AsyncClient, response: httpx.Response,
                     request: ChatRequest, deadline: Deadline, /) -> httpx.Request | None: ...

    def poll_delay(self, deadline: Deadline, /) -> float: ...

    def request_id(self, headers: httpx.Headers) -> str | None: ...

    def status_error(self, response: httpx.Response, raw: bytes) -> APIStatusError: ...

    def parse_completion(self, response: httpx.Response, raw: bytes) -> ChatCompletion: ...

    def decoder(self, response: httpx.Response, /) -> EventDecoder:
        """A fresh decoder for one streamed answer."""
        ...

    def chunk(self, event: Any, request_id: str | None, /) -> ChatCompletionChunk | None:
        """One decoded event as a chunk; None ends the stream. Error events raise."""
        ...


def _error_message(body: Any, status: int | None) -> tuple[str, str | int | None]:
    """A readable message and a machine code from the error bodies hosts send."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or json.dumps(err)[:500]
            return str(message), err.get("code") if err.get("code") is not None else err.get("type")
        if isinstance(err, str):
            return err, body.get("code")
        for key in ("detail", "message", "title"):  # NVIDIA's problem JSON, FastAPI, ...
            if isinstance(body.get(key), str):
                return body[key], body.get("code") or body.get("type")
        return json.dumps(body)[:500], None
    if isinstance(body, str) and body.strip():
        text = " ".join(body.split())
        return (text[:200] + "...") if len(text) > 200 else text, None
    return f"HTTP {status}", None


def read_error(raw: bytes, status: int | None) -> tuple[Any, str, str | int | None]:
    """An error answer's body (JSON, else text, None when empty), a readable message and a machine code."""
    text = raw.decode("utf-8", errors="replace")
    try:
        body: Any = json.loads(text) if text.strip() else None
    except ValueError:
        body = text
    return (body, *_error_message(body, status))


class HTTPCore:
    """Request building and response interpretation for one configured host (no I/O)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.provider = config.preset.name
        self.policy = RetryPolicy(max_retries=config.max_retries)
        if config.base_url is None:
            raise ConfigurationError(f"provider {self.provider!r} has no base_url")
        base = httpx.URL(config.base_url)  # a query in base_url (?api-version=...) goes on every request
        self.url = str(base.copy_with(path=base.path.rstrip("/") + "/chat/completions"))
        self.text_url = str(base.copy_with(path=base.path.rstrip("/") + "/completions"))  # raw prompts
        self._base_query = httpx.QueryParams(base.query)  # merged into every request's params (_query)
        headers = {
            "Authorization": f"Bearer {config.api_key}",
            "Content-Type": "application/json",
            "User-Agent": f"mixtral-sdk/{__version__}",
        }
        if config.app_url:
            headers["HTTP-Referer"] = config.app_url
        if config.app_name:
            headers["X-Title"] = config.app_name
        headers.update(config.default_headers)
        self.headers = headers
        self._owned: httpx.Client | httpx.AsyncClient | None = None

    def own(self, client: httpx.Client | httpx.AsyncClient) -> None:
        """Let ``build`` skip ``client.build_request()`` for ``client``, which the backend created itself.

        Its base URL and params are empty and its headers are httpx's defaults, fixed from now on, so the
        merges ``build_request`` repeats on every call (URL parsing, header merging, ~60 us) are done once
        here. While its cookie jar holds cookies, ``build`` goes through ``build_request`` to send them.
        """
        self._owned = client
        self._endpoint = httpx.URL(self.url)
        self._text_endpoint = httpx.URL(self.text_url)
        self._client_headers = httpx.Headers(client.headers)
        self._merged = self._merge(self.headers)
        self._merged_stream = self._merge({**self.headers, "Accept": "text/event-stream"})

    def _merge(self, headers: Mapping[str, str]) -> httpx.Headers:
        """``headers`` over the client's, as ``build_request`` merges them."""
        merged = self._client_headers.copy()
        merged.update(headers)
        return merged

    # -- requests ----------------------------------------------------------------------------------

    @staticmethod
    def timeout(request: ChatRequest, deadline: Deadline) -> httpx.Timeout:
        return _httpx_timeout(request.options.timeout, request.stream, deadline)

    def build(self, client: httpx.Client | httpx.AsyncClient, request: ChatRequest, deadline: Deadline) -> httpx.Request:
        opts = request.options
        headers = self._headers(request)
        content = json.dumps(request.body(), ensure_ascii=False, separators=(",", ":")).encode()
        params = self._query(request) if opts.extra_query else None
        if client is self._owned and not client.cookies:
            if opts.extra_headers:
                merged = self._merge(headers)
            else:
                merged = self._merged_stream if request.stream else self._merged
            built = httpx.Request("POST", self._endpoint if request.prompt is None else self._text_endpoint,
                                  params=params, content=content, headers=merged,
                                  extensions={"timeout": self.timeout(request, deadline).as_dict()})
        else:
            built = client.build_request("POST", self.url if request.prompt is None else self.text_url,
                                         content=content, headers=headers, params=params,
                                         timeout=self.timeout(request, deadline))
        if log.isEnabledFor(logging.DEBUG):  # asked per request: logging may be set up after the client
            log_request(built, content)
        return built

    def _headers(self, request: ChatRequest, *, body: bool = True) -> Mapping[str, str]:
        """The headers of a request for ``request``: the client's, ``Accept`` for streams, ``extra_headers`` over
        them; without ``body`` (a poll) less ``Content-Type``."""
        opts = request.options
        if body and not (request.stream or opts.extra_headers):
            return self.headers
        headers = httpx.Headers(self.headers)  # case-insensitive: extra_headers replace, never duplicate
        if not body:
            del headers["Content-Type"]
        if request.stream:
            headers["Accept"] = "text/event-stream"
        headers.update(opts.extra_headers)
        return headers

    def _query(self, request: ChatRequest) -> httpx.QueryParams:
        """base_url's query with ``extra_query`` over it (httpx would replace a URL's query with params=)."""
        return self._base_query.merge(request.options.extra_query)

    def models_request(self, client: httpx.Client | httpx.AsyncClient, timeout: Timeout,
                       deadline: Deadline) -> httpx.Request:
        """``GET {base_url}/models``, with the client's headers and base_url's query."""
        base = httpx.URL(self.config.base_url or "")
        url = base.copy_with(path=base.path.rstrip("/") + "/models", query=None)
        headers = httpx.Headers(self.headers)
        del headers["Content-Type"]
        return client.build_request("GET", url, headers=headers, params=self._base_query,
                                    timeout=_httpx_timeout(timeout, False, deadline))

    def parse_models(self, response: httpx.Response, raw: bytes) -> list[Model]:
        """OpenAI's ``{"object": "list", "data": [...]}``, or a bare list of entries or ids."""
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        entries = body.get("data") if isinstance(body, dict) else body
        if not isinstance(entries, list):
            raise APIError(f"{self.provider} answered GET /models with no list of models: {raw[:200]!r}",
                           provider=self.provider, request_id=self.request_id(response.headers), body=body)
        return [Model(id=entry) if isinstance(entry, str) else Model.model_validate(entry) for entry in entries]

    def poll_url(self, request_id: str) -> str:
        """Where NVIDIA's 202 answers are fetched: its NVCF host, or the same origin when base_url is overridden."""
        base = self.config.base_url or ""
        default = self.config.preset.base_url or ""
        origin = _NVCF_HOST if base == default.rstrip("/") else str(httpx.URL(base).copy_with(path="/", query=None))
        return origin.rstrip("/") + _NVCF_STATUS_PATH + request_id

    def poll_request(self, client: httpx.Client | httpx.AsyncClient, response: httpx.Response,
                     request: ChatRequest, deadline: Deadline, /) -> httpx.Request | None:
        """The follow-up request for a 202 answer, or None when the 202 is not a pending NVCF job.

        The first 202 names the job in ``NVCF-REQID``; a later 202 from the status URL may omit it, and
        then the same status URL is asked again.
        """
        if response.status_code != 202:
            return None
        reqid = response.headers.get("nvcf-reqid")
        if reqid:  # with the POST's query, as a gateway in front may need it
            url = httpx.URL(self.poll_url(reqid)).copy_merge_params(self._query(request))
        elif response.request.method == "GET":  # the only GETs sent are polls
            url = response.request.url
        else:
            return None
        if deadline.expired():
            raise APITimeoutError(f"{self.provider} answer still pending when the total deadline passed",
                                  provider=self.provider, request_id=reqid)
        headers = self._headers(request, body=False)  # the POST's, default_headers and extra_headers too
        return client.build_request("GET", url, headers=headers, timeout=self.timeout(request, deadline))

    def poll_delay(self, deadline: Deadline, /) -> float:
        """How long to wait before asking about a pending job again (never past the total deadline)."""
        return deadline.cap(_POLL_INTERVAL) or _POLL_INTERVAL

    # -- responses ---------------------------------------------------------------------------------

    def request_id(self, headers: httpx.Headers) -> str | None:
        for name in self.config.preset.request_id_headers:
            value: str | None = headers.get(name)
            if value:
                return value
        fallback: str | None = headers.get("x-request-id")
        return fallback

    def status_error(self, response: httpx.Response, raw: bytes) -> APIStatusError:
        body, message, code = read_error(raw, response.status_code)
        cls = status_error_for(response.status_code)
        return cls(message, status_code=response.status_code, provider=self.provider,
                   request_id=self.request_id(response.headers), body=body, code=code,
                   headers=dict(response.headers))

    def error_from_payload(self, error: Any, *, request_id: str | None, body: Any,
                           partial: ChatCompletion | None = None) -> APIStatusError:
        """A typed error for an error object met inside a 200 answer or a stream (by its code when numeric)."""
        message, code = _error_message({"error": error}, None)
        status = code if isinstance(code, int) else None
        if status is None and isinstance(code, str) and code.isdigit():
            status = int(code)
        return status_error_for(status)(message, status_code=status, provider=self.provider,
                                        request_id=request_id, body=body, code=code, partial=partial)

    def parse_completion(self, response: httpx.Response, raw: bytes) -> ChatCompletion:
        return self._completion(raw, self.request_id(response.headers))

    def _completion(self, raw: bytes | str, rid: str | None) -> ChatCompletion:
        """A whole answer; an error object in it (top-level or in a choice) raises, as a status would."""
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("error") and "choices" not in body:
            raise self.error_from_payload(body["error"], request_id=rid, body=body)
        try:
            completion = ChatCompletion.model_validate(chat_shaped(body) if is_text_shaped(body) else body)
        except pydantic.ValidationError as exc:
            raise APIConnectionError(f"{self.provider} sent an answer that is not a chat completion: {exc}",
                                     provider=self.provider, request_id=rid,
                                     body=raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw,
                                     ) from exc
        for choice in completion.choices:
            error = (choice.model_extra or {}).get("error")
            if error is not None or choice.finish_reason == "error":
                raise self.error_from_payload(error or {"message": "the host ended the answer with an error"},
                                              request_id=rid, body=body, partial=completion)
        return completion

    def decoder(self, response: httpx.Response, /) -> SSEDecoder | _WholeBody:
        """An SSE decoder; a JSON body (a host that answered a stream request with a whole answer or an
        error object) is read whole instead."""
        if response.headers.get("content-type", "").startswith("application/json"):
            return _WholeBody()
        return SSEDecoder()

    def chunk(self, event: ServerSentEvent, request_id: str | None, /) -> ChatCompletionChunk | None:
        """One stream event as a chunk; None for ``[DONE]``. Error events raise."""
        data = event.data
        if data == "[DONE]":
            return None
        if event.event == _WHOLE_BODY:
            return self._chunk_from_whole_body(data, request_id)
        if event.event == "error":
            try:
                payload: Any = json.loads(data)
            except ValueError:
                payload = data
            inner = payload.get("error", payload) if isinstance(payload, dict) else payload
            raise self.error_from_payload(inner, request_id=request_id, body=payload)
        try:
            chunk = ChatCompletionChunk.model_validate_json(data)
        except pydantic.ValidationError as exc:
            raise APIConnectionError(f"{self.provider} sent an unreadable stream event: {data[:200]!r}",
                                     provider=self.provider, request_id=request_id, body=data) from exc
        if chunk.choices and "text" in (chunk.choices[0].model_extra or ()):  # a raw prompt's: the chat shape
            chunk = chat_chunk(chunk)
        extra = chunk.model_extra
        if extra and extra.get("error") is not None:
            raise self.error_from_payload(extra["error"], request_id=request_id, body=json.loads(data))
        for choice in chunk.choices:
            if choice.finish_reason == "error":
                error = (choice.model_extra or {}).get("error") or {"message": "the stream ended with an error"}
                raise self.error_from_payload(error, request_id=request_id, body=json.loads(data))
        return chunk

    def _chunk_from_whole_body(self, data: str, request_id: str | None) -> ChatCompletionChunk:
        """A stream request answered with plain JSON: read as a whole answer (its errors raise the same way),
        then given as one chunk."""
        completion = self._completion(data, request_id)
        choices = []
        for choice in completion.choices:
            message = choice.message
            calls = whole_call_deltas(message.tool_calls or [])
            delta = ChoiceDelta(role=message.role, content=message.content, tool_calls=calls or None)
            choices.append(ChunkChoice(index=choice.index, delta=delta, finish_reason=choice.finish_reason,
                                       logprobs=choice.logprobs))
        return ChatCompletionChunk(id=completion.id, created=completion.created, model=completion.model,
                                   choices=choices, usage=completion.usage)


_WHOLE_BODY = "mixtral-sdk.whole-body"


class _WholeBody:
    """The decoder for a JSON body met where an event stream was expected: one event, at the end."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, data: bytes, /) -> list[ServerSentEvent]:
        self._parts.append(data)
        return []

    def end(self) -> list[ServerSentEvent]:
        return [ServerSentEvent(b"".join(self._parts).decode("utf-8", errors="replace"), event=_WHOLE_BODY)]


class _StreamReader:
    """One response body to chunks, with no I/O: SSE decoding, the idle and total deadlines, error
    events, and telling a finished answer from a cut one. The backends only feed it the bytes they read."""

    __slots__ = ("core", "deadline", "decoder", "done", "finished", "idle", "rid", "waiting_since")

    def __init__(self, core: WireCore, request: ChatRequest, deadline: Deadline, response: httpx.Response) -> None:
        self.core = core
        self.deadline = deadline
        self.idle = request.options.timeout.idle
        self.rid = core.request_id(response.headers)
        self.decoder = core.decoder(response)
        #: when the reader last started waiting for content (keep-alive comments do not reset it)
        self.waiting_since = time.monotonic()
        self.done = False
        self.finished = False

    def feed(self, raw: bytes) -> Iterator[ChatCompletionChunk]:
        """The chunks these bytes complete; then the error event among them, if any, is raised."""
        chunks, error = self._take(self.decoder.feed(raw))
        if not chunks and error is None and not self.done:
            self._check_idle()
        self._check_total()
        if chunks:
            yield from chunks
            # the caller asked for more: from now on the reader waits for the next content
            self.waiting_since = time.monotonic()
        if error is not None:
            raise error

    def end(self) -> Iterator[ChatCompletionChunk]:
        """The body ended: the last chunks, then an error unless the answer was complete."""
        chunks, error = self._take(self.decoder.end())
        yield from chunks
        if error is not None:
            raise error
        if not self.done and not self.finished:
            raise APIConnectionError(f"the {self.core.provider} stream ended before the answer was complete",
                                     provider=self.core.provider, request_id=self.rid)

    def _take(self, events: list[Any]) -> tuple[list[ChatCompletionChunk], APIError | None]:
        chunks: list[ChatCompletionChunk] = []
        for event in events:
            try:
                chunk = self.core.chunk(event, self.rid)
            except APIError as error:
                return chunks, error
            if chunk is None:
                self.done = True
                break
            chunk._request_id = self.rid
            if not self.finished:
                for choice in chunk.choices:
                    if choice.finish_reason is not None:
                        self.finished = True
                        break
            chunks.append(chunk)
        return chunks, None

    def _check_idle(self) -> None:
        if self.idle is not None and time.monotonic() - self.waiting_since > self.idle:
            raise APITimeoutError(f"no content from {self.core.provider} for {self.idle:g} s (idle deadline)",
                                  provider=self.core.provider, request_id=self.rid)

    def _check_total(self) -> None:
        if self.deadline.expired():
            raise APITimeoutError(f"the total deadline passed while streaming from {self.core.provider}",
                                  provider=self.core.provider, request_id=self.rid)


#: a stream whose first chunk has arrived: the response, its chunk generator, and that first chunk
#: (None when the stream ended without any)
_Opened = tuple[httpx.Response, Generator[ChatCompletionChunk, None, None], ChatCompletionChunk | None]
_AsyncOpened = tuple[httpx.Response, AsyncGenerator[ChatCompletionChunk, None], ChatCompletionChunk | None]


_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


def _core_for(config: ClientConfig, core: WireCore | None,
              own_client: httpx.Client | httpx.AsyncClient | None) -> WireCore:
    """The core a sender drives: the one given (Bedrock's), else an ``HTTPCore`` that prebuilds requests
    for the httpx client the sender created itself."""
    if core is not None:
        return core
    http = HTTPCore(config)
    if own_client is not None:
        http.own(own_client)
    return http


def _httpx_timeout(t: Timeout, stream: bool, deadline: Deadline) -> httpx.Timeout:
    """httpx's timeouts for one send: a stream's read may wait at most ``idle``; a whole answer's, the rest of the
    total deadline (``idle`` when there is none); nothing past the total deadline."""
    connect = deadline.cap(t.connect)
    read = deadline.cap(t.idle if (stream or t.total is None) else None)
    return httpx.Timeout(connect=connect, read=read, write=connect, pool=deadline.cap(None))


def _listing_core(core: WireCore) -> HTTPCore:
    if not isinstance(core, HTTPCore):
        raise UnsupportedFeatureError(f"{core.provider} has no model listing over this API", provider=core.provider)
    return core


class HTTPBackend:
    """Synchronous sender over one ``httpx.Client`` (its pool is shared by every request)."""

    def __init__(self, config: ClientConfig, core: WireCore | None = None) -> None:
        self._owns_client = config.http_client is None
        self._client = config.http_client or httpx.Client(limits=_LIMITS, follow_redirects=True)
        self.core = _core_for(config, core, self._client if self._owns_client else None)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _send(self, request: ChatRequest, deadline: Deadline) -> httpx.Response:
        core = self.core
        job: str | None = None
        record = request.options.record
        if record is not None:
            record.sent()
        with transport_errors(core.provider):
            response = self._client.send(core.build(self._client, request, deadline), stream=True)
            try:
                while (poll := core.poll_request(self._client, response, request, deadline)) is not None:
                    job = core.request_id(response.headers) or job
                    response.close()
                    time.sleep(core.poll_delay(deadline))
                    with transport_errors(core.provider, job):  # a poll cut short still names the job
                        response = self._client.send(poll, stream=True)
                if response.status_code < 400:
                    if record is not None:
                        record.response = response
                    return response
                raw = response.read()
            except BaseException:  # a poll past the deadline, a cut while reading an error, a cancellation
                response.close()
                raise
            response.close()
        raise core.status_error(response, raw)

    def list_models(self, timeout: Timeout) -> list[Model]:
        """The host's ``GET /models``, retried as a request is."""
        deadline = Deadline(timeout.total)
        return self.core.policy.call(deadline, self._models_once, timeout, deadline)

    def _models_once(self, timeout: Timeout, deadline: Deadline) -> list[Model]:
        core = _listing_core(self.core)
        with transport_errors(core.provider):
            response = self._client.send(core.models_request(self._client, timeout, deadline))
        if response.status_code >= 400:
            raise core.status_error(response, response.content)
        return core.parse_models(response, response.content)

    def _complete_once(self, request: ChatRequest, deadline: Deadline) -> ChatCompletion:
        response = self._send(request, deadline)
        try:
            with transport_errors(self.core.provider):
                raw = response.read()
        finally:
            response.close()
        completion = self.core.parse_completion(response, raw)
        completion._request_id = self.core.request_id(response.headers)
        return completion

    def complete(self, request: ChatRequest) -> ChatCompletion:
        deadline = Deadline(request.options.timeout.total)
        return self.core.policy.call(deadline, self._complete_once, request, deadline)

    def _read(self, response: httpx.Response, request: ChatRequest,
              deadline: Deadline) -> Generator[ChatCompletionChunk, None, None]:
        reader = _StreamReader(self.core, request, deadline, response)
        with transport_errors(self.core.provider):
            body = response.iter_bytes()
            for raw in body:
                yield from reader.feed(raw)
                if reader.done:
                    _drain_sync(body, response)
                    return
            yield from reader.end()

    def _open_stream(self, request: ChatRequest, deadline: Deadline) -> _Opened:
        """Send, and read until the first chunk: all of this is retried as one attempt."""
        response = self._send(request, deadline)
        chunks = self._read(response, request, deadline)
        try:
            return response, chunks, next(chunks, None)
        except BaseException:
            chunks.close()
            response.close()
            raise

    def stream(self, request: ChatRequest) -> Iterator[ChatCompletionChunk]:
        deadline = Deadline(request.options.timeout.total)
        response, chunks, first = self.core.policy.call(deadline, self._open_stream, request, deadline)
        try:
            if first is not None:
                yield first
                yield from chunks
        finally:
            chunks.close()
            response.close()


async def _aclose(*closables: httpx.Response | AsyncGenerator[Any, None]) -> None:
    """Close even inside a cancelled scope, so a cancelled task still returns its connection to the pool."""
    with anyio.CancelScope(shield=True):
        for closable in closables:
            await closable.aclose()


#: how long the end of a body may take to arrive after ``[DONE]`` before the connection is dropped instead
DRAIN_S = 0.1


async def _drain(body: AsyncIterator[bytes], response: httpx.Response) -> None:
    """After ``[DONE]``, read an HTTP/1.1 body to its end, so that closing it returns the connection to the
    pool instead of dropping it (the next request then skips a TCP and TLS handshake). The end usually came
    with ``[DONE]`` or right after it; past ``DRAIN_S`` the close drops the connection, as before."""
    if response.http_version != "HTTP/1.1":  # HTTP/2 closes the one stream and keeps the connection
        return
    with anyio.move_on_after(DRAIN_S), contextlib.suppress(httpx.HTTPError, httpx.StreamError):
        async for _ in body:
            pass


def _drain_sync(body: Iterator[bytes], response: httpx.Response) -> None:
    """``_drain`` for the sync client. A blocking read cannot be cut short by a timer, so the body's end is read
    on a helper thread for at most ``DRAIN_S``; past that the socket is shut down under it, which ends the read
    at once and drops the connection, as before. A transport without a socket (a mock, say) is not drained."""
    if response.http_version != "HTTP/1.1":
        return
    network = response.extensions.get("network_stream")
    sock = network.get_extra_info("socket") if network is not None else None
    if not isinstance(sock, socket.socket):
        return

    try:
        while _end_buffered(response) or _ready(sock):  # what is there already (the usual case) is read here
            if next(body, None) is None:
                return
    except (httpx.HTTPError, httpx.StreamError, OSError):
        return  # the close drops the connection

    def read_to_end() -> None:
        with contextlib.suppress(httpx.HTTPError, httpx.StreamError, OSError):
            for _ in body:
                pass

    reader = threading.Thread(target=read_to_end, name="mixtral-drain", daemon=True)
    reader.start()
    reader.join(DRAIN_S)
    if reader.is_alive():
        # ``socket.socket.shutdown``, not ``SSLSocket.shutdown``, which would also drop the TLS state the reading
        # thread is using; a connection that ended in the pool just now is readable after this, so the pool
        # discards it instead of reusing it
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        reader.join(1.0)


def _end_buffered(response: httpx.Response) -> bool:
    """Whether the chunked body's end was read off the socket with ``[DONE]`` and waits in h11's buffer, so that
    reading on cannot block. httpx has no public way to ask; this looks through its and httpcore's stream
    wrappers and answers False where their layout differs (the drain then falls back to its thread)."""
    state: Any = response.stream
    for name in ("_stream", "_httpcore_stream", "_stream", "_connection", "_h11_state"):
        state = getattr(state, name, None)
    buffered = getattr(state, "trailing_data", None)
    return isinstance(buffered, tuple) and isinstance(buffered[0], bytes) and buffered[0].endswith(b"0\r\n\r\n")


def _ready(sock: socket.socket) -> bool:
    """Whether a read on ``sock`` returns without waiting: bytes on the socket, or decrypted TLS bytes pending."""
    pending = getattr(sock, "pending", None)  # ssl.SSLSocket
    if pending is not None and pending() > 0:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed under us
        return False


async def _discard(body: AsyncIterator[bytes], response: httpx.Response) -> None:
    """Close ``response``, then run its body iterator to its end.

    httpx's body iterators are nested async generators: closing the outer one leaves the inner ones to the
    garbage collector, and trio warns about each (encode/httpx#3686). Once the response is closed, reading
    on ends them all at once with a ``ReadError`` (or at once when the body was already read to its end).
    """
    with anyio.CancelScope(shield=True):
        await response.aclose()
        with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
            async for _ in body:
                pass


class AsyncHTTPBackend:
    """Asynchronous sender over one ``httpx.AsyncClient``; runs under asyncio and trio (anyio)."""

    def __init__(self, config: ClientConfig, core: WireCore | None = None) -> None:
        self._owns_client = config.async_http_client is None
        self._client = config.async_http_client or httpx.AsyncClient(limits=_LIMITS, follow_redirects=True)
        self.core = _core_for(config, core, self._client if self._owns_client else None)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _send(self, request: ChatRequest, deadline: Deadline) -> httpx.Response:
        core = self.core
        job: str | None = None
        record = request.options.record
        if record is not None:
            record.sent()
        with transport_errors(core.provider):
            response = await self._client.send(core.build(self._client, request, deadline), stream=True)
            try:
                while (poll := core.poll_request(self._client, response, request, deadline)) is not None:
                    job = core.request_id(response.headers) or job
                    await _aclose(response)
                    await anyio.sleep(core.poll_delay(deadline))
                    with transport_errors(core.provider, job):  # a poll cut short still names the job
                        response = await self._client.send(poll, stream=True)
                if response.status_code < 400:
                    if record is not None:
                        record.response = response
                    return response
                raw = await response.aread()
            except BaseException:
                await _aclose(response)
                raise
            await _aclose(response)
        raise core.status_error(response, raw)

    async def list_models(self, timeout: Timeout) -> list[Model]:
        deadline = Deadline(timeout.total)
        return await self.core.policy.acall(deadline, self._models_once, timeout, deadline)

    async def _models_once(self, timeout: Timeout, deadline: Deadline) -> list[Model]:
        core = _listing_core(self.core)
        with transport_errors(core.provider):
            response = await self._client.send(core.models_request(self._client, timeout, deadline))
        if response.status_code >= 400:
            raise core.status_error(response, response.content)
        return core.parse_models(response, response.content)

    async def _complete_once(self, request: ChatRequest, deadline: Deadline) -> ChatCompletion:
        response = await self._send(request, deadline)
        try:
            with transport_errors(self.core.provider):
                raw = await response.aread()
        finally:
            await _aclose(response)
        completion = self.core.parse_completion(response, raw)
        completion._request_id = self.core.request_id(response.headers)
        return completion

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        deadline = Deadline(request.options.timeout.total)
        return await self.core.policy.acall(deadline, self._complete_once, request, deadline)

    async def _read(self, response: httpx.Response, request: ChatRequest,
                    deadline: Deadline) -> AsyncGenerator[ChatCompletionChunk, None]:
        reader = _StreamReader(self.core, request, deadline, response)
        body = response.aiter_bytes()
        try:
            with transport_errors(self.core.provider):
                async for raw in body:
                    for chunk in reader.feed(raw):
                        yield chunk
                    if reader.done:
                        await _drain(body, response)
                        return
                for chunk in reader.end():
                    yield chunk
        finally:
            await _discard(body, response)

    async def _open_stream(self, request: ChatRequest, deadline: Deadline) -> _AsyncOpened:
        response = await self._send(request, deadline)
        chunks = self._read(response, request, deadline)
        try:
            return response, chunks, await anext(chunks, None)
        except BaseException:
            await _aclose(chunks, response)
            raise

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatCompletionChunk]:
        deadline = Deadline(request.options.timeout.total)
        opened: _AsyncOpened = await self.core.policy.acall(deadline, self._open_stream, request, deadline)
        response, chunks, first = opened
        try:
            if first is not None:
                yield first
                async for chunk in chunks:
                    yield chunk
        finally:
            await _aclose(chunks, response)
