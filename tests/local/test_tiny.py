"""Tiny random checkpoints and the init-tiny command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mixtral_local
from mixtral_local.cli import init_tiny_main
from mixtral_local.config import MixtralConfig
from mixtral_local.tiny import write_tiny_checkpoint


def test_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    a = write_tiny_checkpoint(tmp_path / "a", seed=5, vocab_size=500)
    b = write_tiny_checkpoint(tmp_path / "b", seed=5, vocab_size=500)
    c = write_tiny_checkpoint(tmp_path / "c", seed=6, vocab_size=500)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]


def test_checkpoint_has_the_hf_layout_and_says_its_weights_are_random(tmp_path: Path) -> None:
    root = write_tiny_checkpoint(tmp_path / "t")
    assert {p.name for p in root.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    config = MixtralConfig.from_hf(root)
    assert config.random_weights and config.vocab_size == 32000
    assert json.loads((root / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_init_tiny_main_writes_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = init_tiny_main(str(tmp_path / "demo"), seed=1)
    assert (root / "model.safetensors").is_file()
    assert "RANDOM weights" in capsys.readouterr().out


def test_public_names_are_exported() -> None:
    for name in mixtral_local.__all__:
        assert getattr(mixtral_local, name) is not None
    assert sorted(mixtral_local.__all__) == mixtral_local.__all__


def test_importing_mixtral_local_does_not_import_torch() -> None:
    code = "import sys, mixtral_local; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
