"""The Bedrock backend against the loopback stand-in: sync and async, whole and streamed, SigV4 and API key."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from mixtral_client import (
    APIConnectionError,
    AsyncMixtralClient,
    BadRequestError,
    ChatCompletion,
    ConfigurationError,
    InternalServerError,
    InvalidRequestError,
    MixtralClient,
    PermissionDeniedError,
    RateLimitError,
    UnsupportedFeatureError,
)
from mixtral_client._backends.bedrock import BedrockCore, region_from_url
from mixtral_client._config import resolve_config
from mixtral_client._request import RequestOptions, build_request
from mixtral_client._timeouts import Deadline, Timeout
from tests.bedrock.standin import (
    API_KEY,
    MODEL,
    REGION,
    BedrockStandIn,
    answer,
    answer_frames,
    event,
    exception,
    http_error,
    stream_bytes,
)

MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
WIRE_MESSAGES = [{"role": "user", "content": [{"text": "Be brief.\n\nHi"}]}]


def sync_call(client: MixtralClient, stream: bool, **params: Any) -> ChatCompletion:
    """One call; a stream is read to the end and merged."""
    completion: ChatCompletion
    if stream:
        with client.chat.completions.create(messages=MESSAGES, stream=True, **params) as chunks:
            completion = chunks.get_final_completion()
    else:
        completion = client.chat.completions.create(messages=MESSAGES, **params)
    return completion


async def async_call(client: AsyncMixtralClient, stream: bool, **params: Any) -> ChatCompletion:
    completion: ChatCompletion
    if stream:
        async with await client.chat.completions.create(messages=MESSAGES, stream=True, **params) as chunks:
            completion = await chunks.get_final_completion()
    else:
        completion = await client.chat.completions.create(messages=MESSAGES, **params)
    return completion


def check_answer(completion: ChatCompletion, bedrock: BedrockStandIn, auth: dict[str, str], stream: bool) -> None:
    call = bedrock.calls[-1]
    assert completion.choices[0].message.content == "Hello from Bedrock"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) \
        == (12, 3, 15)
    assert (completion.model, completion.id, completion._request_id) == (MODEL, call.request_id, call.request_id)
    assert (call.auth, call.stream, call.model) == ("api-key" if "api_key" in auth else "sigv4", stream, MODEL)
    assert call.json()["messages"] == WIRE_MESSAGES
    assert bedrock.refused == []


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_sync_answers(bedrock: BedrockStandIn, auth: dict[str, str], stream: bool) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        check_answer(sync_call(client, stream), bedrock, auth, stream)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
async def test_async_answers(bedrock: BedrockStandIn, auth: dict[str, str], stream: bool) -> None:
    async with AsyncMixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        check_answer(await async_call(client, stream), bedrock, auth, stream)


def test_stream_chunks_carry_role_text_finish_and_usage(bedrock: BedrockStandIn, auth: dict[str, str]) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:4]] == ["Hello", " from", " Bedrock"]
    assert chunks[4].choices[0].finish_reason == "stop"
    assert chunks[5].choices == [] and chunks[5].usage is not None and chunks[5].usage.total_tokens == 15


# --------------------------------------------------------------------------- what goes on the wire


def test_converse_request_on_the_wire_with_sigv4(bedrock: BedrockStandIn, aws_keys: None) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        client.chat.completions.create(messages=MESSAGES, max_tokens=64, temperature=0.3, top_p=0.8,
                                       stop=["\n\n"], extra_body={"top_k": 40}, extra_query={"trace": "on"})
    received = bedrock.calls[0].received
    assert received.path == "/model/mistral.mixtral-8x7b-instruct-v0%3A1/converse?trace=on"
    assert received.json() == {
        "messages": WIRE_MESSAGES,
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.3, "topP": 0.8, "stopSequences": ["\n\n"]},
        "additionalModelRequestFields": {"top_k": 40},
    }
    headers = received.headers
    assert (headers["content-type"], headers["accept"]) == ("application/json", "application/json")
    signed = headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"content-type", "host", "x-amz-date", "accept"} <= set(signed)
    assert "accept-encoding" not in signed and "content-length" not in signed


@pytest.mark.parametrize("stream", [False, True])
def test_a_base_url_with_a_path_and_a_query_keeps_both_and_signs_them(bedrock: BedrockStandIn, aws_keys: None,
                                                                      stream: bool) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url + "/proxy/?tenant=a%2Fb&trace=off",
                       region=REGION) as client:
        answer = client.chat.completions.create(messages=MESSAGES, stream=stream, extra_query={"trace": "on"})
        text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream else (
            answer.choices[0].message.content)  # type: ignore[union-attr]
    assert text == "Hello from Bedrock"  # the stand-in answered: the signature over path and query held
    suffix = "converse-stream" if stream else "converse"
    assert bedrock.calls[0].received.path == (
        f"/proxy/model/mistral.mixtral-8x7b-instruct-v0%3A1/{suffix}?tenant=a%2Fb&trace=on")


def test_converse_stream_request_with_an_api_key(bedrock: BedrockStandIn) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, api_key=API_KEY) as client:
        sync_call(client, True)
    headers = bedrock.calls[0].received.headers
    assert bedrock.calls[0].received.path == "/model/mistral.mixtral-8x7b-instruct-v0%3A1/converse-stream"
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert headers["accept"] == "application/vnd.amazon.eventstream"
    assert "x-amz-date" not in headers


def test_api_key_from_aws_bearer_token_bedrock(bedrock: BedrockStandIn) -> None:
    env = {"AWS_BEARER_TOKEN_BEDROCK": API_KEY}
    with MixtralClient(provider="bedrock", base_url=bedrock.url, env=env) as client:
        sync_call(client, False)
    assert bedrock.calls[0].auth == "api-key"


def test_a_wrong_api_key_is_refused(bedrock: BedrockStandIn) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, api_key="nope") as client, \
            pytest.raises(PermissionDeniedError) as info:
        sync_call(client, False)
    assert info.value.code == "UnrecognizedClientException"


def test_a_model_id_is_percent_encoded_whole(bedrock: BedrockStandIn, aws_keys: None) -> None:
    arn = "arn:aws:bedrock:eu-west-3:123456789012:inference-profile/eu.mistral.mixtral"
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        completion = sync_call(client, True, model=arn)
    assert bedrock.calls[0].model == arn and completion.model == arn
    assert "%2F" in bedrock.calls[0].received.path


# --------------------------------------------------------------------------- event-stream bytes over HTTP


def _frames_cut(cuts: list[int]) -> Any:
    return stream_bytes(answer_frames(["Hello", " from", " Bedrock"]), cuts=cuts)


@pytest.mark.parametrize("reply", [
    stream_bytes(answer_frames(["Hello", " from", " Bedrock"]), one_byte=True),
    _frames_cut([5, 10, 20, 60]),           # inside the first prelude, its CRC, its headers
    _frames_cut([len(answer_frames()[0]) - 2, len(answer_frames()[0]) + 1]),  # inside a CRC, then a prelude
], ids=["one-byte", "prelude-headers", "crc-prelude"])
def test_stream_split_at_awkward_bytes(bedrock: BedrockStandIn, auth: dict[str, str], reply: Any) -> None:
    bedrock.replies.append(reply)
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        check_answer(sync_call(client, True), bedrock, auth, True)


@pytest.mark.anyio
async def test_async_stream_one_byte_at_a_time(bedrock: BedrockStandIn, auth: dict[str, str]) -> None:
    bedrock.replies.append(stream_bytes(answer_frames(["Hello", " from", " Bedrock"]), one_byte=True))
    async with AsyncMixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        check_answer(await async_call(client, True), bedrock, auth, True)


# --------------------------------------------------------------------------- errors mid-stream and retries

MID_STREAM_FAILURE = stream_bytes([*answer_frames(["Half", " an"])[:4],
                                   exception("modelStreamErrorException", "The model stopped.")], one_byte=True)


def _check_mid_stream_failure(error: InternalServerError, bedrock: BedrockStandIn) -> None:
    assert (error.status_code, error.code, error.request_id) == (500, "modelStreamErrorException", "standin-1")
    assert error.partial is not None and error.partial.choices[0].message.content == "Half an"
    assert len(bedrock.calls) == 1  # never retried once a chunk has reached the caller


def test_exception_frame_mid_stream_raises_with_the_partial_answer(bedrock: BedrockStandIn,
                                                                   auth: dict[str, str]) -> None:
    bedrock.replies.append(MID_STREAM_FAILURE)
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        stream = client.chat.completions.create(messages=MESSAGES, stream=True)
        seen = []
        with pytest.raises(InternalServerError) as info:
            for chunk in stream:
                seen.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in seen) == "Half an"
    _check_mid_stream_failure(info.value, bedrock)


@pytest.mark.anyio
async def test_async_exception_frame_mid_stream(bedrock: BedrockStandIn, auth: dict[str, str]) -> None:
    bedrock.replies.append(MID_STREAM_FAILURE)
    async with AsyncMixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        with pytest.raises(InternalServerError) as info:
            await async_call(client, True)
    _check_mid_stream_failure(info.value, bedrock)


def test_a_throttling_frame_before_the_first_chunk_is_retried(bedrock: BedrockStandIn, auth: dict[str, str]) -> None:
    bedrock.replies.append(stream_bytes([exception("throttlingException", "Too many requests")]))
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        check_answer(sync_call(client, True), bedrock, auth, True)
    assert len(bedrock.calls) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_throttled_then_answered(bedrock: BedrockStandIn, auth: dict[str, str], stream: bool) -> None:
    bedrock.replies.append(http_error(429, "ThrottlingException", "Too many requests, please wait."))
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        check_answer(sync_call(client, stream), bedrock, auth, stream)
    assert len(bedrock.calls) == 2


@pytest.mark.anyio
async def test_async_throttled_then_answered(bedrock: BedrockStandIn, auth: dict[str, str]) -> None:
    bedrock.replies.append(http_error(429, "ThrottlingException", "Too many requests, please wait."))
    async with AsyncMixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        check_answer(await async_call(client, True), bedrock, auth, True)
    assert len(bedrock.calls) == 2


def test_throttling_retries_are_bounded(bedrock: BedrockStandIn, aws_keys: None) -> None:
    bedrock.replies.extend([http_error(429, "ThrottlingException", "Too many requests")] * 3)
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION, max_retries=1) as client, \
            pytest.raises(RateLimitError) as info:
        sync_call(client, False)
    assert len(bedrock.calls) == 2
    assert (info.value.status_code, info.value.code, info.value.request_id) == (429, "ThrottlingException", "standin-2")


@pytest.mark.anyio
async def test_async_validation_error_is_not_retried(bedrock: BedrockStandIn, aws_keys: None) -> None:
    bedrock.replies.append(http_error(400, "ValidationException", "This model doesn't support system messages."))
    async with AsyncMixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        with pytest.raises(BadRequestError, match="system messages") as info:
            await async_call(client, True)
    assert len(bedrock.calls) == 1
    assert info.value.body == {"message": "This model doesn't support system messages."}


def test_a_stream_cut_inside_a_frame_raises(bedrock: BedrockStandIn, aws_keys: None) -> None:
    bedrock.replies.append(stream_bytes(answer_frames(["Hello", " from"]), truncate=3))
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client, \
            pytest.raises(APIConnectionError) as info:
        sync_call(client, True)
    assert info.value.partial is not None and info.value.partial.choices[0].message.content == "Hello from"


# --------------------------------------------------------------------------- signatures


class _TamperingTransport(httpx.BaseTransport):
    """Changes the body after it was signed, as a meddling proxy would."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read().replace(b"Hi", b"Hacked")
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        return self._inner.handle_request(httpx.Request(request.method, request.url, headers=headers, content=body,
                                                        extensions=request.extensions))

    def close(self) -> None:
        self._inner.close()


