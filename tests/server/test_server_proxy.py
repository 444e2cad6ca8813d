"""``mixtral serve`` in front of a hosted OpenAI-compatible host (a loopback server): refusals never reach the
host, the host's errors reach the caller as OpenAI errors of the right status, and a stream that fails midway
ends in an error event that the openai SDK raises, never in a quiet [DONE]."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.client.conftest import chunk, completion, replying, streaming, text_stream
from tests.loopback import Conn, Handler, LoopbackServer, Received, sse, unanswered_port
from tests.server.conftest import openai_client

MESSAGES = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
def host() -> Iterator[Callable[[Handler], LoopbackServer]]:
    servers: list[LoopbackServer] = []

    def start(handler: Handler) -> LoopbackServer:
        servers.append(LoopbackServer(handler).__enter__())
        return servers[-1]

    yield start
    for server in servers:
        server.close()
    assert not [e for s in servers for e in s.errors]


def test_whole_answer_and_stream_pass_through(host: Callable[[Handler], LoopbackServer],
                                              proxy: Callable[..., str]) -> None:
    limits = {"x-ratelimit-remaining-requests": "12", "x-ratelimit-reset-tokens": "1s", "x-other": "kept home"}
    whole = host(replying(200, completion("Bonjour", usage_extra=1), {"x-request-id": "upstream-1", **limits}))
    with openai_client(proxy(whole.url)) as sdk:
        raw_whole = sdk.chat.completions.with_raw_response.create(model="mixtral-8x7b-instruct", messages=MESSAGES,
                                                                  temperature=0.5)
        answer = raw_whole.parse()
    assert answer.choices[0].message.content == "Bonjour" and answer.usage.total_tokens == 5
    # the host's rate limits reach the caller (so it paces itself by the host), its other headers do not
    assert raw_whole.headers["x-ratelimit-remaining-requests"] == "12"
    assert raw_whole.headers["x-ratelimit-reset-tokens"] == "1s" and "x-other" not in raw_whole.headers
    assert answer._request_id == "upstream-1"  # the host's id, for its support, through the server
    sent = whole.requests[0].json()
    assert sent["model"] == "mistralai/Mixtral-8x7B-Instruct-v0.1" and sent["temperature"] == 0.5
    assert whole.requests[0].headers["authorization"] == "Bearer upstream-key"

    streamed = host(streaming(text_stream("Bon", "jour"), headers={"x-request-id": "upstream-2", **limits}))
    with openai_client(proxy(streamed.url)) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model="mixtral-8x7b-instruct", messages=MESSAGES,
                                                            stream=True)
        assert raw.headers["x-request-id"] == "upstream-2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "12" and "x-other" not in raw.headers
        chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Bonjour"


def test_refused_request_never_reaches_the_host(host: Callable[[Handler], LoopbackServer],
                                                proxy: Callable[..., str]) -> None:
    upstream = host(replying(200, completion()))
    with openai_client(proxy(upstream.url, provider="nvidia")) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES, seed=-1)
        assert caught.value.param == "seed"
        with pytest.raises(openai.BadRequestError) as caught:  # NVIDIA takes no unknown body fields
            sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES,
                                        extra_body={"provider": {"order": ["x"]}})
        assert caught.value.param == "extra_body"
    assert upstream.requests == []


def test_extra_fields_reach_a_host_that_takes_them(host: Callable[[Handler], LoopbackServer],
                                                   proxy: Callable[..., str]) -> None:
    upstream = host(replying(200, completion()))
    with openai_client(proxy(upstream.url, provider="openrouter")) as sdk:
        sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES, max_completion_tokens=9,
                                    extra_body={"provider": {"order": ["a", "b"]}})
    sent = upstream.requests[0].json()
    assert sent["provider"] == {"order": ["a", "b"]} and sent["max_tokens"] == 9


def test_rate_limit_keeps_its_status_and_retry_after(host: Callable[[Handler], LoopbackServer],
                                                     proxy: Callable[..., str]) -> None:
    upstream = host(replying(429, {"error": {"message": "slow down", "code": "rate_limited"}},
                             {"Retry-After": "7"}))
    with openai_client(proxy(upstream.url)) as sdk, pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "7"
    assert "slow down" in caught.value.message


def test_host_refusing_the_servers_key_is_a_bad_gateway(host: Callable[[Handler], LoopbackServer],
                                                        proxy: Callable[..., str]) -> None:
    upstream = host(replying(401, {"error": {"message": "bad key"}}))
    with openai_client(proxy(upstream.url)) as sdk, pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES)
    assert caught.value.status_code == 502 and "credentials" in caught.value.message


def test_host_that_does_not_answer_is_a_gateway_timeout(proxy: Callable[..., str]) -> None:
    with unanswered_port() as port:
        url = proxy(f"http://127.0.0.1:{port}/v1", timeout=0.3)
        with openai_client(url) as sdk, pytest.raises(openai.InternalServerError) as caught:
            sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES)
    assert caught.value.status_code == 504 and caught.value.type == "timeout_error"


def test_host_refusing_connections_is_a_bad_gateway(proxy: Callable[..., str]) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connections are refused
    with openai_client(proxy(f"http://127.0.0.1:{port}/v1")) as sdk, \
            pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES)
    assert caught.value.status_code == 502 and caught.value.type == "api_connection_error"


def test_stream_failing_midway_ends_in_an_error_event(host: Callable[[Handler], LoopbackServer],
                                                      proxy: Callable[..., str]) -> None:
    body = sse(chunk(role="assistant"), chunk("Half"),
               {"error": {"code": 502, "message": "provider died"}, "choices": [{"index": 0, "delta": {},
                                                                               "finish_reason": "error"}]},
               done=False)
    upstream = host(streaming(body))
    url = proxy(upstream.url)
    with httpx.Client(timeout=30) as http:
        raw = http.post(f"{url}/chat/completions", json={"messages": MESSAGES, "stream": True}).text
    assert "provider died" in raw and "[DONE]" not in raw
    with openai_client(url) as sdk, pytest.raises(openai.APIError, match="provider died"):
        for _ in sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES, stream=True):
            pass
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text.splitlines()
    assert 'mixtral_serve_requests_total{code="200",stream="true"} 2' in metrics  # the status they got
    assert "mixtral_serve_stream_errors_total 2" in metrics and "mixtral_serve_requests_in_flight 0" in metrics
    assert not any(line.startswith("mixtral_local_") for line in metrics)  # a host: no local batch to show


def test_prompted_tools_come_back_as_tool_calls(host: Callable[[Handler], LoopbackServer],
                                                proxy: Callable[..., str]) -> None:
    """NVIDIA takes no ``tools``: the server's client writes them into the prompt and reads the call back."""
    said = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'

    def handle(req: Received, conn: Conn) -> None:
        assert "tools" not in req.json()
        conn.respond(200, completion(said))

    upstream = host(handle)
    with openai_client(proxy(upstream.url, provider="nvidia")) as sdk:
        answer = sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES, tools=TOOLS)
    call = answer.choices[0].message.tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')


