"""The OpenAI-compatible HTTP backend (NVIDIA, OpenRouter, AIML API, any OpenAI-compatible host).

``HTTPCore`` does everything that needs no I/O: building requests, mapping statuses and error bodies
onto the error tree, parsing answers and stream events. ``HTTPBackend`` and ``AsyncHTTPBackend`` only
send, read and sleep. ``transport_errors()`` is the one place httpx exceptions become ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import anyio
import httpx
import pydantic

from mixtral_client._config import ClientConfig
from mixtral_client._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    status_error_for,
)
from mixtral_client._request import ChatRequest
from mixtral_client._retry import RetryPolicy
from mixtral_client._sse import ServerSentEvent, SSEDecoder
from mixtral_client._timeouts import Deadline
from mixtral_client._version import __version__
from mixtral_client.types import ChatCompletion, ChatCompletionChunk

__all__ = ["AsyncHTTPBackend", "HTTPBackend", "HTTPCore", "transport_errors"]

log = logging.getLogger("mixtral_client")

_NVCF_STATUS_PATH = "/v2/nvcf/pexec/status/"
_NVCF_HOST = "https://api.nvcf.nvidia.com"
_POLL_INTERVAL = 0.25
_REDACT = frozenset({"authorization", "x-api-key", "api-key"})


@contextlib.contextmanager
def transport_errors(provider: str) -> Iterator[None]:
    """Translate httpx's transport exceptions into ``APITimeoutError`` / ``APIConnectionError``."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"{type(exc).__name__}: the {provider} request timed out", provider=provider) from exc
    except (httpx.TransportError, httpx.StreamError, httpx.DecodingError) as exc:
        raise APIConnectionError(f"{type(exc).__name__}: {exc}", provider=provider) from exc


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


