"""The generation loop: refuse what does not fit, prefill each prompt, then decode all rows together.

An ``Engine`` holds the model and tokenizer. ``generate()`` / ``stream()`` run a fixed set of prompts as
one batch in the calling thread; ``submit()`` hands one prompt to the engine's ``Scheduler``, which
decodes every submitted request in one running batch (continuous batching). Both yield ``Delta`` objects
as tokens arrive: text that is safe to show (whole UTF-8 characters, nothing that could begin a stop
string), and on the last one the finish reason.

A ``_Batch`` is the rows decoding together: they sit in the first slots of one KV cache, which grows as
they need; a row that finishes leaves its slot to the last row, so a step only ever computes live rows.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mixtral_client._exceptions import InvalidRequestError
from mixtral_local.model import KVPair, MixtralModel
from mixtral_local.tokenizer import IncrementalDetokenizer, MixtralTokenizer

from .grammar import Constraint, GrammarError, token_table
from .kv_cache import KVCache
from .prefix_cache import MIN_REUSE, PREFIX_CACHE_TOKENS, Prefix, PrefixCache, common_prefix
from .sampling import SamplingParams, bias_vector, sample
from .scheduler import Scheduler, Ticket
from .stops import StopMatcher

__all__ = ["Completion", "Delta", "Engine", "TokenLogprob"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log probability under the model (its raw logits: before penalties, temperature,
    top-k / top-p and any grammar), and the ``SamplingParams.logprobs`` most likely tokens at its position,
    most likely first. ``text`` is what the token adds to the answer's text: the first token of an answer loses
    the space sentencepiece puts before a word (the answer's text has none), so the tokens' texts add up to
    the answer's, stop strings aside."""

    token_id: int
    text: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()  # (token id, text, log probability)


@dataclass(frozen=True, slots=True)
class Delta:
    """What one step produced for request ``index``: new text, and on its last delta the finish reason."""

    index: int
    text: str
    finish_reason: str | None  # "stop" (EOS, a stop string, a grammar's end) or "length"; "error": see the row
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt positions taken from the prefix cache rather than computed
    logprobs: tuple[TokenLogprob, ...] = ()  # with ``SamplingParams.logprobs``: this step's token (not EOS)


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with ``SamplingParams.logprobs``

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True, eq=False)
class _Row:
    """One request being generated."""

    index: int
    prompt: list[int]
    params: SamplingParams
    max_new: int
    detok: IncrementalDetokenizer
    stops: StopMatcher
    generator: torch.Generator | None
    counts: torch.Tensor | None
    constraint: Constraint | None = None  # the grammar the answer must follow
    bias: torch.Tensor | None = None  # [V] added to the logits before sampling (``logit_bias``)
    seen: torch.Tensor | None = None  # bool [V]: tokens of the prompt and the answer (``repetition_penalty``)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: BaseException | None = None  # why the row ended, when its finish is "error"
    shown: bool = False  # a constrained row has given text
    prefix: Prefix | _LiveRow | None = None  # a prefix-cache entry or a decoding row sharing ``cached`` tokens
    cached: int = 0
    order: int = 0  # when the scheduler took it: under a KV-cache bound the latest is set aside first

    @property
    def reach(self) -> int:
        """The most positions the row may occupy: its prompt and every token it may generate."""
        return len(self.prompt) + self.max_new

    @property
    def need(self) -> int:
        """The positions the row's next step needs: its prompt and, once decoding, every token so far."""
        return len(self.prompt) + max(len(self.tokens), 1)

    @property
    def need_ahead(self) -> int:
        """``need`` and ``LOOKAHEAD`` more positions (at most its ``reach``): what admitting it under a KV-cache
        bound counts, so that it does not have to be set aside again a few steps later."""
        return min(self.reach, self.need + LOOKAHEAD)

    @property
    def computed(self) -> list[int]:
        """The tokens whose keys and values the row's slot holds: the prompt, and every answer token but the
        last (which no step has fed to the model yet)."""
        return self.prompt + self.tokens[:-1]


@dataclass(frozen=True, slots=True, eq=False)
class _LiveRow:
    """A row decoding in ``batch`` whose prompt starts as another row's does: its slot's keys and values serve
    the other's first positions, as a prefix-cache entry would."""

    batch: _Batch
    row: _Row

    def copy_into(self, layers: Sequence[KVPair], slot: int, length: int) -> None:
        """Write the live row's first ``length`` positions into ``slot`` of ``layers`` (views of the batch's cache)."""
        src = next((i for i, r in enumerate(self.batch.rows) if r is self.row), None)
        if src is None or self.batch.cache is None:
            raise RuntimeError("the row whose keys and values were to be shared has left the batch")
        for (k, v), (sk, sv) in zip(layers, self.batch.cache.layers, strict=True):
            k[slot, :, :length] = sk[src, :, :length]
            v[slot, :, :length] = sv[src, :, :length]


