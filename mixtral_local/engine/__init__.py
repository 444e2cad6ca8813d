"""Generation: a preallocated KV cache, pure sampling functions, stop strings, and the prefill/decode loop."""

from .engine import Completion, Delta, Engine
from .kv_cache import KVCache
from .sampling import SamplingParams, apply_penalties, logits_to_probs, sample
from .stops import StopMatcher

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "KVCache",
    "SamplingParams",
    "StopMatcher",
    "apply_penalties",
    "logits_to_probs",
    "sample",
]
