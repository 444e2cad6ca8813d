"""Tile configurations of the fused MoE kernel: tuned JSON tables per shape and GPU, else a heuristic.

A table lives in ``configs/`` beside this module, one file per (E, N, K, dtype, device)::

    E=8,N=14336,K=4096,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json

with N the expert FFN width I, K the hidden size H and device ``torch.cuda.get_device_name()`` with spaces
as underscores. It maps M (tokens per call) to a config; a call takes the entry of the nearest listed M.
``benchmarks/tune_moe.py`` writes these files. A folder named by ``MIXTRAL_MOE_CONFIG_DIR`` is searched
before the package's, so a table tuned on one's own GPU is used without writing into site-packages. Shapes
or GPUs without a table use ``heuristic_config``, and say so once per (shape, dtype, device) through
``logging``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "CONFIG_DIR",
    "CONFIG_DIR_ENV",
    "MoEConfig",
    "config_dirs",
    "config_file_name",
    "device_name",
    "get_config",
    "heuristic_config",
    "load_config_table",
]

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_DIR_ENV = "MIXTRAL_MOE_CONFIG_DIR"  # a folder of tuned tables, searched before CONFIG_DIR


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class MoEConfig:
    """One launch configuration, shared by the w13 and the w2 kernel (they share the expert-sorted blocks).

    BLOCK_SIZE_N counts the w13 rows one program reads: half gate rows, half the matching up rows.
    """

    BLOCK_SIZE_M: int
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    GROUP_SIZE_M: int = 1
    num_warps: int = 4
    num_stages: int = 3
    USE_TMA: int = 0  # 1: operand tiles through tensor descriptors (Hopper's TMA), where the operands allow

    def __post_init__(self) -> None:
        for name in ("BLOCK_SIZE_M", "BLOCK_SIZE_K"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or not _is_power_of_two(value):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value!r}")
        n = self.BLOCK_SIZE_N
        if not isinstance(n, int) or n < 32 or not _is_power_of_two(n):
            raise ValueError(f"BLOCK_SIZE_N must be a power of two >= 32 (two halves of >= 16), got {n!r}")
        if not isinstance(self.GROUP_SIZE_M, int) or self.GROUP_SIZE_M < 1:
            raise ValueError(f"GROUP_SIZE_M must be a positive int, got {self.GROUP_SIZE_M!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be an int in 1..8, got {self.num_stages!r}")
        if self.USE_TMA not in (0, 1):  # True and False pass too (they are 1 and 0)
            raise ValueError(f"USE_TMA must be 0 or 1, got {self.USE_TMA!r}")
        if self.USE_TMA and max(self.BLOCK_SIZE_N, self.BLOCK_SIZE_K) > 256:  # a TMA box side is <= 256
            raise ValueError(
                f"USE_TMA takes BLOCK_SIZE_N and BLOCK_SIZE_K <= 256, got {self.BLOCK_SIZE_N}, {self.BLOCK_SIZE_K}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> MoEConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown MoE config keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TypeError as err:  # a required key is missing
            raise ValueError(f"incomplete MoE config {dict(values)}: {err}") from None

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def device_name(device: torch.device) -> str:
    """The GPU's marketing name as used in config file names ("NVIDIA_H100_80GB_HBM3"); "cpu" off CUDA."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_file_name(n_experts: int, n: int, k: int, dtype: torch.dtype, device: str) -> str:
    return f"E={n_experts},N={n},K={k},dtype={_dtype_name(dtype)},device={device}.json"


def config_dirs() -> tuple[Path, ...]:
    """Where tables are looked for, first match wins: ``$MIXTRAL_MOE_CONFIG_DIR`` (when set), then the package's."""
    user = os.environ.get(CONFIG_DIR_ENV)
    return (Path(user).expanduser(), CONFIG_DIR) if user else (CONFIG_DIR,)


def load_config_table(
    n_experts: int, n: int, k: int, dtype: torch.dtype, device: str
) -> Mapping[int, MoEConfig] | None:
    """The tuned table {M: config} for this shape, dtype and device, or None when no folder holds one."""
    name = config_file_name(n_experts, n, k, dtype, device)
    for folder in config_dirs():
        path = folder / name
        if path.is_file():
            return _read_table(path)
    return None


@functools.cache
def _read_table(path: Path) -> Mapping[int, MoEConfig]:
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"expected an object of M -> config, got {type(raw).__name__}")
        return {int(m): MoEConfig.from_dict(entry) for m, entry in raw.items()}
    except (ValueError, TypeError) as err:  # JSONDecodeError, a non-int M, an entry that is no config
        raise ValueError(f"bad fused-MoE config table {path}: {err}") from None


def heuristic_config(m: int, n_experts: int, top_k: int) -> MoEConfig:
    """A reasonable config from the tokens each expert receives, modelled on tuned Hopper tables."""
    tokens_per_expert = m * top_k / n_experts
    if tokens_per_expert <= 16:  # decode: weight-bandwidth bound, thin tiles, deep pipeline
        return MoEConfig(
            BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4
        )
    if tokens_per_expert <= 128:
        return MoEConfig(
            BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=4
        )
    return MoEConfig(
        BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=16, num_warps=8, num_stages=4
    )


@functools.cache
def _log_fallback_once(file_name: str) -> None:
    logger.warning(
        "no tuned fused-MoE config %s in %s; using heuristic tiles (run benchmarks/tune_moe.py on this GPU)",
        file_name,
        CONFIG_DIR,
    )


def get_config(
    m: int, n_experts: int, n: int, k: int, top_k: int, dtype: torch.dtype, device: str
) -> MoEConfig:
    """The tuned config of the nearest tabled M for this shape and device, else the heuristic (logged once)."""
    table = load_config_table(n_experts, n, k, dtype, device)
    if not table:
        _log_fallback_once(config_file_name(n_experts, n, k, dtype, device))
        return heuristic_config(m, n_experts, top_k)
    nearest = min(table, key=lambda bucket: (abs(bucket - m), bucket))
    return table[nearest]