#: rows that decode together by default: on CPU, 32 callers of `mixtral serve` then get their first tokens 1.17 to
#: 1.33x sooner than transformers' continuous batching, where 16 rows left the second half waiting
#: (docs/benchmarks/serve.md); on a GPU the KV cache's memory bound decides how many actually run
MAX_BATCH = 32
PROMPT_LOGPROB_ROWS = 512  # prompt positions whose vocabulary logits prompt_logprobs holds at once (echo)


class Engine:
    """Generation over one model: a fixed batch in the caller's thread, or requests joining a running batch.

    ``max_batch`` bounds how many submitted requests decode together; more wait for a free row.
    ``prefix_cache`` is how many positions of finished requests' keys and values are kept for later prompts
    that start with the same tokens (``prefix_cache.py``); 0 turns reuse off.
    ``kv_cache_bytes`` bounds the running batch's KV cache (None: no bound), which never grows past it. A
    submitted request joins when the batch has room for what it needs now and ``LOOKAHEAD`` positions more;
    when the rows grow past the bound, the latest taken are set aside (their keys and values in host memory)
    and come back, ahead of new requests, when rows finish. A request whose prompt and ``max_tokens`` alone
    exceed the bound is refused (without ``max_tokens``, it may generate as far as the bound). ``generate()``
    refuses prompts that could not all reach their end together.
    """

    def __init__(self, model: MixtralModel, tokenizer: MixtralTokenizer, *, max_batch: int = MAX_BATCH,
                 prefix_cache: int = PREFIX_CACHE_TOKENS, kv_cache_bytes: int | None = None) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                             f"{model.config.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.max_position_embeddings
        self.device = model.output.weight.device
        self.dtype = model.output.weight.dtype
        #: slot-positions the KV cache may hold (one position of one row: ``KVCache.nbytes(config, 1, 1)``)
        self.kv_cells: int | None = None
        if kv_cache_bytes is not None:
            per_position = KVCache.nbytes(model.config, 1, 1, self.dtype)
            self.kv_cells = kv_cache_bytes // per_position
            if self.kv_cells < 2:
                raise ValueError(f"a KV cache of {kv_cache_bytes} bytes holds {self.kv_cells} positions "
                                 f"({per_position} bytes each): a request needs at least 2")
        #: the most positions one request may reach: the model's context, or what the KV-cache bound holds
        self.max_positions = self.context if self.kv_cells is None else min(self.context, self.kv_cells)
        self.scheduler = Scheduler(self, max_batch)
        self.prefix_cache = PrefixCache(prefix_cache)
        self._grammar_table: Any = None  # llguidance's view of the vocabulary, built with the first grammar
        self._grammars: collections.OrderedDict[str, Constraint] = collections.OrderedDict()  # compiled, unused
        self._grammar_lock = threading.Lock()

    def _constraint(self, grammar: str, lazy_marker: str | None) -> Constraint:
        """A fresh ``Constraint`` for ``grammar``: a copy of the one compiled the first time it was asked for
        (the ``n`` choices of a request, an agent's every turn: a copy takes microseconds, a compile about a
        millisecond or more), the ``GRAMMAR_CACHE`` most recent kept."""
        with self._grammar_lock:
            if self._grammar_table is None:
                self._grammar_table = token_table(self.tokenizer)
            compiled = self._grammars.pop(grammar, None) or Constraint(self._grammar_table, grammar)
            self._grammars[grammar] = compiled
            while len(self._grammars) > GRAMMAR_CACHE:
                self._grammars.popitem(last=False)
        return compiled.fresh(lazy_marker=lazy_marker)

    def stats(self) -> dict[str, Any]:
        """The running batch (``Scheduler.load()``) and the engine's limits, for a health check."""
        per_position = KVCache.nbytes(self.model.config, 1, 1, self.dtype)
        return {**self.scheduler.load(), "max_batch": self.scheduler.max_rows,
                "kv_cache_bound_bytes": None if self.kv_cells is None else self.kv_cells * per_position,
                "prefix_cache_tokens": self.prefix_cache.tokens, "decode_steps": self.scheduler.steps}

    def budget(self, prompt_len: int, max_tokens: int | None) -> int:
        """How many tokens a request may generate; refuses a prompt that does not fit the context (or the
        KV-cache bound)."""
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="messages", provider="local")
        limit = self.max_positions
        what = (f"the model's context is {limit} tokens" if limit == self.context else
                f"the KV cache (local_options kv_cache_memory) holds {limit} positions")
        if prompt_len >= limit:
            raise InvalidRequestError(f"the prompt is {prompt_len} tokens; {what}, leaving no room for a completion",
                                      param="messages", provider="local")
        if max_tokens is None:
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise InvalidRequestError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is {prompt_len + max_tokens} "
                f"tokens; {what}", param="max_tokens", provider="local")
        return max_tokens

    def fits(self, limits: Sequence[int]) -> bool:
        """Whether rows that may reach ``limits`` positions can decode together within the KV-cache bound:
        the cache is one block of rows x their longest reach."""
        return self.kv_cells is None or not limits or len(limits) * max(limits) <= self.kv_cells

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: Sequence[int], k: int) -> list[TokenLogprob | None]:
        """Each prompt token's log probability given the tokens before it, and the ``k`` most likely tokens at its
        position (the legacy completions API's ``echo`` with ``logprobs``): None for the first token, which has
        nothing before it. One forward pass over the prompt in the caller's thread, with no KV cache (the
        running batch is not touched); ``budget()`` has checked the prompt against the context. A token's text
        is its piece as written in the prompt (``<s>`` for BOS, a word's leading space kept).

        The vocabulary's logits are taken ``PROMPT_LOGPROB_ROWS`` positions at a time from the final hidden
        states, so a long prompt holds [rows, V] float32 at a time rather than [S, V] (2 GB for a 32k prompt
        in bf16), and each slice's log-softmax, chosen tokens and top-k are one kernel each."""
        ids = torch.tensor([list(prompt)], device=self.device)
        hidden = self.model(ids, logits=False)[0, :-1]  # [S-1, H]: row i predicts token i + 1
        targets = ids[0, 1:]
        out: list[TokenLogprob | None] = [None]
        for start in range(0, hidden.shape[0], PROMPT_LOGPROB_ROWS):
            rows = torch.log_softmax(self.model.output(hidden[start:start + PROMPT_LOGPROB_ROWS]).float(), dim=-1)
            chosen = rows.gather(1, targets[start:start + rows.shape[0], None])[:, 0].tolist()
            top = torch.topk(rows, k) if k else None
            top_ids, top_lps = ([], []) if top is None else (top.indices.tolist(), top.values.tolist())
            for i, logprob in enumerate(chosen):
                position, token = start + i + 1, prompt[start + i + 1]
                shown = self._prompt_shown(prompt, position)
                alternatives = () if not k else tuple(
                    (t, shown(self._piece(t)), lp) for t, lp in zip(top_ids[i], top_lps[i], strict=True))
                out.append(TokenLogprob(token, shown(self._piece(token)), logprob, alternatives))
        return out

    def prompt_pieces(self, prompt: Sequence[int]) -> list[bytes]:
        """Each prompt token's text as ``prompt_logprobs`` shows it, the first's too (``<s>`` for BOS, else its
        text with no leading space, as a sentencepiece-encoded run begins): joined, a prompt given as token ids
        written out (``echo``)."""
        return [self._prompt_shown(prompt, i)(self._piece(token)) for i, token in enumerate(prompt)]

    def _prompt_shown(self, prompt: Sequence[int], position: int) -> Callable[[bytes], bytes]:
        """How the text of the token at ``position`` shows in the prompt: a piece that opens a sentencepiece-
        encoded run (first, or right after <s> or </s>) without the space it starts with, which is not in the
        prompt's text (encode_prompt), so the tokens' texts add up to the prompt."""
        opens = position == 0 or prompt[position - 1] in (self.tokenizer.bos_id, self.tokenizer.eos_id)
        return _drop_space if opens else _as_is

    def _piece(self, token: int) -> bytes:
        """A token as a prompt writes it: BOS and EOS as ``<s>`` and ``</s>``, others as their text."""
        if token == self.tokenizer.bos_id:
            return b"<s>"
        if token == self.tokenizer.eos_id:
            return b"</s>"
        return self.tokenizer.token_bytes(token)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 ) -> list[Completion]:
        """Generate for every prompt together; one ``Completion`` per prompt, in order."""
        out = [Completion("", None, len(p)) for p in prompts]
        rows = self._rows(prompts, params)
        for delta in self._run(rows, None):
            out[delta.index].text += delta.text
            out[delta.index].finish_reason = delta.finish_reason
            out[delta.index].logprobs.extend(delta.logprobs)
        for row, completion in zip(rows, out, strict=True):
            completion.token_ids = row.tokens
        return out

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
               should_stop: Callable[[], bool] | None = None) -> Iterator[Delta]:
        """Deltas as tokens arrive; ends early (without finish reasons) once ``should_stop()`` is true.

        The prompts are checked before the first delta, so a refusal raises on the first ``next()``.
        """
        return self._run(self._rows(prompts, params), should_stop)

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> Ticket:
        """Queue one prompt for the running batch; iterate the ticket for its deltas.

        A prompt that does not fit, or bad token ids, raise here, in the caller's thread.
        """
        return self.submit_all([prompt], params)[0]

    def submit_all(self, prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams]) -> list[Ticket]:
        """Queue several prompts at once (the ``n`` choices of one request): every one is checked before any
        is queued, and they join the running batch together, so copies of one prompt are prefilled once."""
        return self.scheduler.submit(self._rows(prompts, params))

    def _rows(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
              ) -> list[_Row]:
        per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_row) != len(prompts) or not prompts:
            raise ValueError(f"need one SamplingParams per prompt: {len(prompts)} prompts, {len(per_row)} params")
        rows = []
        for i, (prompt, p) in enumerate(zip(prompts, per_row, strict=True)):
            if any(not 0 <= t < self.model.config.vocab_size for t in prompt):
                raise ValueError(f"prompt {i} has token ids outside the vocabulary")
            generator = None
            if not p.greedy:
                seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
                generator = torch.Generator(self.device).manual_seed(seed)
            counts = torch.zeros(self.model.config.vocab_size, device=self.device) if p.penalized else None
            max_new = self.budget(len(prompt), p.max_tokens)
            constraint = self._constraint(p.grammar, p.lazy_marker) if p.grammar is not None else None
            bias = bias_vector(p, self.model.config.vocab_size, self.device)
            seen = None
            if p.repetition_penalty != 1:
                seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                seen[torch.tensor(prompt, device=self.device)] = True
            prefix, cached = self.prefix_cache.match(prompt)
            rows.append(_Row(i, list(prompt), p, max_new, self.tokenizer.detokenizer(), StopMatcher(p.stop),
                             generator, counts, constraint, bias, seen, prefix=prefix, cached=cached))
        return rows

    def _forward(self, ids: list[list[int]], positions: list[list[int]], cache: Sequence[tuple[torch.Tensor, ...]],
                 kv_len: int, last: list[int] | None = None) -> torch.Tensor:
        t_ids = torch.tensor(ids, device=self.device)
        t_pos = torch.tensor(positions, device=self.device)
        t_last = None if last is None else torch.tensor(last, device=self.device)
        return self.model(t_ids, t_pos, cache, kv_len, last_only=True, last=t_last)[:, -1]  # [B, V]

    def _accept(self, row: _Row, token: int, last: bool = False) -> Delta:
        """Take one sampled token for ``row``: text, stop strings, EOS and the length limit; ``last``: the
        row's grammar can take nothing more, so the token ends the answer (the step for EOS is saved)."""
        row.tokens.append(token)
        if row.counts is not None:
            row.counts[token] += 1
        if row.seen is not None:
            row.seen[token] = True
        text = ""
        if token == self.tokenizer.eos_id:
            row.finish = "stop"
        else:
            text = row.stops.feed(row.detok.push(token))
            if row.stops.stopped or last:
                row.finish = "stop"
            elif len(row.tokens) >= row.max_new:
                row.finish = "length"
        if row.finish is not None and not row.stops.stopped:
            text += row.stops.feed(row.detok.flush()) + row.stops.flush()
            if row.stops.stopped:
                row.finish = "stop"
        return Delta(row.index, text, row.finish, len(row.prompt), len(row.tokens), row.cached)

    def _next_token(self, row: _Row, logits: torch.Tensor) -> Delta:
        """Sample ``row``'s next token from its logits [V] (within its grammar, if it has one) and take it.

        A grammar that fails ends its row alone: finish ``"error"``, with the reason in ``row.error``.
        """
        if row.constraint is None:
            token = sample(logits, row.params, row.counts, row.generator, row.bias, row.seen)
            logprob = self._logprob(row, logits, token)
            delta = self._accept(row, token)
            return delta if logprob is None else dataclasses.replace(delta, logprobs=(logprob,))
        try:
            token = sample(row.constraint.mask(logits), row.params, row.counts, row.generator, row.bias, row.seen)
            row.constraint.accept(token)
        except GrammarError as exc:
            row.finish, row.error = "error", exc
            return Delta(row.index, "", "error", len(row.prompt), len(row.tokens), row.cached)
        logprob = self._logprob(row, logits, token)
        delta = self._accept(row, token, last=row.constraint.done and token != self.tokenizer.eos_id)
        if not row.shown:  # the space a grammar lets an answer open with is not part of it
            text = delta.text.lstrip(" ")
            row.shown = bool(text)
            delta = dataclasses.replace(delta, text=text)
        return delta if logprob is None else dataclasses.replace(delta, logprobs=(logprob,))

    def _logprob(self, row: _Row, logits: torch.Tensor, token: int) -> TokenLogprob | None:
        """``token``'s log probability and the most likely tokens at its position (``row.params.logprobs`` of
        them), from the raw logits [V]; None when the row did not ask or the token is EOS (no text: not shown).
        Call it before the token is accepted: the texts depend on what the answer has shown so far."""
        k = row.params.logprobs
        if k is None or token == self.tokenizer.eos_id:
            return None
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, k) if k else None
        # the answer's text opens without the space that starts its first token (sentencepiece decodes so), and
        # a constrained answer's text without any space the grammar let it open with
        if row.constraint is not None and not row.shown:
            shown = _drop_spaces
        elif not row.tokens:
            shown = _drop_space
        else:
            shown = _as_is
        text = self.tokenizer.token_bytes
        alternatives = () if top is None else tuple(
            (i, shown(text(i)), lp) for i, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True))
        return TokenLogprob(token, shown(text(token)), float(logprobs[token]), alternatives)

    def _run(self, rows: list[_Row], should_stop: Callable[[], bool] | None) -> Iterator[Delta]:
        if not self.fits([r.reach for r in rows]):
            raise ValueError(f"{len(rows)} prompts reaching up to {max(r.reach for r in rows)} positions do not fit "
                             f"the KV-cache bound ({self.kv_cells} slot-positions) together: pass fewer, or "
                             "submit() them (the scheduler admits them as room frees)")
        if should_stop is not None and should_stop():
            return
        batch = _Batch(self, slots=len(rows))
        for row, delta in batch.admit_all(rows):
            yield _checked(row, delta)
            if should_stop is not None and should_stop():
                return
        while batch.rows:
            if should_stop is not None and should_stop():
                return
            for row, delta in batch.step():
                yield _checked(row, delta)


