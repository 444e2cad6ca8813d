"""``mixtral serve``: refuses to start with no backend named, and serves a checkpoint as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mixtral_client._cli import main
from tests.slow_load import interrupted


def test_serve_with_no_backend_named_exits_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve"], env={})
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--model-path" in err and "MIXTRAL_PROVIDER" in err and "init-tiny" in err


def test_serve_refuses_a_bad_checkpoint_before_listening(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{}")
    code = main(["serve", "--model-path", str(tmp_path)], env={})
    assert code == 2 and str(tmp_path) in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_answers_over_http_until_stopped(tiny_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "MIXTRAL_LOCAL_DTYPE": "float32", "MIXTRAL_LOCAL_DEVICE": "cpu",
           "MIXTRAL_SERVER_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "mixtral_client", "serve", "--model-path", str(tiny_dir),
                             "--port", str(port), "--model-name", "mixtral"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        body = {"model": "mixtral", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        answer = httpx.post(url, json=body, headers={"Authorization": "Bearer k"}, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 3 and answer["model"] == "mixtral-local"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "Application shutdown complete" in out  # the lifespan closed the client (uvicorn then re-raises the
    assert proc.returncode == -15, out               # signal it caught, so the exit status is SIGTERM's)


def test_ctrl_c_while_serve_loads_the_weights_stops_the_load_and_exits_130(tiny_dir: Path) -> None:
    code, seconds, out, err = interrupted("serve", "--model-path", str(tiny_dir), "--port", str(free_port()))
    assert code == 130, err[-2000:]
    assert seconds < 3 and out.count("reading") < 5  # not after the whole load (nor a server started)
    assert out.index("file closed by LoadCancelled") < out.index("exiting")
    assert "Uvicorn running" not in err
