"""ChatMixtral on the local backend (``provider="local"``) with a tiny random checkpoint.

Skipped until ``mixtral_local.backend`` and ``mixtral_local.write_tiny_checkpoint`` exist (they are written on
another branch). The one guess about their API lives in the ``tiny_checkpoint`` fixture.

A tiny random checkpoint follows no instructions: it never calls the tools written into its prompt unless a
call is required (then constrained decoding makes it), and it fills the standard suite's unbounded strings
until ``max_tokens``. The standard suite's tool and structured-output tests are switched off through
``has_tool_calling`` / ``has_structured_output``; structured output on local weights is tested below with
bounded schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import ConfigurableField
from langchain_tests.integration_tests import ChatModelIntegrationTests
from pydantic import BaseModel, ConfigDict, Field

from langchain_mixtral import ChatMixtral
from tests.langchain.scripted_host import ScriptedHost

pytest.importorskip("mixtral_local.backend", reason="the local backend (mixtral_local.backend) is not installed")

pytestmark = pytest.mark.anyio

MAX_TOKENS = 12


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Mixtral checkpoint directory (the one place that knows how mixtral_local writes it)."""
    try:
        from mixtral_local import write_tiny_checkpoint
    except ImportError:
        pytest.skip("mixtral_local.write_tiny_checkpoint is not available")
    path: Path = tmp_path_factory.mktemp("tiny-mixtral")
    write_tiny_checkpoint(path)
    return str(path)


@pytest.fixture
def local_llm(tiny_checkpoint: str) -> Iterator[ChatMixtral]:
    llm = ChatMixtral(provider="local", model_path=tiny_checkpoint, temperature=0, max_tokens=MAX_TOKENS, seed=0)
    yield llm
    llm.close()


def test_greedy_invoke_and_stream_give_the_same_text(local_llm: ChatMixtral) -> None:
    invoked = local_llm.invoke("Hello")
    streamed = "".join(str(chunk.content) for chunk in local_llm.stream("Hello"))
    assert streamed == invoked.content


def test_logprobs_come_in_response_metadata_whole_and_streamed(tiny_checkpoint: str) -> None:
    llm = ChatMixtral(provider="local", model_path=tiny_checkpoint, temperature=0, max_tokens=MAX_TOKENS,
                      logprobs=True, top_logprobs=2)
    try:
        invoked = llm.invoke("Hello")
        streamed = None
        for chunk in llm.stream("Hello"):
            streamed = chunk if streamed is None else streamed + chunk
    finally:
        llm.close()
    tokens = invoked.response_metadata["logprobs"]["content"]
    assert len(tokens) == MAX_TOKENS and "".join(t["token"] for t in tokens) == invoked.content
    assert all(len(t["top_logprobs"]) == 2 for t in tokens)
    assert streamed is not None and streamed.response_metadata["logprobs"]["content"] == tokens


async def test_greedy_ainvoke_and_astream_give_the_same_text(local_llm: ChatMixtral) -> None:
    invoked = await local_llm.ainvoke("Hello")
    streamed = "".join([str(chunk.content) async for chunk in local_llm.astream("Hello")])
    assert streamed == invoked.content == local_llm.invoke("Hello").content


async def test_concurrent_chains_on_the_local_backend_decode_in_one_batch(local_llm: ChatMixtral) -> None:
    import anyio

    from mixtral_local.backend import LocalOptions, _engine_for

    questions = [f"Question {i}?" for i in range(6)]
    expected = [local_llm.invoke(q).content for q in questions]
    engine = _engine_for(LocalOptions.from_config(local_llm._client().config))  # the one the client uses
    sizes: list[int] = []
    hook = engine.model.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    answers: dict[int, object] = {}

    async def ask(i: int) -> None:
        answers[i] = (await local_llm.ainvoke(questions[i])).content

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(questions)):
                tg.start_soon(ask, i)
    finally:
        hook.remove()
    assert [answers[i] for i in range(len(questions))] == expected
    assert max(sizes) > 1  # the chains shared decode steps


def test_local_options_reach_the_engine(tiny_checkpoint: str) -> None:
    import torch

    from mixtral_client import ConfigurationError
    from mixtral_local.backend import LocalOptions, _engine_for

    with pytest.raises(ConfigurationError, match="unknown dtipe"):  # refused when the model is built
        ChatMixtral(provider="local", model_path=tiny_checkpoint, local_options={"dtipe": "float32"})
    llm = ChatMixtral(provider="local", model_path=tiny_checkpoint, max_tokens=2,
                      local_options={"quantize": "int8", "device": "cpu", "max_batch": 2})
    try:
        assert llm.invoke("Hello").usage_metadata is not None
        engine = _engine_for(LocalOptions.from_config(llm._client().config))
        assert engine.model.layers[0].moe.w13.dtype == torch.int8
        assert engine.scheduler.max_rows == 2
    finally:
        llm.close()