def test_a_tampered_body_is_refused(bedrock: BedrockStandIn, aws_keys: None) -> None:
    with httpx.Client(transport=_TamperingTransport()) as http, \
            MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION, http_client=http) as client, \
            pytest.raises(PermissionDeniedError) as info:
        sync_call(client, False)
    assert info.value.code == "InvalidSignatureException"
    assert info.value.request_id == "standin-1"
    assert b"Hacked" in bedrock.requests[0].body and bedrock.calls == []  # refused once, not retried


def test_a_wrong_secret_key_is_refused(bedrock: BedrockStandIn, monkeypatch: pytest.MonkeyPatch,
                                       aws_keys: None) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client, \
            pytest.raises(PermissionDeniedError, match="signature we calculated does not match"):
        sync_call(client, True)
    assert len(bedrock.refused) == 1


def test_a_session_token_is_sent_and_signed(monkeypatch: pytest.MonkeyPatch, aws_keys: None) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session/token==")
    with BedrockStandIn(session_token="session/token==") as bedrock, \
            MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        sync_call(client, False)
        assert bedrock.calls[0].auth == "sigv4"
        assert "x-amz-security-token" in bedrock.calls[0].received.headers["authorization"]


@pytest.mark.parametrize("variable", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_region_from_the_environment_scopes_the_signature(variable: str, aws_keys: None) -> None:
    with BedrockStandIn(region="ap-southeast-2") as bedrock, \
            MixtralClient(provider="bedrock", base_url=bedrock.url, env={variable: "ap-southeast-2"}) as client:
        sync_call(client, False)
        assert "/ap-southeast-2/bedrock/aws4_request" in bedrock.calls[0].received.headers["authorization"]


def test_region_from_the_aws_profile_scopes_the_signature(aws_keys: None, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.write_text("[profile work]\nregion = eu-central-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "work")
    with BedrockStandIn(region="eu-central-1") as bedrock, \
            MixtralClient(provider="bedrock", base_url=bedrock.url, env={}) as client:
        sync_call(client, False)
        assert "/eu-central-1/bedrock/aws4_request" in bedrock.calls[0].received.headers["authorization"]


def test_the_default_endpoint_comes_from_the_profile_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    with MixtralClient(provider="bedrock", api_key=API_KEY, env={}) as client:
        assert client._backend.core.endpoint == "https://bedrock-runtime.eu-west-3.amazonaws.com"


def test_no_region_anywhere_is_a_configuration_error_naming_the_ways_to_set_one() -> None:
    with pytest.raises(ConfigurationError, match="needs a region: region=, AWS_REGION / AWS_DEFAULT_REGION, or a "
                                                  "region in your AWS profile"):
        MixtralClient(provider="bedrock", api_key=API_KEY, env={})


def test_a_signature_for_another_region_is_refused(bedrock: BedrockStandIn, aws_keys: None) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region="us-east-1") as client, \
            pytest.raises(PermissionDeniedError):
        sync_call(client, False)


# --------------------------------------------------------------------------- configuration


def _core(env: dict[str, str], **kwargs: Any) -> BedrockCore:
    return BedrockCore(resolve_config(env, provider="bedrock", **kwargs))


def test_the_default_endpoint_comes_from_the_region(aws_keys: None) -> None:
    core = _core({"AWS_REGION": "eu-west-3"})
    request = build_request(core.config.preset, model=None, messages=MESSAGES, stream=True,
                            options=RequestOptions(timeout=Timeout()), params={})
    with httpx.Client() as http:
        built = core.build(http, request, Deadline(None))
    assert str(built.url) == \
        "https://bedrock-runtime.eu-west-3.amazonaws.com/model/mistral.mixtral-8x7b-instruct-v0%3A1/converse-stream"
    assert "Credential=AKIDSTANDIN0000001/" in built.headers["authorization"]
    assert "/eu-west-3/bedrock/aws4_request" in built.headers["authorization"]


@pytest.mark.parametrize(("url", "region"), [
    ("https://bedrock-runtime.us-west-2.amazonaws.com", "us-west-2"),
    ("https://bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
    ("https://vpce-0a1b-2c3d.bedrock-runtime.eu-central-1.vpce.amazonaws.com", "eu-central-1"),
    ("http://127.0.0.1:9000", None),
    (None, None),
])
def test_region_from_an_endpoint_url(url: str | None, region: str | None) -> None:
    assert region_from_url(url) == region


def test_a_vpc_endpoint_names_the_signing_region(aws_keys: None) -> None:
    core = _core({}, base_url="https://vpce-0a1b.bedrock-runtime.eu-central-1.vpce.amazonaws.com")
    assert core.region == "eu-central-1"


def test_no_credentials_names_both_ways_to_authenticate() -> None:
    with pytest.raises(ConfigurationError) as info:
        MixtralClient(provider="bedrock", region=REGION)
    message = str(info.value)
    assert "api_key=" in message and "AWS_BEARER_TOKEN_BEDROCK" in message and "AWS_ACCESS_KEY_ID" in message


def test_an_unknown_profile_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(ConfigurationError, match="could not load AWS credentials"):
        MixtralClient(provider="bedrock", region=REGION)


def test_a_failed_credential_refresh_is_a_configuration_error(
        bedrock: BedrockStandIn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A credential process that hands out credentials already expired: the refresh before signing fails."""
    process = tmp_path / "expired_credentials.py"
    process.write_text("import json; print(json.dumps({'Version': 1, 'AccessKeyId': 'AKID', 'SecretAccessKey': 's', "
                       "'SessionToken': 't', 'Expiration': '2000-01-01T00:00:00Z'}))")
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {process}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client, \
            pytest.raises(ConfigurationError, match="could not refresh AWS credentials"):
        sync_call(client, False)
    assert bedrock.requests == []


def test_sigv4_without_any_region_is_a_configuration_error(aws_keys: None) -> None:
    with pytest.raises(ConfigurationError, match="region"):
        MixtralClient(provider="bedrock", base_url="http://127.0.0.1:9")


def test_an_api_key_needs_no_region(bedrock: BedrockStandIn) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, api_key=API_KEY) as client:
        assert sync_call(client, False).choices[0].message.content == "Hello from Bedrock"


@pytest.mark.parametrize(("params", "error"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name", "parameters": {"type": "object"}}}]},
     InvalidRequestError),
    ({"response_format": {"type": "json_schema"}}, InvalidRequestError),
    ({"seed": 7}, UnsupportedFeatureError),
    ({"temperature": 1.2}, InvalidRequestError),
    ({"max_tokens": 8192}, InvalidRequestError),
], ids=["tools", "response_format", "seed", "temperature", "max_tokens"])
def test_refused_requests_send_nothing(bedrock: BedrockStandIn, aws_keys: None, params: dict[str, Any],
                                       error: type[Exception]) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        for stream in (False, True):
            with pytest.raises(error):
                sync_call(client, stream, **params)
    assert bedrock.requests == []


TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL_TEXT = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lyon"}}]'


def _check_tool_call(completion: ChatCompletion, bedrock: BedrockStandIn) -> None:
    """Converse got no toolConfig and one user turn with the tools in its text; the text came back as a call."""
    body = bedrock.calls[-1].json()
    assert "toolConfig" not in body
    (turn,) = body["messages"]
    text = turn["content"][0]["text"]
    assert turn["role"] == "user" and text.startswith("Be brief.\n\n[AVAILABLE_TOOLS] ") and text.endswith("\n\nHi")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []] == \
        [("get_weather", {"city": "Lyon"})]


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_tools_are_prompted_and_the_answer_read_back_as_calls(bedrock: BedrockStandIn, aws_keys: None,
                                                               stream: bool) -> None:
    pieces = ["[TOOL_CALLS] [", '{"name": "get_weather", ', '"arguments": {"city": "Lyon"}}]']
    bedrock.replies.append(stream_bytes(answer_frames(pieces)) if stream else answer(CALL_TEXT))
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        _check_tool_call(sync_call(client, stream, tools=TOOLS), bedrock)


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_response_format_is_prompted_and_the_json_cut_out(bedrock: BedrockStandIn, aws_keys: None,
                                                           stream: bool) -> None:
    pieces = ["Sure! Here it is:\n```json\n", '{"city": "Lyon", ', '"sunny": true}\n```\nAnything else?']
    bedrock.replies.append(stream_bytes(answer_frames(pieces)) if stream else answer("".join(pieces)))
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        completion = sync_call(client, stream, response_format=fmt)

    body = bedrock.calls[-1].json()
    assert "response_format" not in json.dumps(body)
    (turn,) = body["messages"]
    text = turn["content"][0]["text"]
    assert text.startswith("Be brief.\n\nHi\n\nReply with one JSON object that follows this JSON schema")
    assert json.loads(text.rsplit("\n", 1)[1]) == schema
    assert json.loads(completion.choices[0].message.content or "") == {"city": "Lyon", "sunny": True}


@pytest.mark.anyio
async def test_async_tools_are_prompted(bedrock: BedrockStandIn, aws_keys: None) -> None:
    bedrock.replies.append(stream_bytes(answer_frames(["[TOOL_CALLS] ", CALL_TEXT[13:]])))
    async with AsyncMixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        _check_tool_call(await async_call(client, True, tools=TOOLS), bedrock)


def test_a_tool_result_turn_reaches_bedrock_as_user_text(bedrock: BedrockStandIn, aws_keys: None) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "sunny"}]
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        answer_ = client.chat.completions.create(messages=messages, tools=TOOLS)
    assert answer_.choices[0].message.content == "Hello from Bedrock"
    roles = [m["role"] for m in bedrock.calls[-1].json()["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert "sunny" in bedrock.calls[-1].json()["messages"][2]["content"][0]["text"]


def test_unknown_events_in_a_stream_are_skipped(bedrock: BedrockStandIn, aws_keys: None) -> None:
    frames = answer_frames()
    bedrock.replies.append(stream_bytes([frames[0], event("somethingNew", {"x": 1}), *frames[1:]]))
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        assert sync_call(client, True).choices[0].message.content == "Hello from Bedrock"


def test_a_converse_answer_that_is_not_json_is_a_connection_error(bedrock: BedrockStandIn, aws_keys: None) -> None:
    bedrock.replies.extend([lambda call, conn: conn.respond(200, "<html>oops</html>")] * 3)
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION, max_retries=0) as client, \
            pytest.raises(APIConnectionError, match="not a Converse answer"):
        sync_call(client, False)


def test_importing_the_client_does_not_import_botocore() -> None:
    code = "import sys, mixtral_client; print(json.dumps(sorted(m for m in sys.modules if m.startswith('botocore'))))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert json.loads(out.stdout) == []


def test_answers_with_other_stop_reasons(bedrock: BedrockStandIn, aws_keys: None) -> None:
    bedrock.replies.extend([answer(stop="max_tokens"), answer(stop="content_filtered")])
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client:
        assert sync_call(client, False).choices[0].finish_reason == "length"
        assert sync_call(client, True).choices[0].finish_reason == "content_filter"


def test_debug_logging_redacts_credentials(bedrock: BedrockStandIn, monkeypatch: pytest.MonkeyPatch,
                                           aws_keys: None, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "secret-session-token")
    caplog.set_level(logging.DEBUG, logger="mixtral_client")
    with MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION) as client, \
            pytest.raises(PermissionDeniedError):  # the stand-in expects no session token
        sync_call(client, False)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "mixtral_client")
    assert "/converse" in logged and "<redacted>" in logged
    assert "secret-session-token" not in logged and "Signature=" not in logged


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_with_raw_response_gives_bedrocks_headers_and_retries(bedrock: BedrockStandIn, auth: dict[str, str],
                                                              stream: bool) -> None:
    bedrock.replies.append(http_error(429, "ThrottlingException", "Too many requests, please wait."))
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        raw = client.chat.completions.with_raw_response.create(messages=MESSAGES, stream=stream)
        assert raw.status_code == 200 and raw.retries_taken == 1
        assert raw.request_id == raw.headers["x-amzn-requestid"] == bedrock.calls[-1].request_id
        answer = raw.parse()
        if isinstance(answer, ChatCompletion):
            completion = answer
        else:
            with answer:
                assert raw.headers["content-type"] == "application/vnd.amazon.eventstream"
                completion = answer.get_final_completion()
    check_answer(completion, bedrock, auth, stream)
