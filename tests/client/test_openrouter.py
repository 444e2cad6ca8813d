"""OpenRouter: attribution headers, routing extras, keep-alives, credits and its error chunks."""

from __future__ import annotations

import pytest

from mixtral_client import APIStatusError, InternalServerError
from tests.client.conftest import Driver, chunk, completion, replying, streaming
from tests.loopback import sse

OPENROUTER = {"provider": "openrouter"}


def test_app_url_and_name_become_attribution_headers(driver: Driver, serve) -> None:
    server = serve(replying(200, completion()))

    driver.complete(server, client={**OPENROUTER, "app_url": "https://example.org", "app_name": "Demo App"})

    headers = server.requests[0].headers
    assert headers["http-referer"] == "https://example.org"
    assert headers["x-title"] == "Demo App"


def test_no_attribution_headers_unless_asked(serve) -> None:
    server = serve(replying(200, completion()))

    Driver("sync").complete(server, client=OPENROUTER)

    assert "http-referer" not in server.requests[0].headers and "x-title" not in server.requests[0].headers


def test_routing_object_and_fallback_models_go_in_the_body(driver: Driver, serve) -> None:
    server = serve(replying(200, completion()))
    routing = {"order": ["Together", "DeepInfra"], "allow_fallbacks": False, "sort": "price",
               "max_price": {"prompt": 1, "completion": 2}, "data_collection": "deny"}
    models = ["mistralai/mixtral-8x7b-instruct", "mistralai/mistral-7b-instruct"]

    driver.complete(server, client=OPENROUTER, extra_body={"provider": routing, "models": models})

    body = server.requests[0].json()
    assert body["model"] == "mistralai/mixtral-8x7b-instruct"
    assert body["provider"] == routing
    assert body["models"] == models


def test_processing_comments_then_usage_cost_and_provider(driver: Driver, serve) -> None:
    body = (b": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\n\n"
            + sse(chunk("Bonjour", role="assistant", provider="Mistral"), chunk(finish="stop"),
                  {**chunk(), "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                                       "total_tokens": 6, "cost": 3e-6}}))
    server = serve(streaming(body, one_byte=True))

    final = driver.final(server, client=OPENROUTER, stream_options={"include_usage": True})

    assert final.choices[0].message.content == "Bonjour"
    assert final.usage is not None and final.usage.model_extra == {"cost": 3e-6}
    assert final.model_extra is not None and final.model_extra["provider"] == "Mistral"


def test_no_credits_402_is_raised_at_once(driver: Driver, serve) -> None:
    server = serve(replying(402, {"error": {"code": 402, "message": "Insufficient credits"}}))

    with pytest.raises(APIStatusError) as info:
        driver.complete(server, client=OPENROUTER)

    assert info.value.status_code == 402
    assert info.value.provider == "openrouter"
    assert len(server.requests) == 1


def test_mid_stream_provider_failure_raises_with_the_text_so_far(driver: Driver, serve) -> None:
    failure = {**chunk(finish="error"), "error": {"code": 502, "message": "Provider returned error",
                                                  "metadata": {"provider_name": "Together"}}}
    server = serve(streaming(sse(chunk("The answer is"), failure, done=False), one_byte=True,
                             headers={"x-generation-id": "gen-1"}))

    with pytest.raises(InternalServerError) as info:
        driver.chunks(server, client=OPENROUTER)

    err = info.value
    assert (err.status_code, err.message, err.request_id) == (502, "Provider returned error", "gen-1")
    assert err.body["error"]["metadata"] == {"provider_name": "Together"}
    assert err.partial is not None and err.partial.choices[0].message.content == "The answer is"
    assert len(server.requests) == 1
