"""The pure half of the server: bodies read as OpenAI reads them, exceptions mapped to OpenAI errors, usage
moved where OpenAI's stream carries it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mixtral_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    InvalidRequestError,
    RateLimitError,
    UnsupportedFeatureError,
)
from mixtral_client._serving import (
    BodyTooLarge,
    ModelNotFound,
    StreamShaper,
    Unauthorized,
    error_response,
    read_body,
    sse,
)
from mixtral_client.types import ChatCompletionChunk, ChoiceDelta, ChunkChoice, Usage

SERVED = frozenset({"mixtral-local", "mixtral-8x7b-instruct"})
MESSAGES = [{"role": "user", "content": "Hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"messages": MESSAGES, **fields}).encode()


def test_nulls_are_absent_and_the_rest_are_create_arguments() -> None:
    read = read_body(body(model="mixtral-local", temperature=None, top_p=0.5, stream=True, n=None, tools=None), SERVED)
    assert (read.messages, read.stream, read.params) == (MESSAGES, True, {"top_p": 0.5})


def test_max_completion_tokens_is_max_tokens() -> None:
    assert read_body(body(max_completion_tokens=12), SERVED).params == {"max_tokens": 12}
    assert read_body(body(max_completion_tokens=12, max_tokens=12), SERVED).params == {"max_tokens": 12}
    with pytest.raises(InvalidRequestError) as caught:
        read_body(body(max_completion_tokens=12, max_tokens=13), SERVED)
    assert caught.value.param == "max_completion_tokens"


def test_fields_outside_openais_travel_as_extra_body_for_the_backend_to_judge() -> None:
    read = read_body(body(top_k=40, provider={"order": ["a"]}, seed=1), SERVED)
    assert read.params == {"seed": 1, "extra_body": {"top_k": 40, "provider": {"order": ["a"]}}}


def test_a_completions_body_reads_its_prompt_and_the_legacy_parameters() -> None:
    raw = json.dumps({"model": "mixtral-local", "prompt": "<s>[INST] Hi [/INST]", "logprobs": 2, "echo": None,
                      "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
                      "suffix": "x", "tools": []}).encode()

    read = read_body(raw, SERVED, text=True)

    assert (read.prompt, read.messages, read.stream, read.include_usage) == ("<s>[INST] Hi [/INST]", None, True, True)
    assert read.params == {"logprobs": 2, "max_tokens": 5, "stream_options": {"include_usage": True},
                           "extra_body": {"suffix": "x", "tools": []}}
    with pytest.raises(InvalidRequestError) as caught:
        read_body(body(), SERVED, text=True)  # messages, no prompt
    assert caught.value.param == "prompt"


@pytest.mark.parametrize("fields", [{"extra_headers": {"x": "1"}}, {"timeout": 1}, {"extra_query": {"a": 1}}])
def test_transport_options_are_not_the_callers_to_set(fields: dict[str, Any]) -> None:
    assert read_body(body(**fields), SERVED).params == {"extra_body": fields}


def test_usage_chunk_only_when_include_usage_is_true() -> None:
    assert read_body(body(stream=True, stream_options={"include_usage": True}), SERVED).include_usage
    assert not read_body(body(stream=True, stream_options={"include_usage": False}), SERVED).include_usage
    assert not read_body(body(stream=True), SERVED).include_usage


@pytest.mark.parametrize(("raw", "says"), [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'{"model": "mixtral-local"}', "messages: required"),
])
def test_what_is_not_a_chat_body_is_refused(raw: bytes, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        read_body(raw, SERVED)


def test_a_model_not_served_is_not_found() -> None:
    with pytest.raises(ModelNotFound, match="gpt-4o"):
        read_body(body(model="gpt-4o"), SERVED)
    assert read_body(body(model="mixtral-8x7b-instruct"), SERVED).messages == MESSAGES


@pytest.mark.parametrize(("exc", "status", "kind", "param"), [
    (ModelNotFound("no"), 404, "invalid_request_error", "model"),
    (BodyTooLarge(10), 413, "invalid_request_error", None),
    (Unauthorized("no key"), 401, "invalid_request_error", None),
    (InvalidRequestError("temperature: too hot", param="temperature"), 400, "invalid_request_error", "temperature"),
    (UnsupportedFeatureError("logprobs: no", param="logprobs"), 400, "invalid_request_error", "logprobs"),
    (RateLimitError("slow", status_code=429), 429, "rate_limit_error", None),
    (APIStatusError("gone", status_code=404), 404, "not_found_error", None),
    (APIStatusError("down", status_code=503), 503, "server_error", None),
    (AuthenticationError("bad key", status_code=401), 502, "authentication_error", None),
    (APIStatusError("forbidden", status_code=403), 502, "authentication_error", None),
    (APIStatusError("error frame", status_code=None), 502, "server_error", None),
    (APITimeoutError("idle"), 504, "timeout_error", None),
    (APIConnectionError("reset"), 502, "api_connection_error", None),
    (KeyError("bug"), 500, "server_error", None),
])
def test_errors_map_to_openai_statuses_and_types(exc: Exception, status: int, kind: str, param: str | None) -> None:
    got_status, got, _ = error_response(exc)
    assert (got_status, got["error"]["type"], got["error"]["param"]) == (status, kind, param)
    assert set(got["error"]) == {"message", "type", "param", "code"}


def test_a_hosts_retry_after_is_handed_on_and_nothing_else() -> None:
    exc = RateLimitError("slow", status_code=429, headers={"retry-after": "3", "retry-after-ms": "3000",
                                                            "x-secret": "s"})
    assert error_response(exc)[2] == {"retry-after": "3", "retry-after-ms": "3000"}


def test_internal_errors_say_nothing_of_their_content() -> None:
    assert "s3cret" not in error_response(RuntimeError("key s3cret"))[1]["error"]["message"]


def _chunk(content: str | None = None, *, finish: str | None = None, usage: Usage | None = None,
           choices: bool = True) -> ChatCompletionChunk:
    choice = ChunkChoice(delta=ChoiceDelta(content=content), finish_reason=finish)
    return ChatCompletionChunk(id="c", model="m", choices=[choice] if choices else [], usage=usage)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("own_chunk", [False, True])
def test_usage_moves_to_one_last_chunk_without_choices(include_usage: bool, own_chunk: bool) -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    stream = [_chunk("a"), _chunk("b"), _chunk(finish="stop", usage=None if own_chunk else usage)]
    if own_chunk:
        stream.append(_chunk(usage=usage, choices=False))
    shaper = StreamShaper(include_usage)
    sent = [out for c in stream if (out := shaper.feed(c)) is not None]
    assert [c.choices[0].delta.content for c in sent] == ["a", "b", None]
    assert all(c.usage is None for c in sent)
    last = shaper.end()
    if include_usage:
        assert last is not None and last.choices == [] and last.usage == usage and last.id == "c"
    else:
        assert last is None


def test_sse_frames_json() -> None:
    assert sse({"a": 1}) == b'data: {"a": 1}\n\n'
    frame = sse(_chunk("é"))
    assert frame.startswith(b"data: {") and frame.endswith(b"}\n\n")
    assert json.loads(frame[6:])["choices"][0]["delta"]["content"] == "é"
