"""Fallbacks between providers, over two real loopback servers: what falls back and what does not, streams,
the per-call model, raw responses, the environment variable, sync and async."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from mixtral_client import (
    APIConnectionError,
    AsyncMixtralClient,
    BadRequestError,
    ConfigurationError,
    MixtralClient,
    RateLimitError,
)
from tests.client.conftest import chunk, completion, cut_stream, replying, streaming, text_stream
from tests.loopback import unanswered_port

MESSAGES = [{"role": "user", "content": "Hi"}]


def clients(primary: str, backup: str, *, asynchronous: bool = False, **kwargs: Any) -> Any:
    """A client on ``primary`` falling back to one on ``backup`` (model id ``backup-model``)."""
    cls = AsyncMixtralClient if asynchronous else MixtralClient
    fallback = cls(base_url=backup, api_key="k2", model="backup-model", max_retries=0)
    return cls(base_url=primary, api_key="k1", max_retries=0, fallbacks=[fallback], **kwargs), fallback


@pytest.mark.parametrize("failure", [replying(503, "down"), replying(429, {"error": {"message": "slow down"}}),
                                     replying(401, {"error": {"message": "revoked"}})])
def test_a_failure_another_host_may_answer_goes_to_the_fallback(serve, failure: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    down, up = serve(failure), serve(replying(200, completion("from the fallback")))
    client, fallback = clients(down.url, up.url)
    with client, fallback, caplog.at_level(logging.WARNING, logger="mixtral_client"):
        answer = client.chat.completions.create(messages=MESSAGES, temperature=0.5)

    assert answer.choices[0].message.content == "from the fallback"
    assert len(down.requests) == 1 and up.requests[0].json()["model"] == "backup-model"
    assert up.requests[0].json()["temperature"] == 0.5 and up.requests[0].headers["authorization"] == "Bearer k2"
    assert "openai failed" in caplog.text and "falling back to openai" in caplog.text


def test_a_host_that_does_not_answer_falls_back(serve) -> None:
    up = serve(replying(200, completion("ok")))
    with unanswered_port() as port:
        client, fallback = clients(f"http://127.0.0.1:{port}/v1", up.url, timeout=0.3)  # its connect times out
        with client, fallback:
            assert client.chat.completions.create(messages=MESSAGES).choices[0].message.content == "ok"


def test_a_wrong_request_does_not_fall_back(serve) -> None:
    down, up = serve(replying(400, {"error": {"message": "bad stop"}})), serve(replying(200, completion()))
    client, fallback = clients(down.url, up.url)
    with client, fallback, pytest.raises(BadRequestError):
        client.chat.completions.create(messages=MESSAGES)
    assert up.requests == []


def test_when_every_provider_fails_the_last_error_names_the_first(serve) -> None:
    down, also_down = serve(replying(503, "down")), serve(replying(429, {"error": {"message": "busy"}}))
    client, fallback = clients(down.url, also_down.url)
    with client, fallback, pytest.raises(RateLimitError) as caught:
        client.chat.completions.create(messages=MESSAGES)
    assert any("after openai failed: InternalServerError" in note for note in caught.value.__notes__)


def test_a_stream_falls_back_before_its_first_chunk_and_never_after(serve) -> None:
    down, up = serve(replying(502, "bad gateway")), serve(streaming(text_stream("fall", "back")))
    client, fallback = clients(down.url, up.url)
    with client, fallback:
        with client.chat.completions.create(messages=MESSAGES, stream=True) as stream:
            assert "".join(stream.text()) == "fallback"

    cut, spare = serve(cut_stream(chunk("Hel"))), serve(streaming(text_stream("never")))
    client, fallback = clients(cut.url, spare.url)
    with client, fallback, client.chat.completions.create(messages=MESSAGES, stream=True) as stream, \
            pytest.raises(APIConnectionError):
        list(stream)
    assert spare.requests == []  # part of an answer had reached the caller


def test_the_per_call_model_stays_with_the_first_provider_unless_it_is_the_alias(serve) -> None:
    down = serve(replying(500, "down"))
    up = serve(replying(200, completion()))
    client, fallback = clients(down.url, up.url)
    with client, fallback:
        client.chat.completions.create(messages=MESSAGES, model="primary-only-id")
        client.chat.completions.create(messages=MESSAGES, model="mixtral-8x7b-instruct")
    assert [r.json()["model"] for r in down.requests] == ["primary-only-id", "mistralai/Mixtral-8x7B-Instruct-v0.1"]
    assert [r.json()["model"] for r in up.requests] == ["backup-model", "mistralai/Mixtral-8x7B-Instruct-v0.1"]


def test_a_raw_response_counts_every_attempt_and_shows_the_answering_host(serve) -> None:
    down = serve(replying(503, "down", {"retry-after-ms": "10"}))
    up = serve(replying(200, completion(), {"x-request-id": "from-backup"}))
    client, fallback = clients(down.url, up.url)
    with client, fallback:
        raw = client.with_options(max_retries=1).chat.completions.with_raw_response.create(messages=MESSAGES)
    assert len(down.requests) == 2 and raw.retries_taken == 2 and raw.request_id == "from-backup"


def test_the_async_client_falls_back_too(serve) -> None:
    down, up = serve(replying(503, "down")), serve(replying(200, completion("async fallback")))

    async def main() -> str:
        client, fallback = clients(down.url, up.url, asynchronous=True)
        async with client, fallback:
            answer = await client.chat.completions.create(messages=MESSAGES)
            async with client.chat.completions.stream(messages=MESSAGES) as stream:
                assert [e async for e in stream]
            return answer.choices[0].message.content or ""

    # the second request is a stream: the fallback answers it with JSON, which a stream reads as one chunk
    assert anyio.run(main, backend="trio") == "async fallback"
    assert len(down.requests) == 2 and len(up.requests) == 2


def test_fallbacks_by_name_and_from_the_environment() -> None:
    env = {"NVIDIA_API_KEY": "nvapi-x", "OPENROUTER_API_KEY": "or", "AIMLAPI_API_KEY": "a",
           "MIXTRAL_FALLBACKS": "openrouter, aimlapi"}
    with MixtralClient(provider="nvidia", env=env, timeout=9) as client:
        assert client.fallbacks == ["openrouter", "aimlapi"]
        built = client._fallback_clients[0]
        assert built.config.timeout.total == 9 and built.fallbacks == []  # not MIXTRAL_FALLBACKS again
    with MixtralClient(provider="nvidia", env=env, fallbacks=["aimlapi"]) as client:
        assert client.fallbacks == ["aimlapi"]  # the argument wins over the variable
    with MixtralClient(provider="openrouter", env=env) as client:
        assert client.fallbacks == ["aimlapi"]  # the variable names a chain: a client skips itself in it
    with pytest.raises(ConfigurationError, match="own provider"):
        MixtralClient(provider="nvidia", env=env, fallbacks=["nvidia"])
    with pytest.raises(ConfigurationError, match="OPENROUTER_API_KEY"):
        MixtralClient(provider="nvidia", env={"NVIDIA_API_KEY": "x"}, fallbacks=["openrouter"])
    with pytest.raises(ConfigurationError, match="provider names or MixtralClients"):
        MixtralClient(provider="nvidia", env=env, fallbacks=[AsyncMixtralClient(provider="aimlapi", env={"AIMLAPI_API_KEY": "a"})])


def test_closing_closes_the_fallbacks_built_by_name_only(serve) -> None:
    env = {"NVIDIA_API_KEY": "nvapi-x", "OPENROUTER_API_KEY": "or"}
    mine = MixtralClient(base_url="http://127.0.0.1:9/v1", api_key="k")
    client = MixtralClient(provider="nvidia", env=env, fallbacks=["openrouter", mine])
    client.close()
    assert client._fallback_clients[0]._backend._client.is_closed
    assert not mine._backend._client.is_closed
    mine.close()


def test_a_fallback_that_cannot_be_configured_leaves_nothing_open(monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_client._backends import http

    closed: list[str] = []
    real_close = http.HTTPBackend.close
    monkeypatch.setattr(http.HTTPBackend, "close", lambda self: closed.append(self.core.provider) or real_close(self))
    env = {"NVIDIA_API_KEY": "nvapi-x", "OPENROUTER_API_KEY": "or"}  # no key for aimlapi
    with pytest.raises(ConfigurationError, match="AIMLAPI_API_KEY"):
        MixtralClient(provider="nvidia", env=env, fallbacks=["openrouter", "aimlapi"])
    assert sorted(closed) == ["nvidia", "openrouter"]  # the client's own pool and the fallback built before


def test_a_raw_prompt_falls_back_as_a_raw_prompt(serve) -> None:
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "backup-model",
              "choices": [{"index": 0, "text": " from the fallback", "finish_reason": "stop"}]}
    down, up = serve(replying(503, "down")), serve(replying(200, answer))
    client, fallback = clients(down.url, up.url)
    with client, fallback:
        text = client.completions.create(prompt="<s>[INST] Hi [/INST]", max_tokens=5)

    assert text.choices[0].text == " from the fallback"
    assert [r.path for r in down.requests + up.requests] == ["/v1/completions", "/v1/completions"]
    assert up.requests[0].json() == {"model": "backup-model", "prompt": "<s>[INST] Hi [/INST]", "max_tokens": 5}
