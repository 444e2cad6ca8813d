"""The preallocated KV cache: one zeroed ``(k, v)`` pair of ``[B, Hkv, T, D]`` per layer."""

from __future__ import annotations

import torch

from mixtral_local.config import MixtralConfig
from mixtral_local.model import KVPair

__all__ = ["KVCache"]


class KVCache:
    """Room for ``batch`` sequences of up to ``length`` positions, allocated once per generation.

    Zeroed rather than empty: a row attends over positions up to the longest row through a mask, and a
    masked-out NaN left in memory would still poison the weighted sum.
    """

    def __init__(self, config: MixtralConfig, batch: int, length: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, config.num_key_value_heads, length, config.head_dim)
        self.layers: list[KVPair] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self.batch, self.length = batch, length

    def row(self, b: int) -> list[KVPair]:
        """Views of row ``b`` alone ([1, Hkv, T, D]): a prefill writes through them."""
        return [(k[b:b + 1], v[b:b + 1]) for k, v in self.layers]

    @staticmethod
    def nbytes(config: MixtralConfig, batch: int, length: int, dtype: torch.dtype) -> int:
        per_layer = 2 * batch * config.num_key_value_heads * length * config.head_dim
        return per_layer * config.num_hidden_layers * dtype.itemsize
