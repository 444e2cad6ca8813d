"""``client.chat.completions.with_raw_response``: the answer with the status, headers and retries of the HTTP
response that carried it, over a real loopback server (sync, asyncio, trio)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel

from mixtral_client import (
    AsyncStream,
    BadRequestError,
    ChatCompletion,
    InvalidRequestError,
    MixtralClient,
    ParsedChatCompletion,
    RawResponse,
    Stream,
)
from tests.client.conftest import Driver, completion, cut_stream, replying, streaming, text_stream
from tests.loopback import Conn, Received, in_turn

LIMITS = {"x-ratelimit-remaining-requests": "41", "x-ratelimit-reset-requests": "7s", "x-request-id": "req-raw-1"}


def test_a_whole_answer_comes_with_its_status_and_headers(driver: Driver, serve) -> None:
    server = serve(replying(200, completion("Hello there"), LIMITS))

    seen = driver.raw(server, max_tokens=5)

    assert seen.status_code == 200
    assert seen.headers["x-ratelimit-remaining-requests"] == "41"
    assert seen.headers["x-ratelimit-reset-requests"] == "7s"
    assert seen.request_id == "req-raw-1"
    assert seen.retries_taken == 0
    assert isinstance(seen.answer, ChatCompletion) and seen.answer.choices[0].message.content == "Hello there"
    assert seen.answer._request_id == "req-raw-1"
    assert isinstance(seen.http_response, httpx.Response) and seen.http_response.is_closed
    assert seen.http_response.request.url.path.endswith("/chat/completions")
    assert server.requests[0].json()["max_tokens"] == 5


def test_retries_taken_counts_the_attempts_before_the_answer(driver: Driver, serve) -> None:
    busy = replying(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "10", "x-ratelimit-remaining-requests": "0"})
    server = serve(in_turn(busy, busy, replying(200, completion(), LIMITS)))

    seen = driver.raw(server)

    assert len(server.requests) == 3
    assert seen.retries_taken == 2
    assert seen.headers["x-ratelimit-remaining-requests"] == "41"  # the answering response's, not the 429's


def test_a_stream_has_its_headers_before_its_body_is_read(driver: Driver, serve) -> None:
    server = serve(streaming(text_stream("Hel", "lo"), headers=LIMITS))

    seen = driver.raw(server, stream=True)

    assert seen.headers["x-ratelimit-remaining-requests"] == "41"
    assert seen.request_id == "req-raw-1" and seen.retries_taken == 0
    assert "".join(c.choices[0].delta.content or "" for c in seen.answer if c.choices) == "Hello"
    assert all(c._request_id == "req-raw-1" for c in seen.answer)


def test_a_stream_cut_before_its_first_event_is_retried_and_counted(driver: Driver, serve) -> None:
    server = serve(in_turn(cut_stream(), streaming(text_stream("ok"), headers=LIMITS)))

    seen = driver.raw(server, stream=True)

    assert seen.retries_taken == 1 and len(server.requests) == 2
    assert "".join(c.choices[0].delta.content or "" for c in seen.answer if c.choices) == "ok"


class City(BaseModel):
    name: str


def test_parse_gives_the_validated_instance(driver: Driver, serve) -> None:
    server = serve(replying(200, completion('{"name": "Lyon"}'), LIMITS))

    seen = driver.raw(server, method="parse", response_format=City)

    assert isinstance(seen.answer, ParsedChatCompletion)
    assert seen.answer.choices[0].message.parsed == City(name="Lyon")
    assert seen.headers["x-request-id"] == "req-raw-1"
    assert server.requests[0].json()["response_format"]["type"] == "json_schema"


def test_an_error_status_raises_as_create_does(driver: Driver, serve) -> None:
    server = serve(replying(400, {"error": {"message": "bad"}}, {"x-request-id": "req-bad"}))

    with pytest.raises(BadRequestError) as caught:
        driver.raw(server)

    assert caught.value.request_id == "req-bad"


def test_an_invalid_request_is_refused_before_sending(driver: Driver, serve) -> None:
    server = serve(replying(200, completion(), LIMITS))

    with pytest.raises(InvalidRequestError, match="temperature"):
        driver.raw(server, temperature=9)
    with pytest.raises(TypeError, match="stream"):
        driver.raw(server, method="parse", response_format=City, stream=True)

    assert server.requests == []


def test_nvidia_polling_answers_with_the_last_polls_response(serve) -> None:
    def handle(req: Received, conn: Conn) -> None:
        if req.method == "POST":
            conn.respond(202, b"", {"NVCF-REQID": "req-42"})
        else:
            conn.respond(200, completion("polled"), {"NVCF-REQID": "req-42", "x-ratelimit-remaining": "9"})

    server = serve(handle)
    with httpx.Client() as http, MixtralClient(provider="nvidia", base_url=server.url, api_key="k",
                                                http_client=http) as client:
        raw = client.chat.completions.with_raw_response.create(messages=[{"role": "user", "content": "Hi"}])

    assert raw.status_code == 200 and raw.retries_taken == 0
    assert raw.headers["x-ratelimit-remaining"] == "9"
    assert raw.http_response is not None and raw.http_response.request.method == "GET"
    assert raw.request_id == "req-42"
    assert raw.parse().choices[0].message.content == "polled"


def test_the_types_say_what_parse_gives(serve) -> None:
    """Not only for mypy: the objects are the ones the overloads name."""
    server = serve(in_turn(replying(200, completion()), streaming(text_stream("x"))))
    with httpx.Client() as http, MixtralClient(base_url=server.url, api_key="k", http_client=http) as client:
        whole: RawResponse[ChatCompletion] = client.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": "Hi"}])
        streamed: RawResponse[Stream] = client.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": "Hi"}], stream=True)
        assert isinstance(whole.parse(), ChatCompletion)
        with streamed.parse() as stream:
            assert isinstance(stream, Stream) and not isinstance(stream, AsyncStream)
            assert stream.get_final_completion().choices[0].message.content == "x"
        assert repr(whole) == "<RawResponse [200] ChatCompletion>"
