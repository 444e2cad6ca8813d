"""The scripts in examples/ run, offline, on a tiny random Mixtral (their answers are noise; every call is real)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from mixtral_local.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return {"MIXTRAL_MODEL_PATH": str(path), "MIXTRAL_LOCAL_DTYPE": "float32", "MIXTRAL_LOCAL_DEVICE": "cpu",
            "MIXTRAL_LOCAL_PROGRESS": "0"}


@pytest.mark.parametrize(("script", "expected"), [("agent.py", ""), ("extract.py", "parsed: name="),
                                                  ("chain.py", "prompt tokens: "),
                                                  ("few_shot.py", "via LangChain: ")])
def test_the_example_runs(script: str, expected: str, tiny_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXTRAL_")} | tiny_env
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "integrations"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout


def test_the_server_app_streams_an_answer(tiny_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    for key in [k for k in os.environ if k.startswith("MIXTRAL_")]:
        monkeypatch.delenv(key)
    for key, value in tiny_env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("server_app", ROOT / "examples" / "server_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with TestClient(module.app) as http:
        answer = http.get("/ask", params={"q": "Why is the sea salty?"})
    assert answer.status_code == 200 and answer.text
