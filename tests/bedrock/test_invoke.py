"""Raw prompts on Bedrock: ``client.completions.create`` goes to InvokeModel (and InvokeModelWithResponseStream),
Mistral's native text API, against the loopback stand-in, signed with SigV4 or an API key."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mixtral_client import (
    APIConnectionError,
    AsyncMixtralClient,
    Completion,
    MixtralClient,
    RateLimitError,
    UnsupportedFeatureError,
)
from tests.bedrock.standin import (
    API_KEY,
    MODEL,
    BedrockStandIn,
    event,
    exception,
    http_error,
    invoke_chunk,
    stream_bytes,
)

PROMPT = "<s>[INST] Be brief.\n\nHi [/INST]"
KEY = {"api_key": API_KEY}


def check(text: Completion, bedrock: BedrockStandIn, stream: bool) -> None:
    call = bedrock.calls[-1]
    assert call.op == ("invoke-with-response-stream" if stream else "invoke")
    assert call.json() == {"prompt": PROMPT, "max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "stop": ["</s>"],
                           "top_k": 50}
    assert text.object == "text_completion"
    assert [(c.text, c.finish_reason) for c in text.choices] == [("Hello from Bedrock", "stop")]
    assert text.usage is not None
    assert (text.usage.prompt_tokens, text.usage.completion_tokens, text.usage.total_tokens) == (12, 3, 15)
    assert (text.model, text.id, text._request_id) == (MODEL, call.request_id, call.request_id)
    assert bedrock.refused == []


PARAMS: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "stop": "</s>",
                          "extra_body": {"top_k": 50}}


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "invoke-stream"])
def test_sync_raw_prompts_use_invoke_model(bedrock: BedrockStandIn, auth: dict[str, str], stream: bool) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        if stream:
            with client.completions.create(stream=True, **PARAMS) as chunks:
                text = chunks.get_final_completion()
        else:
            text = client.completions.create(**PARAMS)
    check(text, bedrock, stream)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "invoke-stream"])
async def test_async_raw_prompts_use_invoke_model(bedrock: BedrockStandIn, auth: dict[str, str], stream: bool) -> None:
    async with AsyncMixtralClient(provider="bedrock", base_url=bedrock.url, **auth) as client:  # type: ignore[arg-type]
        if stream:
            async with await client.completions.create(stream=True, **PARAMS) as chunks:
                text = await chunks.get_final_completion()
        else:
            text = await client.completions.create(**PARAMS)
    check(text, bedrock, stream)


def test_stream_chunks_carry_text_then_the_stop_reason_and_usage(bedrock: BedrockStandIn) -> None:
    bedrock.replies.append(stream_bytes([invoke_chunk(" Hel"), invoke_chunk("lo", "length", (5, 2))], one_byte=True))

    with MixtralClient(provider="bedrock", base_url=bedrock.url, **KEY) as client:
        chunks = list(client.completions.create(prompt="Hi", stream=True))

    assert [[c.text for c in ch.choices] for ch in chunks] == [[" Hel"], ["lo"]]
    assert chunks[1].choices[0].finish_reason == "length"
    assert chunks[1].usage is not None and chunks[1].usage.total_tokens == 7
    assert chunks[1].model_extra is not None and chunks[1].model_extra["metrics"]["invocationLatency"] == 42


def test_an_exception_frame_mid_stream_raises_with_the_text_so_far(bedrock: BedrockStandIn) -> None:
    bedrock.replies.append(stream_bytes([invoke_chunk("Half"), exception("throttlingException", "slow down")]))

    with MixtralClient(provider="bedrock", base_url=bedrock.url, **KEY) as client:
        with pytest.raises(RateLimitError, match="slow down") as info, \
                client.completions.create(prompt="Hi", stream=True) as chunks:
            for _ in chunks:
                pass

    assert info.value.partial is not None and info.value.partial.choices[0].message.content == "Half"


def test_a_chunk_whose_bytes_are_not_base64_json_is_a_connection_error(bedrock: BedrockStandIn) -> None:
    bedrock.replies.append(stream_bytes([event("chunk", {"bytes": base64.b64encode(b"not json").decode()})]))

    with MixtralClient(provider="bedrock", base_url=bedrock.url, **KEY, max_retries=0) as client:
        with pytest.raises(APIConnectionError, match="unreadable event stream"):
            client.completions.create(prompt="Hi", stream=True)


def test_a_throttled_invoke_is_retried(bedrock: BedrockStandIn) -> None:
    bedrock.replies.append(http_error(429, "ThrottlingException", "Too many requests"))

    with MixtralClient(provider="bedrock", base_url=bedrock.url, **KEY) as client:
        text = client.completions.create(prompt="Hi")

    assert text.choices[0].text == "Hello from Bedrock"
    assert [c.op for c in bedrock.calls] == ["invoke", "invoke"]


def test_an_answer_without_outputs_is_a_connection_error(bedrock: BedrockStandIn) -> None:
    def odd(call: Any, conn: Any) -> None:
        conn.respond(200, {"output": {"message": {}}}, {"x-amzn-RequestId": call.request_id})

    bedrock.replies.append(odd)
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **KEY, max_retries=0) as client:
        with pytest.raises(APIConnectionError, match="not an InvokeModel answer"):
            client.completions.create(prompt="Hi")


@pytest.mark.parametrize(("params", "param"), [({"logprobs": 1}, "logprobs"), ({"seed": 1}, "seed"),
                                               ({"presence_penalty": 0.5}, "presence_penalty"),
                                               ({"echo": True}, "echo"), ({"echo": True, "max_tokens": 0}, "echo"),
                                               ({"prompt": ["Hi", "Bye"]}, "prompt"), ({"prompt": [1, 2]}, "prompt")])
def test_what_invoke_model_cannot_take_is_refused_before_signing(bedrock: BedrockStandIn,
                                                                 params: dict[str, Any], param: str) -> None:
    with MixtralClient(provider="bedrock", base_url=bedrock.url, **KEY) as client:
        with pytest.raises(UnsupportedFeatureError) as info:
            client.completions.create(**{"prompt": "Hi", **params})

    assert info.value.param == param
    assert bedrock.requests == []