def _drop_space(text: bytes) -> bytes:
    return text[1:] if text.startswith(b" ") else text


def _drop_spaces(text: bytes) -> bytes:
    return text.lstrip(b" ")


def _as_is(text: bytes) -> bytes:
    return text


def _checked(row: _Row, delta: Delta) -> Delta:
    """``delta``, or the error that ended its row raised."""
    if row.error is not None:
        raise row.error
    return delta


GRAMMAR_CACHE = 32  # compiled grammars an engine keeps for the requests that ask for them again
LOOKAHEAD = 128  # positions of growth a request must have room for to join a batch under a KV-cache bound

_MIN_LENGTH = 256  # positions a fresh cache holds at least (when the rows may need that many)
PREFILL_TOKENS = 4096  # the most (padded) prompt tokens one prefill pass takes, unless one prompt is longer
PREFILL_CHUNK = 512  # the scheduler prefills a longer prompt this many tokens at a time, between decode steps


def _pass_tokens(rows: Sequence[_Row], start: int = 0) -> int:
    """The (padded) tokens one prefill pass of ``rows`` from position ``start`` computes: copies of a prompt
    are computed once."""
    distinct = {tuple(r.prompt) for r in rows}
    return len(distinct) * (max(len(p) for p in distinct) - start)


def _joins(group: Sequence[_Row], row: _Row, budget: int) -> bool:
    """Whether ``row`` can be prefilled in ``group``'s pass. A pass starts at its rows' smallest reused prefix,
    so rows that reuse one go together only when their prefixes end at most ``MIN_REUSE`` positions apart,
    and never with rows that reuse none."""
    cached = [r.cached for r in group]
    lo, hi = min(*cached, row.cached), max(*cached, row.cached)
    if (lo == 0) != (hi == 0) or hi - lo > MIN_REUSE:
        return False
    return _pass_tokens([*group, row], lo) <= budget


