"""Converse mapping, with no network: messages, bodies, answers, stream events, errors."""

from __future__ import annotations

from typing import Any

import pytest

from mixtral_client import (
    APIStatusError,
    BadRequestError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnsupportedFeatureError,
)
from mixtral_client._converse import (
    api_error,
    chunk_from_event,
    completion_from_converse,
    converse_body,
    converse_messages,
    converse_path,
    finish_reason,
    model_from_path,
)
from mixtral_client._providers import get_preset
from mixtral_client._request import ChatRequest, RequestOptions, build_request
from mixtral_client._timeouts import Timeout

BEDROCK = get_preset("bedrock")


def _request(messages: list[dict[str, Any]] | None = None, *, extra_body: dict[str, Any] | None = None,
             **params: Any) -> ChatRequest:
    return build_request(BEDROCK, model=None, messages=messages or [{"role": "user", "content": "Hi"}],
                         stream=False, options=RequestOptions(timeout=Timeout(), extra_body=extra_body or {}),
                         params=params)


def _texts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], "".join(block["text"] for block in m["content"])) for m in messages]


# --------------------------------------------------------------------------- messages


def test_a_plain_user_message_becomes_one_text_block() -> None:
    assert converse_messages([{"role": "user", "content": "Hi"}]) == [
        {"role": "user", "content": [{"text": "Hi"}]}
    ]


def test_system_message_is_folded_into_the_first_user_turn() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    assert _texts(converse_messages(messages)) == [
        ("user", "Be brief.\n\nHi"), ("assistant", "Hello"), ("user", "Again")
    ]


def test_several_system_and_developer_messages_are_joined_with_blank_lines() -> None:
    messages = [{"role": "system", "content": "One."}, {"role": "user", "content": "Hi"},
                {"role": "developer", "content": "Two."}]
    assert _texts(converse_messages(messages)) == [("user", "One.\n\nTwo.\n\nHi")]


def test_consecutive_turns_of_one_role_are_merged() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"},
                {"role": "user", "content": "e"}]
    assert _texts(converse_messages(messages)) == [("user", "a\n\nb"), ("assistant", "c\n\nd"), ("user", "e")]


def test_a_last_assistant_turn_is_kept_as_a_prefill() -> None:
    messages = [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "1, 2,"}]
    assert _texts(converse_messages(messages)) == [("user", "Count:"), ("assistant", "1, 2,")]


def test_text_parts_are_concatenated() -> None:
    content = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    assert _texts(converse_messages([{"role": "user", "content": content}])) == [("user", "Hello")]


def test_blank_turns_are_dropped_and_neighbours_merged() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "},
                {"role": "user", "content": "b"}]
    assert _texts(converse_messages(messages)) == [("user", "a\n\nb")]


def test_a_conversation_opening_with_assistant_gets_the_system_text_as_user_turn() -> None:
    messages = [{"role": "system", "content": "Rules."}, {"role": "assistant", "content": "Hi, ask me."},
                {"role": "user", "content": "Why?"}]
    assert _texts(converse_messages(messages)) == [
        ("user", "Rules."), ("assistant", "Hi, ask me."), ("user", "Why?")
    ]


def test_a_system_message_alone_becomes_the_user_turn() -> None:
    assert _texts(converse_messages([{"role": "system", "content": "Say hi."}])) == [("user", "Say hi.")]


