"""The local backend behind ``MixtralClient(provider="local", model_path=DIR)``.

One core (``LocalCore``) turns a validated ``ChatRequest`` into a prompt and sampling parameters and queues
it in the engine's running batch (``Engine.submit``: continuous batching, so concurrent requests from any
threads or tasks decode together, one step for all); ``_Answer`` turns the engine's deltas into
``ChatCompletion`` / ``ChatCompletionChunk`` objects. ``LocalBackend`` waits for the deltas in the calling
thread; ``AsyncLocalBackend`` queues from a worker thread and then awaits the deltas without holding a
thread, so the event loop never blocks. A closed, abandoned or cancelled stream leaves the batch after the
step in flight.

The checkpoint is checked when a backend is built (a bad one raises ``CheckpointError``, a
``ConfigurationError``) and loaded on the first request, once per process for each
(path, dtype, device, moe_backend, quantize): clients built alike share the weights and the running batch.

Streams: a first chunk with ``role="assistant"`` (for every choice), one chunk per piece of text, and a last
chunk with an empty delta, the ``finish_reason`` and the ``usage`` (always there, whatever ``stream_options``
says). With ``n > 1`` each choice's finish chunk carries no usage, and a final chunk without choices does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch

from mixtral_client._accumulate import ChunkAccumulator
from mixtral_client._config import ClientConfig
from mixtral_client._exceptions import APITimeoutError, ConfigurationError, InvalidRequestError
from mixtral_client._request import ChatRequest
from mixtral_client._timeouts import Deadline
from mixtral_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionTokenLogprob,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)

from .engine import Delta, Engine, SamplingParams, Ticket, TokenLogprob
from .engine.engine import MAX_BATCH
from .engine.grammar import GrammarError, check_grammar, json_grammar, tool_calls_grammar
from .engine.kv_cache import KVCache
from .engine.prefix_cache import PREFIX_CACHE_TOKENS
from .loader import check_checkpoint, load_model, resolve_device, resolve_dtype, resolve_quantize
from .model import MixtralModel
from .tokenizer import MixtralTokenizer

__all__ = ["AsyncLocalBackend", "LocalBackend", "LocalCore", "LocalOptions", "clear_engine_cache"]

log = logging.getLogger("mixtral_local")

_EXTRA_BODY = frozenset({"top_k", "min_p", "repetition_penalty"})  # the sampling knobs OpenRouter and AIML take
_engines: weakref.WeakValueDictionary[tuple[str, str, str, str, str], Engine] = weakref.WeakValueDictionary()
_engines_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class LocalOptions:
    """``ClientConfig.local_options``: how to load the checkpoint at ``model_path``."""

    path: Path
    dtype: str = "auto"
    device: str = "auto"
    moe_backend: str = "auto"
    quantize: str | None = None
    progress: bool | None = None
    max_batch: int = MAX_BATCH
    prefix_cache: int = PREFIX_CACHE_TOKENS
    kv_cache_memory: int | None = None  # bytes the running batch's KV cache may hold; None: "auto"

    @classmethod
    def from_config(cls, config: ClientConfig) -> LocalOptions:
        if config.model_path is None:
            raise ConfigurationError("provider 'local' needs model_path= (or MIXTRAL_MODEL_PATH)")
        opts = dict(config.local_options)  # keys checked by resolve_config
        source = config.local_option_source
        max_batch = _int_option(opts, "max_batch", MAX_BATCH, 1, source("max_batch"))
        prefix_cache = _int_option(opts, "prefix_cache", PREFIX_CACHE_TOKENS, 0, source("prefix_cache"),
                                   " (tokens of finished requests kept for reuse; 0: off)")
        kv_cache_memory = _memory_option(opts, "kv_cache_memory", source("kv_cache_memory"))
        options = cls(Path(config.model_path), max_batch=max_batch, prefix_cache=prefix_cache,
                      kv_cache_memory=kv_cache_memory,
                      **{k: v if k in ("progress", "quantize") else str(v) for k, v in opts.items()})
        for name, check in (("device", lambda: resolve_device(options.device)),
                            ("dtype", lambda: resolve_dtype(options.dtype, resolve_device(options.device))),
                            ("quantize", lambda: resolve_quantize(options.quantize))):
            try:
                check()
            except (ValueError, RuntimeError) as exc:
                raise ConfigurationError(f"{source(name)}: {exc}") from None
        return options

    def key(self) -> tuple[str, str, str, str, str]:
        device = resolve_device(self.device)
        return (str(self.path.resolve()), str(resolve_dtype(self.dtype, device)), str(device), self.moe_backend,
                str(self.quantize))


def _int_option(opts: dict[str, Any], name: str, default: int, minimum: int, source: str, meaning: str = "") -> int:
    """Take ``name`` out of ``opts``: an integer (not a bool) >= ``minimum``, else a ``ConfigurationError``."""
    value = opts.pop(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{source}: {name} must be an integer >= {minimum}{meaning}, got {value!r}")
    return value


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def _memory_option(opts: dict[str, Any], name: str, source: str) -> int | None:
    """Take ``name`` out of ``opts``: bytes as an integer or a text such as ``"24GiB"`` or ``"512MB"``; None for
    ``"auto"`` (the default)."""
    value = opts.pop(name, "auto")
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _MEMORY.match(value) if isinstance(value, str) else None
    if match is not None and match.group(2).lower() in _UNITS:
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
        if size > 0:
            return size
    raise ConfigurationError(f"{source}: {name} must be 'auto', a number of bytes or a size such as '24GiB' or "
                             f"'512MB', got {value!r}")


#: what ``kv_cache_memory="auto"`` leaves of a GPU's free memory after the weights are loaded: for one prefill
#: pass's activations (about 3 GiB at 4096 tokens: attention scores, MoE intermediates) and allocator slack
AUTO_KV_HEADROOM = 3 * 2**30
AUTO_KV_FRACTION = 0.9


def _kv_cache_bytes(options: LocalOptions, model: MixtralModel) -> int | None:
    """The running batch's KV-cache bound: the option, or with "auto" on a GPU, what the free memory leaves
    after the prefix cache's share and ``AUTO_KV_HEADROOM``; on a CPU "auto" sets no bound."""
    if options.kv_cache_memory is not None:
        return options.kv_cache_memory
    device = model.output.weight.device
    if device.type != "cuda":
        return None

    free, _ = torch.cuda.mem_get_info(device)
    prefix = options.prefix_cache * KVCache.nbytes(model.config, 1, 1, model.output.weight.dtype)
    bound = int(free * AUTO_KV_FRACTION) - prefix - AUTO_KV_HEADROOM
    if bound <= 0:
        raise ConfigurationError(f"{device}: {free / 2**30:.1f} GiB free after loading the weights leaves no room "
                                 f"for the KV cache (the prefix cache takes {prefix / 2**30:.1f} GiB): set "
                                 "local_options kv_cache_memory, or a smaller prefix_cache, or quantize='int8'")
    log.info("%s: the KV cache may hold %.1f GiB (kv_cache_memory='auto': %.0f%% of %.1f GiB free, less the "
             "prefix cache and %.0f GiB of headroom)", device, bound / 2**30, AUTO_KV_FRACTION * 100, free / 2**30,
             AUTO_KV_HEADROOM / 2**30)
    return bound