def prefill_groups(rows: Sequence[_Row], budget: int = PREFILL_TOKENS) -> list[list[_Row]]:
    """``rows`` in order, cut into groups prefilled in one pass each: distinct prompts x (longest - start)
    <= ``budget``, where a group of rows that reuse cached prefixes starts at the shortest of them."""
    groups: list[list[_Row]] = []
    for row in rows:
        if groups and _joins(groups[-1], row, budget):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def shared_start_waves(rows: Sequence[_Row]) -> tuple[list[_Row], list[_Row]]:
    """``rows`` (to be prefilled now) in two waves. The second holds the rows that reuse nothing yet whose
    prompt starts, for ``MIN_REUSE`` tokens or more, as a different prompt of the first wave does (a shared
    system prompt): prefilled after the first wave, they start from its keys and values (``_Batch.share``)
    instead of computing the same start again. The copies of a prompt stay together."""
    first: list[_Row] = []
    later: list[_Row] = []
    for row in rows:
        limit = len(row.prompt) - 1
        if not row.cached and any(r.prompt != row.prompt and min(common_prefix(r.prompt, row.prompt), limit)
                                  >= MIN_REUSE for r in first):
            later.append(row)
        else:
            first.append(row)
    return first, later


class _Batch:
    """Rows decoding together, in the first ``len(rows)`` slots of a KV cache that grows as they need.

    ``slots`` is the most rows the batch will hold: the cache's slots double up to it. Positions double
    too, up to the most any row may reach (its prompt plus its token budget), so a request that may
    generate to the end of the context holds memory only for the positions it has reached.

    One more row may be ``filling``: a long prompt prefilled a chunk at a time (``fill()``), in the slot
    just after the decoding rows, so the others keep decoding between its chunks. It joins them when its
    prompt is done.
    """

    def __init__(self, engine: Engine, slots: int) -> None:
        self.engine, self.slots = engine, slots
        self.rows: list[_Row] = []
        self.filling: _Row | None = None  # in slot len(rows)
        self.filled = 0  # positions of the filling row's prompt already in the cache
        self.cache: KVCache | None = None

    @property
    def size(self) -> int:
        """Rows held: decoding, and the one filling."""
        return len(self.rows) + (self.filling is not None)

    def _reserve(self, slots: int, positions: int) -> None:
        cache = self.cache
        if cache is not None and slots <= cache.batch and positions <= cache.length:
            return
        have_b, have_t = (cache.batch, cache.length) if cache is not None else (0, 0)
        held = [*self.rows, *([self.filling] if self.filling is not None else [])]
        limit = max(r.reach for r in held)
        b = have_b if slots <= have_b else min(self.slots, max(slots, 2 * have_b))
        t = have_t if positions <= have_t else min(limit, max(positions, 2 * have_t, _MIN_LENGTH))
        cells = self.engine.kv_cells
        if cells is not None and b * t > cells:
            # growing by doubling would pass the bound: hold only the rows there are, and as many positions as
            # the bound leaves them (at least what they hold now; admission keeps that within the bound)
            used = max([positions, self.filled, *(len(r.prompt) + len(r.tokens) for r in self.rows)])
            b = max(slots, self.size)
            t = max(used, min(t, cells // b))
            if cache is not None:
                cache.resize(b, t)
                return
        if cache is None:
            config = self.engine.model.config
            self.cache = KVCache(config, b, t, dtype=self.engine.dtype, device=self.engine.device)
        else:
            cache.reserve(b, t)

    @torch.inference_mode()
    def admit(self, rows: Sequence[_Row]) -> list[Delta]:
        """Prefill ``rows`` together into the next free slots; their first tokens' deltas (a row whose first
        token is its last leaves at once). Prompts are right-padded to the longest: every row sits at
        positions 0..S-1, so one causal pass serves all, and what a pad leaves in the cache lies beyond its
        row's position, never attended and overwritten as the row moves on.

        Rows with the same prompt (the ``n`` choices of one request) are computed once: the first one's keys and
        values are copied into the others' slots, and all sample their first token from its logits.

        Rows that reuse cached prefixes (``row.cached`` positions of ``row.prefix``) come together: the pass
        starts at the shortest of their prefixes, which each computed row copies that much of into its slot,
        and computes only the rest. A row's ``cached`` becomes what it did reuse."""
        if self.size + len(rows) > self.slots:
            raise RuntimeError(f"the batch is full ({self.slots} rows)")
        b = len(self.rows)
        start = min(r.cached for r in rows)
        source: dict[tuple[int, ...], int] = {}  # prompt -> its computed row's place in the pass
        place: list[int] = []  # each row's computed row
        computed: list[_Row] = []
        copies: list[tuple[_Row, int]] = []  # (row, its computed row's place)
        for row in rows:
            key = tuple(row.prompt)
            if key not in source:
                source[key] = len(computed)
                computed.append(row)
            else:
                copies.append((row, source[key]))
            place.append(source[key])
        u = len(computed)
        lengths = [len(r.prompt) for r in computed]
        s = max(lengths)
        # the pass writes slots b .. b + u - 1
        with self._joining([*computed, *(row for row, _ in copies)], s):
            assert self.cache is not None
            cache = self.cache.slots(b, u)
            if start:
                for i, row in enumerate(computed):
                    self._reuse(row, cache, i, start)
            ids = [r.prompt[start:] + [0] * (s - len(r.prompt)) for r in computed]
            logits = self.engine._forward(ids, [list(range(start, s))] * u, cache, s,
                                          last=[t - 1 - start for t in lengths])
            for j, (row, src) in enumerate(copies):
                self.cache.move(b + src, b + u + j, len(row.prompt))
            for row in rows:
                row.cached = start  # what it did reuse (its prefix may reach further)
            deltas = [self.engine._next_token(row, logits[place[i]]) for i, row in enumerate(rows)]
        for row in rows:
            if row.finish is not None:
                self.drop(row)
        return deltas

    def admit_all(self, rows: Sequence[_Row], failed: Callable[[_Row, Exception], None] | None = None,
                  ) -> Iterator[tuple[_Row, Delta]]:
        """Prefill ``rows`` group by group (``prefill_groups``), a shared start once (``shared_start_waves``);
        each row with its first token's delta. With ``failed``, a group that fails is prefilled row by row,
        so that only a prompt that fails alone fails (it goes to ``failed``); without, the error is raised."""
        first, later = shared_start_waves(rows)
        for wave in (first, later):
            if wave is later:
                for row in later:
                    self.share(row)  # the first wave is in the batch now
            for group in prefill_groups(wave):
                try:
                    yield from zip(group, self.admit(group), strict=True)
                except Exception:
                    if failed is None:
                        raise
                    for row in group:
                        try:
                            yield row, self.admit([row])[0]
                        except Exception as exc:
                            failed(row, exc)

    def share(self, row: _Row) -> None:
        """Let ``row``, about to be prefilled, start from the keys and values of a decoding row when that row
        has computed more of ``row``'s prompt than the prefix-cache entry found at submission (if any), or from
        an entry that has reached the prefix cache since: the ``n`` choices of a long prompt, or requests that
        share a system prompt while the first of them is still answering, then compute only what differs.

        Call it just before ``admit`` or ``start_filling``: the decoding row must still be there then (only
        ``step()`` and a finished row's ``drop()`` take rows out)."""
        if isinstance(row.prefix, _LiveRow):  # found on an earlier look: that row may have left since
            row.prefix, row.cached = None, 0
        limit = len(row.prompt) - 1  # the last prompt token is computed: its logits pick the first new token
        best: _LiveRow | Prefix | None = None
        best_len = max(row.cached, MIN_REUSE - 1)
        if not row.cached:
            entry, n = self.engine.prefix_cache.match(row.prompt)
            if n > best_len:
                best, best_len = entry, n
        for other in self.rows:
            n = min(common_prefix(other.computed, row.prompt), limit)
            if n > best_len:
                best, best_len = _LiveRow(self, other), n
        if best is not None:
            row.prefix, row.cached = best, best_len

    def _reuse(self, row: _Row, layers: Sequence[KVPair], slot: int, length: int) -> None:
        """Copy the first ``length`` positions ``row`` shares into ``slot``; a prefix-cache entry counts a hit."""
        assert row.prefix is not None
        row.prefix.copy_into(layers, slot, length)
        if isinstance(row.prefix, Prefix):
            self.engine.prefix_cache.count_hit()

    @torch.inference_mode()
    def start_filling(self, row: _Row) -> None:
        """Make ``row`` the filling row; ``fill()`` then prefills it a chunk at a time (from the end of the
        cached prefix it reuses, if any: that is copied into its slot here)."""
        if self.filling is not None or self.size + 1 > self.slots:
            raise RuntimeError("a row is filling already, or the batch is full")
        self.share(row)
        self.filling, self.filled = row, 0
        if row.cached:
            assert row.prefix is not None
            try:
                self._reserve(self.size, row.cached)
                assert self.cache is not None
                self._reuse(row, self.cache.layers, len(self.rows), row.cached)
            except BaseException:
                self.filling = None
                raise
            self.filled = row.cached

    @torch.inference_mode()
    def fill(self, chunk: int = PREFILL_CHUNK) -> Delta | None:
        """Prefill the next ``chunk`` positions of the filling row; when its prompt is done, its first
        token's delta (it then decodes with the others, or leaves if that token was its last)."""
        row, b, start = self.filling, len(self.rows), self.filled
        assert row is not None
        end = min(len(row.prompt), start + chunk)
        try:
            self._reserve(b + 1, end)
            assert self.cache is not None
            logits = self.engine._forward([row.prompt[start:end]], [list(range(start, end))],
                                          self.cache.slots(b, 1), end)  # attends over the chunks before it
        except BaseException:
            self.filling = None
            raise
        self.filled = end
        if end < len(row.prompt):
            return None
        self.filling = None
        delta = self.engine._next_token(row, logits[0])
        if row.finish is None:
            self.rows.append(row)  # its slot, len(rows), is already the next decoding slot
        else:
            self._keep(row, b)
        return delta

    def stop_filling(self) -> None:
        self.filling = None

    @torch.inference_mode()
    def step(self) -> list[tuple[_Row, Delta]]:
        """One decode step for every row; finished rows leave the batch."""
        rows = list(self.rows)
        positions = [len(r.prompt) + len(r.tokens) - 1 for r in rows]  # where each row's last token goes
        kv_len = max(positions) + 1
        self._reserve(len(rows), kv_len)
        assert self.cache is not None
        logits = self.engine._forward([[r.tokens[-1]] for r in rows], [[p] for p in positions],
                                      self.cache.slots(0, len(rows)), kv_len)
        out = [(row, self.engine._next_token(row, logits[b])) for b, row in enumerate(rows)]
        for row, delta in out:
            if delta.finish_reason is not None:
                self.drop(row)
        return out

    @torch.inference_mode()
    def drop(self, row: _Row) -> None:
        """Take ``row`` out (its keys and values kept in the prefix cache); the last row moves into its slot."""
        b = next(i for i, r in enumerate(self.rows) if r is row)
        self._keep(row, b)
        self._vacate(row, b)

    def needs(self, chunk: int = PREFILL_CHUNK) -> tuple[int, int]:
        """(slots, positions) the next fill and step need: every row held, and the longest of the decoding
        rows' next positions and the filling row's next chunk."""
        positions = max((len(r.prompt) + len(r.tokens) for r in self.rows), default=0)
        if self.filling is not None:
            positions = max(positions, min(len(self.filling.prompt), self.filled + chunk))
        return self.size, positions

    @torch.inference_mode()
    def set_aside(self) -> list[tuple[_Row, Prefix]]:
        """Under a KV-cache bound, take decoding rows out, the latest taken first, until the next fill and step
        fit the bound; each with its keys and values (in host memory), to be ``restore``d when room frees."""
        cells = self.engine.kv_cells
        out: list[tuple[_Row, Prefix]] = []
        while cells is not None and self.rows and math.prod(self.needs()) > cells:
            row = max(self.rows, key=lambda r: r.order)
            b = next(i for i, r in enumerate(self.rows) if r is row)
            assert self.cache is not None
            n = len(row.computed)
            kv = torch.stack([torch.stack((k[b, :, :n], v[b, :, :n])) for k, v in self.cache.layers])
            out.append((row, Prefix(tuple(row.computed), kv.cpu() if kv.is_cuda else kv)))
            self._vacate(row, b)
        return out

    @torch.inference_mode()
    def restore(self, row: _Row, saved: Prefix) -> None:
        """Put a row that was set aside back among the decoding rows, its keys and values copied in: it goes on
        from its last token as if it had never left."""
        if self.size + 1 > self.slots:
            raise RuntimeError(f"the batch is full ({self.slots} rows)")
        b, n = len(self.rows), len(saved.tokens)
        with self._joining([row], n + 1):
            assert self.cache is not None
            saved.copy_into(self.cache.layers, b, n)

    @contextlib.contextmanager
    def _joining(self, rows: list[_Row], positions: int) -> Iterator[None]:
        """``rows`` appended to the decoding rows, in the next slots, with the cache grown for ``positions``
        and the filling row moved past them; all undone if the body fails."""
        b, n = len(self.rows), len(rows)
        self.rows.extend(rows)
        moved = False
        try:
            self._reserve(self.size, max(positions, self.filled))
            assert self.cache is not None
            if self.filling is not None:  # it keeps the slot after the decoding rows
                self.cache.move(b, b + n, self.filled)
                moved = True
            yield
        except BaseException:
            del self.rows[b:]
            if moved:
                assert self.cache is not None
                self.cache.move(b + n, b, self.filled)
            raise

    def _vacate(self, row: _Row, b: int) -> None:
        """Take ``row`` out of slot ``b``: the last decoding row moves into it, the filling row down one."""
        last = self.rows[-1]
        if last is not row:
            assert self.cache is not None
            self.cache.move(len(self.rows) - 1, b, len(last.prompt) + len(last.tokens) - 1)
            self.rows[b] = last
        self.rows.pop()
        if self.filling is not None and self.filled:  # it follows the decoding rows down one slot
            assert self.cache is not None
            self.cache.move(len(self.rows) + 1, len(self.rows), self.filled)

    def _keep(self, row: _Row, slot: int) -> None:
        """Copy the keys and values of ``row`` (leaving ``slot``) into the engine's prefix cache."""
        if self.cache is not None and self.engine.prefix_cache.max_tokens:
            self.engine.prefix_cache.store(row.computed, self.cache.layers, slot)
