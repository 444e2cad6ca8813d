"""Reading what a safetensors checkpoint declares without loading it, and what a device can hold.

``read_header`` parses one file's header and checks the file holds every byte it promises (a truncated
download is named here); ``checkpoint_tensors`` does so for a single file or every shard of an index.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CheckpointError

__all__ = ["TensorInfo", "checkpoint_tensors", "free_memory", "read_header"]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, after checking the file holds all their bytes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes, not even a safetensors header)")
        n = int.from_bytes(prefix, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt (header claims {n} bytes, the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; only floating-point weights load")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} {list(shape)} {dtype} spans "
                                  f"{end - begin} bytes")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes up to {8 + n + end}, "
                                  f"the file has {size}")
        out[name] = TensorInfo(path, dtype, shape)
    return out


def checkpoint_tensors(root: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in ``root``, single-file or sharded."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from None
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            shard = root / name
            if not shard.is_file():
                raise CheckpointError(f"{index}: names shard {name}, which is missing")
            tensors.update(read_header(shard))
        for name, shard_name in weight_map.items():
            if name not in tensors or tensors[name].file.name != shard_name:
                raise CheckpointError(f"{root / shard_name}: has no tensor {name!r}, which {index.name} puts there")
        return tensors
    single = root / "model.safetensors"
    if single.is_file():
        return read_header(single)
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json")


def free_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
