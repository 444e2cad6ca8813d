"""An OpenAI-compatible HTTP server over any backend: ``mixtral serve`` (the ``server`` extra).

    POST /v1/chat/completions   OpenAI's chat completions: whole answers, and SSE streams ending in [DONE]
    POST /v1/completions        OpenAI's (legacy) completions: a raw prompt, no chat template; the same two ways
    POST /tokenize              vLLM's tokenizer endpoints (and POST /detokenize, GET /tokenizer_info), with
                                Mixtral's tokenizer: what evaluation harnesses (lm-eval) call to send token ids
    GET  /v1/models             the one model served (and /v1/models/{id})
    GET  /health                200 once the backend is ready; on local weights, what the batch is doing
    GET  /metrics               Prometheus text: requests by status, durations, tokens, and the local batch

One ``AsyncMixtralClient`` answers every request, so what the client does the server does: validation
before anything is sent or computed, tools and ``response_format`` on every backend, retries and
deadlines towards a host, and on local weights one running batch for all concurrent requests. A caller
that disconnects, mid-stream or before its answer is ready, cancels its request (its row leaves the local
batch; a host's connection is closed). The request/response mapping is pure and lives in ``_serving.py``;
this module only does I/O.

    from mixtral_client import AsyncMixtralClient
    from mixtral_client.server import create_app
    app = create_app(AsyncMixtralClient(provider="local", model_path="/models/mixtral"))  # any ASGI server
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ._client import AsyncMixtralClient
from ._config import ClientConfig
from ._exceptions import ConfigurationError
from ._metrics import ServerMetrics
from ._providers import MODEL_ALIAS
from ._response import RawResponse
from ._serving import (
    DONE,
    BodyTooLarge,
    ModelNotFound,
    StreamShaper,
    Unauthorized,
    check_model,
    error_response,
    read_body,
    read_detokenize,
    read_tokenize,
    sse,
)
from ._streaming import AsyncStream
from ._text_client import AsyncTextStream

__all__ = ["MAX_BODY_BYTES", "create_app", "serve"]

log = logging.getLogger("mixtral_client.server")
T = TypeVar("T")

#: what the local backend is asked at start-up, so the weights load (and a bad checkpoint fails) before the
#: first caller waits
_WARMUP: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


def _failure(exc: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``error_response``, logged when it is the server's or the backend's fault."""
    status, body, headers = error_response(exc)
    if status >= 500:
        log.error("answering with %d: %s", status, body["error"]["message"], exc_info=status == 500)
    return status, body, headers


def _request_id(upstream: str | None) -> str:
    """The ``x-request-id`` of an answer: the host's own when the backend is one (so a caller can quote it to
    the host's support), else a fresh one."""
    return upstream or f"req_{uuid.uuid4().hex}"


def _passed(headers: Mapping[str, str]) -> dict[str, str]:
    """The host's rate-limit headers (``x-ratelimit-*``), passed on so that a caller paces itself by the host."""
    return {name: value for name, value in headers.items() if name.lower().startswith("x-ratelimit-")}


def _error(exc: Exception) -> JSONResponse:
    status, body, headers = _failure(exc)
    return JSONResponse(body, status_code=status, headers=headers)


async def _events(stream: AsyncStream | AsyncTextStream, include_usage: bool,
                  done: Callable[[bool], None]) -> AsyncIterator[bytes]:
    """The stream as SSE. A failure after the first event is one last ``error`` event (OpenAI's shape, which
    openai-python raises as an ``APIError``) and no ``[DONE]``, so no caller mistakes it for an answer.
    ``done(failed)`` is called once the stream is over, however it ended."""
    shaper: StreamShaper[Any] = StreamShaper(include_usage)
    failed = False
    try:
        async with stream:  # a caller that goes away cancels this generator: the stream closes, the request ends
            try:
                async for chunk in stream:
                    if (out := shaper.feed(chunk)) is not None:
                        yield sse(out)
            except Exception as exc:
                failed = True
                yield sse(_failure(exc)[1])
                return
        if (usage := shaper.end()) is not None:
            yield sse(usage)
        yield DONE
    finally:
        done(failed)


async def _unless_gone(request: Request, make: Callable[[], Awaitable[T]]) -> T | None:
    """``await make()``, cancelled (None) if the caller disconnects first: a whole answer, or a stream's first
    chunk, is not computed for nobody. (Starlette watches a stream's caller itself once it is streaming.)"""
    out: list[T] = []
    failed: list[Exception] = []
    async with anyio.create_task_group() as tasks:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        try:
            out.append(await make())
        except Exception as exc:  # raised below as it is, not in an exception group
            failed.append(exc)
        tasks.cancel_scope.cancel()
    if failed:
        raise failed[0]
    return out[0] if out else None


#: the largest request body taken (Mixtral's 32k-token context is about 130 KB of text; more is a mistake or abuse)
MAX_BODY_BYTES = 4 << 20


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, read no further than ``limit`` bytes (else ``BodyTooLarge``)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