def test_usage_appears_once_in_a_local_stream(local_llm: ChatMixtral) -> None:
    chunks = list(local_llm.stream("Hello"))
    assert len([c for c in chunks if c.usage_metadata]) == 1


def test_a_follow_up_turn_reports_its_reused_prompt_tokens_as_cache_reads(local_llm: ChatMixtral) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    system = SystemMessage(" ".join(f"Rule {i}: answer briefly and politely." for i in range(12)))
    first = local_llm.invoke([system, HumanMessage("Hi")])
    second = local_llm.invoke([system, HumanMessage("Hi"), first, HumanMessage("And then?")])
    assert first.usage_metadata is not None and second.usage_metadata is not None
    cached = second.usage_metadata.get("input_token_details", {}).get("cache_read", 0)
    assert first.usage_metadata["input_tokens"] <= cached < second.usage_metadata["input_tokens"]


def test_tools_bound_on_the_local_backend_travel_in_the_prompt(local_llm: ChatMixtral) -> None:
    def ping() -> str:
        """Ping."""
        return "pong"

    plain = local_llm.invoke("Hello")
    with_tools = local_llm.bind_tools([ping]).invoke("Hello")

    assert with_tools.usage_metadata["input_tokens"] > plain.usage_metadata["input_tokens"] + 40
    assert with_tools.tool_calls == []  # random weights answer in text


class Reading(BaseModel):
    """A meter reading."""

    model_config = ConfigDict(extra="forbid")
    meter: str = Field(max_length=6)
    kwh: int = Field(ge=0, le=9999)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_on_the_local_backend_is_enforced(tiny_checkpoint: str, method: str) -> None:
    """Random weights write no JSON of their own: the parsed objects come from constrained decoding."""
    llm = ChatMixtral(provider="local", model_path=tiny_checkpoint, max_tokens=400)
    structured = llm.with_structured_output(Reading, method=method)  # type: ignore[arg-type]
    readings = [structured.invoke("Read the meter.", config={"configurable": {}}, seed=seed)  # type: ignore[call-arg]
                for seed in range(3)]
    llm.close()
    assert all(isinstance(r, Reading) for r in readings), readings
    assert len({(r.meter, r.kwh) for r in readings}) > 1  # sampled, not a fixed answer


def test_a_chain_switches_between_hosted_and_local_by_config(tiny_checkpoint: str) -> None:
    with ScriptedHost() as host:
        llm = ChatMixtral(provider="openai", base_url=host.url, api_key="test-key", max_tokens=MAX_TOKENS)
        chain = llm.configurable_fields(provider=ConfigurableField(id="provider"),
                                        model_path=ConfigurableField(id="model_path"))
        hosted = chain.invoke("Hello")
        local = chain.invoke("Hello", config={"configurable": {"provider": "local", "model_path": tiny_checkpoint}})
    assert len(host.requests) == 1
    assert hosted.response_metadata["model_name"] != local.response_metadata["model_name"]


class TestChatMixtralLocalIntegration(ChatModelIntegrationTests):
    model_path: str

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _checkpoint(cls, tiny_checkpoint: str) -> None:
        cls.model_path = tiny_checkpoint

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatMixtral

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"provider": "local", "model_path": self.model_path, "temperature": 0, "max_tokens": MAX_TOKENS}

    @property
    def has_tool_calling(self) -> bool:
        return False  # tools go into the prompt, but random weights never answer with a call

    @property
    def has_structured_output(self) -> bool:
        return False  # the suite's schemas have unbounded strings: random weights fill them to max_tokens


def test_chat_mixtral_falls_back_to_local_weights_and_paces_its_calls(tiny_checkpoint: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from langchain_mixtral import ChatMixtral
    from mixtral_client import ConfigurationError
    from tests.client.conftest import replying
    from tests.loopback import LoopbackServer

    for key, value in {"MIXTRAL_MODEL_PATH": tiny_checkpoint, "MIXTRAL_LOCAL_DTYPE": "float32",
                       "MIXTRAL_LOCAL_DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, value)
    with LoopbackServer(replying(503, "down")) as host:
        llm = ChatMixtral(provider="openai", base_url=host.url, api_key="k", max_retries=0, max_tokens=3,
                          fallbacks=["local"], rate_limit=300)  # one call every 0.2 s
        started = time.monotonic()
        first, second = llm.invoke("hi"), llm.invoke("hi again")
        elapsed = time.monotonic() - started
        llm.close()
    assert first.response_metadata["model_name"] == second.response_metadata["model_name"] == "mixtral-local"
    assert len(host.requests) == 2 and elapsed >= 0.19  # the host's two refusals were paced, then the weights
    with pytest.raises(ConfigurationError, match="unknown provider 'nowhere'"):
        ChatMixtral(provider="openai", base_url="http://127.0.0.1:9/v1", api_key="k", fallbacks=["nowhere"])
    with pytest.raises(ConfigurationError, match="requests per minute"):
        ChatMixtral(provider="openai", base_url="http://127.0.0.1:9/v1", api_key="k", rate_limit=0)
