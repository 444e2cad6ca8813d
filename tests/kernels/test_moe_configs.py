"""Tile configs: shipped JSON tables per shape and GPU, nearest-M choice, and a heuristic that logs once."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mixtral_local.kernels import configs
from mixtral_local.kernels.configs import MoEConfig, config_file_name, get_config, heuristic_config

MIXTRAL = {"n_experts": 8, "n": 14336, "k": 4096}


@pytest.fixture
def fresh_fallback_log():
    configs._log_fallback_once.cache_clear()
    yield
    configs._log_fallback_once.cache_clear()


def test_file_name_names_shape_dtype_and_device():
    name = config_file_name(8, 14336, 4096, torch.bfloat16, "NVIDIA_H100_80GB_HBM3")
    assert name == "E=8,N=14336,K=4096,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json"


@pytest.mark.parametrize("device", ["NVIDIA_H100_80GB_HBM3", "NVIDIA_H200"])
def test_mixtral_tables_ship_for_hopper(device):
    path = configs.CONFIG_DIR / config_file_name(**MIXTRAL, dtype=torch.bfloat16, device=device)
    raw = json.loads(path.read_text())
    table = {int(m): MoEConfig.from_dict(entry) for m, entry in raw.items()}
    assert {1, 16, 4096} <= set(table)


def test_shipped_config_files_all_parse():
    files = sorted(configs.CONFIG_DIR.glob("*.json"))
    assert files
    for path in files:
        for entry in json.loads(path.read_text()).values():
            MoEConfig.from_dict(entry)


def test_table_entry_of_the_nearest_m_is_chosen():
    table = configs.load_config_table(**MIXTRAL, dtype=torch.bfloat16, device="NVIDIA_H100_80GB_HBM3")
    assert table is not None
    chosen = get_config(5000, top_k=2, dtype=torch.bfloat16, device="NVIDIA_H100_80GB_HBM3", **MIXTRAL)
    assert chosen == table[4096]


def test_missing_table_falls_back_to_heuristic(fresh_fallback_log):
    chosen = get_config(1, top_k=2, dtype=torch.bfloat16, device="Unknown_GPU", **MIXTRAL)
    assert chosen == heuristic_config(1, 8, 2)


def test_heuristic_fallback_logs_once_per_shape(fresh_fallback_log, caplog):
    with caplog.at_level(logging.WARNING, logger=configs.__name__):
        for m in (1, 64, 4096):
            get_config(m, top_k=2, dtype=torch.bfloat16, device="Unknown_GPU", **MIXTRAL)
    assert len(caplog.records) == 1
    assert "benchmarks/tune_moe.py" in caplog.records[0].getMessage()


@pytest.mark.parametrize("m", [1, 16, 64, 256, 4096, 65536])
def test_heuristic_tiles_grow_with_tokens_per_expert(m):
    small, large = heuristic_config(1, 8, 2), heuristic_config(m, 8, 2)
    assert large.BLOCK_SIZE_M >= small.BLOCK_SIZE_M


def test_config_round_trips_through_dict():
    config = heuristic_config(4096, 8, 2)
    assert MoEConfig.from_dict(config.to_dict()) == config


def _write_table(folder, device, entries):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / config_file_name(**MIXTRAL, dtype=torch.bfloat16, device=device)
    path.write_text(json.dumps({str(m): config.to_dict() for m, config in entries.items()}))
    return path


def test_a_table_in_the_env_folder_comes_before_the_shipped_one(tmp_path, monkeypatch):
    mine = MoEConfig(BLOCK_SIZE_M=32, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, num_warps=2, num_stages=2)
    _write_table(tmp_path, "NVIDIA_H100_80GB_HBM3", {1: mine})
    shipped = get_config(1, top_k=2, dtype=torch.bfloat16, device="NVIDIA_H100_80GB_HBM3", **MIXTRAL)
    assert shipped != mine

    monkeypatch.setenv(configs.CONFIG_DIR_ENV, str(tmp_path))
    assert configs.config_dirs() == (tmp_path, configs.CONFIG_DIR)
    assert get_config(1, top_k=2, dtype=torch.bfloat16, device="NVIDIA_H100_80GB_HBM3", **MIXTRAL) == mine
    # a device the folder has no table for still finds the shipped one
    h200 = get_config(1, top_k=2, dtype=torch.bfloat16, device="NVIDIA_H200", **MIXTRAL)
    assert h200 == configs.load_config_table(**MIXTRAL, dtype=torch.bfloat16, device="NVIDIA_H200")[1]


@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2]", '{"one": {"BLOCK_SIZE_M": 16}}', '{"1": {"BLOCK_SIZE_M": 16}}', '{"1": 5}'],
)
def test_a_bad_table_fails_naming_its_file(tmp_path, monkeypatch, text):
    path = tmp_path / config_file_name(**MIXTRAL, dtype=torch.bfloat16, device="My_GPU")
    path.write_text(text)
    monkeypatch.setenv(configs.CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="bad fused-MoE config table") as err:
        get_config(1, top_k=2, dtype=torch.bfloat16, device="My_GPU", **MIXTRAL)
    assert str(path) in str(err.value)
