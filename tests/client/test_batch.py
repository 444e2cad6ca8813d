"""``chat.completions.batch()``: many requests answered concurrently and returned in order, over a real
loopback server that records how many were in flight at once (sync threads, async tasks)."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

from mixtral_client import AsyncMixtralClient, BadRequestError, InvalidRequestError, MixtralClient
from tests.client.conftest import completion
from tests.loopback import Conn, Received


class Host:
    """Answers each request with its own user text, after a pause; counts requests in flight."""

    def __init__(self, fail_on: str | None = None, pause: float = 0.05) -> None:
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.texts: list[str] = []
        self.fail_on, self.pause = fail_on, pause

    def __call__(self, req: Received, conn: Conn) -> None:
        text = req.json()["messages"][-1]["content"]
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.texts.append(text)
        conn.pause(self.pause * (1 + hash(text) % 3))  # answers finish out of order
        with self.lock:
            self.in_flight -= 1
        if text == self.fail_on:
            conn.respond(400, {"error": {"message": f"cannot answer {text}"}})
        else:
            conn.respond(200, completion(f"echo {text}"))


def requests(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}], **extra} for i in range(n)]


def run(mode: str, url: str, batch: list[dict[str, Any]], **kwargs: Any) -> list[Any]:
    if mode == "sync":
        with MixtralClient(base_url=url, api_key="k", max_retries=0) as client:
            return client.chat.completions.batch(batch, **kwargs)

    async def main() -> list[Any]:
        async with AsyncMixtralClient(base_url=url, api_key="k", max_retries=0) as client:
            return await client.chat.completions.batch(batch, **kwargs)

    return anyio.run(main, backend=mode)


@pytest.fixture(params=["sync", "trio", "asyncio"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_answers_come_back_in_order_with_at_most_max_concurrency_in_flight(mode: str, serve) -> None:
    host = Host()
    server = serve(host)
    started = time.monotonic()

    answers = run(mode, server.url, requests(12, temperature=0.5), max_concurrency=4)

    assert [a.choices[0].message.content for a in answers] == [f"echo q{i}" for i in range(12)]
    assert host.most == 4  # concurrent, and bounded
    assert time.monotonic() - started < 12 * 0.05  # far less than one after another
    assert all(r.json()["temperature"] == 0.5 for r in server.requests)


def test_every_request_is_checked_before_the_first_is_sent(mode: str, serve) -> None:
    server = serve(Host())
    batch = requests(5)
    batch[3]["temperature"] = 9
    with pytest.raises(InvalidRequestError, match=r"requests\[3\]: temperature"):
        run(mode, server.url, batch)
    with pytest.raises(InvalidRequestError, match=r"requests\[1\]: batch\(\) returns whole answers"):
        run(mode, server.url, [*requests(1), {**requests(1)[0], "stream": True}])
    with pytest.raises(TypeError, match=r"requests\[0\]: create\(\) got unexpected keyword arguments: colour"):
        run(mode, server.url, [{**requests(1)[0], "colour": "red"}])
    with pytest.raises(InvalidRequestError, match="max_concurrency"):
        run(mode, server.url, requests(2), max_concurrency=0)
    assert server.requests == []


def test_a_failure_stops_the_batch_or_takes_its_place(mode: str, serve) -> None:
    host = Host(fail_on="q2", pause=0.02)
    server = serve(host)
    with pytest.raises(BadRequestError, match="cannot answer q2") as caught:
        run(mode, server.url, requests(40), max_concurrency=2)
    assert "(batch requests[2])" in caught.value.__notes__
    assert len(server.requests) < 40  # what had not started was not sent
    assert set(host.texts[:2]) == {"q0", "q1"}  # requests start in order (trio runs waiting tasks in any order)

    answers = run(mode, server.url, requests(6), max_concurrency=3, return_exceptions=True)
    assert isinstance(answers[2], BadRequestError)
    assert [a.choices[0].message.content for i, a in enumerate(answers) if i != 2] == \
        [f"echo q{i}" for i in range(6) if i != 2]


def test_an_empty_batch_is_an_empty_list(serve) -> None:
    assert run("sync", serve(Host()).url, []) == []
