"""The generation loop: refuse what does not fit, prefill each prompt, then decode all rows together.

An ``Engine`` holds only the model and tokenizer; each generation allocates its own KV cache, so several
threads may generate at once. ``stream()`` yields ``Delta`` objects as tokens arrive (text that is safe to
show: whole UTF-8 characters, nothing that could begin a stop string); ``generate()`` collects them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mixtral_client._exceptions import InvalidRequestError
from mixtral_local.model import MixtralModel
from mixtral_local.tokenizer import IncrementalDetokenizer, MixtralTokenizer

from .kv_cache import KVCache
from .sampling import SamplingParams, sample
from .stops import StopMatcher

__all__ = ["Completion", "Delta", "Engine"]


@dataclass(frozen=True, slots=True)
class Delta:
    """What one step produced for request ``index``: new text, and on its last delta the finish reason."""

    index: int
    text: str
    finish_reason: str | None  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
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
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


class Engine:
    def __init__(self, model: MixtralModel, tokenizer: MixtralTokenizer) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                             f"{model.config.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.max_position_embeddings
        self.device = model.output.weight.device
        self.dtype = model.output.weight.dtype

    def budget(self, prompt_len: int, max_tokens: int | None) -> int:
        """How many tokens a request may generate; refuses a prompt that does not fit the context."""
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="messages", provider="local")
        if prompt_len >= self.context:
            raise InvalidRequestError(
                f"the prompt is {prompt_len} tokens; the model's context is {self.context} tokens, "
                "leaving no room for a completion", param="messages", provider="local")
        if max_tokens is None:
            return self.context - prompt_len
        if prompt_len + max_tokens > self.context:
            raise InvalidRequestError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is {prompt_len + max_tokens} "
                f"tokens; the model's context is {self.context} tokens", param="max_tokens", provider="local")
        return max_tokens

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 ) -> list[Completion]:
        """Generate for every prompt together; one ``Completion`` per prompt, in order."""
        out = [Completion("", None, len(p)) for p in prompts]
        rows = self._rows(prompts, params)
        for delta in self._run(rows, None):
            out[delta.index].text += delta.text
            out[delta.index].finish_reason = delta.finish_reason
        for row, completion in zip(rows, out, strict=True):
            completion.token_ids = row.tokens
        return out

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
               should_stop: Callable[[], bool] | None = None) -> Iterator[Delta]:
        """Deltas as tokens arrive; ends early (without finish reasons) once ``should_stop()`` is true.

        The prompts are checked before the first delta, so a refusal raises on the first ``next()``.
        """
        return self._run(self._rows(prompts, params), should_stop)

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
            rows.append(_Row(i, list(prompt), p, self.budget(len(prompt), p.max_tokens),
                             self.tokenizer.detokenizer(), StopMatcher(p.stop), generator, counts))
        return rows

    @torch.inference_mode()
    def _forward(self, ids: list[list[int]], positions: list[list[int]], cache: Sequence[tuple[torch.Tensor, ...]],
                 kv_len: int) -> torch.Tensor:
        t_ids = torch.tensor(ids, device=self.device)
        t_pos = torch.tensor(positions, device=self.device)
        return self.model(t_ids, t_pos, cache, kv_len, last_only=True)[:, -1]  # [B, V]

    def _accept(self, row: _Row, token: int) -> Delta:
        """Take one sampled token for ``row``: text, stop strings, EOS and the length limit."""
        row.tokens.append(token)
        if row.counts is not None:
            row.counts[token] += 1
        text = ""
        if token == self.tokenizer.eos_id:
            row.finish = "stop"
        else:
            text = row.stops.feed(row.detok.push(token))
            if row.stops.stopped:
                row.finish = "stop"
            elif len(row.tokens) >= row.max_new:
                row.finish = "length"
        if row.finish is not None and not row.stops.stopped:
            text += row.stops.feed(row.detok.flush()) + row.stops.flush()
            if row.stops.stopped:
                row.finish = "stop"
        return Delta(row.index, text, row.finish, len(row.prompt), len(row.tokens))

    def _run(self, rows: list[_Row], should_stop: Callable[[], bool] | None) -> Iterator[Delta]:
        length = max(len(r.prompt) + r.max_new for r in rows)
        with torch.inference_mode():
            cache = KVCache(self.model.config, len(rows), length, dtype=self.dtype, device=self.device)
        for b, row in enumerate(rows):
            if should_stop is not None and should_stop():
                return
            logits = self._forward([row.prompt], [list(range(len(row.prompt)))], cache.row(b), len(row.prompt))
            yield self._accept(row, sample(logits[0], row.params, row.counts, row.generator))
        while any(r.finish is None for r in rows):
            if should_stop is not None and should_stop():
                return
            # each row feeds its last token; finished rows ride along, repeating their last step (ignored)
            ids = [[r.tokens[-1]] for r in rows]
            pos = [[len(r.prompt) + len(r.tokens) - 1] for r in rows]
            kv_len = max(p[0] for p in pos) + 1
            logits = self._forward(ids, pos, cache.layers, kv_len)
            for b, row in enumerate(rows):
                if row.finish is None:
                    yield self._accept(row, sample(logits[b], row.params, row.counts, row.generator))
