"""OpenTelemetry spans for chat requests, named and filled as the GenAI semantic conventions say.

With ``opentelemetry-api`` installed and a tracer provider set up by the application, every ``create()``
(and ``parse()``, ``stream()``, each round of ``run_tools()``) is one ``CLIENT`` span ``chat {model}``: the
request's model and sampling parameters, the host (``server.address`` / ``server.port``), and on the way back
the response id, model, finish reasons and token usage. Retries happen inside the span; the span is current
while the request is sent, so an instrumented httpx nests its spans under it. A stream's span ends when the
stream does (read to the end, closed, left early or failed). A failure sets ``error.type`` (the exception's
class) and the span's error status.

Without opentelemetry, or without a provider that records, nothing is done beyond one cheap check per request.
The text of prompts and answers is never recorded.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from ._config import ClientConfig
from ._request import ChatRequest
from ._rewrite import aclose_chunks, close_chunks
from ._version import __version__
from .types import ChatCompletion, ChatCompletionChunk

__all__ = ["RequestSpan", "start"]

_UNSET: Any = object()
_tracer: Any = _UNSET  # the opentelemetry tracer, None without opentelemetry; looked up on the first request
_instruments: Any = _UNSET  # (duration, token usage) histograms, None without opentelemetry
#: the advised bucket boundaries of the GenAI conventions
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]

#: gen_ai.provider.name: the well-known value where the conventions have one, else the preset's name
_PROVIDER_NAMES = {"bedrock": "aws.bedrock"}
#: request parameters -> their attribute
_PARAMS = {
    "max_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}


def _get_tracer() -> Any:
    global _tracer
    if _tracer is _UNSET:
        try:
            from opentelemetry import trace
        except ImportError:
            _tracer = None
        else:
            _tracer = trace.get_tracer("mixtral_client", __version__)
    return _tracer


def _metrics_wanted() -> bool:
    """Whether the application has set a meter provider (until it does, the API's proxy records nothing, and
    the client skips the work of observing a request for it)."""
    from opentelemetry import metrics

    provider = metrics.get_meter_provider()
    return not isinstance(provider, metrics.NoOpMeterProvider) and type(provider).__name__ != "_ProxyMeterProvider"


def _get_instruments() -> Any:
    """The two histograms, or None without opentelemetry or a meter provider set."""
    global _instruments
    if _instruments is _UNSET:
        try:
            from opentelemetry import metrics
        except ImportError:
            _instruments = None
        else:
            meter = metrics.get_meter("mixtral_client", __version__)
            _instruments = (
                meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                       description="GenAI operation duration",
                                       explicit_bucket_boundaries_advisory=_DURATION_BUCKETS),
                meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                       description="Number of input and output tokens used",
                                       explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS),
            )
    return _instruments if _instruments is not None and _metrics_wanted() else None


@functools.lru_cache(maxsize=64)
def _server(base_url: str) -> tuple[str, int]:
    url = httpx.URL(base_url)
    return url.host, url.port or (443 if url.scheme == "https" else 80)


def _operation(request: ChatRequest) -> str:
    """The GenAI operation: ``chat``, or ``text_completion`` for a raw prompt."""
    return "chat" if request.prompt is None else "text_completion"


def _common(config: ClientConfig, request: ChatRequest) -> dict[str, Any]:
    """The attributes the span and the metrics share."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": _operation(request),
        "gen_ai.provider.name": _PROVIDER_NAMES.get(config.provider, config.provider),
        "gen_ai.request.model": request.model,
    }
    if config.base_url:
        attributes["server.address"], attributes["server.port"] = _server(config.base_url)
    return attributes