class HTTPCore:
    """Request building and response interpretation for one configured host (no I/O)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.provider = config.preset.name
        self.policy = RetryPolicy(max_retries=config.max_retries)
        if config.base_url is None:
            raise ConfigurationError(f"provider {self.provider!r} has no base_url")
        self.url = config.base_url + "/chat/completions"
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
        self.debug = log.isEnabledFor(logging.DEBUG)
        self._owned: httpx.Client | httpx.AsyncClient | None = None

    def own(self, client: httpx.Client | httpx.AsyncClient) -> None:
        """Let ``build`` skip ``client.build_request()`` for ``client``, which the backend created itself.

        Its base URL and params are empty and its headers are httpx's defaults, fixed from now on, so the
        merges ``build_request`` repeats on every call (URL parsing, header merging, ~60 us) are done once
        here. While its cookie jar holds cookies, ``build`` goes through ``build_request`` to send them.
        """
        self._owned = client
        self._endpoint = httpx.URL(self.url)
        self._client_headers = httpx.Headers(client.headers)
        self._merged = self._merge(self.headers)
        self._merged_stream = self._merge({**self.headers, "Accept": "text/event-stream"})

    def _merge(self, headers: dict[str, str]) -> httpx.Headers:
        """``headers`` over the client's, as ``build_request`` merges them."""
        merged = self._client_headers.copy()
        merged.update(headers)
        return merged

    # -- requests ----------------------------------------------------------------------------------

    def timeout(self, request: ChatRequest, deadline: Deadline) -> httpx.Timeout:
        t = request.options.timeout
        connect = deadline.cap(t.connect)
        # streams: a read may wait at most `idle`; whole answers: the rest of the total deadline
        read = deadline.cap(t.idle if (request.stream or t.total is None) else None)
        return httpx.Timeout(connect=connect, read=read, write=connect, pool=deadline.cap(None))

    def build(self, client: httpx.Client | httpx.AsyncClient, request: ChatRequest, deadline: Deadline) -> httpx.Request:
        opts = request.options
        headers = self.headers
        if request.stream or opts.extra_headers:
            headers = dict(headers)
            if request.stream:
                headers["Accept"] = "text/event-stream"
            headers.update(opts.extra_headers)
        content = json.dumps(request.body(), ensure_ascii=False, separators=(",", ":")).encode()
        params = dict(opts.extra_query) if opts.extra_query else None
        if client is self._owned and not client.cookies:
            if opts.extra_headers:
                merged = self._merge(headers)
            else:
                merged = self._merged_stream if request.stream else self._merged
            built = httpx.Request("POST", self._endpoint, params=params, content=content, headers=merged,
                                  extensions={"timeout": self.timeout(request, deadline).as_dict()})
        else:
            built = client.build_request("POST", self.url, content=content, headers=headers, params=params,
                                         timeout=self.timeout(request, deadline))
        if self.debug:
            shown = {k: ("<redacted>" if k.lower() in _REDACT else v) for k, v in built.headers.items()}
            log.debug("POST %s headers=%s body=%s", built.url, shown, content[:2000].decode(errors="replace"))
        return built

    def poll_url(self, request_id: str) -> str:
        """Where NVIDIA's 202 answers are fetched: its NVCF host, or the same origin when base_url is overridden."""
        base = self.config.base_url or ""
        default = self.config.preset.base_url or ""
        origin = _NVCF_HOST if base == default.rstrip("/") else str(httpx.URL(base).copy_with(path="/", query=None))
        return origin.rstrip("/") + _NVCF_STATUS_PATH + request_id

    def poll_request(self, client: httpx.Client | httpx.AsyncClient, response: httpx.Response,
                     request: ChatRequest, deadline: Deadline) -> httpx.Request | None:
        """The follow-up request for a 202 answer, or None when the 202 is not a pending NVCF job."""
        if response.status_code != 202:
            return None
        reqid = response.headers.get("nvcf-reqid")
        if not reqid:
            return None
        if deadline.expired():
            raise APITimeoutError(f"{self.provider} answer still pending when the total deadline passed",
                                  provider=self.provider, request_id=reqid)
        headers = {"Authorization": self.headers["Authorization"], "User-Agent": self.headers["User-Agent"]}
        if request.stream:
            headers["Accept"] = "text/event-stream"
        return client.build_request("GET", self.poll_url(reqid), headers=headers,
                                    timeout=self.timeout(request, deadline))

    # -- responses ---------------------------------------------------------------------------------

    def request_id(self, headers: httpx.Headers) -> str | None:
        for name in self.config.preset.request_id_headers:
            value: str | None = headers.get(name)
            if value:
                return value
        fallback: str | None = headers.get("x-request-id")
        return fallback

    def status_error(self, response: httpx.Response, raw: bytes) -> APIStatusError:
        text = raw.decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text) if text.strip() else None
        except ValueError:
            body = text
        message, code = _error_message(body, response.status_code)
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
        try:
            completion = ChatCompletion.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            raise APIConnectionError(f"{self.provider} sent an answer that is not a chat completion: {exc}",
                                     provider=self.provider, request_id=self.request_id(response.headers),
                                     body=raw.decode("utf-8", errors="replace")) from exc
        for choice in completion.choices:
            error = (choice.model_extra or {}).get("error")
            if error is not None or choice.finish_reason == "error":
                raise self.error_from_payload(error or {"message": "the host ended the answer with an error"},
                                              request_id=self.request_id(response.headers),
                                              body=json.loads(raw), partial=completion)
        return completion

    def chunk(self, event: ServerSentEvent, request_id: str | None) -> ChatCompletionChunk | None:
        """One stream event as a chunk; None for ``[DONE]``. Error events raise."""
        data = event.data
        if data == "[DONE]":
            return None
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
        extra = chunk.model_extra
        if extra and extra.get("error") is not None:
            raise self.error_from_payload(extra["error"], request_id=request_id, body=json.loads(data))
        for choice in chunk.choices:
            if choice.finish_reason == "error":
                error = (choice.model_extra or {}).get("error") or {"message": "the stream ended with an error"}
                raise self.error_from_payload(error, request_id=request_id, body=json.loads(data))
        return chunk


