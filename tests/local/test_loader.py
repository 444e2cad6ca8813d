"""Loading safetensors checkpoints, and refusing broken ones before allocating anything."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_local import loader
from mixtral_local.checkpoint import free_memory
from mixtral_local.config import CheckpointError, MixtralConfig
from mixtral_local.loader import check_checkpoint, load_model
from mixtral_local.tiny import write_tiny_checkpoint

SMALL = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 48, "head_dim": 8,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 3}


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "ckpt", seed=3, **SMALL)


def _rewrite(ckpt: Path, edit: dict[str, torch.Tensor | None]) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    for name, value in edit.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, ckpt / "model.safetensors")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def test_load_model_gives_float32_on_cpu_in_eval_mode(small: Path) -> None:
    model = load_model(small, dtype="float32", device="cpu")
    assert model.output.weight.dtype == torch.float32 and not model.training
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 1000)


def test_load_model_converts_to_the_target_dtype(small: Path) -> None:
    model = load_model(small, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sharded_checkpoint_loads_the_same_weights(small: Path, tmp_path: Path) -> None:
    sharded = write_tiny_checkpoint(tmp_path / "sharded", seed=3, shards=3, **SMALL)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    a, b = _state(load_model(small, device="cpu")), _state(load_model(sharded, device="cpu"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stacked_experts_load_the_same_weights(small: Path, tmp_path: Path) -> None:
    stacked = write_tiny_checkpoint(tmp_path / "stacked", seed=3, layout="stacked", **SMALL)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(stacked / "model.safetensors")
    a, b = _state(load_model(small, device="cpu")), _state(load_model(stacked, device="cpu"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_experts_are_stacked_gate_rows_first(small: Path) -> None:
    raw = load_file(small / "model.safetensors")
    moe = load_model(small, device="cpu").layers[1].moe
    e = "model.layers.1.block_sparse_moe.experts.2."
    assert torch.equal(moe.w13[2], torch.cat([raw[e + "w1.weight"], raw[e + "w3.weight"]]))
    assert torch.equal(moe.w2[2], raw[e + "w2.weight"])


def test_progress_bar_is_quiet_when_asked(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_model(small, device="cpu", progress=False)
    assert capsys.readouterr().err == ""


def test_missing_tensor_is_named(small: Path) -> None:
    _rewrite(small, {"model.layers.1.self_attn.k_proj.weight": None})
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load_model(small, device="cpu")


def test_unexpected_tensor_is_named_with_its_file(small: Path) -> None:
    _rewrite(small, {"model.layers.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mystery"):
        load_model(small, device="cpu")


def test_wrong_shape_is_named_with_both_shapes(small: Path) -> None:
    _rewrite(small, {"model.norm.weight": torch.ones(31)})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \[31\], config.json implies \[32\]"):
        load_model(small, device="cpu")


def test_config_that_does_not_match_the_weights_is_refused(small: Path) -> None:
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(small, device="cpu")


def test_truncated_file_is_named(small: Path) -> None:
    file = small / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(small, device="cpu")


def test_corrupt_header_is_named(small: Path) -> None:
    file = small / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff\xfe garb"
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_model(small, device="cpu")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    sharded = write_tiny_checkpoint(tmp_path / "sharded", seed=3, shards=2, **SMALL)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        load_model(sharded, device="cpu")


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(MixtralConfig(hidden_size=32, head_dim=8).to_hf()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path, device="cpu")


def _header_only_checkpoint(root: Path, config: MixtralConfig) -> int:
    """config.json and a sparse model.safetensors whose header declares every tensor; returns its bytes."""
    from mixtral_local.loader import _targets

    root.mkdir()
    (root / "config.json").write_text(json.dumps(config.to_hf()))
    header, offset = {}, 0
    for name, target in _targets(config, set()).items():
        size = math.prod(target.shape) * 4
        header[name] = {"dtype": "F32", "shape": list(target.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with (root / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: no disk is used for the weights
    return offset


def test_checkpoint_larger_than_free_memory_is_refused_before_allocating(tmp_path: Path) -> None:
    config = MixtralConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                           num_key_value_heads=1, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                           vocab_size=1_500_000_000)
    needed = _header_only_checkpoint(tmp_path / "huge", config)
    free = free_memory(torch.device("cpu"))
    if free is None or free > needed:
        pytest.skip("this machine has more free memory than the fake checkpoint needs")
    with pytest.raises(CheckpointError, match=r"the model needs 89\.4\d GiB in float32, cpu has .* GiB free"):
        check_checkpoint(tmp_path / "huge", device="cpu")


# --------------------------------------------------------------------------- int8 experts

def test_int8_experts_load_as_int8_rows_with_scales(small: Path) -> None:
    model = load_model(small, dtype="float32", device="cpu", quantize="int8")
    full = load_model(small, dtype="float32", device="cpu")
    moe, full_moe = model.layers[0].moe, full.layers[0].moe
    assert moe.w13.dtype == moe.w2.dtype == torch.int8 and not moe.w13.requires_grad
    assert moe.w13_scale is not None and moe.w2_scale is not None
    assert moe.w13_scale.shape == (3, 96) and moe.w2_scale.shape == (3, 32)
    assert moe.w13_scale.dtype == torch.float32
    assert full_moe.w13_scale is None
    # each stored row is the float row to within half a step of its scale
    err = (moe.w13.float() * moe.w13_scale[..., None] - full_moe.w13).abs()
    assert bool((err <= 0.51 * moe.w13_scale[..., None]).all())
    # everything else is exactly the float model's
    assert torch.equal(model.layers[0].attention.wqkv.weight, full.layers[0].attention.wqkv.weight)
    assert torch.equal(model.output.weight, full.output.weight)


def test_int8_experts_from_stacked_and_sharded_checkpoints_are_the_same(small: Path, tmp_path: Path) -> None:
    stacked = write_tiny_checkpoint(tmp_path / "stacked", seed=3, layout="stacked", shards=2, **SMALL)
    a = _state(load_model(small, device="cpu", quantize="int8"))
    b = _state(load_model(stacked, device="cpu", quantize="int8"))
    assert a.keys() == b.keys() and any(k.endswith("w13_scale") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_int8_experts_change_the_logits_little(small: Path) -> None:
    ids = torch.tensor([[1, 5, 9, 200, 33, 7, 450, 12]])
    exact = load_model(small, dtype="float32", device="cpu")(ids)
    int8 = load_model(small, dtype="float32", device="cpu", quantize="int8")(ids)
    bf16 = load_model(small, dtype="bfloat16", device="cpu")(ids).float()
    rel = lambda x: float((x - exact).norm() / exact.norm())  # noqa: E731
    assert 0 < rel(int8) < 1e-2
    assert rel(int8) < 2 * rel(bf16) + 1e-3  # int8 experts cost about what bf16 does


def test_int8_experts_in_bfloat16_keep_bfloat16_scales(small: Path) -> None:
    model = load_model(small, dtype="bfloat16", device="cpu", quantize="int8")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.int8}
    assert model.layers[1].moe.w2_scale.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).isfinite().all()


def test_unknown_quantize_is_refused_before_loading(small: Path) -> None:
    with pytest.raises(ValueError, match="quantize must be None or 'int8', got 'int4'"):
        check_checkpoint(small, device="cpu", quantize="int4")


def test_the_memory_check_counts_int8_experts_at_a_byte_each(tmp_path: Path) -> None:
    config = MixtralConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                           num_key_value_heads=1, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                           vocab_size=16)
    _header_only_checkpoint(tmp_path / "ckpt", config)
    full = check_checkpoint(tmp_path / "ckpt", device="cpu")
    int8 = check_checkpoint(tmp_path / "ckpt", device="cpu", quantize="int8")
    expert_targets = [t for t in int8.targets.values() if int8.quantized(t)]
    assert len(expert_targets) == 2 * 3  # w1, w2 and w3 of both experts
    for t in expert_targets:
        n = math.prod(t.shape)
        assert full.stored_bytes(t) == 4 * n and int8.stored_bytes(t) == n + t.shape[0] * 4


@pytest.mark.parametrize("slab", [1, 100, 48 * 32])  # a row at a time, 3 rows with a remainder, one expert
def test_int8_experts_quantized_in_slabs_are_the_same(small: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, slab: int) -> None:
    stacked = write_tiny_checkpoint(tmp_path / "stacked", seed=3, layout="stacked", **SMALL)
    whole = [_state(load_model(p, device="cpu", quantize="int8")) for p in (small, stacked)]
    monkeypatch.setattr(loader, "QUANT_SLAB", slab)
    for expected, path in zip(whole, (small, stacked), strict=True):
        sliced = _state(load_model(path, device="cpu", quantize="int8"))
        assert all(torch.equal(expected[k], sliced[k]) for k in expected)


def test_the_memory_check_counts_the_quantization_slab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = MixtralConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                           num_key_value_heads=1, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                           vocab_size=16)
    _header_only_checkpoint(tmp_path / "ckpt", config)
    plan = check_checkpoint(tmp_path / "ckpt", device="cpu", quantize="int8")
    assert check_checkpoint(tmp_path / "ckpt", device="cpu").workspace_bytes() == 0
    assert plan.workspace_bytes() == loader.QUANT_SLAB * 9  # read slab, its float32 copy, its int8 rows
    needed = plan.needed_bytes()
    assert needed == sum(plan.stored_bytes(t) for t in plan.targets.values()) + plan.workspace_bytes()
    monkeypatch.setattr(loader, "free_memory", lambda device: needed)
    check_checkpoint(tmp_path / "ckpt", device="cpu", quantize="int8")
    monkeypatch.setattr(loader, "free_memory", lambda device: needed - 1)
    with pytest.raises(CheckpointError, match="experts in int8"):
        check_checkpoint(tmp_path / "ckpt", device="cpu", quantize="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_loading_on_cuda_peaks_within_what_the_memory_check_counted(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiny_checkpoint(tmp_path / "wide", seed=0, layout="stacked", vocab_size=1000, hidden_size=1024,
                                 intermediate_size=3584, head_dim=128, num_hidden_layers=2)
    monkeypatch.setattr(loader, "QUANT_SLAB", 1 << 20)  # 9 MiB of workspace against 235 MB stacked tensors
    plan = check_checkpoint(path, device="cuda", dtype="bfloat16", quantize="int8")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_model(path, device="cuda", dtype="bfloat16", quantize="int8")
    peak = torch.cuda.max_memory_allocated() - base
    assert model.layers[0].moe.w13.dtype == torch.int8
    assert peak <= plan.needed_bytes() + (1 << 20), (peak, plan.needed_bytes())