def _load_in_own_thread(options: LocalOptions, cancel: threading.Event | None = None) -> MixtralModel:
    """``load_model`` in a short-lived thread, so that the caller's thread starts no OpenMP pool of its own.

    On CPU each thread that runs torch operators gets its own OpenMP pool, and once two pools exist their
    workers stop spinning between operators (there are more of them than cores): every small operator of the
    scheduler thread then waits for a sleeping worker. A pool dies with its thread.

    Ctrl-C while waiting (a ``KeyboardInterrupt`` in the caller's thread) stops the load before its next tensor
    and waits for the thread to end before it goes on: no thread is left inside torch, loading, when the
    interpreter exits. Setting ``cancel`` (from another thread: an async request cancelled) stops it too.
    """
    out: list[MixtralModel] = []
    errors: list[BaseException] = []
    cancel, done = cancel or threading.Event(), threading.Event()

    def load() -> None:
        try:
            out.append(load_model(options.path, dtype=options.dtype, device=options.device,
                                  moe_backend=options.moe_backend, quantize=options.quantize,
                                  progress=options.progress, cancel=cancel))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=load, name="mixtral-local-load", daemon=True).start()
    try:
        done.wait()  # not Thread.join: once interrupted, it takes a running thread for ended (bpo-45274)
    except BaseException:
        cancel.set()
        done.wait()
        raise
    if errors:
        raise errors[0]
    return out[0]


