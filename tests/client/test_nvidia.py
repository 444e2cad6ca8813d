"""NVIDIA's API catalog: 202 + NVCF-REQID answers are polled until ready (here on the loopback server)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from mixtral_client import APIConnectionError, APITimeoutError, AsyncMixtralClient, MixtralClient, Timeout
from mixtral_client._backends.http import HTTPCore
from mixtral_client._config import resolve_config
from tests.client.conftest import MESSAGES, Driver, completion, text_stream
from tests.loopback import Conn, Received

NVIDIA = {"provider": "nvidia"}


def nvcf(pending_polls: int, *, repeat_reqid: bool = True, stream: bool = False):
    """Answer the POST with 202 + NVCF-REQID, then answer ``pending_polls`` status polls with 202."""
    polls = [0]

    def handle(req: Received, conn: Conn) -> None:
        if req.method == "POST":
            conn.respond(202, b"", {"NVCF-REQID": "req-42", "NVCF-STATUS": "pending-evaluation"})
        elif polls[0] < pending_polls:
            polls[0] += 1
            conn.respond(202, b"", {"NVCF-REQID": "req-42"} if repeat_reqid else {})
        elif stream:
            conn.start(200, {"Content-Type": "text/event-stream"})
            conn.write(text_stream("polled", " stream"))
            conn.finish()
        else:
            conn.respond(200, completion("polled answer"), {"NVCF-REQID": "req-42"})

    return handle


def test_202_is_polled_on_the_same_origin_until_the_answer_is_ready(driver: Driver, serve) -> None:
    server = serve(nvcf(pending_polls=1))

    answer = driver.complete(server, client=NVIDIA)

    assert answer.choices[0].message.content == "polled answer"
    post, *polls = server.requests
    assert (post.method, post.path) == ("POST", "/v1/chat/completions")
    assert [(p.method, p.path) for p in polls] == [("GET", "/v2/nvcf/pexec/status/req-42")] * 2
    assert all(p.headers["authorization"] == "Bearer sk-test" for p in polls)
    assert all(p.body == b"" for p in polls)


def test_polls_carry_the_posts_headers(driver: Driver, serve) -> None:
    """A gateway that wants its own header on every request gets it on the polls too; Content-Type does not
    go on a GET without a body."""
    server = serve(nvcf(pending_polls=1))

    answer = driver.complete(
        server,
        client=NVIDIA | {"default_headers": {"X-Gateway-Key": "gw-1"}},
        extra_headers={"X-Trace": "t-9", "User-Agent": "my-agent/2"},
    )

    assert answer.choices[0].message.content == "polled answer"
    post, *polls = server.requests
    assert len(polls) == 2
    for request in (post, *polls):
        assert request.headers["x-gateway-key"] == "gw-1"
        assert request.headers["x-trace"] == "t-9"
        assert request.headers["user-agent"] == "my-agent/2"  # extra_headers replace, never duplicate
    assert post.headers["content-type"] == "application/json"
    assert all("content-type" not in p.headers for p in polls)


def test_polls_carry_the_posts_query(driver: Driver, serve) -> None:
    server = serve(nvcf(pending_polls=1))

    driver.complete(server, client=NVIDIA | {"base_url": server.url + "?tenant=a"}, extra_query={"trace": "1"})

    post, *polls = server.requests
    assert len(polls) == 2
    for request in (post, *polls):
        assert parse_qs(urlsplit(request.path).query) == {"tenant": ["a"], "trace": ["1"]}
    assert {urlsplit(p.path).path for p in polls} == {"/v2/nvcf/pexec/status/req-42"}


def test_pending_poll_without_reqid_asks_the_same_status_url_again(serve) -> None:
    server = serve(nvcf(pending_polls=1, repeat_reqid=False))

    answer = Driver("sync").complete(server, client=NVIDIA)

    assert answer.choices[0].message.content == "polled answer"
    assert [r.path for r in server.requests[1:]] == ["/v2/nvcf/pexec/status/req-42"] * 2


def test_streamed_answer_is_polled_too(driver: Driver, serve) -> None:
    server = serve(nvcf(pending_polls=1, stream=True))

    assert driver.text(server, client=NVIDIA) == "polled stream"
    assert server.requests[-1].headers["accept"] == "text/event-stream"


def test_polling_stops_at_the_total_deadline(sync_or_async: Driver, serve) -> None:
    server = serve(nvcf(pending_polls=1000))

    with pytest.raises(APITimeoutError) as info:
        sync_or_async.complete(server, client={**NVIDIA, "max_retries": 0}, timeout=Timeout(total=0.6))

    assert info.value.request_id == "req-42"
    assert 2 <= len(server.requests) <= 5


def test_a_poll_cut_off_names_the_pending_job(driver: Driver, serve) -> None:
    def drop_the_poll(req: Received, conn: Conn) -> None:
        if req.method == "POST":
            conn.respond(202, b"", {"NVCF-REQID": "req-42"})
        else:
            conn.drop()

    server = serve(drop_the_poll)

    with pytest.raises(APIConnectionError) as info:
        driver.complete(server, client={**NVIDIA, "max_retries": 0})

    assert info.value.request_id == "req-42"  # the job to ask NVIDIA about
    assert [r.method for r in server.requests] == ["POST", "GET"]


def test_202_without_reqid_from_another_host_is_the_answer(serve) -> None:
    def accepted(req: Received, conn: Conn) -> None:
        conn.respond(202, completion("accepted body"))

    server = serve(accepted)

    assert Driver("sync").complete(server).choices[0].message.content == "accepted body"
    assert len(server.requests) == 1


def test_default_nvidia_host_polls_the_nvcf_host() -> None:
    config = resolve_config({}, provider="nvidia", api_key="nvapi-x")

    assert HTTPCore(config).poll_url("abc") == "https://api.nvcf.nvidia.com/v2/nvcf/pexec/status/abc"


def test_overridden_base_url_polls_its_own_origin() -> None:
    config = resolve_config({}, provider="nvidia", api_key="nvapi-x", base_url="https://nim.example.com:8443/proxy/v1")

    assert HTTPCore(config).poll_url("abc") == "https://nim.example.com:8443/v2/nvcf/pexec/status/abc"


def pending_unless_ready(req: Received, conn: Conn) -> None:
    """Every job stays pending, except a request asking "ready?"."""
    if req.method == "POST" and req.json()["messages"][0]["content"] == "ready?":
        conn.respond(200, completion("ready"))
    else:
        conn.respond(202, b"", {"NVCF-REQID": "req-slow"})


def test_polling_that_times_out_returns_its_connection(serve) -> None:
    server = serve(pending_unless_ready)
    with httpx.Client(limits=httpx.Limits(max_connections=1)) as http, \
            MixtralClient("nvidia", base_url=server.url, api_key="k", http_client=http, max_retries=0) as client:
        for _ in range(2):
            with pytest.raises(APITimeoutError):
                client.chat.completions.create(messages=MESSAGES, timeout=Timeout(connect=1, idle=1, total=0.2))
        answer = client.chat.completions.create(messages=[{"role": "user", "content": "ready?"}], timeout=2)

    assert answer.choices[0].message.content == "ready"


@pytest.mark.anyio
async def test_async_polling_that_times_out_returns_its_connection(serve) -> None:
    server = serve(pending_unless_ready)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as http, \
            AsyncMixtralClient("nvidia", base_url=server.url, api_key="k", http_client=http, max_retries=0) as client:
        for _ in range(2):
            with pytest.raises(APITimeoutError):
                await client.chat.completions.create(messages=MESSAGES, timeout=Timeout(connect=1, idle=1, total=0.2))
        answer = await client.chat.completions.create(messages=[{"role": "user", "content": "ready?"}], timeout=2)

    assert answer.choices[0].message.content == "ready"
