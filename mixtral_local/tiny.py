"""Tiny random Mixtral checkpoints in the Hugging Face layout, for tests, benchmarks and a first offline run.

The weights are random (deterministic for a seed): the model runs exactly like Mixtral, but its text is
nonsense. ``config.json`` says so (``"mixtral_sdk": {"random_weights": true}``) so tools can warn.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from .config import MixtralConfig
from .tokenizer import v1_tokenizer_path

__all__ = ["TINY_CONFIG", "write_tiny_checkpoint"]

#: the default tiny shape: 32k vocabulary to match the real tokenizer, everything else small
TINY_CONFIG = MixtralConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=1024,
    random_weights=True,
)


def _random_tensors(config: MixtralConfig, seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face names -> fp32 tensors, with experts one by one (w1 gate, w3 up, w2 down)."""
    gen = torch.Generator().manual_seed(seed)
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d

    def linear(rows: int, cols: int) -> torch.Tensor:  # scaled so activations stay O(1) through the layers
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(h, generator=gen)

    out = {"model.embed_tokens.weight": torch.randn(config.vocab_size, h, generator=gen)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = norm()
        out[p + "self_attn.q_proj.weight"] = linear(q, h)
        out[p + "self_attn.k_proj.weight"] = linear(kv, h)
        out[p + "self_attn.v_proj.weight"] = linear(kv, h)
        out[p + "self_attn.o_proj.weight"] = linear(h, q)
        out[p + "post_attention_layernorm.weight"] = norm()
        out[p + "block_sparse_moe.gate.weight"] = linear(config.num_local_experts, h)
        for e in range(config.num_local_experts):
            out[p + f"block_sparse_moe.experts.{e}.w1.weight"] = linear(i, h)
            out[p + f"block_sparse_moe.experts.{e}.w3.weight"] = linear(i, h)
            out[p + f"block_sparse_moe.experts.{e}.w2.weight"] = linear(h, i)
    out["model.norm.weight"] = norm()
    out["lm_head.weight"] = linear(config.vocab_size, h)
    return out


def _stack_experts(tensors: dict[str, torch.Tensor], config: MixtralConfig) -> dict[str, torch.Tensor]:
    """The layout transformers 5 holds in memory: ``mlp.gate`` and ``mlp.experts.gate_up_proj/down_proj``."""
    out = {k: v for k, v in tensors.items() if ".block_sparse_moe." not in k}
    for n in range(config.num_hidden_layers):
        src, dst = f"model.layers.{n}.block_sparse_moe.", f"model.layers.{n}.mlp."
        experts = range(config.num_local_experts)
        out[dst + "gate.weight"] = tensors[src + "gate.weight"]
        out[dst + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{src}experts.{e}.w1.weight"], tensors[f"{src}experts.{e}.w3.weight"]]) for e in experts]
        )
        out[dst + "experts.down_proj"] = torch.stack([tensors[f"{src}experts.{e}.w2.weight"] for e in experts])
    return out


def write_tiny_checkpoint(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    config: MixtralConfig = TINY_CONFIG,
    layout: Literal["per_expert", "stacked"] = "per_expert",
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    **shape: int,
) -> Path:
    """Write a random Mixtral (config.json, safetensors, tokenizer.model) into ``path``; returns the path.

    ``shape`` overrides fields of ``config`` (``hidden_size=256, num_hidden_layers=4, ...``). ``shards`` > 1
    writes ``model-0000k-of-0000n.safetensors`` files and ``model.safetensors.index.json``.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if layout not in ("per_expert", "stacked"):
        raise ValueError(f"layout must be 'per_expert' or 'stacked', got {layout!r}")
    config = replace(config, random_weights=True, **shape)
    tensors = _random_tensors(config, seed)
    if layout == "stacked":
        tensors = _stack_experts(tensors, config)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(v1_tokenizer_path(), root / "tokenizer.model")
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata=meta)
        return root
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, str(root / file), metadata=meta)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return root