def _engine_for(options: LocalOptions, cancel: threading.Event | None = None) -> Engine:
    """The process-wide engine for these options, loading the model on first use.

    Clients sharing an engine share its running batch; its row limit is the largest ``max_batch`` asked, its
    prefix cache the largest ``prefix_cache``; its KV-cache bound is the first client's ``kv_cache_memory``.
    """
    key = options.key()
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            model = _load_in_own_thread(options, cancel)
            try:
                engine = Engine(model, MixtralTokenizer.from_pretrained(options.path), max_batch=options.max_batch,
                                prefix_cache=options.prefix_cache, kv_cache_bytes=_kv_cache_bytes(options, model))
            except ValueError as exc:  # a bound too small for one request
                raise ConfigurationError(f"kv_cache_memory: {exc}") from None
            if model.config.random_weights:
                log.info("%s holds RANDOM weights (a tiny test checkpoint): its text is nonsense", options.path)
            _engines[key] = engine
        engine.scheduler.max_rows = max(engine.scheduler.max_rows, options.max_batch)
        engine.prefix_cache.max_tokens = max(engine.prefix_cache.max_tokens, options.prefix_cache)
        return engine


def clear_engine_cache() -> None:
    """Forget the shared engines (backends still holding one keep it)."""
    with _engines_lock:
        _engines.clear()


def _format_schema(request: ChatRequest) -> tuple[dict[str, Any], bool] | None:
    """``response_format``'s JSON schema and whether it is read leniently; None for text."""
    fmt = request.params.get("response_format")
    if fmt is None or fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "object"}, False
    spec = fmt["json_schema"]  # its schema, if any, is a dict: build_request checked it
    return spec.get("schema", {"type": "object"}), not spec.get("strict")


def _checked(param: str, build: Callable[[], str]) -> str:
    """The grammar ``build()`` makes, checked; a bad one is an ``InvalidRequestError`` naming ``param``."""
    try:
        grammar = build()
        check_grammar(grammar)
    except GrammarError as exc:
        raise InvalidRequestError(f"{param}: {exc}", param=param, provider="local") from None
    return grammar


def _grammar(request: ChatRequest) -> str | None:
    """The grammar the answer must follow, checked here, before anything loads: required tool calls;
    ``response_format``'s JSON; under ``tool_choice="auto"``, calls that parse if the answer opens with the
    marker, else text (or that JSON, with a ``response_format``)."""
    calls, fmt = request.prompted_calls, _format_schema(request)
    if calls is None:
        return None if fmt is None else _checked("response_format", lambda: json_grammar(fmt[0], lenient=fmt[1]))
    if calls.required:
        return _checked("tools", lambda: tool_calls_grammar(calls.functions, marker=calls.marker, one=calls.one))
    if fmt is not None:  # checked alone first, so that a bad format is named as such
        _checked("response_format", lambda: json_grammar(fmt[0], lenient=fmt[1]))
    return _checked("tools", lambda: tool_calls_grammar(
        calls.functions, marker=calls.marker, one=calls.one, required=False,
        otherwise=None if fmt is None else fmt[0], lenient=fmt is not None and fmt[1]))


