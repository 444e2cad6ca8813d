"""The ``mixtral local ...`` commands the main CLI delegates to."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .tiny import write_tiny_checkpoint

__all__ = ["describe", "init_tiny_main"]


def init_tiny_main(path: str, *, seed: int = 0) -> Path:
    """``mixtral local init-tiny DIR``: write a tiny random Mixtral (HF layout + tokenizer) and say so."""
    root = write_tiny_checkpoint(path, seed=seed)
    sys.stdout.write(
        f"wrote a tiny Mixtral with RANDOM weights (seed {seed}) to {root}: it runs like Mixtral but its text is "
        f"noise. Try: MIXTRAL_MODEL_PATH={root} mixtral chat 'Hello'\n"
    )
    return root


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def describe(config: Any) -> list[tuple[str, str]]:
    """``mixtral doctor``'s lines for local weights: the checkpoint as checked, and where and how it would load
    (nothing is allocated; a checkpoint that fails its check raises, naming the file)."""
    import torch

    from .backend import LocalOptions
    from .checkpoint import free_memory
    from .loader import check_checkpoint

    options = LocalOptions.from_config(config)
    plan = check_checkpoint(options.path, dtype=options.dtype, device=options.device,
                            moe_backend=options.moe_backend, quantize=options.quantize)
    shape = plan.config
    how = str(plan.dtype).removeprefix("torch.") + (", experts in int8" if plan.quantize else "")
    free = free_memory(plan.device)
    where = str(plan.device)
    if plan.device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(plan.device)})"
    rows = [
        ("checkpoint", f"{plan.root}" + ("  (RANDOM weights: answers are noise)" if shape.random_weights else "")),
        ("shape", f"{shape.num_hidden_layers} layers, {shape.num_local_experts} experts (top {shape.num_experts_per_tok}), "
                  f"hidden {shape.hidden_size}, vocabulary {shape.vocab_size}"),
        ("weights", f"{_gib(plan.needed_bytes())} in {how} on {where}"
                    + (f", {_gib(free)} free" if free is not None else "")),
        ("moe", "fused Triton kernel" if getattr(plan.moe_fn, "__name__", "") == "fused_moe" else "torch reference"),
        ("batch", f"up to {options.max_batch} rows; KV cache "
                  + (f"bound {_gib(options.kv_cache_memory)}" if options.kv_cache_memory else
                     "bound: auto (on a GPU, what the weights leave free)" if plan.device.type == "cuda" else
                     "unbound (CPU)")),
    ]
    return rows
