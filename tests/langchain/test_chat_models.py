"""ChatMixtral against a host on 127.0.0.1: what reaches the wire, and what comes back as LangChain objects."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.runnables import ConfigurableField
from pydantic import BaseModel, Field

from langchain_mixtral import ChatMixtral
from mixtral_client import APIStatusError, ConfigurationError
from tests.langchain.scripted_host import ScriptedHost
from tests.loopback import Conn, LoopbackServer, Received, sse

pytestmark = pytest.mark.anyio

MISTRAL_ID = re.compile(r"^[A-Za-z0-9]{9}$")


def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


def get_time(timezone: str) -> str:
    """The time in a timezone."""
    return "noon"


class Joke(BaseModel):
    """A joke."""

    setup: str = Field(description="the question")
    punchline: str = Field(description="the answer")


def model_on(host: ScriptedHost | LoopbackServer, **kwargs: Any) -> ChatMixtral:
    return ChatMixtral(provider="openai", base_url=host.url, api_key="test-key", max_retries=0, **kwargs)


def merge(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    return full


@pytest.fixture
def parallel_host() -> Iterator[ScriptedHost]:
    with ScriptedHost(parallel=True, piece=3) as host:
        yield host


# --------------------------------------------------------------------------- tool calls


def test_parallel_tool_call_chunks_merge_into_two_correct_tool_calls(parallel_host: ScriptedHost) -> None:
    llm = model_on(parallel_host).bind_tools([get_weather, get_time])
    chunks = list(llm.stream("weather and time?"))
    full = merge(chunks)
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [
        ("get_weather", {"city": "example city"}), ("get_time", {"timezone": "example timezone"})]
    assert [c["id"] for c in full.tool_calls] == ["call_1_0", "call_1_1"]
    assert full.response_metadata["finish_reason"] == "tool_calls"


async def test_parallel_tool_call_chunks_merge_async(parallel_host: ScriptedHost) -> None:
    llm = model_on(parallel_host).bind_tools([get_weather, get_time])
    full = merge([c async for c in llm.astream("weather and time?")])
    assert [c["name"] for c in full.tool_calls] == ["get_weather", "get_time"]
    assert full.tool_calls[1]["args"] == {"timezone": "example timezone"}


def test_tool_call_chunks_have_integer_index_and_id_name_on_first_fragment_only(parallel_host: ScriptedHost) -> None:
    fragments = [tc for c in model_on(parallel_host).bind_tools([get_weather, get_time]).stream("go")
                 for tc in c.tool_call_chunks]
    assert len(fragments) > 4
    assert all(isinstance(f["index"], int) for f in fragments)
    for index in (0, 1):
        mine = [f for f in fragments if f["index"] == index]
        assert mine[0]["id"] and mine[0]["name"]
        assert all(f["id"] is None and f["name"] is None for f in mine[1:])


def test_streamed_tool_calls_get_mistral_style_ids_when_the_host_sends_none() -> None:
    with ScriptedHost(tool_call_ids=False, parallel=True) as host:
        full = merge(list(model_on(host).bind_tools([get_weather, get_time]).stream("go")))
    ids = [c["id"] for c in full.tool_calls]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all(MISTRAL_ID.match(i or "") for i in ids)


def test_invoked_tool_calls_get_mistral_style_ids_when_the_host_sends_an_empty_one() -> None:
    with ScriptedHost(tool_call_ids=False) as host:
        message = model_on(host).bind_tools([get_weather]).invoke("go")
    assert MISTRAL_ID.match(message.tool_calls[0]["id"] or "")


def test_invoked_tool_calls_get_mistral_style_ids_when_the_host_omits_them() -> None:
    def handler(req: Received, conn: Conn) -> None:
        conn.respond(200, {"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}}]})

    with LoopbackServer(handler) as server:
        message = model_on(server).bind_tools([get_weather]).invoke("go")
    assert MISTRAL_ID.match(message.tool_calls[0]["id"] or "")


def test_fragments_without_index_are_matched_by_id_and_position() -> None:
    def handler(req: Received, conn: Conn) -> None:
        base = {"id": "r", "model": "m"}
        frag = [{"id": "a", "function": {"name": "get_weather", "arguments": '{"city":'}},
                {"function": {"arguments": ' "Oslo"}'}},
                {"id": "b", "function": {"name": "get_time", "arguments": "{}"}}]
        events = [{**base, "choices": [{"index": 0, "delta": {"tool_calls": [f]}}]} for f in frag]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(*events))
        conn.finish()

    with LoopbackServer(handler) as server:
        full = merge(list(model_on(server).bind_tools([get_weather, get_time]).stream("go")))
    assert [(c["id"], c["args"]) for c in full.tool_calls] == [("a", {"city": "Oslo"}), ("b", {})]


def test_tool_choice_words_names_and_dicts_reach_the_host(host: ScriptedHost) -> None:
    llm = model_on(host)
    for choice, sent in [("any", "required"), ("auto", "auto"), ("none", "none"),
                         ("get_time", {"type": "function", "function": {"name": "get_time"}})]:
        llm.bind_tools([get_weather, get_time], tool_choice=choice).invoke("hi")
        assert host.requests[-1]["tool_choice"] == sent
    assert llm.bind_tools([get_weather, get_time], tool_choice="get_time").invoke("hi").tool_calls[0]["name"] == "get_time"
    assert llm.bind_tools([get_weather, get_time], tool_choice="none").invoke("hi").tool_calls == []


def test_a_mixtral_client_tool_is_bound_with_its_own_schema(host: ScriptedHost) -> None:
    from mixtral_client import tool

    weather = tool(get_weather)
    model_on(host).bind_tools([weather, get_time]).invoke("hi")
    sent = host.requests[-1]["tools"]
    assert sent[0] == weather.param and sent[0]["function"]["parameters"]["additionalProperties"] is False
    assert sent[1]["function"]["name"] == "get_time"


def test_unknown_tool_choice_is_refused() -> None:
    llm = ChatMixtral(provider="openai", base_url="http://127.0.0.1:9/v1", api_key="k")
    with pytest.raises(ValueError, match="tool_choice 'nope'"):
        llm.bind_tools([get_weather], tool_choice="nope")


def test_agent_loop_sends_tool_calls_and_results_back(host: ScriptedHost) -> None:
    llm = model_on(host).bind_tools([get_weather])
    question = HumanMessage("weather in Oslo?")
    call = llm.invoke([question])
    result = ToolMessage("sunny", tool_call_id=call.tool_calls[0]["id"])
    answer = llm.invoke([question, call, result])
    assert answer.content == "The tool answered: sunny"
    sent = host.requests[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "example city"}'}
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": call.tool_calls[0]["id"]}


@pytest.fixture
def nvidia_like() -> Iterator[ScriptedHost]:
    """A host without native tools: it refuses ``tools`` and reads them from the prompt."""
    with ScriptedHost(prompted=True, parallel=True) as host:
        yield host


def test_an_agent_loop_runs_on_a_host_without_native_tools(nvidia_like: ScriptedHost) -> None:
    llm = ChatMixtral(provider="nvidia", base_url=nvidia_like.url, api_key="nvapi-test").bind_tools(
        [get_weather, get_time])
    question = HumanMessage("weather in Oslo?")

    call = llm.invoke([question])

    assert [(c["name"], c["args"]) for c in call.tool_calls] == [("get_weather", {"city": "example city"}),
                                                                  ("get_time", {"timezone": "example timezone"})]
    assert all(MISTRAL_ID.match(c["id"] or "") for c in call.tool_calls)
    assert call.response_metadata["finish_reason"] == "tool_calls"
    results = [ToolMessage(f"result {i}", tool_call_id=c["id"]) for i, c in enumerate(call.tool_calls)]
    answer = llm.invoke([question, call, *results])
    assert answer.content == "The tool answered: result 1"
    assert answer.tool_calls == []
    assert all("tools" not in body for body in nvidia_like.requests)
    follow_up = nvidia_like.requests[-1]["messages"]
    assert [m["role"] for m in follow_up] == ["system", "user", "assistant", "user"]
    assert follow_up[2]["content"].startswith("[TOOL_CALLS] [")


async def test_a_streamed_agent_turn_on_a_host_without_native_tools(nvidia_like: ScriptedHost) -> None:
    llm = ChatMixtral(provider="nvidia", base_url=nvidia_like.url, api_key="nvapi-test").bind_tools(
        [get_weather], tool_choice="get_weather")

    chunks = [chunk async for chunk in llm.astream("hi")]

    full = merge(chunks)
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("get_weather", {"city": "example city"})]
    assert full.content == ""
    assert "must call the tool get_weather" in nvidia_like.requests[-1]["messages"][0]["content"]


def test_structured_output_by_function_calling_on_a_host_without_native_tools(nvidia_like: ScriptedHost) -> None:
    llm = ChatMixtral(provider="nvidia", base_url=nvidia_like.url, api_key="nvapi-test")
    joke = llm.with_structured_output(Joke, method="function_calling").invoke("a joke")
    assert joke == Joke(setup="example setup", punchline="example punchline")


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_by_json_schema_and_json_mode_on_a_host_without_response_format(
        nvidia_like: ScriptedHost, stream: bool) -> None:
    llm = ChatMixtral(provider="nvidia", base_url=nvidia_like.url, api_key="nvapi-test", streaming=stream)
    joke = llm.with_structured_output(Joke, method="json_schema").invoke("a joke")
    assert joke == Joke(setup="example setup", punchline="example punchline")
    assert "response_format" not in nvidia_like.requests[-1]
    assert llm.with_structured_output(None, method="json_mode").invoke("a joke") == {"answer": "a joke"}


def test_structured_output_prompt_serves_json_schema_from_an_openai_compatible_host_without_it(
        nvidia_like: ScriptedHost) -> None:
    llm = ChatMixtral(provider="openai", base_url=nvidia_like.url, api_key="k", structured_output="prompt")
    joke = llm.with_structured_output(Joke, method="json_schema").invoke("a joke")
    assert joke == Joke(setup="example setup", punchline="example punchline")
    with pytest.raises(ValueError, match="structured_output"):
        ChatMixtral(provider="openai", base_url=nvidia_like.url, api_key="k", structured_output="sometimes")


# --------------------------------------------------------------------------- structured output


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_parses_into_the_schema(host: ScriptedHost, method: str) -> None:
    joke = model_on(host).with_structured_output(Joke, method=method).invoke("a joke")
    assert joke == Joke(setup="example setup", punchline="example punchline")


def test_structured_output_methods_send_the_right_request(host: ScriptedHost) -> None:
    llm = model_on(host)
    llm.with_structured_output(Joke, strict=True).invoke("a joke")
    sent = host.requests[-1]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "Joke"}}
    assert sent["tools"][0]["function"]["strict"] is True
    llm.with_structured_output(Joke, method="json_schema", strict=True).invoke("a joke")
    fmt = host.requests[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Joke" and fmt["json_schema"]["strict"]
    assert "tools" not in host.requests[-1]
    assert llm.with_structured_output(None, method="json_mode").invoke("a joke") == {"answer": "a joke"}
    assert host.requests[-1]["response_format"] == {"type": "json_object"}


def test_structured_output_include_raw_keeps_the_message_and_the_error(host: ScriptedHost) -> None:
    out = model_on(host).with_structured_output(Joke, method="json_mode", include_raw=True).invoke("a joke")
    assert isinstance(out, dict)
    assert isinstance(out["raw"], AIMessage) and out["parsed"] is None and out["parsing_error"] is not None


def test_structured_output_without_schema_is_refused_for_schema_methods() -> None:
    llm = ChatMixtral(provider="openai", base_url="http://127.0.0.1:9/v1", api_key="k")
    with pytest.raises(ValueError, match="needs a schema"):
        llm.with_structured_output(None, method="json_schema")


# --------------------------------------------------------------------------- usage and metadata


def test_invoke_carries_usage_and_response_metadata(llm: ChatMixtral) -> None:
    message = llm.invoke("hi there")
    assert message.usage_metadata == {"input_tokens": 2, "output_tokens": 5, "total_tokens": 7}
    assert message.response_metadata["model_name"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.response_metadata["id"] == message.id == "chatcmpl-1"


def test_usage_appears_on_exactly_one_stream_chunk(llm: ChatMixtral, host: ScriptedHost) -> None:
    chunks = list(llm.stream("hi there"))
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1
    assert with_usage[0].usage_metadata == {"input_tokens": 2, "output_tokens": 5, "total_tokens": 7}
    assert host.requests[-1]["stream_options"] == {"include_usage": True}
    full = merge(chunks)
    assert full.content == "Hello! You said: hi there"
    assert full.response_metadata["finish_reason"] == "stop"
    assert full.response_metadata["model_name"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert full.id == "chatcmpl-1"


def test_usage_is_counted_once_when_the_host_repeats_a_running_total() -> None:
    def handler(req: Received, conn: Conn) -> None:
        base = {"id": "r", "model": "m"}
        events = [{**base, "choices": [{"index": 0, "delta": {"content": w}}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": i + 1, "total_tokens": 4 + i}}
                  for i, w in enumerate(["a", "b", "c"])]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(*events))
        conn.finish()

    with LoopbackServer(handler) as server:
        full = merge(list(model_on(server).stream("hi")))
    assert full.usage_metadata == {"input_tokens": 3, "output_tokens": 3, "total_tokens": 6}


def test_stream_usage_can_be_turned_off(host: ScriptedHost) -> None:
    chunks = list(model_on(host, stream_usage=False).stream("hi"))
    assert "stream_options" not in host.requests[-1]
    assert not any(c.usage_metadata for c in chunks)


def test_max_tokens_and_stop_reach_the_host(llm: ChatMixtral, host: ScriptedHost) -> None:
    cut = llm.invoke("one two three four", max_tokens=2)
    assert cut.content == "Hello! You" and cut.response_metadata["finish_reason"] == "length"
    stopped = llm.invoke("one two three", stop=["two"])
    assert stopped.content == "Hello! You said: one " and host.requests[-1]["stop"] == ["two"]


def test_model_kwargs_known_ones_go_top_level_unknown_ones_into_the_body(host: ScriptedHost) -> None:
    llm = model_on(host, model_kwargs={"n": 2, "top_k": 5})
    result = llm.generate([[HumanMessage("hi")]])
    assert len(result.generations[0]) == 2
    assert host.requests[-1]["n"] == 2 and host.requests[-1]["top_k"] == 5


def test_model_kwargs_may_not_shadow_fields() -> None:
    with pytest.raises(ValueError, match="model_kwargs must not set"):
        ChatMixtral(provider="openai", base_url="http://127.0.0.1:9/v1", api_key="k", model_kwargs={"temperature": 1})


def test_the_stream_switch_of_invoke_is_not_sent_as_a_body_field(llm: ChatMixtral, host: ScriptedHost) -> None:
    assert llm.invoke("hi", stream=True).usage_metadata is not None
    assert host.requests[-1]["stream"] is True
    assert llm.invoke("hi", stream=False).content == "Hello! You said: hi"
    assert "stream" not in host.requests[-1]


def test_logprobs_reach_the_generation_info(host: ScriptedHost) -> None:
    llm = model_on(host, logprobs=True, top_logprobs=2)
    message = llm.invoke("hi")
    assert message.response_metadata["logprobs"]["content"][0]["token"] == "Hello!"
    assert (host.requests[-1]["logprobs"], host.requests[-1]["top_logprobs"]) == (True, 2)
    assert "logprobs" not in model_on(host).invoke("hi").response_metadata
    assert "logprobs" not in host.requests[-1]


async def test_response_headers_on_the_answer_and_on_the_first_stream_chunk(host: ScriptedHost) -> None:
    llm = model_on(host, include_response_headers=True)
    message = llm.invoke("hi")
    assert message.response_metadata["headers"]["x-ratelimit-remaining-requests"] == "99"
    assert message.response_metadata["headers"]["x-request-id"] == "req-1"
    chunks = list(llm.stream("hi"))
    with_headers = [c for c in chunks if "headers" in c.response_metadata]
    assert with_headers == chunks[:1] and chunks[0].content
    assert chunks[0].response_metadata["headers"]["x-request-id"] == "req-2"
    assert merge(chunks).response_metadata["headers"]["x-ratelimit-remaining-requests"] == "98"
    answer = await llm.ainvoke("hi")
    assert answer.response_metadata["headers"]["x-request-id"] == "req-3"
    first = [c async for c in llm.astream("hi")][0]
    assert first.response_metadata["headers"]["x-request-id"] == "req-4"
    assert "headers" not in model_on(host).invoke("hi").response_metadata  # off by default


def test_logit_bias_is_sent_with_openais_string_keys(host: ScriptedHost) -> None:
    model_on(host, logit_bias={5592: 10}).invoke("hi")
    assert host.requests[-1]["logit_bias"] == {"5592": 10}


# --------------------------------------------------------------------------- errors


def test_a_mid_stream_host_error_raises_instead_of_ending_quietly() -> None:
    with ScriptedHost(error_after=3) as host:
        seen = []
        with pytest.raises(APIStatusError, match="upstream provider failed") as info:
            for chunk in model_on(host).stream("hi there"):
                seen.append(chunk)
    assert info.value.status_code == 502
    assert "".join(str(c.content) for c in seen) == "Hello! You"


async def test_a_mid_stream_host_error_raises_async() -> None:
    with ScriptedHost(error_after=3) as host:
        with pytest.raises(APIStatusError, match="upstream provider failed"):
            async for _ in model_on(host).astream("hi there"):
                pass


def test_images_are_refused_before_sending(llm: ChatMixtral, host: ScriptedHost) -> None:
    image = HumanMessage([{"type": "text", "text": "what is this?"},
                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    with pytest.raises(ValueError, match="reads text only"):
        llm.invoke([image])
    assert host.requests == []


# --------------------------------------------------------------------------- configuration and clients


def test_keys_come_from_the_providers_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-from-env")
    llm = ChatMixtral(provider="nvidia")
    assert llm.api_key is not None and llm.api_key.get_secret_value() == "nvapi-from-env"


def test_a_missing_key_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENROUTER_API_KEY", "MIXTRAL_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigurationError, match="OPENROUTER_API_KEY"):
        ChatMixtral(provider="openrouter")


def test_switching_provider_by_config_reads_the_new_providers_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-key")
    monkeypatch.setenv("OPENROUTER_API_KEY", "or-key")
    monkeypatch.delenv("MIXTRAL_API_KEY", raising=False)
    chain = ChatMixtral(provider="nvidia").configurable_fields(provider=ConfigurableField(id="provider"))
    switched, _ = chain._prepare({"configurable": {"provider": "openrouter"}})
    assert isinstance(switched, ChatMixtral) and switched.api_key is not None
    assert switched.api_key.get_secret_value() == "or-key"


def test_switching_model_by_config_reaches_the_host(host: ScriptedHost) -> None:
    chain = model_on(host).configurable_fields(model=ConfigurableField(id="model"))
    answer = chain.invoke("hi", config={"configurable": {"model": "my-mixtral"}})
    assert host.requests[-1]["model"] == "my-mixtral" and answer.response_metadata["model_name"] == "my-mixtral"


def test_ls_params_honour_a_per_call_model(llm: ChatMixtral) -> None:
    assert llm._get_ls_params()["ls_model_name"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert llm._get_ls_params(model="other")["ls_model_name"] == "other"
    assert llm._get_ls_params()["ls_provider"] == "openai"


async def test_async_calls_do_not_fall_back_to_threads(llm: ChatMixtral, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sync(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sync path was used")

    monkeypatch.setattr(ChatMixtral, "_generate", no_sync)
    monkeypatch.setattr(ChatMixtral, "_stream", no_sync)
    assert (await llm.ainvoke("hi")).content == "Hello! You said: hi"
    assert [c async for c in llm.astream("hi")]


def test_async_clients_are_per_event_loop_and_closed_with_it(llm: ChatMixtral) -> None:
    async def ask() -> str:
        return str((await llm.ainvoke("hi")).content)

    assert asyncio.run(ask()) == asyncio.run(ask()) == "Hello! You said: hi"
    assert len(llm._async_clients) == 0  # each loop's client was closed as that loop shut down


def test_the_sync_client_is_built_once_and_reused(llm: ChatMixtral, host: ScriptedHost) -> None:
    llm.invoke("a")
    client = llm._client()
    llm.invoke("b")
    assert llm._client() is client
    assert json.loads(json.dumps(host.requests[-1]))["messages"] == [{"role": "user", "content": "b"}]


def test_tool_calling_prompt_for_an_openai_compatible_host_without_tools(nvidia_like: ScriptedHost) -> None:
    llm = ChatMixtral(base_url=nvidia_like.url, api_key="k", tool_calling="prompt").bind_tools([get_weather])

    call = llm.invoke("weather in Oslo?")

    assert call.tool_calls[0]["name"] == "get_weather"
    assert "tools" not in nvidia_like.requests[-1]
    with pytest.raises(ValueError, match="tool_calling"):
        ChatMixtral(base_url=nvidia_like.url, api_key="k", tool_calling="always")