class _StreamState:
    """What one stream has seen: used for the idle deadline and to tell a clean end from a cut one."""

    __slots__ = ("done", "finished", "last_content")

    def __init__(self) -> None:
        self.last_content = time.monotonic()
        self.done = False
        self.finished = False

    def check(self, core: HTTPCore, request: ChatRequest, deadline: Deadline, request_id: str | None) -> None:
        idle = request.options.timeout.idle
        if idle is not None and time.monotonic() - self.last_content > idle:
            raise APITimeoutError(f"no content from {core.provider} for {idle:g} s (idle deadline)",
                                  provider=core.provider, request_id=request_id)
        if deadline.expired():
            raise APITimeoutError(f"the total deadline passed while streaming from {core.provider}",
                                  provider=core.provider, request_id=request_id)

    def take(self, core: HTTPCore, events: list[ServerSentEvent], rid: str | None) -> list[ChatCompletionChunk]:
        chunks = []
        for event in events:
            chunk = core.chunk(event, rid)
            if chunk is None:
                self.done = True
                break
            if not self.finished:
                for choice in chunk.choices:
                    if choice.finish_reason is not None:
                        self.finished = True
                        break
            chunks.append(chunk)
        if events:
            self.last_content = time.monotonic()
        return chunks

    def end(self, core: HTTPCore, rid: str | None) -> None:
        if not self.done and not self.finished:
            raise APIConnectionError(f"the {core.provider} stream ended before the answer was complete",
                                     provider=core.provider, request_id=rid)


#: an opened stream: the response, its byte iterator, the decoder and state, and the first chunks
_Opened = tuple[httpx.Response, Iterator[bytes], SSEDecoder, _StreamState, list[ChatCompletionChunk]]
_AsyncOpened = tuple[httpx.Response, AsyncIterator[bytes], SSEDecoder, _StreamState, list[ChatCompletionChunk]]


def _raise_status(core: HTTPCore, response: httpx.Response, raw: bytes) -> NoReturn:
    raise core.status_error(response, raw)


class HTTPBackend:
    """Synchronous sender over one ``httpx.Client`` (its pool is shared by every request)."""

    def __init__(self, config: ClientConfig) -> None:
        self.core = HTTPCore(config)
        self._owns_client = config.http_client is None
        self._client = config.http_client or httpx.Client(
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20), follow_redirects=True
        )
        if self._owns_client:
            self.core.own(self._client)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _send(self, request: ChatRequest, deadline: Deadline) -> httpx.Response:
        core = self.core
        with transport_errors(core.provider):
            response = self._client.send(core.build(self._client, request, deadline), stream=True)
            while (poll := core.poll_request(self._client, response, request, deadline)) is not None:
                response.close()
                time.sleep(min(_POLL_INTERVAL, max(deadline.remaining() or _POLL_INTERVAL, 0.0)))
                response = self._client.send(poll, stream=True)
            if response.status_code >= 400:
                try:
                    raw = response.read()
                finally:
                    response.close()
                _raise_status(core, response, raw)
        return response

    def _complete_once(self, request: ChatRequest, deadline: Deadline) -> ChatCompletion:
        response = self._send(request, deadline)
        try:
            with transport_errors(self.core.provider):
                raw = response.read()
        finally:
            response.close()
        return self.core.parse_completion(response, raw)

    def complete(self, request: ChatRequest) -> ChatCompletion:
        deadline = Deadline(request.options.timeout.total)
        return self.core.policy.call(deadline, self._complete_once, request, deadline)

    def _open_stream(self, request: ChatRequest, deadline: Deadline) -> _Opened:
        """Send, and read until the first chunk: all of this is retried as one attempt."""
        core = self.core
        response = self._send(request, deadline)
        rid = core.request_id(response.headers)
        decoder, state = SSEDecoder(), _StreamState()
        byte_iter = response.iter_bytes()
        try:
            with transport_errors(core.provider):
                for raw in byte_iter:
                    chunks = state.take(core, decoder.feed(raw), rid)
                    if chunks or state.done:
                        return response, byte_iter, decoder, state, chunks
                    state.check(core, request, deadline, rid)
                chunks = state.take(core, decoder.end(), rid)
                if not chunks:
                    state.end(core, rid)
            return response, iter(()), decoder, state, chunks
        except BaseException:
            response.close()
            raise

    def stream(self, request: ChatRequest) -> Iterator[ChatCompletionChunk]:
        deadline = Deadline(request.options.timeout.total)
        core = self.core
        opened = core.policy.call(deadline, self._open_stream, request, deadline)
        response, byte_iter, decoder, state, first = opened
        rid = core.request_id(response.headers)
        try:
            yield from first
            if state.done:
                return
            with transport_errors(core.provider):
                for raw in byte_iter:
                    chunks = state.take(core, decoder.feed(raw), rid)
                    yield from chunks
                    if state.done:
                        return
                    if not chunks:
                        state.check(core, request, deadline, rid)
                yield from state.take(core, decoder.end(), rid)
            state.end(core, rid)
        finally:
            response.close()


