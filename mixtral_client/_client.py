"""``MixtralClient`` and ``AsyncMixtralClient``: ``client.chat.completions.create(...)`` over any backend.

Both shells share ``_ClientCore`` (configuration, request validation, backend choice). The shells only
call their backend: they never know whether it is a hosted host, Bedrock or local weights. On a host without
native tools or ``response_format``, ``Rewrites`` stand between them (``ToolPrompt``, ``FormatPrompt``): they
rewrite the request and read the calls and the JSON back out of the answer.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypedDict, Unpack, overload

import anyio
import httpx

from ._backends.base import AsyncBackend, SyncBackend
from ._batch import checked_batch
from ._config import ClientConfig, check_max_retries, client_default_timeout, resolve_config
from ._exceptions import APIError, ConfigurationError, MixtralError
from ._fallback import fallback_names, fallback_params, falls_back, switching
from ._logging import setup_logging
from ._models import AsyncModels, Models
from ._params import CompletionParams, ParseParams, Prompt, StreamParams, TextCompletionParams
from ._parse import Repairs, format_for
from ._ratelimit import RateLimiter, apace, as_limiter, pace
from ._request import ChatRequest, RequestOptions, build_request
from ._response import AsyncRawCompletions, RawCompletions, ResponseRecord
from ._rewrite import Rewrites
from ._streaming import AsyncStream, Stream
from ._text_client import AsyncTextCompletions, TextCompletions
from ._timeouts import Timeout, coerce_timeout
from ._tracing import start as start_span
from .events import AsyncChatCompletionStreamManager, ChatCompletionStreamManager
from .tools import AsyncToolRunner, ToolRunner
from .types import (
    ChatCompletion,
    ChatCompletionMessageParam,
    ParsedChatCompletion,
    ParsedT,
)

__all__ = ["AsyncCompletions", "AsyncMixtralClient", "CompletionParams", "Completions", "MixtralClient",
           "ParseParams", "StreamParams"]

_TRANSPORT = frozenset({"model", "extra_headers", "extra_query", "extra_body", "timeout"})
_KNOWN = frozenset(CompletionParams.__annotations__)
_PARSE_KNOWN = frozenset(ParseParams.__annotations__)
_STREAM_KNOWN = frozenset(StreamParams.__annotations__)
_RUN_TOOLS_KNOWN = _KNOWN - {"tools", "stream_options"}
#: a raw prompt's (chat-only ones are refused by name in build_request; logprobs arrives as the chat pair)
_TEXT_KNOWN = _KNOWN | frozenset(TextCompletionParams.__annotations__)


def _parse_format(response_format: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The format ``parse()`` sends; its arguments checked first (``stream`` and such are not for parse)."""
    unknown = params.keys() - _PARSE_KNOWN
    if unknown:
        raise TypeError(f"parse() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    return format_for(response_format)


def _stream_params(response_format: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """``create()``'s arguments for ``stream()``: a class as ``parse()`` sends it, a dict as it is."""
    unknown = params.keys() - _STREAM_KNOWN
    if unknown:
        raise TypeError(f"stream() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if response_format is None:
        return dict(params)
    return {**params, "response_format": format_for(response_format) if isinstance(response_format, type)
            else response_format}


class _ClientCore:
    """What both shells share: the resolved configuration and request building (no I/O)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._tokenizer: Any = None

    def count_tokens(self, messages: Sequence[ChatCompletionMessageParam], params: Mapping[str, Any]) -> int:
        """Prompt tokens of a request in Mixtral's own chat format, with the sentencepiece tokenizer (the local
        checkpoint's; else the v1 one in mistral-common, which is Mixtral's): the request validated and
        rewritten as this backend sends it, so tools and a ``response_format`` that travel in the prompt are
        counted. Exact on local weights; on a host, the count its Mixtral template gives the same text (tools
        a host takes natively are rendered by it, and not counted here). Needs the ``local`` extra."""
        return len(self.chat_prompt_ids(messages, params))

    def chat_prompt_ids(self, messages: Sequence[ChatCompletionMessageParam], params: Mapping[str, Any]) -> list[int]:
        """The prompt token ids that ``count_tokens`` counts (``mixtral serve``'s ``/tokenize`` with messages)."""
        request = Rewrites.for_request(self.request(messages, False, params)).request
        return list(self.tokenizer().encode_chat(request.messages))

    def count_prompt_tokens(self, prompt: Prompt, params: Mapping[str, Any]) -> int:
        """The tokens of a raw prompt (``completions.count_tokens``), checked as ``completions.create`` checks it,
        tokenized as written (``<s>`` / ``</s>`` as BOS / EOS, a BOS first)."""
        request = self.request(None, False, params, prompt=prompt)
        tokenizer = self.tokenizer()  # several prompts: their tokens added up, as usage.prompt_tokens counts them
        return sum(len(p) if isinstance(p, list) else len(tokenizer.encode_prompt(p)) for p in request.prompts())

    def tokenizer(self) -> Any:
        """Mixtral's sentencepiece tokenizer (the local checkpoint's, else mistral-common's v1), loaded once."""
        if self._tokenizer is None:
            try:
                from mixtral_local.tokenizer import MixtralTokenizer
            except ImportError as exc:
                raise ConfigurationError(
                    f"count_tokens needs the Mixtral tokenizer from the local extra (missing {exc.name or exc}): "
                    "pip install 'mixtral-sdk[local]'") from exc
            self._tokenizer = MixtralTokenizer.from_pretrained(self.config.model_path)
        return self._tokenizer

    def request(self, messages: Sequence[ChatCompletionMessageParam] | None, stream: bool,
                params: Mapping[str, Any], record: ResponseRecord | None = None,
                prompt: Prompt | None = None) -> ChatRequest:
        unknown = params.keys() - (_KNOWN if prompt is None else _TEXT_KNOWN)
        if unknown:
            raise TypeError(f"create() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        config = self.config
        options = RequestOptions(
            timeout=coerce_timeout(params.get("timeout"), config.timeout),
            extra_headers=params.get("extra_headers") or {},
            extra_query=params.get("extra_query") or {},
            extra_body=params.get("extra_body") or {},
            record=record,
        )
        sampling = {k: v for k, v in params.items() if k not in _TRANSPORT}
        model = params.get("model")
        return build_request(config.preset, model=config.model if model is None else model, messages=messages,
                             stream=stream, options=options, params=sampling, prompt=prompt)


def _configure(provider: str | None, env: Mapping[str, str] | None, **kwargs: Any) -> ClientConfig:
    env = os.environ if env is None else env
    setup_logging(env)
    return resolve_config(env, provider=provider, **kwargs)


#: where each kind of backend lives: (module, sync class, async class); imported only when used
_BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "http": ("mixtral_client._backends.http", "HTTPBackend", "AsyncHTTPBackend", ""),
    "bedrock": ("mixtral_client._backends.bedrock", "BedrockBackend", "AsyncBedrockBackend", "bedrock"),
    "local": ("mixtral_local.backend", "LocalBackend", "AsyncLocalBackend", "local"),
}


def _backend_class(config: ClientConfig, asynchronous: bool) -> Any:
    module_name, sync_name, async_name, extra = _BACKENDS[config.preset.kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if not extra:
            raise
        raise ConfigurationError(
            f"provider {config.provider!r} needs the {extra} extra (missing {exc.name or exc}): "
            f"pip install 'mixtral-sdk[{extra}]'"
        ) from exc
    return getattr(module, async_name if asynchronous else sync_name)


class Completions:
    def __init__(self, core: _ClientCore, backend: SyncBackend) -> None:
        self._core = core
        self._backend = backend
        self._fallbacks: list[Completions] = []  # the fallback clients' (see _fallback.py)
        self._limiter: RateLimiter | None = None  # rate_limit= (see _ratelimit.py)

    @overload
    def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: Literal[False] = False,
               **params: Unpack[CompletionParams]) -> ChatCompletion: ...

    @overload
    def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: Literal[True],
               **params: Unpack[CompletionParams]) -> Stream: ...

    @overload
    def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: bool,
               **params: Unpack[CompletionParams]) -> ChatCompletion | Stream: ...

    def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: bool = False,
               **params: Unpack[CompletionParams]) -> ChatCompletion | Stream:
        """Send a chat-completions request; with ``stream=True`` get a ``Stream`` of chunks.

        The request is validated first: invalid input raises ``InvalidRequestError`` and nothing is sent.
        """
        return self._create(messages, stream, params)

    def _create(self, messages: Sequence[ChatCompletionMessageParam] | None, stream: bool, params: Mapping[str, Any],
                record: ResponseRecord | None = None, prompt: Prompt | None = None) -> ChatCompletion | Stream:
        """``create()``; with ``messages`` None and a ``prompt``, a raw-prompt request (``client.completions``)."""
        try:
            return self._send(Rewrites.for_request(self._core.request(messages, stream, params, record, prompt)))
        except APIError as exc:
            if not (self._fallbacks and falls_back(exc)):
                raise
            failed, provider = exc, self._core.config.provider
        for fallback in self._fallbacks:
            switching(failed, provider, fallback._core.config.provider)
            try:
                return fallback._create(messages, stream, fallback_params(params), record, prompt)
            except MixtralError as exc:
                exc.add_note(f"(after {provider} failed: {type(failed).__name__}: {failed})")
                if not (isinstance(exc, APIError) and falls_back(exc)):
                    raise
                failed, provider = exc, fallback._core.config.provider
        raise failed

    def _send(self, rewrites: Rewrites) -> ChatCompletion | Stream:
        request = rewrites.request if self._limiter is None else pace(self._limiter, rewrites.request)
        span = start_span(self._core.config, rewrites.asked or request)  # None unless OpenTelemetry records
        if request.stream:
            chunks = rewrites.stream(self._backend.stream(request))
            return Stream(chunks if span is None else span.chunks(chunks))._open()
        if span is None:
            return rewrites.completion(self._backend.complete(request))
        with span.sending():
            completion = rewrites.completion(self._backend.complete(request))
        span.answered(completion)
        return completion

    @overload
    def stream(self, *, messages: Sequence[ChatCompletionMessageParam], response_format: type[ParsedT],
               **params: Unpack[StreamParams]) -> ChatCompletionStreamManager[ParsedT]: ...

    @overload
    def stream(self, *, messages: Sequence[ChatCompletionMessageParam],
               response_format: dict[str, Any] | None = None,
               **params: Unpack[StreamParams]) -> ChatCompletionStreamManager[Any]: ...

    def stream(self, *, messages: Sequence[ChatCompletionMessageParam], response_format: Any = None,
               **params: Unpack[StreamParams]) -> ChatCompletionStreamManager[Any]:
        """A stream of events (openai-python's streaming helper): ``with client.chat.completions.stream(...) as
        stream: for event in stream: ...``. The request is checked now and sent on ``with``; ``response_format``
        may be a pydantic class (as for ``parse()``) or a format dict. See ``mixtral_client.events``."""
        sent = _stream_params(response_format, params)
        self._core.request(messages, True, sent)  # checked now: an invalid request raises here

        def open_stream() -> Stream:
            opened = self._create(messages, True, sent)
            assert isinstance(opened, Stream)
            return opened

        return ChatCompletionStreamManager(open_stream, response_format)

    def run_tools(self, *, messages: Sequence[ChatCompletionMessageParam], tools: Sequence[Any],
                  max_rounds: int = 10, **params: Any) -> ToolRunner:
        """The agent loop: ask, run the answer's tool calls (Python functions, or ``tool()``s), ask again with
        their results, until an answer calls no tool or ``max_rounds`` answers came. Iterate the runner for each
        answer, or ``until_done()``; ``runner.messages`` is the conversation. Other arguments are
        ``create()``'s (not ``stream``). Checked now, sent as you iterate. See ``mixtral_client.tools``."""
        return ToolRunner(self, messages, tools, max_rounds, params, _RUN_TOOLS_KNOWN)

    def count_tokens(self, *, messages: Sequence[ChatCompletionMessageParam], **params: Any) -> int:
        """The prompt tokens of ``create(messages=..., **params)``: see ``_ClientCore.count_tokens``."""
        return self._core.count_tokens(messages, params)

    def batch(self, requests: Iterable[Mapping[str, Any]], *, max_concurrency: int = 8,
              return_exceptions: bool = False) -> list[Any]:
        """Many ``create()`` requests (dicts of its arguments), answered concurrently by worker threads and
        returned in order; all are checked before the first is sent. See ``mixtral_client._batch``."""
        items = checked_batch(requests, self._core, max_concurrency)
        results: list[Any] = [None] * len(items)
        if not items:
            return results
        failed: tuple[int, Exception] | None = None
        with ThreadPoolExecutor(max_workers=min(max_concurrency, len(items)),
                                thread_name_prefix="mixtral-batch") as pool:
            futures = {pool.submit(self._create, messages, False, params): i
                       for i, (messages, params) in enumerate(items)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except CancelledError:
                    continue
                except Exception as exc:
                    if return_exceptions:
                        results[i] = exc
                    elif failed is None:
                        failed = (i, exc)
                        for pending in futures:
                            pending.cancel()  # not started: not sent
        if failed is not None:
            index, error = failed
            error.add_note(f"(batch requests[{index}])")
            raise error
        return results

    @property
    def with_raw_response(self) -> RawCompletions:
        """``create()`` / ``parse()`` that return a ``RawResponse``: status, headers, retries taken, and
        ``parse()`` for the answer (openai-python's ``with_raw_response``)."""
        return RawCompletions(self)

    def parse(self, *, messages: Sequence[ChatCompletionMessageParam], response_format: type[ParsedT],
              max_repairs: int = 0, **params: Unpack[ParseParams]) -> ParsedChatCompletion[ParsedT]:
        """``create()`` with the answer validated into a pydantic model: ``choices[i].message.parsed``.

        ``response_format`` is the model class; its JSON schema is sent as a ``json_schema`` format (enforced
        where the backend can, asked for in the prompt where it cannot). An answer that does not validate
        raises ``StructuredOutputError``, with the completion on it; with ``max_repairs=k`` it first goes back
        to the model with the reason, up to ``k`` times (``usage`` then counts every round).
        """
        return self._parse(messages, response_format, params, max_repairs=max_repairs)

    def _parse(self, messages: Sequence[ChatCompletionMessageParam], response_format: type[ParsedT],
               params: Mapping[str, Any], record: ResponseRecord | None = None,
               max_repairs: int = 0) -> ParsedChatCompletion[ParsedT]:
        fmt = _parse_format(response_format, params)
        repairs = Repairs(messages, response_format, max_repairs, params.get("n", 1))
        while True:
            completion = self._create(repairs.messages, False, {**params, "response_format": fmt}, record)
            assert isinstance(completion, ChatCompletion)
            if (result := repairs.take(completion)) is not None:
                return result


class AsyncCompletions:
    def __init__(self, core: _ClientCore, backend: AsyncBackend) -> None:
        self._core = core
        self._backend = backend
        self._fallbacks: list[AsyncCompletions] = []
        self._limiter: RateLimiter | None = None

    @overload
    async def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: Literal[False] = False,
                     **params: Unpack[CompletionParams]) -> ChatCompletion: ...

    @overload
    async def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: Literal[True],
                     **params: Unpack[CompletionParams]) -> AsyncStream: ...

    @overload
    async def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: bool,
                     **params: Unpack[CompletionParams]) -> ChatCompletion | AsyncStream: ...

    async def create(self, *, messages: Sequence[ChatCompletionMessageParam], stream: bool = False,
                     **params: Unpack[CompletionParams]) -> ChatCompletion | AsyncStream:
        return await self._create(messages, stream, params)

    async def _create(self, messages: Sequence[ChatCompletionMessageParam] | None, stream: bool,
                      params: Mapping[str, Any], record: ResponseRecord | None = None,
                      prompt: Prompt | None = None) -> ChatCompletion | AsyncStream:
        try:
            return await self._send(Rewrites.for_request(self._core.request(messages, stream, params, record,
                                                                            prompt)))
        except APIError as exc:
            if not (self._fallbacks and falls_back(exc)):
                raise
            failed, provider = exc, self._core.config.provider
        for fallback in self._fallbacks:
            switching(failed, provider, fallback._core.config.provider)
            try:
                return await fallback._create(messages, stream, fallback_params(params), record, prompt)
            except MixtralError as exc:
                exc.add_note(f"(after {provider} failed: {type(failed).__name__}: {failed})")
                if not (isinstance(exc, APIError) and falls_back(exc)):
                    raise
                failed, provider = exc, fallback._core.config.provider
        raise failed

    async def _send(self, rewrites: Rewrites) -> ChatCompletion | AsyncStream:
        request = rewrites.request if self._limiter is None else await apace(self._limiter, rewrites.request)
        span = start_span(self._core.config, rewrites.asked or request)
        if request.stream:
            chunks = rewrites.astream(self._backend.stream(request))
            return await AsyncStream(chunks if span is None else span.achunks(chunks))._open()
        if span is None:
            return rewrites.completion(await self._backend.complete(request))
        with span.sending():
            completion = rewrites.completion(await self._backend.complete(request))
        span.answered(completion)
        return completion

    @overload
    def stream(self, *, messages: Sequence[ChatCompletionMessageParam], response_format: type[ParsedT],
               **params: Unpack[StreamParams]) -> AsyncChatCompletionStreamManager[ParsedT]: ...

    @overload
    def stream(self, *, messages: Sequence[ChatCompletionMessageParam],
               response_format: dict[str, Any] | None = None,
               **params: Unpack[StreamParams]) -> AsyncChatCompletionStreamManager[Any]: ...

    def stream(self, *, messages: Sequence[ChatCompletionMessageParam], response_format: Any = None,
               **params: Unpack[StreamParams]) -> AsyncChatCompletionStreamManager[Any]:
        """The async stream of events: ``async with client.chat.completions.stream(...) as stream`` (not
        awaited; see ``Completions.stream``)."""
        sent = _stream_params(response_format, params)
        self._core.request(messages, True, sent)

        async def open_stream() -> AsyncStream:
            opened = await self._create(messages, True, sent)
            assert isinstance(opened, AsyncStream)
            return opened

        return AsyncChatCompletionStreamManager(open_stream, response_format)

    def run_tools(self, *, messages: Sequence[ChatCompletionMessageParam], tools: Sequence[Any],
                  max_rounds: int = 10, **params: Any) -> AsyncToolRunner:
        """The async agent loop (see ``Completions.run_tools``): ``async for answer in runner`` or
        ``await runner.until_done()``; one answer's calls run concurrently, sync functions in threads."""
        return AsyncToolRunner(self, messages, tools, max_rounds, params, _RUN_TOOLS_KNOWN)

    def count_tokens(self, *, messages: Sequence[ChatCompletionMessageParam], **params: Any) -> int:
        """The prompt tokens of ``create(messages=..., **params)`` (no I/O, so not awaited; see
        ``_ClientCore.count_tokens``)."""
        return self._core.count_tokens(messages, params)

    async def batch(self, requests: Iterable[Mapping[str, Any]], *, max_concurrency: int = 8,
                    return_exceptions: bool = False) -> list[Any]:
        """Many ``create()`` requests answered concurrently by tasks, returned in order (see ``Completions.batch``)."""
        items = checked_batch(requests, self._core, max_concurrency)
        results: list[Any] = [None] * len(items)
        slots = anyio.Semaphore(max_concurrency)
        failed: list[tuple[int, Exception]] = []

        async def one(i: int, messages: Any, params: dict[str, Any], scope: anyio.CancelScope) -> None:
            try:
                results[i] = await self._create(messages, False, params)
            except Exception as exc:
                if return_exceptions:
                    results[i] = exc
                elif not failed:
                    failed.append((i, exc))
                    scope.cancel()  # the rest stop: what has not been sent is not
            finally:
                slots.release()

        async with anyio.create_task_group() as group:
            for i, (messages, params) in enumerate(items):
                # a task starts once a slot is free, so requests go out in order (trio runs waiting tasks in
                # any order) and a long batch is not a task per request at once
                await slots.acquire()
                group.start_soon(one, i, messages, params, group.cancel_scope)
        if failed:
            index, error = failed[0]
            error.add_note(f"(batch requests[{index}])")
            raise error
        return results

    @property
    def with_raw_response(self) -> AsyncRawCompletions:
        """The async ``with_raw_response`` (see ``Completions.with_raw_response``)."""
        return AsyncRawCompletions(self)

    async def parse(self, *, messages: Sequence[ChatCompletionMessageParam], response_format: type[ParsedT],
                    max_repairs: int = 0, **params: Unpack[ParseParams]) -> ParsedChatCompletion[ParsedT]:
        """``create()`` with the answer validated into a pydantic model (see ``Completions.parse``)."""
        return await self._parse(messages, response_format, params, max_repairs=max_repairs)

    async def _parse(self, messages: Sequence[ChatCompletionMessageParam], response_format: type[ParsedT],
                     params: Mapping[str, Any], record: ResponseRecord | None = None,
                     max_repairs: int = 0) -> ParsedChatCompletion[ParsedT]:
        fmt = _parse_format(response_format, params)
        repairs = Repairs(messages, response_format, max_repairs, params.get("n", 1))
        while True:
            completion = await self._create(repairs.messages, False, {**params, "response_format": fmt}, record)
            assert isinstance(completion, ChatCompletion)
            if (result := repairs.take(completion)) is not None:
                return result