def create_app(client: AsyncMixtralClient, *, api_key: str | None = None, model_name: str | None = None,
               warmup: bool = True, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """An ASGI app answering OpenAI chat-completions requests with ``client``, which it closes at shutdown.

    ``api_key``: when set, every ``/v1`` request must carry ``Authorization: Bearer <api_key>``.
    ``model_name``: the id ``/v1/models`` lists (default: the client's model id); requests may name it, the
    alias ``mixtral-8x7b-instruct`` or the client's model id. ``warmup``: on the local backend, answer one
    token at start-up so the weights are loaded before the first request. ``max_body_bytes``: a larger body
    is refused with 413 before it is read to its end.
    """
    config = client.config
    metrics = ServerMetrics()
    own_id = config.preset.resolve_model(config.model)
    name = model_name or own_id
    served = frozenset({name, own_id, MODEL_ALIAS})
    created = int(time.time())
    expected = f"Bearer {api_key}".encode() if api_key else None

    def refused(request: Request) -> JSONResponse | None:
        if expected is None or secrets.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return None
        return _error(Unauthorized("missing or wrong API key (Authorization: Bearer ...)"))

    async def answer(request: Request, text: bool) -> Response:
        """A chat-completions request, or with ``text`` a completions one (a raw prompt)."""
        started, stream = metrics.started(), False
        if (denied := refused(request)) is not None:
            metrics.finished(started, denied.status_code, stream)
            return denied
        try:
            asked = read_body(await _body(request, max_body_bytes), served, text=text)
            stream = asked.stream

            async def send() -> RawResponse[Any]:
                sent: RawResponse[Any]
                if text:
                    sent = await client.completions.with_raw_response.create(prompt=asked.prompt, stream=asked.stream,
                                                                            **asked.params)
                else:
                    sent = await client.chat.completions.with_raw_response.create(messages=asked.messages,
                                                                                 stream=asked.stream, **asked.params)
                return sent

            raw = await _unless_gone(request, send)
        except Exception as exc:  # every refusal or failure before the first byte is an HTTP error status
            failure = _error(exc)
            metrics.finished(started, failure.status_code, stream)
            return failure
        if raw is None:  # the caller hung up while the answer was being made: it was cancelled
            metrics.finished(started, 499, stream)
            return Response(status_code=499)
        headers = {**_passed(raw.headers), "x-request-id": _request_id(raw.request_id)}
        answered = raw.parse()
        if isinstance(answered, AsyncStream | AsyncTextStream):
            chunks = answered

            def done(failed: bool) -> None:
                chat = chunks._stream if isinstance(chunks, AsyncTextStream) else chunks
                metrics.finished(started, 200, True, chat._accumulator.usage, stream_failed=failed)

            return StreamingResponse(_events(chunks, asked.include_usage, done),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers})
        metrics.finished(started, 200, False, answered.usage)
        return JSONResponse(answered.model_dump(mode="json"), headers=headers)

    async def chat_completions(request: Request) -> Response:
        return await answer(request, text=False)

    async def completions(request: Request) -> Response:
        return await answer(request, text=True)

    # vLLM's tokenizer endpoints (evaluation harnesses such as lm-eval's local-completions use them to count a
    # context's tokens and send token ids): Mixtral's tokenizer, the one the local backend reads prompts with.
    # Without the local extra there is none: 501, saying so
    def untokenized(exc: ConfigurationError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc), "type": "not_implemented", "param": None,
                                       "code": None}}, status_code=501)

    async def tokenize(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        try:
            asked = read_tokenize(await _body(request, max_body_bytes), served)
            core = client.chat.completions._core
            if asked.messages is not None:  # the ids the chat request would be prompted with
                messages = asked.messages
                tokens = await anyio.to_thread.run_sync(lambda: core.chat_prompt_ids(messages, asked.params))
            else:
                text = asked.prompt or ""
                tokens = await anyio.to_thread.run_sync(
                    lambda: core.tokenizer().encode_prompt(text, bos=asked.add_special_tokens))
        except ConfigurationError as exc:
            return untokenized(exc)
        except Exception as exc:
            return _error(exc)
        return JSONResponse({"count": len(tokens), "max_model_len": config.preset.context_window, "tokens": tokens})

    async def detokenize(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        try:
            tokenizer = client.chat.completions._core.tokenizer()
            tokens = read_detokenize(await _body(request, max_body_bytes), served, tokenizer.vocab_size)
        except ConfigurationError as exc:
            return untokenized(exc)
        except Exception as exc:
            return _error(exc)
        return JSONResponse({"prompt": tokenizer.decode(tokens)})

    async def tokenizer_info(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        return JSONResponse({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                             "pad_token": None, "model_max_length": config.preset.context_window})

    listing = {"id": name, "object": "model", "created": created, "owned_by": config.provider}

    async def models(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [listing]})

    async def model(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        asked = request.path_params["model"]
        try:
            check_model(asked, served)
        except ModelNotFound as exc:
            return _error(exc)
        return JSONResponse({**listing, "id": asked})

    def local_stats() -> dict[str, Any] | None:
        stats = getattr(client._backend, "stats", None)  # local weights: the running batch
        return None if stats is None else dict(stats())

    async def health(_request: Request) -> Response:
        body: dict[str, Any] = {"status": "ok", "provider": config.provider, "model": name}
        if (stats := local_stats()) is not None:
            body["local"] = stats
        return JSONResponse(body)

    async def prometheus(_request: Request) -> Response:
        return PlainTextResponse(metrics.render(local_stats()), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with client:
            if warmup and config.preset.kind == "local":
                await client.chat.completions.create(**_WARMUP)
            log.info("serving %s (provider %s)", name, config.provider)
            yield

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], lifespan=lifespan)


def _load_first(config: ClientConfig) -> Any:
    """On local weights, the engine, loaded here in the caller's thread, where Ctrl-C stops the load (in the
    app's start-up the load would run in a worker thread that no signal reaches, and uvicorn waits for it);
    the app's client then finds it loaded. None for other backends."""
    if config.preset.kind != "local":
        return None
    return importlib.import_module("mixtral_local.backend").LocalCore(config).engine


def serve(client: AsyncMixtralClient, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Run ``create_app(client, ...)`` under uvicorn until interrupted (local weights are loaded first)."""
    import uvicorn

    engine = _load_first(client.config)
    uvicorn.run(create_app(client, api_key=api_key, model_name=model_name), host=host, port=port,
                log_level=log_level, ws="none")
    del engine  # held until here: the engines are shared by clients alike while one of them holds it
