"""Tool calling by prompt on hosts without native tools (NVIDIA here, on the loopback server), and the pure
pieces behind it: the rewritten conversation, the parser, and the stream rewriting at every split."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from mixtral_client import PROVIDERS, APIConnectionError, ChatCompletion, Timeout
from mixtral_client._request import RequestOptions, build_request
from mixtral_client._rewrite import rewrite_astream, rewrite_stream
from mixtral_client._streaming import AsyncStream
from mixtral_client._tools import CALLS, ToolPrompt, parse_tool_calls, rewrite_messages
from tests.client.conftest import (
    MESSAGES,
    Driver,
    chunk,
    completion,
    cut_stream,
    merge_stream,
    replying,
    split_chunks,
    streaming,
)
from tests.loopback import sse

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, ADD]
NAMES = {"get_weather": {}, "add": {}}
NVIDIA = {"provider": "nvidia"}
CALL = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'


def prompt_for(provider: str = "nvidia", *, messages: Any = MESSAGES, **params: Any) -> ToolPrompt | None:
    request = build_request(PROVIDERS[provider], model=None, messages=messages, stream=False,
                            options=RequestOptions(timeout=Timeout()), params=params)
    return ToolPrompt.for_request(request)


# --------------------------------------------------------------------------- the request


def test_tools_go_into_the_system_text_and_leave_the_body() -> None:
    prompt = prompt_for(messages=[{"role": "system", "content": "Be brief."}, *MESSAGES], tools=TOOLS,
                        tool_choice="auto", parallel_tool_calls=True, temperature=0.1)

    assert prompt is not None
    body = prompt.request.body()
    assert {"tools", "tool_choice", "parallel_tool_calls"}.isdisjoint(body)
    assert body["temperature"] == 0.1
    system, user = body["messages"]
    assert user == {"role": "user", "content": "Hi"}
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\n[AVAILABLE_TOOLS] ")
    listing = json.loads(system["content"].split("[AVAILABLE_TOOLS] ")[1].split(" [/AVAILABLE_TOOLS]")[0])
    assert [t["function"]["name"] for t in listing] == ["get_weather", "add"]
    assert listing[0]["function"]["parameters"] == WEATHER["function"]["parameters"]
    assert "strict" not in listing[0]["function"]
    assert "plain text" in system["content"]


@pytest.mark.parametrize(("provider", "stop", "sent"), [
    ("nvidia", None, ["[TOOL_RESULTS]"]),
    ("nvidia", "END", ["END", "[TOOL_RESULTS]"]),
    ("local", ["a", "[TOOL_RESULTS]"], ["a", "[TOOL_RESULTS]"]),
    ("aimlapi", ["a", "b", "c"], ["a", "b", "c", "[TOOL_RESULTS]"]),
    ("aimlapi", ["a", "b", "c", "d"], ["a", "b", "c", "d"]),  # AIML API takes at most 4
])
def test_answers_stop_before_a_made_up_tool_result(provider: str, stop: Any, sent: list[str]) -> None:
    prompt = prompt_for(provider, tools=TOOLS, **({"stop": stop} if stop is not None else {}))

    assert prompt is not None
    assert prompt.request.params["stop"] == sent


def test_no_stop_is_added_when_no_tool_may_be_called() -> None:
    prompt = prompt_for(tools=TOOLS, tool_choice="none")
    assert prompt is not None and "stop" not in prompt.request.params


@pytest.mark.parametrize(("choice", "says", "listed"), [
    ("required", "must call at least one tool", ["get_weather", "add"]),
    ({"type": "function", "function": {"name": "add"}}, "must call the tool add", ["add"]),
])
def test_tool_choice_is_written_into_the_instructions(choice: Any, says: str, listed: list[str]) -> None:
    prompt = prompt_for(tools=TOOLS, tool_choice=choice)

    assert prompt is not None
    system = prompt.request.messages[0]["content"]
    assert says in system
    assert list(prompt.tools) == listed
    assert "plain text" not in system


def test_tool_choice_none_lists_no_tools_and_reads_no_calls() -> None:
    prompt = prompt_for(tools=TOOLS, tool_choice="none")

    assert prompt is not None
    assert prompt.request.messages == [{"role": "user", "content": "Hi"}]
    answer = ChatCompletion.model_validate(completion(CALL))
    assert prompt.completion(answer).choices[0].message.content == CALL


def test_requests_without_tools_or_on_native_hosts_are_not_rewritten() -> None:
    assert prompt_for(temperature=0.5) is None
    assert prompt_for("openrouter", tools=TOOLS) is None
    assert prompt_for("openai", tools=TOOLS) is None


def test_tool_calls_and_results_in_the_history_become_text_turns() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "xyz987uvw", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}},
        ]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "sunny"},
        {"role": "tool", "tool_call_id": "xyz987uvw", "content": [{"type": "text", "text": "rain"}]},
    ]

    rewritten = rewrite_messages(messages, None)

    assert [m["role"] for m in rewritten] == ["user", "assistant", "user"]
    assert rewritten[1]["content"] == CALLS + " " + json.dumps([
        {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"},
        {"name": "get_weather", "arguments": "not json", "id": "xyz987uvw"},
    ])
    results = rewritten[2]["content"].split("\n\n")
    assert results == [
        '[TOOL_RESULTS] {"call_id": "abc123def", "name": "get_weather", "content": "sunny"} [/TOOL_RESULTS]',
        '[TOOL_RESULTS] {"call_id": "xyz987uvw", "name": "get_weather", "content": "rain"} [/TOOL_RESULTS]',
    ]


def test_a_json_tool_result_is_shown_as_json() -> None:
    messages = [*MESSAGES, {"role": "tool", "tool_call_id": "abc123def", "content": '{"temp": 21, "sky": "clear"}'},
                {"role": "tool", "tool_call_id": "xyz987uvw", "content": "[not json"}]

    results = rewrite_messages(messages, None)[0]["content"].split("\n\n")[1:]

    assert results == [
        '[TOOL_RESULTS] {"call_id": "abc123def", "content": {"temp": 21, "sky": "clear"}} [/TOOL_RESULTS]',
        '[TOOL_RESULTS] {"call_id": "xyz987uvw", "content": "[not json"} [/TOOL_RESULTS]',
    ]


def test_a_history_with_tool_results_is_rewritten_even_without_tools() -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "abc123def", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "3"}]

    prompt = prompt_for(messages=messages)

    assert prompt is not None and not prompt.tools
    assert prompt.request.messages[1]["content"] == 'Checking.\n[TOOL_CALLS] [{"name": "add", "arguments": {}, "id": "abc123def"}]'
    assert prompt.request.messages[2]["role"] == "user"


# --------------------------------------------------------------------------- reading calls back


@pytest.mark.parametrize(("text", "content", "calls"), [
    (CALL, None, [("get_weather", {"city": "Paris"})]),
    (' [TOOL_CALLS] {"name": "add", "arguments": "{\\"a\\": 1}"}', None, [("add", {"a": 1})]),
    ('```json\n[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]\n```',
     None, [("add", {"a": 1}), ("get_weather", {"city": "Rome"})]),
    ('{"name": "add"}', None, [("add", {})]),
    ('Let me look. [TOOL_CALLS] [{"name": "add", "arguments": {}}] One moment.', "Let me look. One moment.",
     [("add", {})]),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {}}]\n[TOOL_CALLS] [{"name": "add", "arguments": {"b": 2}}]', None,
     [("add", {}), ("add", {"b": 2})]),
])
def test_calls_are_read_from_the_answer(text: str, content: str | None, calls: list[tuple[str, dict]]) -> None:
    parsed = parse_tool_calls(text, NAMES)

    assert parsed is not None
    assert parsed[0] == content
    assert [(fn.name, json.loads(fn.arguments)) for fn in parsed[1]] == calls


@pytest.mark.parametrize("text", [
    "Paris is sunny.",
    '{"name": "delete_everything", "arguments": {}}',              # not a declared tool
    '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}',          # cut short
    '[TOOL_CALLS] [{"name": "add", "arguments": [1, 2]}]',          # arguments are not an object
    '{"name": "add", "arguments": {}} and then some prose',          # bare JSON must be the whole answer
    '[1, 2, 3]',
    '```json\n{"name": "add", "arguments": {}}',                    # an unclosed fence
])
def test_answers_that_are_not_calls_stay_text(text: str) -> None:
    assert parse_tool_calls(text, NAMES) is None


def test_a_whole_answer_becomes_tool_calls_with_fresh_ids() -> None:
    prompt = prompt_for(tools=TOOLS)
    assert prompt is not None

    answer = prompt.completion(ChatCompletion.model_validate(completion(CALL)))

    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert len(call.id) == 9 and call.id.isalnum()
    assert answer.usage is not None and answer.usage.total_tokens == 5


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    prompt = prompt_for(tools=TOOLS, parallel_tool_calls=False)
    assert prompt is not None
    assert "one tool at a time" in prompt.request.messages[0]["content"]
    two = '[TOOL_CALLS] [{"name": "add", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'

    answer = prompt.completion(ChatCompletion.model_validate(completion(two)))

    assert [c.function.name for c in answer.choices[0].message.tool_calls or []] == ["add"]


# --------------------------------------------------------------------------- streams, split everywhere


ANSWERS = [
    CALL,
    "  " + CALL,
    "Sure: " + CALL,
    '```json\n{"name": "add", "arguments": {"x": "[TOOL"}}\n```',
    "The weather is [mostly] sunny; see [TOOL docs].",
    "[TOOL_CALLS] [{broken json",
    "{not a call}",
    "[TOOL_CALL",
    "",
]


@pytest.mark.parametrize("text", ANSWERS)
@pytest.mark.parametrize("finish", ["stop", None])
def test_a_stream_split_anywhere_gives_what_the_whole_answer_gives(text: str, finish: str | None) -> None:
    prompt = prompt_for(tools=TOOLS)
    assert prompt is not None
    whole = prompt.completion(ChatCompletion.model_validate(completion(text))).choices[0]
    splits = [[]] + [[i] for i in range(1, len(text))] + [list(range(1, len(text)))]

    for cuts in splits:
        streamed, _ = merge_stream(prompt, split_chunks(text, cuts, finish))
        (choice,) = streamed.choices
        assert choice.message.content == whole.message.content, cuts
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == \
            [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []], cuts
        want_finish = "tool_calls" if whole.message.tool_calls else finish
        assert choice.finish_reason == want_finish, cuts


def test_a_text_answer_streams_as_it_comes() -> None:
    prompt = prompt_for(tools=TOOLS)
    assert prompt is not None
    text = "Paris is sunny today, with a light breeze from the west."

    _, texts = merge_stream(prompt, split_chunks(text, list(range(1, len(text)))))

    assert texts == list(text)  # one piece out for each piece in: nothing held back


@pytest.mark.parametrize("text", ["[1] Paris is sunny.", "{braces} first", "`code` then prose", "[To be sure]"])
def test_text_that_opens_like_json_but_cannot_be_a_call_is_not_held(text: str) -> None:
    prompt = prompt_for(tools=TOOLS)
    assert prompt is not None

    _, texts = merge_stream(prompt, split_chunks(text, list(range(1, len(text)))))

    assert "".join(texts) == text
    assert len(texts) >= len(text) - 4  # released after at most a few characters, not at the end


def test_a_marker_in_a_text_answer_ends_the_text_there() -> None:
    prompt = prompt_for(tools=TOOLS)
    assert prompt is not None
    text = "Let me check. " + CALL

    streamed, texts = merge_stream(prompt, split_chunks(text, list(range(1, len(text)))))

    assert "".join(texts) == "Let me check. "
    assert streamed.choices[0].message.content == "Let me check. "
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in streamed.choices[0].message.tool_calls or []] == ["get_weather"]


def test_a_stream_closed_early_closes_what_it_reads() -> None:
    prompt = prompt_for(tools=TOOLS)
    assert prompt is not None
    closed = []

    def source():
        try:
            yield from split_chunks("Hello there, a long answer", [1, 5, 9])
        finally:
            closed.append(True)

    stream = rewrite_stream(source(), prompt.chunks())
    next(stream)
    stream.close()

    assert closed == [True]


@pytest.mark.anyio
async def test_an_async_stream_left_early_or_cancelled_closes_what_it_reads(anyio_backend: str) -> None:
    prompt = prompt_for(tools=TOOLS)
    assert prompt is not None
    closed: list[str] = []

    async def source(name: str):
        try:
            for piece in split_chunks("Hello there, a long answer", [1, 5, 9]):
                yield piece
                await anyio.sleep(0.01)
        finally:
            closed.append(name)

    stream = AsyncStream(rewrite_astream(source("left"), prompt.chunks()))
    async with await stream._open() as opened:
        async for _ in opened:
            break
    with anyio.move_on_after(0.015):
        async with await AsyncStream(rewrite_astream(source("cancelled"), prompt.chunks()))._open() as opened:
            async for _ in opened:
                pass

    assert closed == ["left", "cancelled"]


# --------------------------------------------------------------------------- end to end on a loopback NVIDIA host


def test_a_stream_cut_inside_a_call_keeps_what_was_held_in_the_partial(driver: Driver, serve) -> None:
    server = serve(cut_stream(chunk(role="assistant"), chunk("[TOOL_CALLS] "), chunk('[{"name": "add", "argu')))

    with pytest.raises(APIConnectionError) as info:
        driver.chunks(server, client=NVIDIA | {"max_retries": 0}, tools=TOOLS)

    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == '[TOOL_CALLS] [{"name": "add", "argu'
    assert "".join(c.choices[0].delta.content or "" for c in driver.seen if c.choices) == \
        '[TOOL_CALLS] [{"name": "add", "argu'


def test_nvidia_gets_a_plain_request_and_its_answer_comes_back_as_tool_calls(driver: Driver, serve) -> None:
    server = serve(replying(200, completion(" " + CALL)))

    answer = driver.complete(server, client=NVIDIA, tools=TOOLS, tool_choice="required")

    body = server.requests[0].json()
    assert "tools" not in body and "tool_choice" not in body
    assert body["messages"][0]["role"] == "system" and "[AVAILABLE_TOOLS]" in body["messages"][0]["content"]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []] == \
        [("get_weather", {"city": "Paris"})]


def test_a_streamed_call_from_nvidia_arrives_as_tool_call_deltas(driver: Driver, serve) -> None:
    pieces = ["[TOOL", "_CALLS] [", '{"name": "add", "arg', 'uments": {"a": 1}}, ',
              '{"name": "get_weather", "arguments": {"city": "Rome"}}]']
    body = sse(chunk(role="assistant"), *(chunk(p) for p in pieces), chunk(finish="stop"),
               {**chunk(), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39}})
    server = serve(streaming(body, one_byte=True))

    chunks = driver.chunks(server, client=NVIDIA, tools=TOOLS, stream_options={"include_usage": True})

    assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    calls = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or []]
    assert [(d.index, d.function.name if d.function else None) for d in calls] == [(0, "add"), (1, "get_weather")]
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 39


def test_a_follow_up_turn_with_results_is_sent_as_text_and_answered_as_text(driver: Driver, serve) -> None:
    server = serve(replying(200, completion("It is sunny in Paris.")))
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "sunny, 21 C"}]

    answer = driver.complete(server, client=NVIDIA, messages=messages, tools=TOOLS)

    sent = server.requests[0].json()["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert all(isinstance(m["content"], str) and "tool_call_id" not in m for m in sent)
    assert "sunny, 21 C" in sent[3]["content"] and "abc123def" in sent[3]["content"]
    assert answer.choices[0].message.content == "It is sunny in Paris."
    assert answer.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- choosing the way: tool_calling=


def test_tool_calling_prompt_writes_tools_into_the_prompt_for_any_openai_compatible_host(driver: Driver,
                                                                                         serve) -> None:
    server = serve(replying(200, completion(CALL)))

    answer = driver.complete(server, client={"tool_calling": "prompt"}, tools=TOOLS)

    assert "tools" not in server.requests[0].json()
    assert answer.choices[0].message.tool_calls is not None
    assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_tool_calling_native_sends_tools_to_a_host_that_would_get_them_in_the_prompt(driver: Driver,
                                                                                     serve) -> None:
    server = serve(replying(200, completion("no call")))

    driver.complete(server, client=NVIDIA | {"tool_calling": "native"}, tools=TOOLS)

    assert server.requests[0].json()["tools"] == TOOLS


def test_tool_calling_from_the_environment() -> None:
    from mixtral_client._config import resolve_config

    env = {"MIXTRAL_BASE_URL": "http://127.0.0.1:9/v1", "MIXTRAL_API_KEY": "k", "MIXTRAL_TOOL_CALLING": "prompt"}
    assert resolve_config(env).preset.prompts_tools
    assert not resolve_config(env, tool_calling="auto").preset.prompts_tools
    assert not resolve_config({**env, "MIXTRAL_TOOL_CALLING": ""}).preset.prompts_tools


@pytest.mark.parametrize(("provider", "mode", "message"), [
    ("openai", "sometimes", "tool_calling must be one of auto, native, prompt"),
    ("local", "native", "needs an OpenAI-compatible host"),
    ("bedrock", "native", "needs an OpenAI-compatible host"),
])
def test_impossible_tool_calling_settings_are_configuration_errors(provider: str, mode: str, message: str) -> None:
    from mixtral_client import ConfigurationError
    from mixtral_client._config import resolve_config

    with pytest.raises(ConfigurationError, match=message):
        resolve_config({}, provider=provider, base_url="http://127.0.0.1:9/v1", api_key="k", model_path="/m",
                       region="eu-west-1", tool_calling=mode)
