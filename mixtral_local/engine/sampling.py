"""Sampling as side-effect-free functions of one row of logits.

Order: penalties (repetition, presence, frequency) and ``logit_bias`` on the raw logits, then temperature,
top-k, top-p, min-p, and a draw from the request's own generator (so a seeded request samples the same tokens alone or in a batch). Temperature 0 is greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MAX_LOGPROBS", "SamplingParams", "apply_penalties", "apply_repetition_penalty", "bias_vector",
           "logits_to_probs", "sample"]

MAX_LOGPROBS = 20  # the most alternatives a token's log probabilities list (OpenAI's top_logprobs limit)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """OpenAI's sampling parameters (and top_k); ``max_tokens=None`` means up to the end of the context."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one's probability; 0: off
    repetition_penalty: float = 1.0  # transformers' / vLLM's: over the prompt's and the answer's tokens; 1: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # an llguidance grammar the answer must follow (see ``grammar.py``)
    lazy_marker: str | None = None  # the grammar holds only while the answer may open with this (``Constraint``)
    logprobs: int | None = None  # None: none; k: each token's log probability and the k most likely (0-20)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), -100 to 100

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be between 0 and 1, got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be between 0 and 1, got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        for token, bias in self.logit_bias:
            if token < 0 or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: token {token}, bias {bias}: ids are >= 0, biases -100 to 100")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' and vLLM's repetition penalty: each token ``seen`` (bool [V]: in the prompt or the answer)
    has its logit divided by ``penalty`` when positive, multiplied when negative (less likely for penalty > 1)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def apply_penalties(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties: logit[t] -= frequency * count[t] + presence * (count[t] > 0). Shapes [V]."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def logits_to_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> Tensor:
    """[V] logits -> [V] probabilities after temperature, top-k, top-p (nucleus) and min-p filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    if min_p > 0:  # the most likely token always stays
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def bias_vector(params: SamplingParams, vocab_size: int, device: torch.device | str = "cpu") -> Tensor | None:
    """``params.logit_bias`` as a [V] float32 vector to add to the logits; None when there is none."""
    if not params.logit_bias:
        return None
    ids, values = zip(*params.logit_bias, strict=True)
    if max(ids) >= vocab_size:
        raise ValueError(f"logit_bias: token {max(ids)} is not in the vocabulary ({vocab_size} tokens)")
    vector = torch.zeros(vocab_size, dtype=torch.float32)
    vector[list(ids)] = torch.tensor(values, dtype=torch.float32)
    return vector.to(device)


def sample(logits: Tensor, params: SamplingParams, counts: Tensor | None = None,
           generator: torch.Generator | None = None, bias: Tensor | None = None, seen: Tensor | None = None,
           ) -> int:
    """The next token for one row of logits [V]; ``counts`` [V]: how often each token was generated so far;
    ``bias`` [V]: added to the logits (``bias_vector(params)``: OpenAI's ``logit_bias``); ``seen`` (bool [V]):
    the tokens of the prompt and the answer so far, for ``repetition_penalty``."""
    if seen is not None and params.repetition_penalty != 1:
        logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if counts is not None and params.penalized:
        logits = apply_penalties(logits, counts, params.presence_penalty, params.frequency_penalty)
    if bias is not None:
        logits = logits.float() + bias
    if params.greedy:
        return int(torch.argmax(logits))
    probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    return int(torch.multinomial(probs, 1, generator=generator))
