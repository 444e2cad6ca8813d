"""Fixtures for the LangChain tests: a scripted OpenAI-compatible host on 127.0.0.1 and models bound to it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from langchain_mixtral import ChatMixtral
from tests.langchain.scripted_host import ScriptedHost


def pytest_configure(config: pytest.Config) -> None:
    # pytest-asyncio (installed by langchain-tests) warns at configure time that
    # `asyncio_default_fixture_loop_scope` is unset, and `filterwarnings = error` turns that into an
    # INTERNALERROR. The real fix is one line in pyproject.toml's [tool.pytest.ini_options]
    # (asyncio_default_fixture_loop_scope = "function"); until then ignore exactly that warning.
    # This hook runs before pytest-asyncio's (conftest hooks are called first) and inside the same
    # warnings context, so the filter covers it and ends with it.
    warnings.filterwarnings("ignore", message='The configuration option "asyncio_default_fixture_loop_scope"',
                            category=pytest.PytestDeprecationWarning)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LangChain's async paths are asyncio-only


@pytest.fixture
def host() -> Iterator[ScriptedHost]:
    with ScriptedHost() as scripted:
        yield scripted


@pytest.fixture
def llm(host: ScriptedHost) -> Iterator[ChatMixtral]:
    model = ChatMixtral(provider="openai", base_url=host.url, api_key="test-key", temperature=0)
    yield model
    model.close()
