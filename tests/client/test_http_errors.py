"""Error answers become the error tree: class by status, with status_code, request_id, body and provider."""

from __future__ import annotations

import httpx
import pytest

from mixtral_client import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    MixtralClient,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from tests.client.conftest import MESSAGES, Driver, completion, replying

HTML_502 = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body><center><h1>502 Bad Gateway</h1></center></body>\r\n</html>\r\n"


def mock_client(status: int, body: bytes, headers: dict[str, str] | None = None, **kwargs) -> MixtralClient:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body, headers=headers))
    return MixtralClient(base_url="http://mock/v1", api_key="k", max_retries=0,
                         http_client=httpx.Client(transport=transport), **kwargs)


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError), (404, NotFoundError),
    (422, UnprocessableEntityError), (429, RateLimitError), (500, InternalServerError),
    (502, InternalServerError), (503, InternalServerError), (402, APIStatusError), (409, APIStatusError),
])
def test_status_maps_to_its_error_class(status: int, cls: type[APIStatusError]) -> None:
    client = mock_client(status, b'{"error": {"message": "nope", "code": "x"}}', {"x-should-retry": "false"})

    with pytest.raises(APIStatusError) as info:
        client.chat.completions.create(messages=MESSAGES)

    assert type(info.value) is cls
    assert info.value.status_code == status
    assert info.value.message == "nope"
    assert info.value.code == "x"


def test_openrouter_error_body_gives_message_code_and_body(driver: Driver, serve) -> None:
    body = {"error": {"code": 402, "message": "Insufficient credits", "metadata": {"provider_name": None}}}
    server = serve(replying(402, body, {"x-request-id": "req_123"}))

    with pytest.raises(APIStatusError) as info:
        driver.complete(server)

    err = info.value
    assert (err.status_code, err.code, err.message) == (402, 402, "Insufficient credits")
    assert err.body == body
    assert err.request_id == "req_123"
    assert err.provider == "openai"
    assert "402" in str(err) and "req_123" in str(err)


def test_html_502_body_is_preserved_as_text(driver: Driver, serve) -> None:
    server = serve(replying(502, HTML_502, {"Content-Type": "text/html"}))

    with pytest.raises(InternalServerError) as info:
        driver.complete(server, client={"max_retries": 0})

    assert info.value.status_code == 502
    assert info.value.body == HTML_502
    assert "502 Bad Gateway" in info.value.message


def test_nvidia_problem_json_gives_detail_and_nvcf_request_id() -> None:
    problem = b'{"type": "about:blank", "status": 404, "title": "Not Found", "detail": "Function not found"}'
    client = mock_client(404, problem, {"NVCF-REQID": "nv-1", "x-request-id": "other"}, provider="nvidia")

    with pytest.raises(NotFoundError) as info:
        client.chat.completions.create(messages=MESSAGES)

    assert info.value.message == "Function not found"
    assert info.value.request_id == "nv-1"
    assert info.value.provider == "nvidia"


def test_openrouter_generation_id_is_the_request_id() -> None:
    client = mock_client(500, b'{"error": "boom"}', {"x-generation-id": "gen-9", "x-should-retry": "false"},
                         provider="openrouter")

    with pytest.raises(InternalServerError) as info:
        client.chat.completions.create(messages=MESSAGES)

    assert info.value.request_id == "gen-9"
    assert info.value.message == "boom"


def test_empty_error_body_still_names_the_status() -> None:
    client = mock_client(401, b"")

    with pytest.raises(AuthenticationError) as info:
        client.chat.completions.create(messages=MESSAGES)

    assert info.value.body is None
    assert info.value.message == "HTTP 401"


def test_error_headers_are_kept() -> None:
    client = mock_client(429, b"{}", {"retry-after": "120"})

    with pytest.raises(RateLimitError) as info:
        client.chat.completions.create(messages=MESSAGES)

    assert info.value.headers["retry-after"] == "120"


def test_non_streaming_200_with_choice_error_raises(driver: Driver, serve) -> None:
    body = completion("half an ans", finish="error")
    body["choices"][0]["error"] = {"code": 502, "message": "provider went away"}
    server = serve(replying(200, body))

    with pytest.raises(InternalServerError) as info:
        driver.complete(server, client={"max_retries": 0})

    assert info.value.message == "provider went away"
    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == "half an ans"


def test_non_streaming_200_that_is_not_a_completion_is_a_connection_error(driver: Driver, serve) -> None:
    server = serve(replying(200, "<html>captive portal</html>"))

    with pytest.raises(APIConnectionError) as info:
        driver.complete(server, client={"max_retries": 0})

    assert info.value.body == "<html>captive portal</html>"


def test_response_keeps_unknown_fields_and_open_finish_reason(driver: Driver, serve) -> None:
    body = completion("hi", finish="eos_token", provider="Mistral", system_fingerprint="fp")
    body["usage"]["cost"] = 0.00012
    body["choices"][0]["native_finish_reason"] = "eos"
    server = serve(replying(200, body))

    answer = driver.complete(server)

    assert answer.choices[0].finish_reason == "eos_token"
    assert answer.model_extra == {"provider": "Mistral", "system_fingerprint": "fp"}
    assert answer.usage is not None and answer.usage.model_extra == {"cost": 0.00012}
    assert answer.choices[0].model_extra == {"native_finish_reason": "eos"}


def test_aimlapi_empty_tool_calls_list_and_leading_space_are_kept(serve) -> None:
    body = completion(" Hello")
    body["choices"][0]["message"]["tool_calls"] = []
    server = serve(replying(200, body))

    with MixtralClient("aimlapi", base_url=server.url, api_key="k") as client:
        answer = client.chat.completions.create(messages=MESSAGES)

    assert answer.choices[0].message.content == " Hello"
    assert answer.choices[0].message.tool_calls == []


def test_non_streaming_200_with_a_top_level_error_raises_typed(driver: Driver, serve) -> None:
    server = serve(replying(200, {"error": {"code": 503, "message": "no provider available"}}))

    with pytest.raises(InternalServerError) as info:
        driver.complete(server, client={"max_retries": 0})

    assert info.value.status_code == 503
    assert info.value.message == "no provider available"
