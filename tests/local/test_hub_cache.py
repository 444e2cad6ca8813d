"""``model_path`` as a model id in the Hugging Face cache, and ``provider="local"`` without one.

The cache is built here the way ``huggingface-cli download`` leaves it (``refs/main`` holding a commit,
``snapshots/<commit>/`` of links into ``blobs/``), from a tiny checkpoint our own code writes; huggingface_hub's
own offline lookup (``snapshot_download(local_files_only=True)``) reads it too, so the layout is the real one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from mixtral_client import AsyncMixtralClient, ConfigurationError, MixtralClient
from mixtral_client._config import resolve_config
from mixtral_client._hub import DEFAULT_LOCAL_MODEL, hub_cache, resolve_model_path
from mixtral_local.checkpoint import CheckpointError

COMMIT = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"
LOCAL = {"dtype": "float32", "device": "cpu"}


def cache_model(cache: Path, model_id: str, checkpoint: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Put ``checkpoint``'s files into ``cache`` as the hub lays out a download; returns the snapshot folder."""
    folder = cache / f"models--{model_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        blob = folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, tiny_dir: Path) -> Path:
    hub = tmp_path / "hub"
    cache_model(hub, DEFAULT_LOCAL_MODEL, tiny_dir)
    return hub


def ask(client: MixtralClient) -> str:
    answer = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0)
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    return answer.choices[0].message.content or ""


def test_the_layout_is_the_one_huggingface_hub_reads(cache: Path) -> None:
    hub = pytest.importorskip("huggingface_hub")
    theirs = hub.snapshot_download(DEFAULT_LOCAL_MODEL, cache_dir=cache, local_files_only=True)
    assert resolve_model_path(DEFAULT_LOCAL_MODEL, {"HF_HUB_CACHE": str(cache)}) == str(theirs)


def test_a_model_id_answers_as_its_directory_does(cache: Path, tiny_dir: Path) -> None:
    env = {"HF_HUB_CACHE": str(cache)}
    with MixtralClient(provider="local", model_path=str(tiny_dir), local_options=LOCAL, env={}) as direct, \
            MixtralClient(provider="local", model_path=DEFAULT_LOCAL_MODEL, local_options=LOCAL, env=env) as cached:
        assert ask(cached) == ask(direct)


def test_provider_local_alone_takes_mixtral_from_the_cache(cache: Path) -> None:
    """The script that moves from a hosted key to local weights by configuration alone."""
    env = {"MIXTRAL_PROVIDER": "local", "HF_HOME": str(cache.parent), "MIXTRAL_LOCAL_DTYPE": "float32",
           "MIXTRAL_LOCAL_DEVICE": "cpu"}
    config = resolve_config(env)
    assert Path(config.model_path or "") == cache / f"models--{DEFAULT_LOCAL_MODEL.replace('/', '--')}" / \
        "snapshots" / COMMIT
    with MixtralClient.from_env(env) as client:
        assert ask(client)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_async_client_and_a_revision(anyio_backend: str, cache: Path, tiny_dir: Path) -> None:
    other = "a" * 40
    cache_model(cache, DEFAULT_LOCAL_MODEL, tiny_dir, commit=other, ref="v2")
    env = {"HF_HUB_CACHE": str(cache)}
    for model_id, commit in ((f"{DEFAULT_LOCAL_MODEL}@v2", other), (f"{DEFAULT_LOCAL_MODEL}@{COMMIT}", COMMIT)):
        assert resolve_model_path(model_id, env).endswith(f"snapshots/{commit}")
    async with AsyncMixtralClient(provider="local", model_path=f"{DEFAULT_LOCAL_MODEL}@v2", local_options=LOCAL,
                                  env=env) as client:
        answer = await client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert answer.usage is not None and answer.usage.completion_tokens == 2


