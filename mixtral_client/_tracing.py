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
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx

from ._config import ClientConfig
from ._request import ChatRequest
from ._version import __version__
from .types import ChatCompletion, ChatCompletionChunk

__all__ = ["RequestSpan", "start"]

_UNSET: Any = object()
_tracer: Any = _UNSET  # the opentelemetry tracer, None without opentelemetry; looked up on the first request

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


def _attributes(config: ClientConfig, request: ChatRequest) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": _PROVIDER_NAMES.get(config.provider, config.provider),
        "gen_ai.request.model": request.model,
    }
    if config.base_url:
        url = httpx.URL(config.base_url)
        attributes["server.address"] = url.host
        attributes["server.port"] = url.port or (443 if url.scheme == "https" else 80)
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
    """A span for ``request``, or None when nothing records spans."""
    tracer = _get_tracer()
    if tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    span = tracer.start_span(f"chat {request.model}", kind=SpanKind.CLIENT)
    if not span.is_recording():
        return None
    span.set_attributes(_attributes(config, request))
    return RequestSpan(span)


class RequestSpan:
    """One request's span: made current while sending, ended with the answer, the stream's end or the error."""

    __slots__ = ("_ended", "_finish", "_id", "_model", "_span", "_usage")

    def __init__(self, span: Any) -> None:
        self._span = span
        self._ended = False
        self._id = ""
        self._model = ""
        self._finish: dict[int, str] = {}
        self._usage: Any = None

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        from opentelemetry import trace

        with trace.use_span(self._span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield

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
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("error.type", type(exc).__name__)
        self._span.set_status(Status(StatusCode.ERROR, str(exc)[:500]))
        self.end()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        span = self._span
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
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
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
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):  # a cancelled caller still releases the connection
                    await aclose()
            self.end()