class _Chat:
    def __init__(self, completions: Any) -> None:
        self.completions = completions


class _ClientArgs(TypedDict, total=False):
    base_url: str
    api_key: str
    model: str
    timeout: float | Timeout
    max_retries: int
    default_headers: Mapping[str, str]
    app_url: str
    app_name: str
    region: str
    model_path: str
    local_options: Mapping[str, Any]
    tool_calling: Literal["auto", "native", "prompt"]
    structured_output: Literal["auto", "native", "prompt"]
    fallbacks: Sequence[Any]  # provider names, or clients of the same kind (sync / async)
    rate_limit: float | RateLimiter  # requests a minute, or a RateLimiter shared between clients


def _extras(kwargs: Any, env: Mapping[str, str] | None) -> tuple[Mapping[str, str], Any, RateLimiter | None]:
    """(the environment, ``fallbacks=``, the ``RateLimiter``): the client arguments that are not configuration,
    taken out of ``kwargs``."""
    env = os.environ if env is None else env
    return env, kwargs.pop("fallbacks", None), as_limiter(kwargs.pop("rate_limit", None), env.get("MIXTRAL_RATE_LIMIT"))


def _with_options(config: ClientConfig, timeout: float | Timeout | None, max_retries: int | None,
                  default_headers: Mapping[str, str] | None) -> ClientConfig:
    """``config`` with another default timeout, retry count, or more default headers (checked as the
    client's own are)."""
    changes: dict[str, Any] = {}
    if timeout is not None:
        changes["timeout"] = client_default_timeout(timeout, config.timeout)
    if max_retries is not None:
        check_max_retries(max_retries)
        changes["max_retries"] = max_retries
    if default_headers:
        changes["default_headers"] = {**config.default_headers, **default_headers}
    return dataclasses.replace(config, **changes)


