"""The KV cache: one ``(k, v)`` pair of ``[slots, Hkv, T, D]`` per layer, grown on demand."""

from __future__ import annotations

import torch

from mixtral_local.config import MixtralConfig
from mixtral_local.model import KVPair

__all__ = ["KVCache"]


class KVCache:
    """Room for ``batch`` sequences (slots) of up to ``length`` positions.

    Zeroed rather than empty: a row attends over positions up to the longest row through a mask, and a
    masked-out NaN left in memory would still poison the weighted sum. What a finished row leaves in a slot
    is finite, so a slot can be reused without clearing it. ``reserve()`` grows the cache by copying into a
    larger allocation, so a generation holds memory for the positions it has reached, not for the ones it
    might reach.
    """

    def __init__(self, config: MixtralConfig, batch: int, length: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.config, self.dtype, self.device = config, dtype, device
        self.batch, self.length = batch, length
        self.layers: list[KVPair] = [self._zeros(batch, length) for _ in range(config.num_hidden_layers)]

    def _zeros(self, batch: int, length: int) -> KVPair:
        shape = (batch, self.config.num_key_value_heads, length, self.config.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    def reserve(self, batch: int, length: int) -> None:
        """Make room for at least ``batch`` slots of ``length`` positions, keeping what is cached."""
        if batch <= self.batch and length <= self.length:
            return
        batch, length = max(batch, self.batch), max(length, self.length)
        for i, (k, v) in enumerate(self.layers):
            new_k, new_v = self._zeros(batch, length)
            new_k[: self.batch, :, : self.length] = k
            new_v[: self.batch, :, : self.length] = v
            self.layers[i] = (new_k, new_v)  # the old pair is freed here, one layer at a time
        self.batch, self.length = batch, length

    def resize(self, batch: int, length: int) -> None:
        """Exactly ``batch`` slots of ``length`` positions, keeping the first slots and positions that fit: a
        cache grown for rows that have left gives back the slots they held (the live rows are the first)."""
        if (batch, length) == (self.batch, self.length):
            return
        keep_b, keep_t = min(batch, self.batch), min(length, self.length)
        for i, (k, v) in enumerate(self.layers):
            new_k, new_v = self._zeros(batch, length)
            new_k[:keep_b, :, :keep_t] = k[:keep_b, :, :keep_t]
            new_v[:keep_b, :, :keep_t] = v[:keep_b, :, :keep_t]
            self.layers[i] = (new_k, new_v)
        self.batch, self.length = batch, length

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        for k, v in self.layers:
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def slots(self, start: int, n: int) -> list[KVPair]:
        """Views of slots ``start .. start + n - 1``: a prefill or a decode step writes through them."""
        if start == 0 and n == self.batch:
            return self.layers
        return [(k[start:start + n], v[start:start + n]) for k, v in self.layers]

    @staticmethod
    def nbytes(config: MixtralConfig, batch: int, length: int, dtype: torch.dtype) -> int:
        per_layer = 2 * batch * config.num_key_value_heads * length * config.head_dim
        return per_layer * config.num_hidden_layers * dtype.itemsize
