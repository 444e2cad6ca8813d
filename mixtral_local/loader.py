"""Loading Hugging Face safetensors checkpoints (single file or sharded) into ``MixtralModel``.

Everything is checked from the file headers before a byte of weights is allocated: every tensor the
config implies is present, nothing unexpected is there, every shape matches, no file is shorter than its
header says, and the model fits the free memory of the target device. Experts may be stored one by one
(``block_sparse_moe.experts.{e}.w1/w2/w3``) or stacked as newer transformers holds them
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); both load into the stacked
``w13`` / ``w2`` of the model.

``quantize="int8"`` stores the experts (97% of Mixtral's weights) as int8 with one scale per output row,
quantized tensor by tensor as they are read, on the target device: Mixtral then takes 45 GiB instead of 87.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .checkpoint import TensorInfo, checkpoint_tensors, free_memory
from .config import CheckpointError, MixtralConfig
from .kernels import MoEFn, Quantize, quantize_rows, resolve_moe_backend
from .model import MixtralModel

__all__ = ["CheckpointPlan", "LoadCancelled", "check_checkpoint", "load_model", "resolve_device", "resolve_dtype",
           "resolve_quantize"]

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved
_EXPERT_PARAMS = (".moe.w13", ".moe.w2")


@dataclass(frozen=True, slots=True)
class _Target:
    param: str  # our parameter
    index: tuple[int | slice, ...]  # where the checkpoint tensor goes inside it
    shape: tuple[int, ...]  # the shape the checkpoint must have


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPE_NAMES)}; got {dtype!r}") from None


def resolve_quantize(quantize: str | None) -> Quantize | None:
    """None (weights as the dtype says) or "int8" (int8 experts, one scale per row)."""
    if quantize is None or quantize == "int8":
        return quantize
    raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _targets(config: MixtralConfig, names: set[str]) -> dict[str, _Target]:
    """Checkpoint tensor name -> where it goes, for the layout each layer of the checkpoint uses."""
    h, v, d, e, i = (config.hidden_size, config.vocab_size, config.head_dim, config.num_local_experts,
                     config.intermediate_size)
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    t: dict[str, _Target] = {
        "model.embed_tokens.weight": _Target("tok_embeddings.weight", (), (v, h)),
        "model.norm.weight": _Target("norm.weight", (), (h,)),
    }
    if not config.tie_word_embeddings or "lm_head.weight" in names:
        t["lm_head.weight"] = _Target("output.weight", (), (v, h))
    for n in range(config.num_hidden_layers):
        src, dst = f"model.layers.{n}.", f"layers.{n}."
        qkv = dst + "attention.wqkv.weight"
        t[src + "self_attn.q_proj.weight"] = _Target(qkv, (slice(0, q),), (q, h))
        t[src + "self_attn.k_proj.weight"] = _Target(qkv, (slice(q, q + kv),), (kv, h))
        t[src + "self_attn.v_proj.weight"] = _Target(qkv, (slice(q + kv, q + 2 * kv),), (kv, h))
        t[src + "self_attn.o_proj.weight"] = _Target(dst + "attention.wo.weight", (), (h, q))
        t[src + "input_layernorm.weight"] = _Target(dst + "attention_norm.weight", (), (h,))
        t[src + "post_attention_layernorm.weight"] = _Target(dst + "ffn_norm.weight", (), (h,))
        stacked = next((m for m in ("mlp", "block_sparse_moe") if f"{src}{m}.experts.gate_up_proj" in names), None)
        moe = stacked or ("mlp" if f"{src}mlp.gate.weight" in names else "block_sparse_moe")
        t[f"{src}{moe}.gate.weight"] = _Target(dst + "moe.gate.weight", (), (e, h))
        if stacked:
            t[f"{src}{moe}.experts.gate_up_proj"] = _Target(dst + "moe.w13", (), (e, 2 * i, h))
            t[f"{src}{moe}.experts.down_proj"] = _Target(dst + "moe.w2", (), (e, h, i))
            continue
        for x in range(e):
            ex = f"{src}block_sparse_moe.experts.{x}."
            t[ex + "w1.weight"] = _Target(dst + "moe.w13", (x, slice(0, i)), (i, h))
            t[ex + "w3.weight"] = _Target(dst + "moe.w13", (x, slice(i, 2 * i)), (i, h))
            t[ex + "w2.weight"] = _Target(dst + "moe.w2", (x,), (h, i))
    return t


#: elements quantized at once: the rows of an expert tensor go to the device and through float32 in slabs of
#: about this size, so the loader's workspace is bounded whatever the tensor (a stacked [8, 28672, 4096]
#: tensor would otherwise take 3.8 GB per float32 temporary)
QUANT_SLAB = 1 << 24
#: bytes per slab element on the device: the slab as read (float32 at most), its float32 copy, its int8 rows
_QUANT_SLAB_BYTES = 4 + 4 + 1


def _quantize_into(q: torch.Tensor, scale: torch.Tensor, source: torch.Tensor, device: torch.device) -> None:
    """Quantize ``source`` (rows last, on the CPU) into int8 ``q`` and its row ``scale`` on ``device``."""
    cols = source.shape[-1]
    rows, q_rows, scales = source.reshape(-1, cols), q.view(-1, cols), scale.view(-1)
    step = max(1, QUANT_SLAB // cols)
    for start in range(0, rows.shape[0], step):
        part_q, part_scale = quantize_rows(rows[start:start + step].to(device), scale.dtype)
        q_rows[start:start + step].copy_(part_q)
        scales[start:start + step].copy_(part_scale)
        del part_q, part_scale  # else the next slab is read while this one's int8 rows are still held


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True, slots=True)
class CheckpointPlan:
    """A checked checkpoint: what to load, from where, into which device and dtype."""

    root: Path
    config: MixtralConfig
    device: torch.device
    dtype: torch.dtype
    moe_fn: MoEFn
    tensors: dict[str, TensorInfo]
    targets: dict[str, _Target]
    quantize: Quantize | None = None

    def quantized(self, target: _Target) -> bool:
        """Whether ``target`` is an expert tensor stored as int8."""
        return self.quantize == "int8" and target.param.endswith(_EXPERT_PARAMS)

    def stored_bytes(self, target: _Target) -> int:
        """Bytes ``target`` takes on the device: int8 and a scale per row, or one element of the dtype each."""
        n = math.prod(target.shape)
        if self.quantized(target):
            return n + n // target.shape[-1] * self.dtype.itemsize
        return n * self.dtype.itemsize

    def needed_bytes(self) -> int:
        """Device memory the load takes at its peak: the weights as stored, and the loader's workspace."""
        needed = sum(self.stored_bytes(t) for t in self.targets.values()) + self.workspace_bytes()
        if "lm_head.weight" not in self.targets:  # tied embeddings still get their own output matrix
            needed += self.config.vocab_size * self.config.hidden_size * self.dtype.itemsize
        return needed

    def workspace_bytes(self) -> int:
        """Device memory the load needs beyond the weights: one quantization slab at a time."""
        if self.quantize is None:
            return 0
        widest = max(t.shape[-1] for t in self.targets.values() if self.quantized(t))
        return max(QUANT_SLAB, widest) * _QUANT_SLAB_BYTES


