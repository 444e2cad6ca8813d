"""The shape of a Mixtral model, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtral_client._exceptions import ConfigurationError

__all__ = ["CheckpointError", "MixtralConfig"]


class CheckpointError(ConfigurationError):
    """A checkpoint cannot be used: missing, corrupt, truncated, mismatched or too large for the device."""


_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True, slots=True)
class MixtralConfig:
    """Defaults are Mixtral-8x7B's."""

    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    vocab_size: int = 32000
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    #: written by ``write_tiny_checkpoint``: the weights are random, the text will be nonsense
    random_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                     "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise CheckpointError(
                f"config: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"config: head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | Path) -> MixtralConfig:
        """From a ``config.json`` dict, its path, or the checkpoint directory holding it."""
        where = "config.json"
        if not isinstance(source, Mapping):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            try:
                source = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise CheckpointError(f"{where}: no such file (a Hugging Face checkpoint needs config.json)") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(source, Mapping):
                raise CheckpointError(f"{where}: expected a JSON object")
        hf = source
        model_type = hf.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise CheckpointError(f"{where}: model_type is {model_type!r}, expected 'mixtral'")
        missing = [k for k in _REQUIRED if k not in hf]
        if missing:
            raise CheckpointError(f"{where}: missing {', '.join(missing)}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"{where}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
        theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
        heads = hf["num_attention_heads"]
        max_pos = hf.get("max_position_embeddings", 32768)
        window = hf.get("sliding_window")
        if window:
            # a window at least as long as the sequence changes nothing: serve no more than the window
            max_pos = min(max_pos, int(window))
        extra = hf.get("mixtral_sdk") or {}
        return cls(
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            num_local_experts=hf.get("num_local_experts", 8),
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            vocab_size=hf["vocab_size"],
            max_position_embeddings=max_pos,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=_first_id(hf.get("bos_token_id"), 1),
            eos_token_id=_first_id(hf.get("eos_token_id"), 2),
            random_weights=bool(extra.get("random_weights", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` transformers reads (``MixtralForCausalLM``)."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "sliding_window": None,
            "mixtral_sdk": {"random_weights": self.random_weights},
        }


def _first_id(value: Any, default: int) -> int:
    """A token id from config.json, which may give none, one, or a list of them."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else default