def test_a_model_not_in_the_cache_is_refused_naming_the_folder_and_the_download(tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "empty")}
    with pytest.raises(ConfigurationError) as caught:
        MixtralClient(provider="local", model_path="mistralai/Mixtral-8x7B-Instruct-v0.1@v9", env=env)
    text = str(caught.value)
    assert str(tmp_path / "empty" / "models--mistralai--Mixtral-8x7B-Instruct-v0.1") in text
    assert "huggingface-cli download mistralai/Mixtral-8x7B-Instruct-v0.1 --revision v9" in text
    assert "never downloads" in text
    with pytest.raises(ConfigurationError, match=r"needs model_path=.*does not have it .*empty"):
        MixtralClient(provider="local", env=env)


def test_an_unknown_revision_of_a_cached_model_is_refused(cache: Path) -> None:
    with pytest.raises(ConfigurationError, match="at revision 'nope'"):
        resolve_model_path(f"{DEFAULT_LOCAL_MODEL}@nope", {"HF_HUB_CACHE": str(cache)})
    with pytest.raises(ConfigurationError, match="at revision '" + "b" * 40):  # a commit with no snapshot
        resolve_model_path(f"{DEFAULT_LOCAL_MODEL}@{'b' * 40}", {"HF_HUB_CACHE": str(cache)})


def test_a_partial_download_fails_at_the_client_naming_the_file(tmp_path: Path) -> None:
    """A download stopped part way leaves no link for the shards it did not finish, or a link whose blob is
    gone: the checkpoint check names the file before anything is loaded."""
    from mixtral_local.tiny import write_tiny_checkpoint

    sharded = write_tiny_checkpoint(tmp_path / "sharded", shards=3)
    hub = tmp_path / "hub"
    snapshot = cache_model(hub, "someone/mixtral-ft", sharded)
    shard = sorted(snapshot.glob("model-*.safetensors"))[1]
    env = {"HF_HUB_CACHE": str(hub)}
    (snapshot / shard.name).resolve().unlink()  # the link now dangles
    with pytest.raises(CheckpointError, match=shard.name):
        MixtralClient(provider="local", model_path="someone/mixtral-ft", local_options=LOCAL, env=env)
    (snapshot / shard.name).unlink()  # no link at all
    with pytest.raises(CheckpointError, match=shard.name):
        MixtralClient(provider="local", model_path="someone/mixtral-ft", local_options=LOCAL, env=env)


def test_a_directory_wins_over_the_cache(tmp_path: Path, tiny_dir: Path, cache: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "someone" / "mixtral")
    env = {"HF_HUB_CACHE": str(cache)}
    assert resolve_model_path("someone/mixtral", env) == "someone/mixtral"
    assert resolve_model_path("~/x/y", {}) == str(Path.home() / "x" / "y")  # a path, reported missing later
    assert resolve_model_path("/no/such/dir", env) == "/no/such/dir"


@pytest.mark.parametrize(("env", "expected"), [
    ({"HF_HUB_CACHE": "/a", "HUGGINGFACE_HUB_CACHE": "/b", "HF_HOME": "/c"}, "/a"),
    ({"HUGGINGFACE_HUB_CACHE": "/b", "HF_HOME": "/c"}, "/b"),
    ({"HF_HOME": "/c", "XDG_CACHE_HOME": "/d"}, "/c/hub"),
    ({"XDG_CACHE_HOME": "/d"}, "/d/huggingface/hub"),
    ({}, str(Path.home() / ".cache" / "huggingface" / "hub")),
])
def test_the_cache_folder_is_found_as_huggingface_hub_finds_it(env: dict[str, str], expected: str) -> None:
    assert hub_cache(env) == Path(expected)


def test_the_command_line_takes_a_model_id(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixtral_client._cli import main

    env = {"HF_HUB_CACHE": str(cache)}
    args = ["chat", "hi", "--no-stream", "--max-tokens", "3", "--local", "device=cpu", "--local", "dtype=float32"]
    assert main([*args, "--provider", "local"], env=env) == 0
    assert capsys.readouterr().out.strip()
    assert main([*args, "--model-path", "someone/absent"], env=env) == 2  # a configuration error
    assert "huggingface-cli download someone/absent" in capsys.readouterr().err
