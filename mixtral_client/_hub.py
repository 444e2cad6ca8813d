"""Weights already in the Hugging Face cache: a model id -> the snapshot directory on disk (pure; never downloads).

``huggingface-cli download mistralai/Mixtral-8x7B-Instruct-v0.1`` (or ``hf download``) leaves the files in
the hub cache, laid out as ``models--{org}--{name}/refs/{ref}`` (a commit hash) and
``models--{org}--{name}/snapshots/{commit}/...`` (links into ``blobs/``). ``model_path`` may name such a model
instead of a directory, and ``provider="local"`` without one takes Mixtral-8x7B-Instruct from there. The lookup
reads that layout only; huggingface_hub (and its network stack) is not needed to read it. What is missing from a
partial download is the checkpoint check's to name, file by file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from ._exceptions import ConfigurationError

__all__ = ["DEFAULT_LOCAL_MODEL", "hub_cache", "resolve_model_path"]

#: the model ``provider="local"`` takes from the cache when no ``model_path`` is given
DEFAULT_LOCAL_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"

_MODEL_ID = re.compile(r"^(?P<org>[\w.-]+)/(?P<name>[\w.-]+)(?:@(?P<revision>[\w.-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache(env: Mapping[str, str]) -> Path:
    """The hub cache folder, found as huggingface_hub finds it: ``HF_HUB_CACHE``, then the older
    ``HUGGINGFACE_HUB_CACHE``, then ``$HF_HOME/hub``, with ``HF_HOME`` defaulting to
    ``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    return Path(home).expanduser() / "hub"


def _snapshot(model_id: str, env: Mapping[str, str]) -> tuple[Path | None, Path]:
    """(the snapshot directory of ``org/name[@revision]``, or None; the model's folder in the cache)."""
    match = _MODEL_ID.match(model_id)
    assert match is not None
    folder = hub_cache(env) / f"models--{match['org']}--{match['name']}"
    revision = match["revision"] or "main"
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    elif _COMMIT.match(revision):
        commit = revision
    else:
        return None, folder
    snapshot = folder / "snapshots" / commit
    return (snapshot if snapshot.is_dir() else None), folder


def resolve_model_path(model_path: str | None, env: Mapping[str, str]) -> str:
    """The checkpoint directory for ``model_path``: a directory as given (``~`` expanded); else a model id
    (``org/name``, or ``org/name@revision`` with a branch, tag or commit) found in the hub cache; with None,
    Mixtral-8x7B-Instruct from the cache. A model id that is not there is a ``ConfigurationError`` naming the
    folder looked in and the download command: nothing here fetches weights."""
    if model_path is None:
        snapshot, folder = _snapshot(DEFAULT_LOCAL_MODEL, env)
        if snapshot is None:
            raise ConfigurationError(
                "provider 'local' needs model_path= (or MIXTRAL_MODEL_PATH): a Hugging Face Mixtral checkpoint "
                f"directory or model id; without one it takes {DEFAULT_LOCAL_MODEL} from the Hugging Face cache, "
                f"which does not have it ({folder}). `huggingface-cli download {DEFAULT_LOCAL_MODEL}` fetches it; "
                "`mixtral local init-tiny DIR` writes a tiny random checkpoint to try things with"
            )
        return str(snapshot)
    path = Path(model_path).expanduser()
    if path.exists() or _MODEL_ID.match(model_path) is None:
        return str(path)  # a directory, or a path for the checkpoint check to report as missing
    snapshot, folder = _snapshot(model_path, env)
    if snapshot is None:
        model_id, _, revision = model_path.partition("@")
        at = f" at revision {revision!r}" if revision else ""
        fetch = f"huggingface-cli download {model_id}" + (f" --revision {revision}" if revision else "")
        raise ConfigurationError(
            f"model_path {model_path!r} is neither a directory nor a model in the Hugging Face cache{at} "
            f"(looked in {folder}); mixtral-sdk never downloads weights: `{fetch}` fetches them"
        )
    return str(snapshot)
