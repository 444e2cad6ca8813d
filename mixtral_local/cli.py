"""The ``mixtral local ...`` commands the main CLI delegates to."""

from __future__ import annotations

import sys
from pathlib import Path

from .tiny import write_tiny_checkpoint

__all__ = ["init_tiny_main"]


def init_tiny_main(path: str, *, seed: int = 0) -> Path:
    """``mixtral local init-tiny DIR``: write a tiny random Mixtral (HF layout + tokenizer) and say so."""
    root = write_tiny_checkpoint(path, seed=seed)
    sys.stdout.write(
        f"wrote a tiny Mixtral with RANDOM weights (seed {seed}) to {root}: it runs like Mixtral but its text is "
        f"noise. Try: MIXTRAL_MODEL_PATH={root} mixtral chat 'Hello'\n"
    )
    return root
