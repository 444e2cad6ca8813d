"""The local backend behind ``MixtralClient(provider="local", model_path=DIR)``.

One core (``LocalCore``) turns a validated ``ChatRequest`` into a prompt and sampling parameters, and engine
deltas into ``ChatCompletion`` / ``ChatCompletionChunk`` objects; ``LocalBackend`` runs it in the calling
thread, ``AsyncLocalBackend`` in worker threads (one token step per hop, so the event loop never blocks and
a cancelled or closed stream stops after the step in flight).

The checkpoint is checked when a backend is built (a bad one raises ``CheckpointError``, a
``ConfigurationError``) and loaded on the first request, once per process for each
(path, dtype, device, moe_backend): clients built alike share the weights.

Streams: a first chunk with ``role="assistant"``, one chunk per piece of text, and a last chunk with an
empty delta, the ``finish_reason`` and the ``usage`` (always there, whatever ``stream_options`` says).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread

from mixtral_client._config import ClientConfig
from mixtral_client._exceptions import ConfigurationError, InvalidRequestError, UnsupportedFeatureError
from mixtral_client._request import ChatRequest
from mixtral_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    Usage,
)

from .engine import Engine, SamplingParams
from .loader import check_checkpoint, load_model, resolve_device, resolve_dtype
from .tokenizer import MixtralTokenizer

__all__ = ["AsyncLocalBackend", "LocalBackend", "LocalCore", "LocalOptions", "clear_engine_cache"]

log = logging.getLogger("mixtral_local")

_EXTRA_BODY = frozenset({"top_k"})
_engines: weakref.WeakValueDictionary[tuple[str, str, str, str], Engine] = weakref.WeakValueDictionary()
_engines_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class LocalOptions:
    """``ClientConfig.local_options``: how to load the checkpoint at ``model_path``."""

    path: Path
    dtype: str = "auto"
    device: str = "auto"
    moe_backend: str = "auto"
    progress: bool | None = None

    @classmethod
    def from_config(cls, config: ClientConfig) -> LocalOptions:
        if config.model_path is None:
            raise ConfigurationError("provider 'local' needs model_path= (or MIXTRAL_MODEL_PATH)")
        opts = dict(config.local_options)
        unknown = sorted(set(opts) - {"dtype", "device", "moe_backend", "progress"})
        if unknown:
            raise ConfigurationError(f"local_options: unknown {', '.join(unknown)}; "
                                     "known: dtype, device, moe_backend, progress")
        options = cls(Path(config.model_path), **{k: str(v) if k != "progress" else v for k, v in opts.items()})
        try:
            resolve_dtype(options.dtype, resolve_device(options.device))
        except (ValueError, RuntimeError) as exc:
            raise ConfigurationError(f"local_options: {exc}") from None
        return options

    def key(self) -> tuple[str, str, str, str]:
        device = resolve_device(self.device)
        return (str(self.path.resolve()), str(resolve_dtype(self.dtype, device)), str(device), self.moe_backend)


def _engine_for(options: LocalOptions) -> Engine:
    """The process-wide engine for these options, loading the model on first use."""
    key = options.key()
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            model = load_model(options.path, dtype=options.dtype, device=options.device,
                               moe_backend=options.moe_backend, progress=options.progress)
            engine = Engine(model, MixtralTokenizer.from_pretrained(options.path))
            if model.config.random_weights:
                log.info("%s holds RANDOM weights (a tiny test checkpoint): its text is nonsense", options.path)
            _engines[key] = engine
        return engine


def clear_engine_cache() -> None:
    """Forget the shared engines (backends still holding one keep it)."""
    with _engines_lock:
        _engines.clear()


def _sampling(request: ChatRequest) -> SamplingParams:
    p = request.params
    for name in ("logprobs", "top_logprobs"):
        if p.get(name):
            raise UnsupportedFeatureError(f"{name}: the local backend does not return log probabilities",
                                          param=name, provider="local")
    unknown = sorted(set(request.options.extra_body) - _EXTRA_BODY)
    if unknown:
        raise InvalidRequestError(f"extra_body: the local backend does not know {', '.join(unknown)} "
                                  f"(it accepts {', '.join(sorted(_EXTRA_BODY))})", param="extra_body",
                                  provider="local")
    stop = p.get("stop", ())
    try:
        return SamplingParams(
            temperature=float(p.get("temperature", 1.0)),
            top_p=float(p.get("top_p", 1.0)),
            top_k=int(request.extra("top_k") or 0),
            seed=p.get("seed"),
            presence_penalty=float(p.get("presence_penalty", 0.0)),
            frequency_penalty=float(p.get("frequency_penalty", 0.0)),
            max_tokens=p.get("max_tokens", p.get("max_completion_tokens")),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc), provider="local") from None


class LocalCore:
    """Request in, completion or chunks out; no threads of its own."""

    def __init__(self, config: ClientConfig) -> None:
        self.options = LocalOptions.from_config(config)
        try:
            check_checkpoint(self.options.path, dtype=self.options.dtype, device=self.options.device,
                             moe_backend=self.options.moe_backend)
        except ValueError as exc:  # an unusable moe_backend for the device
            raise ConfigurationError(f"local_options: {exc}") from None
        MixtralTokenizer.from_pretrained(self.options.path)
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = _engine_for(self.options)
        return self._engine

    def close(self) -> None:
        self._engine = None

    def chunks(self, request: ChatRequest, should_stop: Callable[[], bool] | None = None,
               ) -> Iterator[ChatCompletionChunk]:
        params = _sampling(request)
        engine = self.engine
        prompt = engine.tokenizer.encode_chat(request.messages)
        deltas = engine.stream([prompt], params, should_stop)  # refuses a prompt that does not fit, here
        head: dict[str, Any] = {"id": f"chatcmpl-local-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                                "model": request.model}
        yield ChatCompletionChunk(**head, choices=[ChunkChoice(delta=ChoiceDelta(role="assistant", content=""))])
        for delta in deltas:
            if delta.text:
                yield ChatCompletionChunk(**head, choices=[ChunkChoice(delta=ChoiceDelta(content=delta.text))])
            if delta.finish_reason is not None:
                usage = Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens,
                              total_tokens=delta.prompt_tokens + delta.completion_tokens)
                yield ChatCompletionChunk(**head, choices=[ChunkChoice(finish_reason=delta.finish_reason)],
                                          usage=usage)

    def complete(self, request: ChatRequest, should_stop: Callable[[], bool] | None = None) -> ChatCompletion:
        chunks = list(self.chunks(request, should_stop))  # never empty: the role chunk comes first
        text = [c.choices[0].delta.content or "" for c in chunks]
        last = chunks[-1]
        message = ChatCompletionMessage(role="assistant", content="".join(text))
        return ChatCompletion(id=last.id, created=last.created, model=last.model, usage=last.usage,
                              choices=[Choice(message=message, finish_reason=last.choices[0].finish_reason)])


class LocalBackend:
    """``SyncBackend``: generation runs in the calling thread."""

    def __init__(self, config: ClientConfig) -> None:
        self._core = LocalCore(config)

    def complete(self, request: ChatRequest) -> ChatCompletion:
        return self._core.complete(request)

    def stream(self, request: ChatRequest) -> Iterator[ChatCompletionChunk]:
        return self._core.chunks(request)

    def close(self) -> None:
        self._core.close()


_DONE = object()


class AsyncLocalBackend:
    """``AsyncBackend``: generation runs in worker threads; works under asyncio and trio."""

    def __init__(self, config: ClientConfig) -> None:
        self._core = LocalCore(config)

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        stop = threading.Event()
        try:  # on cancellation the worker is abandoned and stops at its next token
            return await anyio.to_thread.run_sync(self._core.complete, request, stop.is_set, abandon_on_cancel=True)
        finally:
            stop.set()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatCompletionChunk]:
        chunks = self._core.chunks(request)
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(next, chunks, _DONE)
                if chunk is _DONE:
                    return
                yield chunk
        finally:
            chunks.close()

    async def aclose(self) -> None:
        self._core.close()
