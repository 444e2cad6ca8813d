"""``response_format`` by prompt on hosts without it (NVIDIA here, on the loopback server): the instruction
in the last user turn, the JSON cut out of the answer, streams split everywhere, and tools beside it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mixtral_client import PROVIDERS, APIConnectionError, ChatCompletion, ChatCompletionChunk, Timeout
from mixtral_client._format import FormatPrompt, cut_json, find_json
from mixtral_client._request import RequestOptions, build_request
from mixtral_client._rewrite import Rewrites
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

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "description": "A person.",
                                                         "schema": PERSON, "strict": True}}
JSON_MODE = {"type": "json_object"}
NVIDIA = {"provider": "nvidia"}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def rewrites_for(provider: str = "nvidia", *, messages: Any = MESSAGES, **params: Any) -> Rewrites:
    request = build_request(PROVIDERS[provider], model=None, messages=messages, stream=False,
                            options=RequestOptions(timeout=Timeout()), params=params)
    return Rewrites.for_request(request)


def format_for(fmt: dict[str, Any] = JSON_MODE, **kwargs: Any) -> FormatPrompt:
    (step,) = rewrites_for(response_format=fmt, **kwargs).steps
    assert isinstance(step, FormatPrompt)
    return step


# --------------------------------------------------------------------------- the request


def test_the_schema_goes_into_the_last_user_turn_and_leaves_the_body() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Dune?"},
                {"role": "assistant", "content": "Frank Herbert."},
                {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "his age?"}]}]

    body = format_for(SCHEMA_FORMAT, messages=messages, temperature=0.2).request.body()

    assert "response_format" not in body and body["temperature"] == 0.2
    assert body["messages"][:3] == messages[:3]
    last = body["messages"][3]["content"]
    head, schema = last.rsplit("\n", 1)
    assert head == ("And his age?\n\nReply with one JSON object that follows this JSON schema, and nothing else: "
                    "no code fence, no text before or after it. A person.")
    assert json.loads(schema) == PERSON


@pytest.mark.parametrize(("fmt", "says"), [
    (JSON_MODE, "Reply with one JSON object and nothing else"),
    ({"type": "json_schema", "json_schema": {"name": "l", "schema": {"type": "array"}}}, "Reply with one JSON array"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}, "Reply with JSON that"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "Reply with one JSON object and nothing else"),
])
def test_the_instruction_names_the_kind_of_json_asked_for(fmt: dict[str, Any], says: str) -> None:
    assert says in format_for(fmt).request.messages[-1]["content"]


@pytest.mark.parametrize(("provider", "fmt"), [
    ("openai", JSON_MODE), ("openrouter", SCHEMA_FORMAT), ("local", SCHEMA_FORMAT), ("nvidia", {"type": "text"}),
])
def test_hosts_that_take_the_format_and_text_formats_are_not_rewritten(provider: str, fmt: dict[str, Any]) -> None:
    rewrites = rewrites_for(provider, response_format=fmt)
    assert rewrites.steps == ()
    assert rewrites.request.params["response_format"] == fmt


def test_a_conversation_without_a_user_turn_gets_one_for_the_instruction() -> None:
    prompt = format_for(messages=[{"role": "system", "content": "Answer in JSON."}])
    assert [m["role"] for m in prompt.request.messages] == ["system", "user"]
    assert prompt.request.messages[1]["content"].startswith("Reply with one JSON object")


def test_with_tools_the_instruction_leaves_room_for_a_call() -> None:
    rewrites = rewrites_for(tools=TOOLS, response_format=JSON_MODE)

    assert [type(s).__name__ for s in rewrites.steps] == ["ToolPrompt", "FormatPrompt"]
    body = rewrites.request.body()
    assert "[AVAILABLE_TOOLS]" in body["messages"][0]["content"]
    assert body["messages"][-1]["content"].endswith(
        "When you answer without calling a tool, reply with one JSON object and nothing else: no code fence, "
        "no text before or after it.")
    assert {"tools", "response_format"}.isdisjoint(body)


def test_tool_choice_none_asks_for_the_json_alone() -> None:
    rewrites = rewrites_for(tools=TOOLS, tool_choice="none", response_format=JSON_MODE)
    assert "Reply with one JSON object" in rewrites.request.messages[-1]["content"]


# --------------------------------------------------------------------------- cutting the JSON out


@pytest.mark.parametrize(("text", "root", "cut"), [
    (' {"name": "Ada", "age": 36}', "object", '{"name": "Ada", "age": 36}'),
    ('{"a": "}{", "b": "\\"}"} I hope this helps.', "object", '{"a": "}{", "b": "\\"}"}'),
    ('```json\n{"a": [1, {"b": 2}]}\n```\nDone.', "object", '{"a": [1, {"b": 2}]}'),
    ('Sure! Here is the JSON: {"a": 1}. Enjoy', "object", '{"a": 1}'),
    ('I think [1, 2] fits; as an object: {"n": [1, 2]}', "object", '{"n": [1, 2]}'),
    ('Here: [1, 2, 3] and {"a": 1}', "array", "[1, 2, 3]"),
    ("Here you go {broken} then {\"ok\": true}", "object", '{"ok": true}'),
    (' 42 ', None, "42"),
    ('The list: ["x"]', None, '["x"]'),
    ('{"name": "Ada", "age": 3', "object", '{"name": "Ada", "age": 3'),  # cut short: kept as it came
    ("I cannot answer that.", "object", "I cannot answer that."),          # no JSON: kept as it came
    ("", "object", ""),
])
def test_the_json_is_cut_out_of_the_answer(text: str, root: str | None, cut: str) -> None:
    assert cut_json(text, root) == cut


def test_a_long_answer_full_of_brackets_gives_up_rather_than_parse_forever() -> None:
    assert find_json("{" * 5000 + ' then {"a": 1}', "object") is None
    assert find_json("{x} " * 100 + '{"a": 1}', "object") == '{"a": 1}'


def test_a_whole_answer_keeps_usage_and_finish_and_leaves_tool_calls_alone() -> None:
    prompt = format_for()
    raw = completion(' ```json\n{"a": 1}\n```', finish="length")
    raw["choices"].append({"index": 1, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "calling", "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}})

    answer = prompt.completion(ChatCompletion.model_validate(raw))

    assert answer.choices[0].message.content == '{"a": 1}' and answer.choices[0].finish_reason == "length"
    assert answer.choices[1].message.content == "calling"
    assert answer.usage is not None and answer.usage.total_tokens == 5


# --------------------------------------------------------------------------- streams, split everywhere


ANSWERS = [
    ' {"name": "Ada", "age": 36}',
    '{"a": "}{", "b": "\\"}"} I hope this helps.',
    '```json\n{"a": [1, {"b": 2}]}\n```\nDone.',
    'Sure! Here is the JSON: {"a": 1}. Enjoy',
    '[1, 2] first, then {"n": 2}',
    '{"name": "Ada", "age": 3',
    "I cannot answer that.",
    "   ",
]


@pytest.mark.parametrize("text", ANSWERS)
@pytest.mark.parametrize("finish", ["stop", None])
def test_a_stream_split_anywhere_gives_what_the_whole_answer_gives(text: str, finish: str | None) -> None:
    prompt = format_for()
    whole = prompt.completion(ChatCompletion.model_validate(completion(text))).choices[0]
    splits = [[]] + [[i] for i in range(1, len(text))] + [list(range(1, len(text)))]

    for cuts in splits:
        streamed, _ = merge_stream(prompt, split_chunks(text, cuts, finish))
        (choice,) = streamed.choices
        assert choice.message.content == whole.message.content, cuts
        assert choice.finish_reason == finish, cuts


def test_json_that_opens_the_answer_streams_as_it_comes_and_stops_at_its_close() -> None:
    text = ' {"name": "Ada", "age": 36}\nShe was a mathematician.'

    _, texts = merge_stream(format_for(), split_chunks(text, list(range(1, len(text)))))

    assert texts == list('{"name": "Ada", "age": 36}')  # one piece out per piece in, from the brace on


def test_each_choice_of_a_stream_is_cut_on_its_own() -> None:
    raw = [chunk(role="assistant", index=0), chunk(role="assistant", index=1),
           chunk('{"a": 1} trailing', index=0), chunk('Here: {"b"', index=1), chunk(": 2}", index=1),
           chunk(finish="stop", index=0), chunk(finish="stop", index=1)]

    merged, _ = merge_stream(format_for(n=2), [ChatCompletionChunk.model_validate(c) for c in raw])

    assert [c.message.content for c in merged.choices] == ['{"a": 1}', '{"b": 2}']


# --------------------------------------------------------------------------- end to end on a loopback NVIDIA host


def test_nvidia_gets_the_schema_in_the_prompt_and_answers_with_the_json_alone(driver: Driver, serve) -> None:
    server = serve(replying(200, completion(' Here is the JSON:\n```json\n{"name": "Ada", "age": 36}\n```')))

    answer = driver.complete(server, client=NVIDIA, response_format=SCHEMA_FORMAT)

    body = server.requests[0].json()
    assert "response_format" not in body
    assert json.loads(body["messages"][-1]["content"].rsplit("\n", 1)[1]) == PERSON
    assert json.loads(answer.choices[0].message.content or "") == {"name": "Ada", "age": 36}
    assert answer.choices[0].finish_reason == "stop"


def test_a_streamed_json_answer_from_nvidia_arrives_piece_by_piece(driver: Driver, serve) -> None:
    pieces = [" ", '{"name": ', '"Ada", "age"', ": 36}", "\n\nShe wrote the first program."]
    body = sse(chunk(role="assistant"), *(chunk(p) for p in pieces), chunk(finish="stop"),
               {**chunk(), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}})
    server = serve(streaming(body, one_byte=True))

    chunks = driver.chunks(server, client=NVIDIA, response_format=JSON_MODE, stream_options={"include_usage": True})

    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == ['{"name": ', '"Ada", "age"', ": 36}"]
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 21


def test_a_stream_cut_before_the_json_keeps_what_was_held_in_the_partial(driver: Driver, serve) -> None:
    server = serve(cut_stream(chunk(role="assistant"), chunk("Let me think: "), chunk('{"a": 1} or else')))

    with pytest.raises(APIConnectionError) as info:
        driver.chunks(server, client=NVIDIA | {"max_retries": 0}, response_format=JSON_MODE)

    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == 'Let me think: {"a": 1} or else'  # as it came


def test_tools_and_a_format_together_give_calls_or_json(driver: Driver, serve) -> None:
    call = '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]'
    server = serve(replying(200, completion(" " + call)))
    answer = driver.complete(server, client=NVIDIA, tools=TOOLS, response_format=JSON_MODE)
    assert answer.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in answer.choices[0].message.tool_calls or []] == ["add"]

    server = serve(replying(200, completion(' ```json\n{"sum": 3}\n``` Done.')))
    answer = driver.complete(server, client=NVIDIA, tools=TOOLS, response_format=JSON_MODE)
    assert answer.choices[0].message.content == '{"sum": 3}' and not answer.choices[0].message.tool_calls


# --------------------------------------------------------------------------- choosing the way: structured_output=


def test_structured_output_prompt_writes_the_format_into_the_prompt_for_any_openai_compatible_host(
        driver: Driver, serve) -> None:
    server = serve(replying(200, completion(' ```json\n{"name": "Ada", "age": 36}\n```')))

    answer = driver.complete(server, client={"structured_output": "prompt"}, response_format=SCHEMA_FORMAT)

    body = server.requests[0].json()
    assert "response_format" not in body and "follows this JSON schema" in body["messages"][-1]["content"]
    assert answer.choices[0].message.content == '{"name": "Ada", "age": 36}'


def test_structured_output_native_sends_the_format_to_a_host_that_would_get_it_in_the_prompt(driver: Driver,
                                                                                            serve) -> None:
    server = serve(replying(200, completion('{"a": 1}')))

    driver.complete(server, client=NVIDIA | {"structured_output": "native"}, response_format=SCHEMA_FORMAT)

    body = server.requests[0].json()
    assert body["response_format"] == SCHEMA_FORMAT and body["messages"] == MESSAGES


def test_structured_output_from_the_environment() -> None:
    from mixtral_client._config import resolve_config

    env = {"MIXTRAL_BASE_URL": "http://127.0.0.1:9/v1", "MIXTRAL_API_KEY": "k", "MIXTRAL_STRUCTURED_OUTPUT": "Prompt"}
    assert not resolve_config(env).preset.supports_response_format
    assert resolve_config(env, structured_output="auto").preset.supports_response_format
    assert resolve_config({**env, "MIXTRAL_STRUCTURED_OUTPUT": ""}).preset.supports_response_format
    assert resolve_config({**env, "MIXTRAL_PROVIDER": "local", "MIXTRAL_MODEL_PATH": "/m"}).preset.kind == "local"


@pytest.mark.parametrize(("provider", "mode", "message"), [
    ("openai", "sometimes", "structured_output must be one of auto, native, prompt"),
    ("bedrock", "native", "Bedrock serves Mixtral without structured output"),
])
def test_impossible_structured_output_settings_are_configuration_errors(provider: str, mode: str,
                                                                        message: str) -> None:
    from mixtral_client import ConfigurationError
    from mixtral_client._config import resolve_config

    with pytest.raises(ConfigurationError, match=message):
        resolve_config({}, provider=provider, base_url="http://127.0.0.1:9/v1", api_key="k", region="eu-west-1",
                       structured_output=mode)
