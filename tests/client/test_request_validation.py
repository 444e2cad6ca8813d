"""What ``create()`` accepts, what it sends, and what it refuses before sending anything."""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from mixtral_client import (
    MODEL_ALIAS,
    PROVIDERS,
    InvalidRequestError,
    Timeout,
    UnsupportedFeatureError,
)
from mixtral_client._request import RequestOptions, build_request
from tests.client.conftest import MESSAGES, Driver, completion, replying, streaming, text_stream

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def build(provider: str = "openai", *, messages: Any = MESSAGES, stream: bool = False,
          extra_body: dict[str, Any] | None = None, **params: Any):
    return build_request(PROVIDERS[provider], model=params.pop("model", None), messages=messages, stream=stream,
                         options=RequestOptions(timeout=Timeout(), extra_body=extra_body or {}), params=params)


def refused(provider: str = "openai", **kwargs: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        build(provider, **kwargs)
    return info.value


# --------------------------------------------------------------------------- on the wire


def test_openai_parameters_and_extras_are_sent(driver: Driver, serve) -> None:
    server = serve(replying(200, completion()))
    params = dict(temperature=0.2, top_p=0.9, max_tokens=64, stop=["\n\n"], seed=7, n=1, presence_penalty=0.5,
                  frequency_penalty=-0.5, logprobs=True, top_logprobs=3, tools=TOOLS, tool_choice="auto",
                  parallel_tool_calls=False, response_format={"type": "json_object"}, user="u-1")

    driver.complete(server, **params, extra_headers={"X-Trace": "abc"}, extra_query={"api-version": "2"},
                    extra_body={"top_k": 40, "temperature": 0.3})

    (req,) = server.requests
    body = req.json()
    assert body == {"model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "messages": MESSAGES,
                    **params, "top_k": 40, "temperature": 0.3}  # extra_body is merged last
    assert req.headers["x-trace"] == "abc"
    assert req.headers["authorization"] == "Bearer sk-test"
    assert parse_qs(urlsplit(req.path).query) == {"api-version": ["2"]}
    assert urlsplit(req.path).path == "/v1/chat/completions"


def test_a_query_in_base_url_goes_on_every_request(driver: Driver, serve) -> None:
    """Gateways that version by query (``?api-version=...``): the path goes before it, extra_query joins it
    and wins on a shared name."""
    server = serve(replying(200, completion()))
    client = {"base_url": server.url + "/?api-version=7&tenant=a"}

    driver.complete(server, client=client)
    driver.complete(server, client=client, extra_query={"trace": "1", "api-version": "8"})

    first, second = server.requests
    assert urlsplit(first.path).path == urlsplit(second.path).path == "/v1/chat/completions"
    assert parse_qs(urlsplit(first.path).query) == {"api-version": ["7"], "tenant": ["a"]}
    assert parse_qs(urlsplit(second.path).query) == {"api-version": ["8"], "tenant": ["a"], "trace": ["1"]}


def test_stream_options_are_sent_with_streams(driver: Driver, serve) -> None:
    server = serve(streaming(text_stream("x")))

    driver.chunks(server, stream_options={"include_usage": True})

    assert server.requests[0].json()["stream_options"] == {"include_usage": True}


def test_none_values_are_not_sent(serve) -> None:
    server = serve(replying(200, completion()))

    Driver("sync").complete(server, temperature=None, stop=None)

    assert set(server.requests[0].json()) == {"model", "messages"}


def test_model_defaults_to_the_client_model_then_the_provider_id(serve) -> None:
    server = serve(replying(200, completion()))

    Driver("sync").complete(server, client={"model": "my-finetune"})
    Driver("sync").complete(server, client={"model": "my-finetune"}, model="per-call")

    assert [r.json()["model"] for r in server.requests] == ["my-finetune", "per-call"]


@pytest.mark.parametrize("provider", ["nvidia", "openrouter", "aimlapi", "otc", "openai", "bedrock", "local"])
def test_alias_maps_to_each_provider_id(provider: str) -> None:
    assert build(provider, model=MODEL_ALIAS).model == PROVIDERS[provider].model
    assert build(provider).model == PROVIDERS[provider].model


def test_other_model_ids_pass_through() -> None:
    assert build("openrouter", model="mistralai/mixtral-8x22b-instruct").model == "mistralai/mixtral-8x22b-instruct"


def test_unknown_keyword_is_a_type_error_and_sends_nothing(driver: Driver, serve) -> None:
    server = serve(replying(200, completion()))

    with pytest.raises(TypeError, match="temprature"):
        driver.complete(server, temprature=0.5)

    assert server.requests == []


@pytest.mark.parametrize("kwargs", [
    {"temperature": 3.0}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
    {"max_tokens": 0}, {"model": ""}, {"timeout": -1}, {"logit_bias": {"7": 101}},
])
def test_invalid_input_sends_nothing(kwargs: dict[str, Any], driver: Driver, serve) -> None:
    server = serve(replying(200, completion()))

    with pytest.raises(InvalidRequestError):
        driver.complete(server, **kwargs)
    with pytest.raises(InvalidRequestError):
        driver.chunks(server, **kwargs)

    assert server.requests == []
    assert server.connections == 0


# --------------------------------------------------------------------------- limits, named


@pytest.mark.parametrize(("provider", "param", "value", "limit"), [
    ("nvidia", "temperature", 2.5, "between 0 and 2"),
    ("nvidia", "temperature", -0.1, "between 0 and 2"),
    ("nvidia", "top_p", 1.5, "between 0 and 1"),
    ("nvidia", "seed", -1, ">= 0"),
    ("nvidia", "max_tokens", 0, ">= 1"),
    ("aimlapi", "top_p", 0.0, "between 0.01 and 1"),
    ("aimlapi", "seed", 0, ">= 1"),
    ("openai", "presence_penalty", 2.5, "between -2 and 2"),
    ("openai", "frequency_penalty", -3, "between -2 and 2"),
    ("bedrock", "temperature", 1.5, "between 0 and 1"),
    ("bedrock", "max_tokens", 5000, "between 1 and 4096"),
    ("bedrock", "n", 2, "between 1 and 1"),
])
def test_out_of_range_value_is_refused_naming_the_limit(provider: str, param: str, value: float, limit: str) -> None:
    error = refused(provider, **{param: value})

    assert error.param == param
    assert limit in str(error)
    assert provider in str(error)


def test_top_k_in_extra_body_is_checked_where_the_host_has_a_limit() -> None:
    assert refused("aimlapi", extra_body={"top_k": 0}).param == "top_k"
    assert build("aimlapi", extra_body={"top_k": 5}).extra("top_k") == 5


@pytest.mark.parametrize("provider", ["openrouter", "local"])
def test_min_p_and_repetition_penalty_in_extra_body_are_checked_where_ranges_are_known(provider: str) -> None:
    assert refused(provider, extra_body={"min_p": 1.5}).param == "min_p"
    assert "between 0 (excluded) and 2" in str(refused(provider, extra_body={"repetition_penalty": 0}))
    assert refused(provider, extra_body={"repetition_penalty": 2.5}).param == "repetition_penalty"
    assert refused(provider, extra_body={"min_p": "0.1"}).param == "min_p"
    ok = build(provider, extra_body={"min_p": 0.05, "repetition_penalty": 1.1})
    assert (ok.extra("min_p"), ok.extra("repetition_penalty")) == (0.05, 1.1)
    assert build("aimlapi", extra_body={"repetition_penalty": 3}).extra("repetition_penalty") == 3  # no known range


def test_aimlapi_accepts_at_most_four_stop_sequences() -> None:
    assert "at most 4" in str(refused("aimlapi", stop=["a", "b", "c", "d", "e"]))
    assert build("aimlapi", stop=["a", "b", "c", "d"]).params["stop"] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("stop", ["", [], [""], ["ok", 3], 5])
def test_bad_stop_is_refused(stop: Any) -> None:
    assert refused(stop=stop).param == "stop"


@pytest.mark.parametrize(("param", "value"), [
    ("temperature", "hot"), ("temperature", True), ("temperature", float("nan")), ("max_tokens", 1.5),
    ("seed", 1.0), ("logprobs", "yes"), ("user", 3),
])
def test_wrong_types_are_refused(param: str, value: Any) -> None:
    assert refused(**{param: value}).param == param


def test_top_logprobs_needs_logprobs() -> None:
    assert refused(top_logprobs=2).param == "top_logprobs"
    assert refused(top_logprobs=21, logprobs=True).param == "top_logprobs"


@pytest.mark.parametrize("bias", [
    [(7, 1)], {"a": 1}, {"-3": 1}, {True: 1}, {7: 100.5}, {7: -101}, {7: "1"}, {7: float("nan")}, {7: True},
    {i: 1 for i in range(301)},
])
def test_bad_logit_bias_is_refused(bias: Any) -> None:
    assert refused(logit_bias=bias).param == "logit_bias"


def test_logit_bias_goes_out_with_openais_string_keys(driver: Driver, serve) -> None:
    server = serve(replying(200, completion()))

    driver.complete(server, logit_bias={5592: 100, "1770": -12.5})

    assert server.requests[0].json()["logit_bias"] == {"5592": 100, "1770": -12.5}


def test_stream_options_need_a_stream() -> None:
    assert refused(stream_options={"include_usage": True}).param == "stream_options"


@pytest.mark.parametrize("messages", [
    "Hi", [], [{"content": "no role"}], [{"role": "user"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "tool", "content": "42"}],
    [{"role": "user", "content": "x", "tool_calls": []}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}],
])
def test_malformed_messages_are_refused(messages: Any) -> None:
    assert refused(messages=messages).param.startswith("messages")