class AsyncHTTPBackend:
    """Asynchronous sender over one ``httpx.AsyncClient``; runs under asyncio and trio (anyio)."""

    def __init__(self, config: ClientConfig) -> None:
        self.core = HTTPCore(config)
        self._owns_client = config.async_http_client is None
        self._client = config.async_http_client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20), follow_redirects=True
        )
        if self._owns_client:
            self.core.own(self._client)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _send(self, request: ChatRequest, deadline: Deadline) -> httpx.Response:
        core = self.core
        with transport_errors(core.provider):
            response = await self._client.send(core.build(self._client, request, deadline), stream=True)
            while (poll := core.poll_request(self._client, response, request, deadline)) is not None:
                await response.aclose()
                await anyio.sleep(min(_POLL_INTERVAL, max(deadline.remaining() or _POLL_INTERVAL, 0.0)))
                response = await self._client.send(poll, stream=True)
            if response.status_code >= 400:
                try:
                    raw = await response.aread()
                finally:
                    await response.aclose()
                _raise_status(core, response, raw)
        return response

    async def _complete_once(self, request: ChatRequest, deadline: Deadline) -> ChatCompletion:
        response = await self._send(request, deadline)
        try:
            with transport_errors(self.core.provider):
                raw = await response.aread()
        finally:
            await response.aclose()
        return self.core.parse_completion(response, raw)

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        deadline = Deadline(request.options.timeout.total)
        return await self.core.policy.acall(deadline, self._complete_once, request, deadline)

    async def _open_stream(self, request: ChatRequest, deadline: Deadline) -> _AsyncOpened:
        core = self.core
        response = await self._send(request, deadline)
        rid = core.request_id(response.headers)
        decoder, state = SSEDecoder(), _StreamState()
        byte_iter = response.aiter_bytes()
        try:
            with transport_errors(core.provider):
                async for raw in byte_iter:
                    chunks = state.take(core, decoder.feed(raw), rid)
                    if chunks or state.done:
                        return response, byte_iter, decoder, state, chunks
                    state.check(core, request, deadline, rid)
                chunks = state.take(core, decoder.end(), rid)
                if not chunks:
                    state.end(core, rid)
            return response, _empty(), decoder, state, chunks
        except BaseException:
            await response.aclose()
            raise

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatCompletionChunk]:
        deadline = Deadline(request.options.timeout.total)
        core = self.core
        opened: _AsyncOpened = await core.policy.acall(deadline, self._open_stream, request, deadline)
        response, byte_iter, decoder, state, first = opened
        rid = core.request_id(response.headers)
        try:
            for chunk in first:
                yield chunk
            if state.done:
                return
            with transport_errors(core.provider):
                async for raw in byte_iter:
                    chunks = state.take(core, decoder.feed(raw), rid)
                    for chunk in chunks:
                        yield chunk
                    if state.done:
                        return
                    if not chunks:
                        state.check(core, request, deadline, rid)
                for chunk in state.take(core, decoder.end(), rid):
                    yield chunk
            state.end(core, rid)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover

