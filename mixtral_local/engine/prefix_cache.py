"""Prefix caching: the keys and values of finished requests, reused by later prompts that start the same way.

A chat resends its whole conversation every turn, and an agent resends its system prompt and tool
definitions with every call. Without a cache each request prefills all of it again, so the time to the first
token grows with the conversation. When a request ends, its row's keys and values (prompt and answer, every
position the model has seen) are copied out of the batch's KV cache into this store; a later prompt whose
first tokens equal an entry's takes those positions from the entry and prefills only the rest.

Reuse is token-exact: the longest common prefix of token ids, never more than the prompt's length minus one
(the last prompt token is always computed, since its logits pick the first new token). Keys and values at a
position depend only on the tokens up to it, so what is reused is what a fresh prefill would compute (up to
the rounding of a differently shaped matrix product).

The store holds at most ``max_tokens`` positions over all entries (least recently used go first); an entry
that is a prefix of a newer one is dropped, since the newer one serves every prompt the older one did.
Matches shorter than ``MIN_REUSE`` tokens are ignored: every prompt shares ``<s>[INST]``, and reusing a handful
of positions would cost a prompt its place in a batched prefill for nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixtral_local.model import KVPair

__all__ = ["MIN_REUSE", "PREFIX_CACHE_TOKENS", "Prefix", "PrefixCache", "common_prefix"]

MIN_REUSE = 32  # the shortest match worth reusing, in tokens
PREFIX_CACHE_TOKENS = 8192  # positions kept by default: 1 GiB of Mixtral's bf16 keys and values


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: halve until they meet
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[lo:mid]) == list(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True, slots=True, eq=False)
class Prefix:
    """One stored entry: ``tokens`` and their keys and values, ``[layers, 2, Hkv, len(tokens), D]``."""

    tokens: tuple[int, ...]
    kv: torch.Tensor

    def copy_into(self, layers: Sequence[KVPair], slot: int, length: int) -> None:
        """Write this entry's first ``length`` positions into ``slot`` of a KV cache's ``layers``."""
        for i, (k, v) in enumerate(layers):
            k[slot, :, :length] = self.kv[i, 0, :, :length]
            v[slot, :, :length] = self.kv[i, 1, :, :length]


class PrefixCache:
    """Finished rows' keys and values, up to ``max_tokens`` positions in all (0: off). Thread-safe."""

    def __init__(self, max_tokens: int) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(
                f"prefix cache size must be an integer >= 0 (tokens; 0: off), got {max_tokens!r}"
            )
        self.max_tokens = max_tokens
        self._entries: list[Prefix] = []  # least recently used first
        self._lock = threading.Lock()
        self.hits = 0  # prompts whose prefill copied an entry's keys and values (not lookups: see count_hit)

    @property
    def tokens(self) -> int:
        """Positions held, over all entries."""
        with self._lock:
            return sum(len(e.tokens) for e in self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def match(self, prompt: Sequence[int]) -> tuple[Prefix | None, int]:
        """(entry, positions to reuse) for the entry sharing the longest prefix with ``prompt``; (None, 0) when
        none shares ``MIN_REUSE`` tokens. The last prompt token is never reused."""
        limit = len(prompt) - 1
        if limit < MIN_REUSE or not self.max_tokens:
            return None, 0
        with self._lock:
            best, best_len = None, 0
            for entry in self._entries:
                n = min(common_prefix(entry.tokens, prompt), limit)
                if n > best_len:
                    best, best_len = entry, n
            if best is None or best_len < MIN_REUSE:
                return None, 0
            self._entries.remove(best)  # now the most recently used
            self._entries.append(best)
            return best, best_len

    def count_hit(self) -> None:
        """An entry found by ``match`` was copied into a prompt's slot (a live row may have served it instead)."""
        with self._lock:
            self.hits += 1

    def store(self, tokens: Sequence[int], layers: Sequence[KVPair], slot: int) -> None:
        """Copy the first ``len(tokens)`` positions of ``slot`` (of a KV cache's ``layers``) in as an entry for
        ``tokens``; kept to the first ``max_tokens`` of them."""
        n = min(len(tokens), self.max_tokens)
        if n < MIN_REUSE:
            return
        key = tuple(tokens[:n])
        with self._lock:
            if any(len(e.tokens) >= n and e.tokens[:n] == key for e in self._entries):
                return  # an entry already serves every prompt this one would
        kv = torch.stack([torch.stack((k[slot, :, :n], v[slot, :, :n])) for k, v in layers])
        entry = Prefix(key, kv)
        with self._lock:
            self._entries = [
                e for e in self._entries if not (len(e.tokens) <= n and key[: len(e.tokens)] == e.tokens)
            ]
            self._entries.append(entry)
            held = sum(len(e.tokens) for e in self._entries)
            while held > self.max_tokens:
                held -= len(self._entries.pop(0).tokens)