def _sampling(request: ChatRequest) -> SamplingParams:
    p = request.params
    unknown = sorted(set(request.options.extra_body) - _EXTRA_BODY)
    if unknown:
        raise InvalidRequestError(f"extra_body: the local backend does not know {', '.join(unknown)} "
                                  f"(it accepts {', '.join(sorted(_EXTRA_BODY))})", param="extra_body",
                                  provider="local")
    stop = p.get("stop", ())
    min_p, repetition = request.extra("min_p"), request.extra("repetition_penalty")  # checked by the preset's limits
    grammar, calls = _grammar(request), request.prompted_calls
    # under "auto" without a format the grammar is calls or any text: it lets go once the answer cannot be calls
    lazy = calls.marker if calls is not None and not calls.required and _format_schema(request) is None else None
    try:
        return SamplingParams(
            temperature=float(p.get("temperature", 1.0)),
            top_p=float(p.get("top_p", 1.0)),
            top_k=int(request.extra("top_k") or 0),
            min_p=float(min_p or 0.0),
            repetition_penalty=float(1.0 if repetition is None else repetition),
            seed=p.get("seed"),
            presence_penalty=float(p.get("presence_penalty", 0.0)),
            frequency_penalty=float(p.get("frequency_penalty", 0.0)),
            max_tokens=p.get("max_tokens", p.get("max_completion_tokens")) or None,  # 0: echo alone (start())
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            grammar=grammar,
            lazy_marker=lazy,
            logprobs=int(p.get("top_logprobs") or 0) if p.get("logprobs") else None,
            logit_bias=tuple((int(token), float(bias)) for token, bias in p.get("logit_bias", {}).items()),
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc), provider="local") from None


@dataclasses.dataclass(frozen=True, slots=True)
class _Echo:
    """``echo`` for one prompt: its text, its first token's (which has no log probability), its token count, and
    with ``logprobs`` its tokens' (the first one's None)."""

    text: str
    first: str
    prompt_tokens: int
    logprobs: list[TokenLogprob | None] | None

    @classmethod
    def of(cls, source: str | list[int], ids: list[int], engine: Engine, k: int | None) -> _Echo:
        """A text's echo is the text itself; its first token, BOS, is "<s>" where the text writes it and "" where
        encode_prompt added it (not in the text), so the tokens' texts add up to it. Token ids are written out."""
        logprobs = None if k is None else engine.prompt_logprobs(ids, k)
        if isinstance(source, str):
            return cls(source, "<s>" if source.startswith("<s>") else "", len(ids), logprobs)
        pieces = engine.prompt_pieces(ids)
        return cls(b"".join(pieces).decode("utf-8", errors="replace"), _shown(pieces[0])["token"], len(ids),
                   logprobs)


