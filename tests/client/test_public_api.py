"""The public surface: ``__all__`` is true, the import is light, async objects never act from ``__del__``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mixtral_client
from mixtral_client import events, types
from mixtral_client._backends.http import AsyncHTTPBackend


@pytest.mark.parametrize("module", [mixtral_client, types, events], ids=lambda m: m.__name__)
def test_all_names_exist_once(module) -> None:
    names = module.__all__

    assert [n for n in names if not hasattr(module, n)] == []
    assert len(set(names)) == len(names)


def test_every_public_error_and_client_is_exported() -> None:
    from mixtral_client import _exceptions

    exported = set(mixtral_client.__all__)
    assert {n for n in _exceptions.__all__ if n != "status_error_for"} <= exported
    assert {"MixtralClient", "AsyncMixtralClient", "Stream", "AsyncStream", "Timeout", "RetryPolicy"} <= exported


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from mixtral_client import *", namespace)

    assert set(namespace) - {"__builtins__"} == set(mixtral_client.__all__)


def test_import_does_not_load_torch_or_the_local_backend() -> None:
    code = ("import sys, mixtral_client; "
            "heavy = [m for m in ('torch', 'triton', 'mixtral_local', 'botocore', 'langchain_core', "
            "'mixtral_client._backends.http', 'starlette', 'uvicorn') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("cls", [mixtral_client.AsyncMixtralClient, mixtral_client.AsyncStream, AsyncHTTPBackend,
                                 mixtral_client.AsyncTextStream, mixtral_client.TextStream,
                                 mixtral_client.MixtralClient, mixtral_client.Stream])
def test_no_finalizer_schedules_work(cls: type) -> None:
    assert not hasattr(cls, "__del__")


def test_version_is_a_string() -> None:
    assert isinstance(mixtral_client.__version__, str) and mixtral_client.__version__