def test_a_body_over_the_limit_is_refused_before_it_is_read(host: Callable[[Handler], LoopbackServer],
                                                           proxy: Callable[..., str]) -> None:
    upstream = host(replying(200, completion()))
    url = f"{proxy(upstream.url)}/chat/completions"
    big = {"messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    with httpx.Client(timeout=30) as http:
        declared = http.post(url, json=big)

        def pieces() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(80):
                yield b"y" * (64 << 10)
            yield b'"}]}'

        streamed = http.post(url, content=pieces())
    for answer in (declared, streamed):
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    assert upstream.requests == []


def test_tokenize_without_a_tokenizer_says_so(proxy: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A server over a host, without the local extra's tokenizer: 501 with the reason, not an internal error."""
    from mixtral_client._client import _ClientCore
    from mixtral_client._exceptions import ConfigurationError

    def missing(self: object) -> object:
        raise ConfigurationError("count_tokens needs the Mixtral tokenizer from the local extra")

    monkeypatch.setattr(_ClientCore, "tokenizer", missing)
    server = proxy("http://127.0.0.1:9").removesuffix("/v1")
    with httpx.Client(base_url=server, timeout=30) as http:
        tokenized = http.post("/tokenize", json={"prompt": "Hi"})
        detokenized = http.post("/detokenize", json={"tokens": [1]})

    assert tokenized.status_code == detokenized.status_code == 501
    assert "local extra" in tokenized.json()["error"]["message"]