def test_well_formed_tool_conversation_is_accepted() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]

    assert build(messages=messages, tools=TOOLS).messages == messages


def test_tools_to_a_host_that_neither_takes_nor_prompts_them_are_unsupported() -> None:
    preset = dataclasses.replace(PROVIDERS["nvidia"], tools="none")
    with pytest.raises(UnsupportedFeatureError) as info:
        build_request(preset, model=None, messages=MESSAGES, stream=False, options=RequestOptions(timeout=Timeout()),
                      params={"tools": TOOLS})
    assert info.value.param == "tools"


@pytest.mark.parametrize("provider", ["nvidia", "aimlapi", "bedrock", "local"])
def test_tools_to_a_host_without_native_tools_are_validated_then_prompted(provider: str) -> None:
    assert build(provider, tools=TOOLS).params["tools"] == TOOLS
    assert "tools" in refused(provider, tools=[{"type": "function", "function": {"name": "bad name"}}]).args[0]


@pytest.mark.parametrize("provider", ["nvidia", "aimlapi", "bedrock"])
def test_structured_output_to_a_host_without_it_is_validated_then_prompted(provider: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
    assert build(provider, response_format=fmt).params["response_format"] == fmt
    bad = {"type": "json_schema", "json_schema": {"name": "n", "schema": ["not", "a", "schema"]}}
    assert refused(provider, response_format=bad).param == "response_format"


def test_a_malformed_format_for_nvidia_sends_nothing(driver: Driver, serve) -> None:
    server = serve(replying(200, completion()))

    with pytest.raises(InvalidRequestError, match="json_schema.schema"):
        driver.complete(server, client={"provider": "nvidia"},
                        response_format={"type": "json_schema", "json_schema": {"schema": "{}"}})

    assert server.requests == []


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": TOOLS + TOOLS}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_malformed_tools_and_formats_are_refused(kwargs: dict[str, Any], param: str) -> None:
    assert refused(**kwargs).param == param


def test_invalid_request_error_is_a_value_error() -> None:
    assert isinstance(refused(temperature=9), ValueError)


def test_nvidia_refuses_unknown_extra_body_fields_before_sending() -> None:
    from mixtral_client import InvalidRequestError, MixtralClient
    from tests.loopback import LoopbackServer

    with LoopbackServer(lambda req, conn: conn.respond(500, "never")) as server:
        client = MixtralClient(provider="nvidia", base_url=server.url, api_key="k")
        with pytest.raises(InvalidRequestError, match="nvidia rejects unknown body fields \\(provider\\)") as exc:
            client.chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"provider": {"order": ["x"]}, "logit_bias": {}})
        client.close()
    assert exc.value.param == "extra_body"
    assert server.requests == []


def test_openrouter_accepts_its_routing_fields_in_extra_body() -> None:
    from mixtral_client._providers import get_preset
    from mixtral_client._request import RequestOptions, build_request
    from mixtral_client._timeouts import Timeout

    request = build_request(get_preset("openrouter"), model=None, messages=[{"role": "user", "content": "hi"}],
                            stream=False, params={},
                            options=RequestOptions(timeout=Timeout(), extra_body={"provider": {"sort": "price"}}))
    assert request.body()["provider"] == {"sort": "price"}
