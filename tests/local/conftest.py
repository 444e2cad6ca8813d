"""Fixtures for the local backend: tiny random checkpoints written by our own code, in the HF layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtral_client._config import ClientConfig, resolve_config
from mixtral_client._request import ChatRequest, RequestOptions, build_request
from mixtral_client._timeouts import DEFAULT_TIMEOUT
from mixtral_local.engine import Engine
from mixtral_local.loader import load_model
from mixtral_local.tiny import write_tiny_checkpoint
from mixtral_local.tokenizer import MixtralTokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Mixtral (hidden 64, 2 layers, 4 experts, 32k vocabulary), per-expert layout."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tokenizer() -> MixtralTokenizer:
    return MixtralTokenizer.from_pretrained(None)


@pytest.fixture(scope="session")
def engine(tiny_dir: Path, tokenizer: MixtralTokenizer) -> Engine:
    return Engine(load_model(tiny_dir, dtype="float32", device="cpu"), tokenizer)


@pytest.fixture(scope="session")
def local_config(tiny_dir: Path) -> ClientConfig:
    return resolve_config({}, provider="local", model_path=str(tiny_dir),
                          local_options={"dtype": "float32", "device": "cpu"})


@pytest.fixture(scope="session")
def make_request(local_config: ClientConfig) -> Callable[..., ChatRequest]:
    def make(messages: Any, *, stream: bool = False, extra_body: dict[str, Any] | None = None,
             **params: Any) -> ChatRequest:
        options = RequestOptions(timeout=DEFAULT_TIMEOUT, extra_body=extra_body or {})
        return build_request(local_config.preset, model=None, messages=messages, stream=stream, options=options,
                             params=params)

    return make


@pytest.fixture(scope="session")
def hf_model() -> Callable[..., Any]:
    """Loads transformers' MixtralForCausalLM on one of our checkpoints: the oracle."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    def load(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
        model = transformers.MixtralForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        return model.to(device).eval()

    return load