class _Answer:
    """One request's engine deltas as OpenAI chunks: the role first, then text, then each choice's finish.

    With one choice the finish chunk carries the ``usage``; with ``n`` choices a last chunk with no choices
    does (the prompt counted once, the completion tokens of every choice added up), as OpenAI streams it.
    """

    def __init__(self, model: str, n: int, logprobs: bool = False, prompts: int = 1) -> None:
        self.head: dict[str, Any] = {"id": f"chatcmpl-local-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                                     "model": model}
        # n choices for each prompt: prompt i's are choices i * n ... i * n + n - 1 (OpenAI's order)
        self.per_prompt, self.n, self.finished, self.completion_tokens = n, n * prompts, 0, 0
        self._prompt_tokens: dict[int, int] = {}  # prompt -> its tokens, each counted once in the usage
        self.cached_tokens = 0
        self.logprobs = logprobs
        self._held: dict[int, list[ChatCompletionTokenLogprob]] = {}  # tokens whose text has not come out yet

    def first(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head, choices=[ChunkChoice(index=i, delta=ChoiceDelta(role="assistant",
                                                                                                 content=""))
                                                         for i in range(self.n)])

    def echoed(self, echoes: Sequence[_Echo], *, finished: bool) -> Iterator[ChatCompletionChunk]:
        """Each choice's text opening with its prompt's (``echo``), its tokens' log probabilities as plain dicts
        (the first has none); when nothing was generated (``max_tokens=0``, ``finished``), each choice's end."""
        for number, echo in enumerate(echoes):
            logprobs = None if echo.logprobs is None or not self.logprobs else {"content": [
                {"token": echo.first, "logprob": None, "top_logprobs": None} if token is None else
                _token_logprob(token).model_dump() for token in echo.logprobs]}
            for index in range(number * self.per_prompt, (number + 1) * self.per_prompt):
                yield ChatCompletionChunk(**self.head, choices=[ChunkChoice(
                    index=index, delta=ChoiceDelta(content=echo.text), logprobs=logprobs)])
        if finished:
            for index in range(self.n):
                prompt_tokens = echoes[index // self.per_prompt].prompt_tokens
                yield from self.chunks(Delta(index, "", "length", prompt_tokens, 0), index)

    def chunks(self, delta: Delta, index: int) -> Iterator[ChatCompletionChunk]:
        """The chunks for one delta of choice ``index``. With ``logprobs``, a token's log probability goes out
        with the chunk that carries its text: a token whose text is held (part of a character, what may begin
        a stop string) waits for the next chunk with text, or for the finish chunk (which then always has
        ``logprobs``, so that a whole answer has them even when it is empty)."""
        tokens = self._held.pop(index, [])
        tokens += (_token_logprob(t) for t in delta.logprobs)
        if delta.text:
            yield ChatCompletionChunk(**self.head, choices=[ChunkChoice(
                index=index, delta=ChoiceDelta(content=delta.text),
                logprobs=ChoiceLogprobs(content=tokens) if self.logprobs else None)])
            tokens = []
        if delta.finish_reason is None:
            if tokens:
                self._held[index] = tokens
            return
        self.finished += 1
        self._prompt_tokens[index // self.per_prompt] = delta.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, delta.cached_tokens)
        self.completion_tokens += delta.completion_tokens
        finish = ChunkChoice(index=index, finish_reason=delta.finish_reason,
                             logprobs=ChoiceLogprobs(content=tokens) if self.logprobs else None)
        if self.n == 1:
            yield ChatCompletionChunk(**self.head, choices=[finish], usage=self._usage())
            return
        yield ChatCompletionChunk(**self.head, choices=[finish])
        if self.finished == self.n:
            yield ChatCompletionChunk(**self.head, choices=[], usage=self._usage())

    def _usage(self) -> Usage:
        prompt_tokens = sum(self._prompt_tokens.values())
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))

    @staticmethod
    def fold(chunks: Iterable[ChatCompletionChunk]) -> ChatCompletion:
        merged = ChunkAccumulator()
        for chunk in chunks:
            merged.add(chunk)
        return merged.completion()


def _answer(request: ChatRequest) -> _Answer:
    return _Answer(request.model, int(request.params.get("n", 1)), bool(request.params.get("logprobs")),
                   max(1, len(request.prompts())))


def _token_logprob(token: TokenLogprob) -> ChatCompletionTokenLogprob:
    return ChatCompletionTokenLogprob(
        **_shown(token.text), logprob=token.logprob,
        top_logprobs=[TopLogprob(**_shown(text), logprob=lp) for _, text, lp in token.top])


def _shown(text: bytes) -> dict[str, Any]:
    """OpenAI's token fields: the text (a byte that is part of a character as ``"\\xe2"``) and its bytes."""
    return {"token": text.decode("utf-8", errors="backslashreplace"), "bytes": list(text)}


class _Clock:
    """A request's deadlines on local weights, from when it is queued (a first load is not counted): ``idle``,
    the longest wait for a token (the first one's wait for a row and its prefill included), and ``total``."""

    def __init__(self, request: ChatRequest) -> None:
        self.limits = request.options.timeout
        self.deadline = Deadline(self.limits.total)

    def wait(self) -> float | None:
        """How long the next token may take."""
        return self.deadline.cap(self.limits.idle)

    def check(self) -> None:
        if self.deadline.expired():
            raise self.expired()

    def expired(self) -> APITimeoutError:
        if self.deadline.expired():
            return APITimeoutError(f"the total deadline ({self.limits.total:g} s) passed while the local model "
                                   "was answering", provider="local")
        return APITimeoutError(f"no token from the local model for {self.limits.idle:g} s (idle deadline)",
                               provider="local")


class LocalCore:
    """Request in, a ticket in the engine's running batch out; the engine's thread does the work."""

    def __init__(self, config: ClientConfig) -> None:
        self.options = LocalOptions.from_config(config)
        try:
            plan = check_checkpoint(self.options.path, dtype=self.options.dtype, device=self.options.device,
                                    moe_backend=self.options.moe_backend, quantize=self.options.quantize)
        except ValueError as exc:  # an unusable moe_backend for the device
            raise ConfigurationError(f"{config.local_option_source('moe_backend')}: {exc}") from None
        MixtralTokenizer.from_pretrained(self.options.path)
        self.vocab_size = plan.config.vocab_size
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        return self.load()

    def load(self, cancel: threading.Event | None = None) -> Engine:
        """The engine, loading the model on first use (setting ``cancel`` stops that load: LoadCancelled)."""
        if self._engine is None:
            self._engine = _engine_for(self.options, cancel)
        return self._engine

    def close(self) -> None:
        self._engine = None

    def stats(self) -> dict[str, Any]:
        """``Engine.stats()`` once the model is loaded; before, only that it is not."""
        return {"loaded": False} if self._engine is None else {"loaded": True, **self._engine.stats()}

    def start(self, request: ChatRequest, cancel: threading.Event | None = None) -> tuple[list[Ticket], list[_Echo]]:
        """Check the request, load the model on first use (``cancel`` stops that load), and queue each prompt
        (one, or a raw request's several) once per choice (``n``), all in the running batch (blocking work: a
        thread's). With a ``seed``, a prompt's choice ``i`` samples with ``seed + i``: the choices differ, and
        each is what one request with that seed gives. A raw prompt with ``echo`` also gets its own text back
        (with ``logprobs``, each of its tokens' log probabilities, from one forward pass here); with
        ``max_tokens=0`` nothing is queued."""
        params = _sampling(request)
        outside = [token for token, _ in params.logit_bias if token >= self.vocab_size]
        if outside:
            raise InvalidRequestError(f"logit_bias: token {outside[0]} is not in the model's vocabulary "
                                      f"({self.vocab_size} tokens)", param="logit_bias", provider="local")
        engine = self.load(cancel)
        tokenizer = engine.tokenizer
        sources = request.prompts()
        prompts: list[list[int]] = [tokenizer.encode_chat(request.messages)] if request.prompt is None else [
            tokenizer.encode_prompt(p) if isinstance(p, str) else p for p in sources]
        for number, ids in enumerate(prompts):
            outside = [t for t in ids if t >= self.vocab_size]
            if outside:
                raise InvalidRequestError(f"prompt: token {outside[0]} (in prompt {number}) is not in the model's "
                                          f"vocabulary ({self.vocab_size} tokens)", param="prompt", provider="local")
        echoes: list[_Echo] = []
        if request.params.get("echo"):  # raw prompts only (build_request)
            for source, ids in zip(sources, prompts, strict=True):
                engine.budget(len(ids), params.max_tokens)  # refuses a prompt that does not fit, before the pass
                echoes.append(_Echo.of(source, ids, engine, params.logprobs))
        if request.params.get("max_tokens") == 0:  # only with echo (build_request): the prompts alone
            return [], echoes
        per_choice = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                      for i in range(int(request.params.get("n", 1)))]
        # refuses what does not fit; prompt i's choices are tickets i * n ... i * n + n - 1
        return engine.submit_all([ids for ids in prompts for _ in per_choice], per_choice * len(prompts)), echoes

    def chunks(self, request: ChatRequest) -> Iterator[ChatCompletionChunk]:
        tickets, echoes = self.start(request)
        clock = _Clock(request)
        try:
            answer = _answer(request)
            yield answer.first()
            yield from answer.echoed(echoes, finished=not tickets)
            live = dict(enumerate(tickets))
            while live:  # every step gives each running choice a token, so taking them in turn never stalls
                for index, ticket in list(live.items()):
                    try:
                        delta = ticket.get(clock.wait())
                    except TimeoutError:
                        raise clock.expired() from None
                    clock.check()
                    yield from answer.chunks(delta, index)
                    if delta.finish_reason is not None:
                        del live[index]
        finally:
            for ticket in tickets:
                ticket.cancel()


