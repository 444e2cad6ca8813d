"""Mixtral as one small, flat module: embeddings, N x (attention + sparse MoE), norm, head.

Shapes: B batch, S new tokens, T cached positions, H hidden, D head dim, E experts, I expert width, V vocab.

``model(input_ids)`` is a plain causal forward over whole sequences ([B, S] -> logits [B, S, V]). With a
KV cache (one ``(k, v)`` pair of ``[B, Hkv, T_max, D]`` per layer) it writes the new keys and values at
``positions`` and attends over the first ``kv_len`` cached positions: a prefill from position 0, or one
decode step per row (S == 1), each row at its own position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MixtralConfig
from .kernels import MoEFn, Quantize, moe_reference, route
from .kernels.reference import expert_linear

__all__ = ["KVPair", "MixtralModel", "moe_one_token"]

KVPair = tuple[Tensor, Tensor]  # (k, v), each [B, Hkv, T_max, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused kernel; the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_size, self.kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)  # q, k, v rows
        self.wo = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache: KVPair | None,
                kv_len: int) -> Tensor:
        b, s, _ = x.shape
        qkv = self.wqkv(x).view(b, s, self.n_head + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        qk, v = qkv[:, : self.n_head + self.n_kv], qkv[:, self.n_head + self.n_kv:]  # [B, Hq+Hkv, S, D], [B, Hkv, S, D]
        qk = qk * cos + rotate_half(qk) * sin  # RoPE on queries and keys at once
        q, k = qk[:, : self.n_head], qk[:, self.n_head:]  # [B, Hq, S, D], [B, Hkv, S, D]
        mask = None
        if cache is not None:
            k_cache, v_cache = cache
            if b == 1:
                k_cache[0].index_copy_(1, positions[0], k[0])  # [Hkv, S, D] into [Hkv, T_max, D]
                v_cache[0].index_copy_(1, positions[0], v[0])
            else:
                rows = torch.arange(b, device=x.device)[:, None]  # [B, 1]
                k_cache[rows, :, positions] = k.transpose(1, 2)  # [B, S, Hkv, D]
                v_cache[rows, :, positions] = v.transpose(1, 2)
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]  # [B, Hkv, T, D]
            if kv_len != s and (b > 1 or s > 1):  # rows at different positions: each sees its own prefix
                mask = (torch.arange(kv_len, device=x.device) <= positions[..., None])[:, None]  # [B, 1, S, T]
        causal = mask is None and s > 1  # a fresh prefill: position j sees 0..j
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_head)  # [B, Hq, S, D]
        return self.wo(y.transpose(1, 2).reshape(b, s, self.q_size))


def moe_one_token(x: Tensor, w13: Tensor, w2: Tensor, router_logits: Tensor, top_k: int, *,
                  w13_scale: Tensor | None = None, w2_scale: Tensor | None = None) -> Tensor:
    """``moe_reference`` for a single token [1, H]: the k chosen experts indexed directly, no bookkeeping."""
    weights, ids = route(router_logits, top_k)  # [1, k], [1, k]
    out = None
    for weight, e in zip(weights[0].tolist(), ids[0].tolist(), strict=True):
        gate, up = expert_linear(x, w13, w13_scale, e).chunk(2, dim=-1)  # [1, I] each
        y = expert_linear(F.silu(gate) * up, w2, w2_scale, e) * weight  # [1, H]
        out = y if out is None else out + y
    return out if out is not None else torch.zeros_like(x)


class SparseMoE(nn.Module):
    """The router and the stacked experts. With ``quantize="int8"`` the experts are int8 with one scale per
    output row (``w13_scale`` [E, 2I], ``w2_scale`` [E, H], in the model's dtype); else both scales are None."""

    w13_scale: nn.Parameter | None
    w2_scale: nn.Parameter | None

    def __init__(self, config: MixtralConfig, moe_fn: MoEFn, quantize: Quantize | None = None) -> None:
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(h, e, bias=False)  # router
        int8 = {"dtype": torch.int8} if quantize == "int8" else {}
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, **int8), requires_grad=not int8)  # gate rows, up rows
        self.w2 = nn.Parameter(torch.empty(e, h, i, **int8), requires_grad=not int8)  # down
        self.register_parameter("w13_scale", nn.Parameter(torch.empty(e, 2 * i)) if int8 else None)
        self.register_parameter("w2_scale", nn.Parameter(torch.empty(e, h)) if int8 else None)
        self.moe_fn = moe_fn

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [M, H]
        moe = moe_one_token if x.shape[0] == 1 and self.moe_fn is moe_reference else self.moe_fn
        return moe(x, self.w13, self.w2, self.gate(x), self.top_k,
                   w13_scale=self.w13_scale, w2_scale=self.w2_scale).view(shape)


class Block(nn.Module):
    def __init__(self, config: MixtralConfig, moe_fn: MoEFn, quantize: Quantize | None = None) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = SparseMoE(config, moe_fn, quantize)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache: KVPair | None,
                kv_len: int) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, positions, cache, kv_len)
        return x + self.moe(self.ffn_norm(x))


class MixtralModel(nn.Module):
    def __init__(self, config: MixtralConfig, moe_fn: MoEFn = moe_reference, quantize: Quantize | None = None) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, moe_fn, quantize) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", self.rope_inv_freq(), persistent=False)

    def rope_inv_freq(self, device: torch.device | str | None = None) -> Tensor:
        """theta^(-2j/D) for j < D/2, in fp32 (computed as transformers does, so logits match it)."""
        d = self.config.head_dim
        return 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d))

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: Sequence[KVPair] | None = None,
                kv_len: int | None = None, last_only: bool = False, last: Tensor | None = None,
                logits: bool = True) -> Tensor:
        """input_ids [B, S] -> logits [B, S, V] (or [B, 1, V] with ``last_only``, or at ``last`` [B]: each
        row's own last position, for right-padded prompts of different lengths). With ``logits=False`` the
        final normed hidden states [B, S, H] instead: ``self.output`` of them is the logits, for a caller that
        takes them a slice of positions at a time.

        ``positions`` [B, S] defaults to 0..S-1; ``kv_len`` (with a cache) to max(positions) + 1.
        """
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        kv_len = s if cache is None else (kv_len if kv_len is not None else int(positions.max()) + 1)
        freqs = positions[..., None].float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
        x = self.tok_embeddings(input_ids)  # [B, S, H]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions, None if cache is None else cache[i], kv_len)
        if last is not None:
            x = x[torch.arange(b, device=x.device), last][:, None]  # [B, 1, H]
        elif last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return self.output(x) if logits else x  # [B, S, V] or [B, S, H]