def test_a_conversation_opening_with_assistant_and_no_system_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="user .*before the first assistant") as info:
        converse_messages([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"}])
    assert info.value.param == "messages"


def test_messages_without_any_text_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="no message has any text"):
        converse_messages([{"role": "user", "content": ""}])


@pytest.mark.parametrize("message", [
    {"role": "tool", "tool_call_id": "abc123def", "content": "42"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "abc123def", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
])
def test_tool_turns_are_unsupported(message: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedFeatureError, match="tool"):
        converse_messages([{"role": "user", "content": "Hi"}, message])


# --------------------------------------------------------------------------- bodies and paths


def test_body_maps_sampling_parameters_to_inference_config() -> None:
    body = converse_body(_request(max_tokens=4096, temperature=1.0, top_p=0.9, stop="END"))
    assert body == {
        "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
        "inferenceConfig": {"maxTokens": 4096, "temperature": 1.0, "topP": 0.9, "stopSequences": ["END"]},
    }


def test_body_without_parameters_has_no_inference_config() -> None:
    assert converse_body(_request()) == {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}


def test_top_k_goes_to_additional_model_request_fields() -> None:
    body = converse_body(_request(extra_body={"top_k": 200}, stop=["a", "b"]))
    assert body["additionalModelRequestFields"] == {"top_k": 200}
    assert body["inferenceConfig"] == {"stopSequences": ["a", "b"]}


def test_other_extra_body_keys_are_merged_into_the_body() -> None:
    guardrail = {"guardrailIdentifier": "g1", "guardrailVersion": "1"}
    body = converse_body(_request(extra_body={"guardrailConfig": guardrail, "top_k": 5,
                                              "inferenceConfig": {"maxTokens": 7}}, temperature=0.2))
    assert body["guardrailConfig"] == guardrail
    assert body["inferenceConfig"] == {"temperature": 0.2, "maxTokens": 7}


@pytest.mark.parametrize("param", [{"seed": 1}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
                                   {"logprobs": True}, {"logit_bias": {"7": 5}}])
def test_parameters_converse_cannot_carry_are_unsupported(param: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedFeatureError) as info:
        converse_body(_request(**param))
    assert info.value.param == next(iter(param))


def test_parameters_without_effect_on_bedrock_are_dropped() -> None:
    body = converse_body(_request(n=1, user="u-1", logprobs=False, response_format={"type": "text"}))
    assert body == {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}


@pytest.mark.parametrize(("params", "extra_body", "param"), [
    ({"temperature": 1.5}, None, "temperature"),
    ({"max_tokens": 4097}, None, "max_tokens"),
    ({"max_tokens": 0}, None, "max_tokens"),
    ({}, {"top_k": 201}, "top_k"),
    ({"stop": [str(i) for i in range(11)]}, None, "stop"),
    ({"n": 2}, None, "n"),
])
def test_the_bedrock_preset_checks_limits_before_anything_is_built(
        params: dict[str, Any], extra_body: dict[str, Any] | None, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _request(extra_body=extra_body, **params)
    assert info.value.param == param


def test_path_percent_encodes_the_whole_model_id() -> None:
    assert converse_path("mistral.mixtral-8x7b-instruct-v0:1", False) == \
        "/model/mistral.mixtral-8x7b-instruct-v0%3A1/converse"
    assert converse_path("mistral.mixtral-8x7b-instruct-v0:1", True) == \
        "/model/mistral.mixtral-8x7b-instruct-v0%3A1/converse-stream"


@pytest.mark.parametrize("model", ["mistral.mixtral-8x7b-instruct-v0:1",
                                   "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.mistral x"])
def test_model_from_path_inverts_the_path(model: str) -> None:
    assert model_from_path("/prefix" + converse_path(model, True) + "?a=b") == model


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(("stop", "reason"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("content_filtered", "content_filter"), ("guardrail_intervened", "content_filter"),
    ("something_new", "something_new"), (None, None),
])
def test_stop_reasons_map_to_finish_reasons(stop: str | None, reason: str | None) -> None:
    assert finish_reason(stop) == reason


def test_a_converse_answer_becomes_a_chat_completion() -> None:
    body = {"output": {"message": {"role": "assistant", "content": [{"text": "Hel"}, {"text": "lo"}]}},
            "stopReason": "max_tokens", "usage": {"inputTokens": 9, "outputTokens": 2, "totalTokens": 11},
            "metrics": {"latencyMs": 80}}
    completion = completion_from_converse(body, id="rid", model="m", created=5)
    assert (completion.id, completion.model, completion.created) == ("rid", "m", 5)
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) \
        == (9, 2, 11)
    assert completion.model_extra == {"metrics": {"latencyMs": 80}}


def test_an_answer_without_usage_has_none() -> None:
    completion = completion_from_converse({"output": {"message": {"content": []}}}, id="", model="m", created=0)
    assert completion.usage is None
    assert completion.choices[0].message.content == ""


def _chunk(event_type: str, payload: Any) -> Any:
    return chunk_from_event(event_type, payload, id="rid", model="m", created=3)


def test_message_start_gives_the_role() -> None:
    chunk = _chunk("messageStart", {"role": "assistant"})
    assert (chunk.id, chunk.model, chunk.created) == ("rid", "m", 3)
    assert chunk.choices[0].delta.role == "assistant"


def test_content_block_delta_gives_text() -> None:
    assert _chunk("contentBlockDelta", {"delta": {"text": "Hé"}, "contentBlockIndex": 0}).choices[0].delta.content \
        == "Hé"


def test_message_stop_gives_the_finish_reason() -> None:
    chunk = _chunk("messageStop", {"stopReason": "guardrail_intervened"})
    assert chunk.choices[0].finish_reason == "content_filter"
    assert chunk.choices[0].delta.content is None


def test_metadata_gives_usage_on_a_chunk_without_choices() -> None:
    chunk = _chunk("metadata", {"usage": {"inputTokens": 4, "outputTokens": 6, "totalTokens": 10},
                                "metrics": {"latencyMs": 1}})
    assert chunk.choices == []
    assert chunk.usage.total_tokens == 10
    assert chunk.model_extra == {"metrics": {"latencyMs": 1}}


@pytest.mark.parametrize(("event_type", "payload"), [
    ("contentBlockStart", {"contentBlockIndex": 0, "start": {}}),
    ("contentBlockStop", {"contentBlockIndex": 0}),
    ("contentBlockDelta", {"delta": {"text": ""}}),
    ("contentBlockDelta", {"delta": {"reasoningContent": {"text": "x"}}}),
    ("somethingNew", {"a": 1}),
    ("messageStart", "not an object"),
])
def test_events_carrying_nothing_give_no_chunk(event_type: str, payload: Any) -> None:
    assert _chunk(event_type, payload) is None


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("error_type", "cls", "status"), [
    ("throttlingException", RateLimitError, 429),
    ("ThrottlingException", RateLimitError, 429),
    ("validationException", BadRequestError, 400),
    ("accessDeniedException", PermissionDeniedError, 403),
    ("resourceNotFoundException", NotFoundError, 404),
    ("modelStreamErrorException", InternalServerError, 500),
    ("internalServerException", InternalServerError, 500),
    ("serviceUnavailableException", InternalServerError, 503),
    ("modelTimeoutException", APIStatusError, 408),
    ("modelNotReadyException", RateLimitError, 429),
    ("brandNewException", APIStatusError, None),
])
def test_error_types_map_onto_the_error_tree(error_type: str, cls: type[APIStatusError], status: int | None) -> None:
    error = api_error(error_type, "boom", provider="bedrock", request_id="rid")
    assert type(error) is cls
    assert (error.status_code, error.code, error.request_id) == (status, error_type, "rid")
    assert "boom" in str(error)


def test_an_http_error_keeps_its_status_and_takes_the_type_before_the_colon() -> None:
    error = api_error("ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/", "slow down",
                      status=429, provider="bedrock", request_id="r", headers={"x-amzn-requestid": "r"})
    assert isinstance(error, RateLimitError)
    assert error.code == "ThrottlingException"
    assert error.message == "ThrottlingException: slow down"
    assert error.headers == {"x-amzn-requestid": "r"}


def test_an_http_error_without_a_type_is_classed_by_status() -> None:
    error = api_error(None, "gateway", status=502, provider="bedrock", request_id=None)
    assert isinstance(error, InternalServerError)
    assert error.code is None