def check_checkpoint(
    path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    moe_backend: str = "auto",
    quantize: str | None = None,
) -> CheckpointPlan:
    """Every check ``load_model`` makes, from config.json and the safetensors headers, allocating nothing.

    Raises ``CheckpointError`` naming the file and tensor: a missing, unexpected or wrongly shaped tensor,
    a truncated or corrupt file, or a model larger than the free memory of the device.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    config = MixtralConfig.from_hf(root)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quant = resolve_quantize(quantize)
    _, moe_fn = resolve_moe_backend(moe_backend, dev)

    tensors = checkpoint_tensors(root)
    targets = _targets(config, set(tensors))
    for name, info in tensors.items():
        target = targets.get(name)
        if target is None:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} for this config.json")
        if info.shape != target.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"config.json implies {list(target.shape)}")
    missing = [name for name in targets if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{root}: checkpoint has no tensor {missing[0]!r}{more}")

    plan = CheckpointPlan(root, config, dev, dt, moe_fn, tensors, targets, quant)
    needed = plan.needed_bytes()
    free = free_memory(dev)
    if free is not None and needed > free:
        how = str(dt).removeprefix("torch.") + (", experts in int8" if quant else "")
        raise CheckpointError(f"{root}: the model needs {_gib(needed)} in {how}, {dev} has {_gib(free)} free")
    return plan


class LoadCancelled(Exception):
    """``load_model`` stopped because its ``cancel`` event was set."""


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    moe_backend: str = "auto",
    quantize: str | None = None,
    progress: bool | None = None,
    cancel: threading.Event | None = None,
) -> MixtralModel:
    """Load a Hugging Face Mixtral checkpoint directory; returns the model in eval mode.

    ``dtype``: "auto" (bfloat16 on CUDA, float32 elsewhere), "float32", "bfloat16", "float16" or a torch dtype.
    ``device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    ``moe_backend``: "auto", "torch" or "triton" (see ``mixtral_local.kernels.resolve_moe_backend``).
    ``quantize``: None, or "int8" for int8 experts with one scale per output row (in ``dtype``), quantized
    as they are read; the other weights stay in ``dtype``.
    ``progress``: a progress bar on stderr (None: only when stderr is a terminal).
    ``cancel``: once set, the load stops before the next tensor and raises ``LoadCancelled``.
    Everything ``check_checkpoint`` checks is refused before any weight is allocated.
    """
    plan = check_checkpoint(path, dtype=dtype, device=device, moe_backend=moe_backend, quantize=quantize)
    dt, dev = plan.dtype, plan.device
    with torch.device("meta"):
        model = MixtralModel(plan.config, plan.moe_fn, plan.quantize).to(dt)  # (int8 parameters stay int8)
    model = model.to_empty(device=dev)
    model.inv_freq = model.rope_inv_freq(dev)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, info in plan.tensors.items():
        if name in plan.targets:
            by_file.setdefault(info.file, []).append(name)
    total = sum(p.numel() * p.element_size() for p in params.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading {plan.root.name}",
               disable=None if progress is None else not progress)
    with torch.no_grad(), bar:
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    if cancel is not None and cancel.is_set():
                        raise LoadCancelled(f"loading {plan.root} was cancelled")
                    target = plan.targets[name]
                    dest = params[target.param][target.index]
                    if plan.quantized(target):  # on the device: far faster there than on the CPU
                        _quantize_into(dest, params[target.param + "_scale"][target.index], f.get_tensor(name),
                                       dev)
                    else:
                        dest.copy_(f.get_tensor(name))
                    bar.update(plan.stored_bytes(target))
        if "lm_head.weight" not in plan.targets:
            params["output.weight"].copy_(params["tok_embeddings.weight"])
            bar.update(params["output.weight"].numel() * dt.itemsize)
        if dev.type == "cpu":
            # the same [V, H] matrix stored column-major: a one-row GEMV then streams it contiguously, ~3x faster
            out = params["output.weight"]
            out.data = out.data.t().contiguous().t()
    return model.eval().requires_grad_(False)
