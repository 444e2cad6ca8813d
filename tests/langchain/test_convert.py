"""The message, result and chunk converters on their own (no network)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_mixtral._convert import ChunkConverter, to_chat_result, to_usage_metadata, to_wire_messages
from mixtral_client.types import ChatCompletion, ChatCompletionChunk, Usage


def chunk(delta: dict[str, object] | None = None, finish: str | None = None, **extra: object) -> ChatCompletionChunk:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return ChatCompletionChunk.model_validate({"id": "r1", "model": "m", "choices": choices, **extra})


def test_messages_become_wire_messages() -> None:
    call = {"name": "add", "args": {"a": 1}, "id": "c1", "type": "tool_call"}
    wire = to_wire_messages([
        SystemMessage("be brief"),
        HumanMessage("hi", name="ann"),
        AIMessage([{"type": "text", "text": "let me add"}, {"type": "tool_use", "id": "c1", "name": "add"}],
                  tool_calls=[call]),
        ToolMessage("1", tool_call_id="c1"),
        ChatMessage(role="developer", content=["one ", {"type": "text", "text": "two"}]),
    ])
    assert wire == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "let me add", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c1"},
        {"role": "developer", "content": "one two"},
    ]


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot send"):
        to_wire_messages([ChatMessage(role="narrator", content="once upon a time")])


def test_arguments_that_are_not_a_json_object_become_invalid_tool_calls() -> None:
    completion = ChatCompletion.model_validate({"id": "r", "model": "m", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "function": {"name": "f", "arguments": "{not json"}},
            {"id": "b", "function": {"name": "g", "arguments": "[1]"}},
            {"id": "c", "function": {"name": "h", "arguments": ""}}]}, "finish_reason": "tool_calls"}]})
    message = to_chat_result(completion, "m").generations[0].message
    assert isinstance(message, AIMessage)
    assert [c["name"] for c in message.invalid_tool_calls] == ["f", "g"]
    assert message.tool_calls == [{"name": "h", "args": {}, "id": "c", "type": "tool_call"}]


def test_cached_prompt_tokens_become_cache_read_details() -> None:
    usage = Usage.model_validate({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 0,
                                  "prompt_tokens_details": {"cached_tokens": 4}})
    assert to_usage_metadata(usage) == {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12,
                                        "input_token_details": {"cache_read": 4}}


def test_the_chunk_converter_holds_metadata_and_usage_for_the_last_chunk() -> None:
    converter = ChunkConverter("requested")
    assert converter.convert(chunk({"role": "assistant", "content": ""})) is None
    first = converter.convert(chunk({"content": "Hi"}))
    assert first is not None and first.message.content == "Hi" and not first.message.response_metadata
    assert converter.convert(chunk({}, finish="stop")) is None
    assert converter.convert(chunk(None, usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})) is None
    last = converter.last().message
    assert last.usage_metadata == {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    assert last.response_metadata == {"id": "r1", "model_name": "m", "finish_reason": "stop"}
    assert last.chunk_position == "last"


def test_the_chunk_converter_drops_repeated_ids_and_names_of_a_call() -> None:
    converter = ChunkConverter("m")
    pieces = [converter.convert(chunk({"tool_calls": [
        {"index": 5, "id": "x", "function": {"name": "f", "arguments": part}}]})) for part in ('{"a"', ": 1}")]
    fragments = [p.message.tool_call_chunks[0] for p in pieces if p is not None]
    assert [(f["index"], f["id"], f["name"], f["args"]) for f in fragments] == [
        (0, "x", "f", '{"a"'), (0, None, None, ": 1}")]


def test_other_choices_of_a_stream_are_ignored() -> None:
    converter = ChunkConverter("m")
    other = ChatCompletionChunk.model_validate({"choices": [{"index": 1, "delta": {"content": "no"}}]})
    assert converter.convert(other) is None


def test_the_package_exports_its_two_models_and_imports_no_torch() -> None:
    code = ("import sys, langchain_mixtral; assert langchain_mixtral.__all__ == ['ChatMixtral', 'MixtralLLM']; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=".", env={"PYTHONPATH": ".:integrations"})