def _attributes(config: ClientConfig, request: ChatRequest) -> dict[str, Any]:
    attributes = _common(config, request)
    params = request.params
    for name, attribute in _PARAMS.items():
        if name in params:
            attributes[attribute] = params[name]
    if (top_k := request.extra("top_k")) is not None:
        attributes["gen_ai.request.top_k"] = top_k
    if "stop" in params:
        stop = params["stop"]
        attributes["gen_ai.request.stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if params.get("n", 1) != 1:
        attributes["gen_ai.request.choice.count"] = params["n"]
    fmt = params.get("response_format")
    attributes["gen_ai.output.type"] = "json" if isinstance(fmt, dict) and fmt.get("type") != "text" else "text"
    return attributes


def start(config: ClientConfig, request: ChatRequest) -> RequestSpan | None:
    """The observation of ``request`` (a span when a tracer records, the two metrics), or None without
    opentelemetry."""
    tracer = _get_tracer()
    if tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    span = tracer.start_span(f"{_operation(request)} {request.model}", kind=SpanKind.CLIENT)
    if span.is_recording():
        span.set_attributes(_attributes(config, request))
    elif _get_instruments() is None:
        return None  # nothing records: no observation, and a stream's chunks pass unwrapped
    else:
        span = None
    return RequestSpan(span, _common(config, request))


class RequestSpan:
    """One request's span (None when no tracer records) and metrics: made current while sending, ended with the
    answer, the stream's end or the error."""

    __slots__ = ("_ended", "_error", "_finish", "_id", "_metric_attributes", "_model", "_span", "_started",
                 "_usage")

    def __init__(self, span: Any, metric_attributes: dict[str, Any]) -> None:
        self._span = span
        self._metric_attributes = metric_attributes
        self._started = time.monotonic()
        self._ended = False
        self._error: str | None = None
        self._id = ""
        self._model = ""
        self._finish: dict[int, str] = {}
        self._usage: Any = None

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        if self._span is None:
            yield
            return
        from opentelemetry import trace

        with trace.use_span(self._span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around sending a whole answer: the span current, a failure recorded (and raised on)."""
        try:
            with self.current():
                yield
        except BaseException as exc:
            self.failed(exc)
            raise

    def answered(self, completion: ChatCompletion) -> None:
        self._id, self._model, self._usage = completion.id, completion.model, completion.usage
        self._finish = {c.index: c.finish_reason for c in completion.choices if c.finish_reason}
        self.end()

    def chunk(self, chunk: ChatCompletionChunk) -> None:
        self._id = self._id or chunk.id
        self._model = self._model or chunk.model
        if chunk.usage is not None:
            self._usage = chunk.usage
        for choice in chunk.choices:
            if choice.finish_reason:
                self._finish[choice.index] = choice.finish_reason

    def failed(self, exc: BaseException) -> None:
        self._error = type(exc).__name__
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_attribute("error.type", self._error)
            self._span.set_status(Status(StatusCode.ERROR, str(exc)[:500]))
        self.end()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._record()
        span = self._span
        if span is None:
            return
        if self._id:
            span.set_attribute("gen_ai.response.id", self._id)
        if self._model:
            span.set_attribute("gen_ai.response.model", self._model)
        if self._finish:
            span.set_attribute("gen_ai.response.finish_reasons", [self._finish[i] for i in sorted(self._finish)])
        if self._usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", self._usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", self._usage.completion_tokens)
        span.end()

    def _record(self) -> None:
        """The duration and token usage histograms of the conventions (when a meter provider is set)."""
        instruments = _get_instruments()
        if instruments is None:
            return
        duration, tokens = instruments
        attributes = dict(self._metric_attributes)
        if self._model:
            attributes["gen_ai.response.model"] = self._model
        if self._error is not None:
            attributes["error.type"] = self._error
        duration.record(time.monotonic() - self._started, attributes)
        if self._usage is not None:
            tokens.record(self._usage.prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
            tokens.record(self._usage.completion_tokens, {**attributes, "gen_ai.token.type": "output"})

    def chunks(self, chunks: Iterator[ChatCompletionChunk]) -> Iterator[ChatCompletionChunk]:
        """``chunks`` passed through, observed; the span ends with them."""
        try:
            with self.current():
                first = next(chunks, None)  # sent (and retried) under the span
            if first is not None:
                self.chunk(first)
                yield first
                for chunk in chunks:
                    self.chunk(chunk)
                    yield chunk
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                self.failed(exc)
            raise
        finally:
            close_chunks(chunks)
            self.end()

    async def achunks(self, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[ChatCompletionChunk]:
        """The async ``chunks``."""
        try:
            with self.current():
                first = await anext(chunks, None)
            if first is not None:
                self.chunk(first)
                yield first
                async for chunk in chunks:
                    self.chunk(chunk)
                    yield chunk
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                self.failed(exc)
            raise
        finally:
            await aclose_chunks(chunks)
            self.end()
