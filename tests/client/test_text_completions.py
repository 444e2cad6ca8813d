"""``client.completions.create(prompt=...)`` against an OpenAI-compatible host's ``/completions``, over a real
loopback server: the wire body, whole answers, streams, legacy logprobs, errors, and refusals before sending."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mixtral_client import APIStatusError, InvalidRequestError, MixtralClient, NotFoundError
from mixtral_client.types import CompletionLogprobs
from tests.client.conftest import PROMPT, Driver, replying, streaming
from tests.loopback import Conn, Received, in_turn, sse


def text_answer(*texts: str, finish: str = "stop", **extra: Any) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
            "choices": [{"index": i, "text": t, "finish_reason": finish, "logprobs": None} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}, **extra}


def text_chunk(text: str = "", *, finish: str | None = None, index: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}], **extra}


def test_a_prompt_goes_to_completions_as_it_is(driver: Driver, serve) -> None:
    server = serve(replying(200, text_answer(" Hello!")))

    answer = driver.text_completion(server, max_tokens=5, temperature=0, stop=["</s>"])

    (req,) = server.requests
    assert req.path == "/v1/completions"
    assert req.json() == {"model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "prompt": PROMPT, "max_tokens": 5,
                          "temperature": 0, "stop": ["</s>"]}
    assert answer.object == "text_completion"
    assert [(c.index, c.text, c.finish_reason) for c in answer.choices] == [(0, " Hello!", "stop")]
    assert (answer.id, answer.created, answer.model) == ("cmpl-1", 7, "m")
    assert answer.usage is not None and answer.usage.total_tokens == 11


def test_the_base_urls_path_and_query_are_kept(serve) -> None:
    server = serve(replying(200, text_answer("ok")))

    with MixtralClient(base_url=server.url + "?tenant=a", api_key="k") as client:
        client.completions.create(prompt="Hi")

    (req,) = server.requests
    assert req.path == "/v1/completions?tenant=a"


def test_several_choices_and_host_fields_are_kept(driver: Driver, serve) -> None:
    server = serve(replying(200, text_answer("a", "b", provider="Together", system_fingerprint="fp")))

    answer = driver.text_completion(server, n=2)

    assert [c.text for c in answer.choices] == ["a", "b"]
    assert answer.model_extra == {"provider": "Together", "system_fingerprint": "fp"}


def test_a_stream_gives_completion_chunks_and_the_whole_text(driver: Driver, serve) -> None:
    body = sse(text_chunk(" Grüß"), text_chunk(" dich"), text_chunk("", finish="length"),
               {**text_chunk(), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2,
                                                         "total_tokens": 11}})
    server = serve(streaming(body, one_byte=True))

    chunks, final = driver.text_chunks(server, max_tokens=2, stream_options={"include_usage": True})

    assert server.requests[0].json()["stream"] is True
    assert [c.object for c in chunks] == ["text_completion"] * 4
    assert [[ch.text for ch in c.choices] for c in chunks] == [[" Grüß"], [" dich"], [""], []]
    assert chunks[2].choices[0].finish_reason == "length"
    assert chunks[3].usage is not None and chunks[3].usage.completion_tokens == 2
    assert final.choices[0].text == " Grüß dich"
    assert final.choices[0].finish_reason == "length"
    assert final.usage is not None and final.usage.total_tokens == 11


LEGACY = {"tokens": [" Hel", "lo"], "token_logprobs": [-0.5, -0.25],
          "top_logprobs": [{" Hel": -0.5, " Hi": -1.5}, {"lo": -0.25, "p": -2.0}], "text_offset": [0, 4]}


def test_logprobs_is_the_legacy_count_and_comes_back_in_the_legacy_shape(driver: Driver, serve) -> None:
    answer_body = text_answer(" Hello")
    answer_body["choices"][0]["logprobs"] = LEGACY
    server = serve(replying(200, answer_body))

    answer = driver.text_completion(server, logprobs=2)

    sent = server.requests[0].json()
    assert sent["logprobs"] == 2 and "top_logprobs" not in sent
    logprobs = answer.choices[0].logprobs
    assert isinstance(logprobs, CompletionLogprobs)
    assert logprobs.model_dump() == LEGACY


def test_streamed_logprobs_offsets_run_on_across_chunks(driver: Driver, serve) -> None:
    first, second = text_chunk(" Hel"), text_chunk("lo", finish="stop")
    first["choices"][0]["logprobs"] = {"tokens": [" Hel"], "token_logprobs": [-0.5], "top_logprobs": [{" Hel": -0.5}]}
    second["choices"][0]["logprobs"] = {"tokens": ["lo"], "token_logprobs": [-0.25], "top_logprobs": [{"lo": -0.25}]}
    server = serve(streaming(sse(first, second)))

    chunks, final = driver.text_chunks(server, logprobs=0)

    offsets = [c.choices[0].logprobs.text_offset for c in chunks]  # type: ignore[union-attr]
    assert offsets == [[0], [4]]
    logprobs = final.choices[0].logprobs
    assert isinstance(logprobs, CompletionLogprobs)
    assert (logprobs.tokens, logprobs.token_logprobs, logprobs.text_offset) == ([" Hel", "lo"], [-0.5, -0.25], [0, 4])


def test_an_error_chunk_mid_stream_raises_with_the_text_so_far(driver: Driver, serve) -> None:
    failing = {**text_chunk("", finish="error"), "error": {"code": 502, "message": "provider went away"}}
    server = serve(streaming(sse(text_chunk(" Hal"), text_chunk("f"), failing, done=False)))

    with pytest.raises(APIStatusError, match="provider went away") as info:
        driver.text_chunks(server)

    assert [c.choices[0].text for c in driver.seen] == [" Hal", "f"]
    assert info.value.partial is not None and info.value.partial.choices[0].message.content == " Half"


def test_a_refusal_before_the_first_chunk_is_retried(driver: Driver, serve) -> None:
    server = serve(in_turn(replying(503, {"error": {"message": "busy"}}, {"retry-after-ms": "1"}),
                           replying(200, text_answer("ok"))))

    assert driver.text_completion(server).choices[0].text == "ok"
    assert [r.path for r in server.requests] == ["/v1/completions", "/v1/completions"]


def test_a_host_that_streams_a_whole_json_answer_is_read_as_one_chunk(driver: Driver, serve) -> None:
    def whole(req: Received, conn: Conn) -> None:
        conn.respond(200, text_answer(" all at once"))

    server = serve(whole)

    chunks, final = driver.text_chunks(server)

    assert [c.choices[0].text for c in chunks] == [" all at once"]
    assert final.choices[0].text == " all at once"


@pytest.mark.parametrize("prompt", [["Hi", "Bye"], [1, 1014, 2], [[1, 1014], [1, 2, 3]]])
def test_several_prompts_and_token_ids_go_as_they_are(driver: Driver, serve, prompt: Any) -> None:
    server = serve(replying(200, text_answer("a", "b", "c", "d")))

    answer = driver.text_completion(server, prompt=prompt, n=2)

    assert server.requests[0].json()["prompt"] == prompt
    assert [c.text for c in answer.choices] == ["a", "b", "c", "d"]


ECHOED = {"tokens": ["<s>", "Hi", " there"], "token_logprobs": [None, -3.5, -0.75],
          "top_logprobs": [None, {"Hi": -3.5, "Hello": -1.0}, {" there": -0.75, "!": -2.0}], "text_offset": [0, 3, 5]}


def test_echo_is_sent_and_the_prompts_logprobs_come_back_with_its_first_token_unscored(driver: Driver,
                                                                                       serve) -> None:
    answer_body = text_answer("<s>Hi there")
    answer_body["choices"][0]["logprobs"] = ECHOED
    server = serve(replying(200, answer_body))

    answer = driver.text_completion(server, echo=True, max_tokens=0, logprobs=1)

    sent = server.requests[0].json()
    assert (sent["echo"], sent["max_tokens"], sent["logprobs"]) == (True, 0, 1)
    assert answer.choices[0].text == "<s>Hi there"
    logprobs = answer.choices[0].logprobs
    assert isinstance(logprobs, CompletionLogprobs)
    assert logprobs.model_dump() == ECHOED


@pytest.mark.parametrize(("params", "param"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": ["a", [1, 2]]}, "prompt"),  # a mix
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": ["a"] * 2049}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": 21}, "top_logprobs"),
    ({"temperature": 9}, "temperature"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream=True
    ({"echo": "yes"}, "echo"),
    ({"echo": 1}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),  # only echo scores the prompt alone
    ({"echo": False, "max_tokens": 0}, "max_tokens"),
])
def test_bad_input_is_refused_before_anything_is_sent(serve, params: dict[str, Any], param: str) -> None:
    server = serve(replying(200, text_answer("never")))

    with MixtralClient(base_url=server.url, api_key="k") as client, pytest.raises(InvalidRequestError) as info:
        client.completions.create(**{"prompt": "Hi", **params})

    assert info.value.param == param
    assert server.requests == []


@pytest.mark.parametrize("name", ["tools", "tool_choice", "response_format", "parallel_tool_calls"])
def test_chat_only_parameters_are_refused_by_name(serve, name: str) -> None:
    server = serve(replying(200, text_answer("never")))
    value = {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
             "response_format": {"type": "json_object"}, "parallel_tool_calls": True}[name]

    with MixtralClient(base_url=server.url, api_key="k") as client:
        with pytest.raises((InvalidRequestError, TypeError), match=name):
            client.completions.create(prompt="Hi", **{name: value})  # type: ignore[arg-type]

    assert server.requests == []


def test_unknown_arguments_raise_type_error(serve) -> None:
    server = serve(replying(200, text_answer("never")))

    with MixtralClient(base_url=server.url, api_key="k") as client, pytest.raises(TypeError, match="best_of"):
        client.completions.create(prompt="Hi", best_of=2)  # type: ignore[call-arg]

    assert server.requests == []


def test_the_request_id_of_the_answer_is_kept(driver: Driver, serve) -> None:
    server = serve(replying(200, text_answer("ok"), {"x-request-id": "req-42"}))

    assert driver.text_completion(server)._request_id == "req-42"


def test_the_answer_json_is_openais_legacy_shape(serve) -> None:
    server = serve(replying(200, text_answer(" Hello")))

    with MixtralClient(base_url=server.url, api_key="k") as client:
        dumped = json.loads(client.completions.create(prompt="Hi").model_dump_json())

    assert dumped["object"] == "text_completion"
    assert dumped["choices"] == [{"index": 0, "text": " Hello", "finish_reason": "stop", "logprobs": None}]


def test_a_host_without_the_completions_api_says_so(driver: Driver, serve) -> None:
    server = serve(replying(404, {"error": {"message": "404 page not found"}}))

    with pytest.raises(NotFoundError) as info:
        driver.text_completion(server)

    assert "does not serve the completions API" in "".join(info.value.__notes__)
    assert len(server.requests) == 1  # a 404 is not retried