class LocalBackend:
    """``SyncBackend``: the caller's thread waits for the engine's thread."""

    def __init__(self, config: ClientConfig) -> None:
        self._core = LocalCore(config)

    def complete(self, request: ChatRequest) -> ChatCompletion:
        return _Answer.fold(self._core.chunks(request))

    def stream(self, request: ChatRequest) -> Iterator[ChatCompletionChunk]:
        return self._core.chunks(request)

    def stats(self) -> dict[str, Any]:
        return self._core.stats()

    def close(self) -> None:
        self._core.close()


class _Waker:
    """Wakes a task of the running event loop (asyncio or trio) from any thread, never blocking that thread."""

    def __init__(self) -> None:
        try:
            self._call_soon: Callable[[Callable[[], object]], object] = asyncio.get_running_loop().call_soon_threadsafe
        except RuntimeError:  # not asyncio, so trio: anyio's other backend
            import trio

            self._call_soon = trio.lowlevel.current_trio_token().run_sync_soon
        self._event = anyio.Event()

    def wake(self) -> None:
        try:
            self._call_soon(self._set)
        except RuntimeError:  # the loop has ended (trio's RunFinishedError is one too): nobody is waiting
            pass

    def _set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class AsyncLocalBackend:
    """``AsyncBackend``: the prompt is queued from a worker thread (the first request loads the model); the
    deltas arrive from the engine's thread through a waker, so a stream holds no thread while it waits."""

    def __init__(self, config: ClientConfig) -> None:
        self._core = LocalCore(config)

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        async with contextlib.aclosing(self.stream(request)) as chunks:
            return _Answer.fold([chunk async for chunk in chunks])

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatCompletionChunk, None]:
        started: list[Ticket] = []
        echoes: list[_Echo] = []
        cancelled = threading.Event()

        def start() -> None:
            tickets, echoed = self._core.start(request, cancelled)
            echoes.extend(echoed)
            started.extend(tickets)
            if cancelled.is_set():  # the request was cancelled while this thread worked: nobody reads these
                for ticket in tickets:
                    ticket.cancel()

        try:
            # abandoned when the request is cancelled (a load takes minutes): ``cancelled`` stops a load in
            # progress, and tickets queued all the same are cancelled by start() or below, whichever comes last
            await anyio.to_thread.run_sync(start, abandon_on_cancel=True)
            waker = _Waker()
            for ticket in started:
                ticket.listen(waker.wake)
            clock = _Clock(request)
            answer = _answer(request)
            yield answer.first()
            for chunk in answer.echoed(echoes, finished=not started):
                yield chunk
            live = dict(enumerate(started))
            while live:
                ready = [(index, delta) for index, ticket in live.items() if (delta := ticket.poll()) is not None]
                if not ready:
                    wait = clock.wait()
                    with anyio.move_on_after(math.inf if wait is None else wait) as waited:
                        await waker.wait()
                    if waited.cancelled_caught:
                        raise clock.expired()
                    continue
                clock.check()
                for index, delta in ready:
                    for chunk in answer.chunks(delta, index):
                        yield chunk
                    if delta.finish_reason is not None:
                        del live[index]
        finally:
            cancelled.set()
            for ticket in started:
                ticket.listen(None)
                ticket.cancel()

    def stats(self) -> dict[str, Any]:
        return self._core.stats()

    async def aclose(self) -> None:
        self._core.close()
