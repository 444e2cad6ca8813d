"""Mixtral-8x7B-Instruct on local weights: config, loader, tokenizer, model, generation engine, kernels.

Importing this package is light: torch and friends load when a name below is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import CheckpointError, MixtralConfig
    from .engine import Completion, Engine, SamplingParams
    from .loader import load_model
    from .model import MixtralModel
    from .tiny import write_tiny_checkpoint
    from .tokenizer import MixtralTokenizer

__all__ = [
    "CheckpointError",
    "Completion",
    "Engine",
    "MixtralConfig",
    "MixtralModel",
    "MixtralTokenizer",
    "SamplingParams",
    "load_model",
    "write_tiny_checkpoint",
]

_HOME = {
    "CheckpointError": "config",
    "MixtralConfig": "config",
    "Completion": "engine",
    "Engine": "engine",
    "SamplingParams": "engine",
    "load_model": "loader",
    "MixtralModel": "model",
    "write_tiny_checkpoint": "tiny",
    "MixtralTokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