def _backend_sharing(backend: Any, config: ClientConfig, asynchronous: bool) -> Any:
    """A backend for ``config`` over ``backend``'s connection pool (the local one itself: same engine)."""
    if config.preset.kind == "local":
        return backend
    pool = backend._client
    backend_class = _backend_class(config, asynchronous)
    shared = backend_class(dataclasses.replace(config, **{"async_http_client" if asynchronous else "http_client": pool}))
    if backend._owns_client and hasattr(shared.core, "own"):  # a pool the client made: keep the fast path
        shared.core.own(pool)
    return shared


class _Shell:
    """What the sync and async clients share beyond ``_ClientCore``: construction from the environment."""

    config: ClientConfig
    _core: _ClientCore
    _backend: Any
    _borrowed = False  # a with_options() copy: the pool (or engine) is the original client's to close
    _asynchronous: ClassVar[bool]
    _completions: ClassVar[type[Completions] | type[AsyncCompletions]]
    chat: _Chat
    models: Any  # Models / AsyncModels

    if TYPE_CHECKING:  # each client defines its own; this is the part from_env relies on

        def __init__(self, provider: str | None = None, *, env: Mapping[str, str] | None = None,
                     **kwargs: Unpack[_ClientArgs]) -> None: ...

    def _set_fallbacks(self, given: Any, env: Mapping[str, str], kwargs: Mapping[str, Any]) -> None:
        """``fallbacks=`` (else ``MIXTRAL_FALLBACKS``): clients of this kind as given, provider names built here
        (from the same environment, with this client's explicit ``timeout`` / ``max_retries``)."""
        self._fallback_clients: list[Any] = []
        self._owned_fallbacks: list[Any] = []
        try:
            self._add_fallbacks(fallback_names(given, env), given is None, env, kwargs)
        except BaseException:
            for made in self._owned_fallbacks:  # built before the one that failed
                if isinstance(made, MixtralClient):
                    made.close()
            raise
        self.chat.completions._fallbacks = [c.chat.completions for c in self._fallback_clients]

    def _add_fallbacks(self, items: list[Any], from_env: bool, env: Mapping[str, str],
                       kwargs: Mapping[str, Any]) -> None:
        for item in items:
            if isinstance(item, str):
                if item.strip().lower() == self.config.provider:
                    if from_env:
                        continue  # MIXTRAL_FALLBACKS names every provider of a chain: each skips itself
                    raise ConfigurationError(f"fallbacks: {item!r} is this client's own provider")
                shared = {k: kwargs[k] for k in ("timeout", "max_retries") if k in kwargs}
                made = type(self)(item, env=env, fallbacks=(), **shared)  # not MIXTRAL_FALLBACKS again
                self._owned_fallbacks.append(made)
            elif isinstance(item, type(self)):
                made = item
            else:
                raise ConfigurationError(f"fallbacks: a {type(self).__name__}'s fallbacks are provider names or "
                                         f"{type(self).__name__}s, got {type(item).__name__}")
            self._fallback_clients.append(made)

    @property
    def fallbacks(self) -> list[str]:
        """The providers tried after this one, in order."""
        return [c.provider for c in self._fallback_clients]

    def with_options(self, *, timeout: float | Timeout | None = None, max_retries: int | None = None,
                     default_headers: Mapping[str, str] | None = None) -> Self:
        """A client like this one with another default ``timeout``, ``max_retries``, or more default headers,
        as openai-python's ``with_options``: ``client.with_options(timeout=5, max_retries=0).chat...``. It
        shares this client's connection pool (local weights: its engine); closing the copy closes nothing."""
        config = _with_options(self.config, timeout, max_retries, default_headers)
        clone = object.__new__(type(self))
        clone.config, clone._core = config, _ClientCore(config)
        clone._backend = _backend_sharing(self._backend, config, self._asynchronous)
        clone.chat = _Chat(self._completions(clone._core, clone._backend))
        clone.models = (AsyncModels if self._asynchronous else Models)(config, clone._backend)
        clone._fallback_clients, clone._owned_fallbacks = self._fallback_clients, []
        clone.chat.completions._fallbacks = self.chat.completions._fallbacks
        clone.chat.completions._limiter = self.chat.completions._limiter  # one pace for both
        clone._borrowed = True
        return clone

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Unpack[_ClientArgs]) -> Self:
        """A client configured by environment variables (``env`` defaults to ``os.environ``)."""
        return cls(None, env=env, **kwargs)

    @property
    def provider(self) -> str:
        return self.config.provider

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r})"


