"""Fixtures for the LangChain tests: a scripted OpenAI-compatible host on 127.0.0.1 and models bound to it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from langchain_mixtral import ChatMixtral
from tests.langchain.scripted_host import ScriptedHost


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
