"""Headers merge case-insensitively, and a stream request answered with plain JSON is read as an answer."""

from __future__ import annotations

import pytest

from mixtral_client import InternalServerError, MixtralClient, RateLimitError
from mixtral_client.types import ChoiceLogprobs
from tests.client.conftest import MESSAGES, Driver, completion, replying
from tests.loopback import LoopbackServer


def _names(server: LoopbackServer) -> list[str]:
    return [name.lower() for name, _ in server.requests[0].header_lines]


def test_extra_headers_replace_built_in_ones_whatever_their_case(driver: Driver, serve) -> None:
    server = serve(replying(200, completion("ok")))

    driver.complete(server, extra_headers={"authorization": "Bearer other", "user-agent": "mine/1"})

    names = _names(server)
    assert names.count("authorization") == 1 and names.count("user-agent") == 1
    assert server.requests[0].headers["authorization"] == "Bearer other"
    assert server.requests[0].headers["user-agent"] == "mine/1"


@pytest.mark.parametrize("stream", [False, True])
def test_the_clients_own_pool_merges_extra_headers_case_insensitively_too(serve, stream: bool) -> None:
    from tests.client.conftest import streaming, text_stream

    server = serve(streaming(text_stream("ok")) if stream else replying(200, completion("ok")))
    with MixtralClient(base_url=server.url, api_key="sk-test") as client:  # no http_client: the prebuilt path
        result = client.chat.completions.create(messages=MESSAGES, stream=stream,
                                                extra_headers={"AUTHORIZATION": "Bearer other"})
        if stream:
            result.get_final_completion()

    assert _names(server).count("authorization") == 1
    assert server.requests[0].headers["authorization"] == "Bearer other"


def test_a_stream_request_answered_with_a_json_error_raises_the_typed_error(driver: Driver, serve) -> None:
    server = serve(replying(200, {"error": {"code": 429, "message": "slow down"}}, {"x-should-retry": "false"}))

    with pytest.raises(RateLimitError, match="slow down"):
        driver.chunks(server, client={"max_retries": 0})

    assert driver.seen == []


def test_a_stream_request_answered_with_a_whole_completion_gives_it_as_one_chunk(driver: Driver, serve) -> None:
    answer = completion("Bonjour", usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
    answer["choices"][0]["message"]["tool_calls"] = [
        {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]
    server = serve(replying(200, answer))

    final = driver.final(server)

    message = final.choices[0].message
    assert message.content == "Bonjour" and final.choices[0].finish_reason == "stop"
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("abcdefghi", "f", "{\"x\": 1}")]
    assert final.usage is not None and final.usage.total_tokens == 4


def test_a_stream_request_answered_with_a_json_choice_error_raises_it(driver: Driver, serve) -> None:
    answer = completion("par", finish="error")
    answer["choices"][0]["error"] = {"code": 502, "message": "provider went away"}
    server = serve(replying(200, answer))

    with pytest.raises(InternalServerError, match="provider went away"):
        driver.chunks(server, client={"max_retries": 0})


def test_a_hosts_logprobs_are_typed_and_a_stranger_shape_is_kept(driver: Driver, serve) -> None:
    answer = completion("Hi")
    answer["choices"][0]["logprobs"] = {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                                     "top_logprobs": [{"token": "Hi", "logprob": -0.5},
                                                                      {"token": "Hey", "logprob": -1.5}]}]}
    server = serve(replying(200, answer))

    logprobs = driver.complete(server, logprobs=True, top_logprobs=2).choices[0].logprobs

    assert server.requests[0].json()["top_logprobs"] == 2
    assert isinstance(logprobs, ChoiceLogprobs) and logprobs.content is not None
    assert [(t.token, t.logprob) for t in logprobs.content[0].top_logprobs] == [("Hi", -0.5), ("Hey", -1.5)]

    legacy = {"tokens": ["Hi"], "token_logprobs": [-0.5], "top_logprobs": None}  # old completions shape
    answer["choices"][0]["logprobs"] = {"content": [{"token": "Hi", "logprob": None}], **legacy}
    strange = driver.complete(serve(replying(200, answer)), logprobs=True).choices[0].logprobs
    assert strange == {"content": [{"token": "Hi", "logprob": None}], **legacy}


def test_the_hosts_request_id_is_on_the_answer(driver: Driver, serve) -> None:
    server = serve(replying(200, completion("ok"), {"x-request-id": "req-123"}))

    assert driver.complete(server)._request_id == "req-123"
    assert driver.complete(serve(replying(200, completion("ok"))))._request_id is None


def test_the_hosts_request_id_is_on_every_chunk_the_stream_and_its_final_completion(driver: Driver, serve) -> None:
    from tests.client.conftest import streaming, text_stream

    server = serve(streaming(text_stream("Bon", "jour"), headers={"x-request-id": "req-9"}))

    assert [c._request_id for c in driver.chunks(server)] == ["req-9"] * len(driver.seen)
    assert driver.final(server)._request_id == "req-9"
    with MixtralClient(base_url=server.url, api_key="sk-test") as client:
        stream = client.chat.completions.create(messages=MESSAGES, stream=True)
        with stream:
            assert stream.request_id == "req-9"  # known as soon as create() returns
            assert "".join(stream.text()) == "Bonjour"
        assert stream.request_id == "req-9"


def test_nvidias_request_id_survives_prompted_tools_and_parse(serve) -> None:
    """NVIDIA names it ``nvcf-reqid``; the rewrites (tools in the prompt) and ``parse()`` keep it."""
    from pydantic import BaseModel

    class Answer(BaseModel):
        city: str

    calls = serve(replying(200, completion('[TOOL_CALLS] [{"name": "f", "arguments": {}}]'), {"nvcf-reqid": "n-1"}))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with MixtralClient(provider="nvidia", base_url=calls.url, api_key="nvapi-test") as client:
        answer = client.chat.completions.create(messages=MESSAGES, tools=tools)
    assert answer.choices[0].finish_reason == "tool_calls" and answer._request_id == "n-1"

    parsed = serve(replying(200, completion('{"city": "Paris"}'), {"nvcf-reqid": "n-2"}))
    with MixtralClient(provider="nvidia", base_url=parsed.url, api_key="nvapi-test") as client:
        result = client.chat.completions.parse(messages=MESSAGES, response_format=Answer)
    assert result.choices[0].message.parsed == Answer(city="Paris") and result._request_id == "n-2"
