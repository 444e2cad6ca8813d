"""Generation: a growable KV cache, pure sampling functions, stop strings, the prefill/decode loop, and the
scheduler that decodes concurrent requests in one running batch."""

from .engine import Completion, Delta, Engine, TokenLogprob
from .kv_cache import KVCache
from .sampling import (
    SamplingParams,
    apply_penalties,
    apply_repetition_penalty,
    bias_vector,
    logits_to_probs,
    sample,
)
from .scheduler import Scheduler, Ticket
from .stops import StopMatcher

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "KVCache",
    "SamplingParams",
    "Scheduler",
    "StopMatcher",
    "Ticket",
    "TokenLogprob",
    "apply_penalties",
    "apply_repetition_penalty",
    "bias_vector",
    "logits_to_probs",
    "sample",
]
