"""benchmarks/tune_moe.py: which M values a benchmark report sends to tuning, and the sweep's table writing
(the CPU interpreter runs the sweep's logic on tiny shapes; the timings themselves need a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.tune_moe import failing_ms

REPO = Path(__file__).resolve().parents[1]


def _row(m: int, verdict: str, *reasons: str) -> dict[str, object]:
    return {"m": m, "verdict": [verdict, list(reasons)]}


def test_the_failed_speed_rules_pick_the_m_values_to_tune():
    report = {
        "rows": [
            _row(1, "FAIL", "bandwidth < 75% of copy"),
            _row(2, "PASS"),
            _row(16, "FAIL", "not faster than hf_grouped_mm"),
            _row(64, "FAIL", "incorrect"),  # a wrong result is for the tests, not the tuner
            _row(4096, "FAIL", "incorrect", "TFLOP/s < 60% of matmul"),
        ]
    }
    assert failing_ms(report) == [1, 16, 4096]
    assert failing_ms({"rows": [_row(1, "PASS")]}) == []


def _tune(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "benchmarks/tune_moe.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_a_report_with_nothing_failed_tunes_nothing(tmp_path):
    report = tmp_path / "moe-h100.json"
    report.write_text(json.dumps({"rows": [_row(1, "PASS"), _row(4096, "PASS")]}))
    done = _tune("--from-bench", str(report), "--out", str(tmp_path / "tables"))
    assert done.returncode == 0, done.stderr
    assert "nothing to tune" in done.stdout
    assert not (tmp_path / "tables").exists()


def test_the_smoke_sweep_writes_a_table_keeping_other_entries(tmp_path):
    out = tmp_path / "tables"
    out.mkdir()
    name = "E=4,N=48,K=40,dtype=float32,device=cpu.json"
    kept = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4,
            "num_stages": 2}  # fmt: skip
    (out / name).write_text(json.dumps({"512": kept}))
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_MOE_CONFIG_DIR"}

    done = _tune("--smoke", "--out", str(out), env=env)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("(6 timed)") == 2  # per M: the 3 tiles, then their 3 USE_TMA twins
    table = json.loads((out / name).read_text())
    assert list(table) == ["1", "9", "512"]  # tuned buckets added in M order, the old one kept
    assert table["512"] == kept
    smoke_tiles = {(16, 32, 16), (16, 64, 32), (32, 32, 16)}
    for m in ("1", "9"):
        assert (table[m]["BLOCK_SIZE_M"], table[m]["BLOCK_SIZE_N"], table[m]["BLOCK_SIZE_K"]) in smoke_tiles


def test_the_kernel_benchmark_smoke_run_reports_the_int8_build_and_feeds_the_tuner(tmp_path: Path) -> None:
    """benchmarks/moe_kernel.py --smoke --int8 (interpreter, tiny shapes): the report a GPU run writes, int8 too."""
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "benchmarks/moe_kernel.py", "--smoke", "--int8", "--m", "1", "17",
         "--impls", "--time-budget-s", "0.05", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "moe-cpu-smoke.json").read_text())
    assert [r["m"] for r in report["rows"]] == [1, 17] and report["overall"].startswith("correct")
    for row in report["rows"]:
        assert row["int8"]["ms"] > 0 and row["int8"]["err"] <= 2 * row["int8"]["err_reference"] + 1e-5
        assert row["int8"]["bytes"] < row["bytes_touched"]  # a byte per weight against four in fp32
    assert "## Int8 weight-only experts" in (tmp_path / "moe-cpu-smoke.md").read_text()
    assert failing_ms(report) == []