class MixtralClient(_Shell):
    """A synchronous client.

    ``MixtralClient(provider="nvidia")`` reads the key from ``NVIDIA_API_KEY``;
    ``MixtralClient(base_url=..., api_key=...)`` talks to any OpenAI-compatible host;
    ``MixtralClient(provider="local", model_path=DIR)`` runs the weights in-process;
    ``MixtralClient()`` / ``from_env()`` read ``MIXTRAL_PROVIDER``, ``MIXTRAL_BASE_URL``, ``MIXTRAL_API_KEY``,
    ``MIXTRAL_MODEL``, ``MIXTRAL_MODEL_PATH`` and, for local weights, ``MIXTRAL_LOCAL_<KEY>`` (``local_options``).
    """

    _asynchronous = False
    _completions = Completions

    def __init__(self, provider: str | None = None, *, http_client: httpx.Client | None = None,
                 env: Mapping[str, str] | None = None, **kwargs: Unpack[_ClientArgs]) -> None:
        env, fallbacks, rate_limit = _extras(kwargs, env)
        self.config = _configure(provider, env, http_client=http_client, **kwargs)
        self._core = _ClientCore(self.config)
        self._backend: SyncBackend = _backend_class(self.config, asynchronous=False)(self.config)
        self.chat = _Chat(Completions(self._core, self._backend))
        self.chat.completions._limiter = rate_limit
        self.models = Models(self.config, self._backend)
        try:
            self._set_fallbacks(fallbacks, env, kwargs)
        except BaseException:  # a fallback that cannot be configured: release what this client opened
            self._backend.close()
            raise

    @property
    def completions(self) -> TextCompletions:
        """Raw-prompt completions (OpenAI's legacy completions API): ``client.completions.create(prompt=...)``."""
        return TextCompletions(self.chat.completions)

    def close(self) -> None:
        if not self._borrowed:
            self._backend.close()
            for fallback in self._owned_fallbacks:
                fallback.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncMixtralClient(_Shell):
    """The asynchronous client (asyncio or trio). Close it with ``async with`` or ``await client.aclose()``."""

    _asynchronous = True
    _completions = AsyncCompletions

    def __init__(self, provider: str | None = None, *, http_client: httpx.AsyncClient | None = None,
                 env: Mapping[str, str] | None = None, **kwargs: Unpack[_ClientArgs]) -> None:
        env, fallbacks, rate_limit = _extras(kwargs, env)
        self.config = _configure(provider, env, async_http_client=http_client, **kwargs)
        self._core = _ClientCore(self.config)
        self._backend: AsyncBackend = _backend_class(self.config, asynchronous=True)(self.config)
        self.chat = _Chat(AsyncCompletions(self._core, self._backend))
        self.chat.completions._limiter = rate_limit
        self.models = AsyncModels(self.config, self._backend)
        self._set_fallbacks(fallbacks, env, kwargs)

    @property
    def completions(self) -> AsyncTextCompletions:
        """Raw-prompt completions (OpenAI's legacy completions API): ``client.completions.create(prompt=...)``."""
        return AsyncTextCompletions(self.chat.completions)

    async def aclose(self) -> None:
        if not self._borrowed:
            await self._backend.aclose()
            for fallback in self._owned_fallbacks:
                await fallback.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
