"""``client.models.list()``: a host's ``GET /models`` over a real loopback server, and the backends that answer
without a request (Bedrock, local weights); the Open Telekom Cloud preset."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from mixtral_client import APIError, AsyncMixtralClient, AuthenticationError, MixtralClient
from mixtral_client._config import resolve_config
from mixtral_client._providers import PROVIDERS
from tests.client.conftest import replying
from tests.loopback import Conn, LoopbackServer, Received, in_turn

LISTING = {"object": "list", "data": [
    {"id": "Mixtral-8x7B-Instruct-v0.1", "object": "model", "created": 1700000000, "owned_by": "mistralai",
     "meta_data": {"deployment_region": "otc-germany", "max_sequence_length": 32768}},
    {"id": "Llama-3.3-70B-Instruct", "object": "model"},
]}


def listing(mode: str, server: LoopbackServer, **client: Any) -> Any:
    args = {"base_url": server.url, "api_key": "sk-test", **client}
    if mode == "sync":
        with httpx.Client() as http, MixtralClient(**args, http_client=http) as c:
            return c.models.list()

    async def main() -> Any:
        async with httpx.AsyncClient() as http, AsyncMixtralClient(**args, http_client=http) as c:
            return await c.models.list()

    return anyio.run(main, backend=mode)


@pytest.fixture(params=["sync", "asyncio", "trio"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_hosts_list_with_its_own_fields(mode: str, serve) -> None:
    server = serve(replying(200, LISTING))

    page = listing(mode, server, default_headers={"X-Team": "a"})

    assert [m.id for m in page] == ["Mixtral-8x7B-Instruct-v0.1", "Llama-3.3-70B-Instruct"] == [m.id for m in page.data]
    first = page.data[0]
    assert (first.created, first.owned_by) == (1700000000, "mistralai")
    assert first.meta_data["deployment_region"] == "otc-germany"  # kept, as every response type keeps extras
    (request,) = server.requests
    assert (request.method, request.path, request.body) == ("GET", "/v1/models", b"")
    assert request.headers["authorization"] == "Bearer sk-test" and request.headers["x-team"] == "a"
    assert "content-type" not in request.headers


def test_a_bare_list_and_the_base_urls_query(serve) -> None:
    server = serve(replying(200, ["a", {"id": "b"}]))

    page = listing("sync", server, base_url=server.url + "?api-version=3")

    assert [m.id for m in page] == ["a", "b"] and len(page) == 2
    assert server.requests[0].path == "/v1/models?api-version=3"


def test_a_failure_is_retried_and_a_refusal_is_typed(serve) -> None:
    server = serve(in_turn(replying(503, "busy", {"retry-after-ms": "10"}), replying(200, LISTING)))
    assert len(listing("sync", server)) == 2 and len(server.requests) == 2

    refused = serve(replying(401, {"error": {"message": "bad key"}}, {"x-request-id": "req-9"}))
    with pytest.raises(AuthenticationError) as caught:
        listing("trio", refused)
    assert caught.value.request_id == "req-9" and len(refused.requests) == 1


def test_an_answer_without_a_list_raises(serve) -> None:
    server = serve(replying(200, {"object": "list"}))
    with pytest.raises(APIError, match="no list of models"):
        listing("sync", server)


def test_a_timeout_bounds_the_listing(serve) -> None:
    def slow(req: Received, conn: Conn) -> None:
        conn.pause(2)
        conn.respond(200, LISTING)

    server = serve(slow)
    with httpx.Client() as http, MixtralClient(base_url=server.url, api_key="k", http_client=http, max_retries=0) as c, \
            pytest.raises(APIError, match="timed out|Timeout|timeout"):
        c.models.list(timeout=0.3)


def test_bedrock_and_local_weights_answer_with_their_own_model_without_a_request(tiny_dir_path: str) -> None:
    with MixtralClient(provider="bedrock", region="us-west-2", api_key="k", env={}) as bedrock:
        assert [(m.id, m.owned_by) for m in bedrock.models.list()] == [("mistral.mixtral-8x7b-instruct-v0:1", "bedrock")]
    with MixtralClient(provider="local", model_path=tiny_dir_path, env={}) as local:
        (entry,) = local.models.list().data
        assert (entry.id, entry.path) == ("mixtral-local", tiny_dir_path)
    with MixtralClient(provider="local", model_path=tiny_dir_path, env={}, model="my-mixtral") as named:
        assert named.models.list().data[0].id == "my-mixtral"


def test_the_open_telekom_cloud_preset() -> None:
    config = resolve_config({"OTC_API_KEY": "otc-key"}, provider="otc")
    assert config.base_url == "https://llm-server.llmhub.t-systems.net/v2" and config.api_key == "otc-key"
    assert PROVIDERS["otc"].resolve_model("mixtral-8x7b-instruct") == "Mixtral-8x7B-Instruct-v0.1"
    assert not PROVIDERS["otc"].prompts_tools and PROVIDERS["otc"].supports_response_format


@pytest.fixture
def tiny_dir_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("torch")
    from mixtral_local.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def test_the_command_prints_one_id_a_line(serve, capsys: pytest.CaptureFixture[str]) -> None:
    from mixtral_client._cli import main

    server = serve(replying(200, LISTING))
    assert main(["models", "--base-url", server.url], env={"MIXTRAL_API_KEY": "k"}) == 0
    assert capsys.readouterr().out.split() == ["Mixtral-8x7B-Instruct-v0.1", "Llama-3.3-70B-Instruct"]
    assert main(["models", "--provider", "otc"], env={}) == 2  # no key: one line naming the variable
    assert "OTC_API_KEY" in capsys.readouterr().err
