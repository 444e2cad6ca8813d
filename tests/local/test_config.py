"""MixtralConfig from Hugging Face config.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral_local.config import CheckpointError, MixtralConfig

# mistralai/Mixtral-8x7B-Instruct-v0.1 config.json as published
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_from_hf_reads_mixtral_8x7b_config() -> None:
    assert MixtralConfig.from_hf(MIXTRAL_8X7B) == MixtralConfig()


def test_from_hf_reads_what_transformers_5_writes() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralConfig(hidden_size=96, intermediate_size=40, num_hidden_layers=3,
                                    num_attention_heads=6, num_key_value_heads=3, num_local_experts=5,
                                    num_experts_per_tok=3, vocab_size=500, rope_theta=500.0, rms_norm_eps=1e-6)
    config = MixtralConfig.from_hf(hf.to_dict())
    assert (config.head_dim, config.num_local_experts, config.num_experts_per_tok) == (16, 5, 3)
    assert (config.rope_theta, config.rms_norm_eps, config.vocab_size) == (500.0, 1e-6, 500)


def test_from_hf_takes_an_explicit_head_dim() -> None:
    config = MixtralConfig.from_hf({**MIXTRAL_8X7B, "hidden_size": 256, "head_dim": 64})
    assert config.head_dim == 64


def test_from_hf_serves_no_more_than_the_sliding_window() -> None:
    assert MixtralConfig.from_hf({**MIXTRAL_8X7B, "sliding_window": 4096}).max_position_embeddings == 4096


def test_from_hf_reads_a_checkpoint_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    assert MixtralConfig.from_hf(tmp_path) == MixtralConfig()


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_key_value_heads": 5}, "multiple"),
    ({"num_experts_per_tok": 9}, "exceeds"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_from_hf_refuses_configs_it_cannot_run(change: dict[str, object], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        MixtralConfig.from_hf({**MIXTRAL_8X7B, **change})


def test_from_hf_names_a_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        MixtralConfig.from_hf(tmp_path)


def test_to_hf_round_trips() -> None:
    config = MixtralConfig(hidden_size=64, head_dim=8, num_local_experts=4, random_weights=True)
    assert MixtralConfig.from_hf(config.to_hf()) == config
