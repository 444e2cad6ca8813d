"""``client.chat.completions.stream(...)``: events made from a real stream (loopback server; sync, asyncio, trio)."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from pydantic import BaseModel

from mixtral_client import (
    APIError,
    AsyncMixtralClient,
    InvalidRequestError,
    MixtralClient,
    ParsedChatCompletion,
    StructuredOutputError,
)
from mixtral_client.events import (
    ChunkEvent,
    ContentDeltaEvent,
    ContentDoneEvent,
    FunctionToolCallArgumentsDeltaEvent,
    FunctionToolCallArgumentsDoneEvent,
    LogprobsContentDeltaEvent,
    LogprobsContentDoneEvent,
    partial_json,
)
from tests.client.conftest import chunk, cut_stream, replying, streaming, tool_delta
from tests.loopback import LoopbackServer, sse

MESSAGES = [{"role": "user", "content": "Hi"}]


class City(BaseModel):
    name: str
    population: int


@pytest.fixture(params=["sync", "asyncio", "trio"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(mode: str, server: LoopbackServer, *, client: dict[str, Any] | None = None, early: int | None = None,
        **params: Any) -> tuple[list[Any], Any]:
    """Every event of ``stream(**params)`` (or the first ``early``), and ``get_final_completion()``."""
    params.setdefault("messages", MESSAGES)
    args = {"base_url": server.url, "api_key": "k", **(client or {})}
    if mode == "sync":
        with httpx.Client() as http, MixtralClient(**args, http_client=http) as c, \
                c.chat.completions.stream(**params) as stream:
            events = []
            for event in stream:
                events.append(event)
                if early is not None and len(events) == early:
                    break
            return events, stream.get_final_completion()

    async def main() -> tuple[list[Any], Any]:
        async with httpx.AsyncClient() as http, AsyncMixtralClient(**args, http_client=http) as c, \
                c.chat.completions.stream(**params) as stream:
            events = []
            async for event in stream:
                events.append(event)
                if early is not None and len(events) == early:
                    break
            return events, await stream.get_final_completion()

    return anyio.run(main, backend=mode)


def kinds(events: list[Any]) -> list[str]:
    return [e.type for e in events if e.type != "chunk"]


def test_text_deltas_and_their_snapshots_then_done(mode: str, serve) -> None:
    body = sse(chunk(role="assistant"), chunk("Hel"), chunk("lo"), chunk("!"), chunk(finish="stop"))
    server = serve(streaming(body, headers={"x-request-id": "req-ev"}))

    events, final = run(mode, server)

    assert kinds(events) == ["content.delta"] * 3 + ["content.done"]
    deltas = [e for e in events if isinstance(e, ContentDeltaEvent)]
    assert [(e.delta, e.snapshot, e.parsed) for e in deltas] == [("Hel", "Hel", None), ("lo", "Hello", None),
                                                                  ("!", "Hello!", None)]
    assert events[-1] == ContentDoneEvent("Hello!", None)
    chunks = [e for e in events if isinstance(e, ChunkEvent)]
    assert len(chunks) == 5 and chunks[-1].snapshot.choices[0].message.content == "Hello!"
    assert isinstance(final, ParsedChatCompletion) and final.choices[0].message.content == "Hello!"
    assert final.choices[0].message.parsed is None and final._request_id == "req-ev"


def test_a_class_format_is_parsed_as_it_grows_and_validated_when_done(mode: str, serve) -> None:
    pieces = ['{"na', 'me": "Ly', 'on", "popu', 'lation": 52', '2250}']
    server = serve(streaming(sse(*(chunk(p) for p in pieces), chunk(finish="stop"))))

    events, final = run(mode, server, response_format=City)

    parsed = [e.parsed for e in events if isinstance(e, ContentDeltaEvent)]
    assert parsed == [{}, {"name": "Ly"}, {"name": "Lyon"}, {"name": "Lyon", "population": 52},
                      {"name": "Lyon", "population": 522250}]
    done = [e for e in events if isinstance(e, ContentDoneEvent)]
    assert done == [ContentDoneEvent('{"name": "Lyon", "population": 522250}', City(name="Lyon", population=522250))]
    assert final.choices[0].message.parsed == City(name="Lyon", population=522250)
    sent = server.requests[0].json()
    assert sent["stream"] is True and sent["response_format"]["json_schema"]["schema"]["required"] == ["name",
                                                                                                       "population"]


def test_a_format_dict_gives_the_json_value_when_done(serve) -> None:
    server = serve(streaming(sse(chunk('{"a": [1, '), chunk("2]}"), chunk(finish="stop"))))

    events, final = run("sync", server, response_format={"type": "json_object"})

    assert [e.parsed for e in events if isinstance(e, ContentDeltaEvent)] == [{"a": [1]}, {"a": [1, 2]}]
    assert [e.parsed for e in events if isinstance(e, ContentDoneEvent)] == [{"a": [1, 2]}]
    assert final.choices[0].message.parsed is None  # a dict format names no class to validate into


def test_an_answer_that_is_not_the_class_raises_when_its_content_is_done(mode: str, serve) -> None:
    server = serve(streaming(sse(chunk('{"name": "Lyon"}'), chunk(finish="stop"))))

    with pytest.raises(StructuredOutputError, match="population") as caught:
        run(mode, server, response_format=City)

    assert caught.value.completion is not None and caught.value.completion.choices[0].message.content


def test_parallel_tool_calls_stream_their_arguments_and_end_one_by_one(mode: str, serve) -> None:
    body = sse(
        chunk("Checking."),
        chunk(tool_calls=[tool_delta(0, id="call_a", name="get_weather", arguments='{"ci')]),
        chunk(tool_calls=[tool_delta(0, arguments='ty": "Oslo"}')]),
        chunk(tool_calls=[tool_delta(1, id="call_b", name="get_time", arguments="")]),
        chunk(tool_calls=[tool_delta(1, arguments='{"utc_offset": 2}')]),
        chunk(finish="tool_calls"),
    )
    server = serve(streaming(body))

    events, final = run(mode, server, tools=[{"type": "function", "function": {"name": "get_weather"}},
                                             {"type": "function", "function": {"name": "get_time"}}])

    assert kinds(events) == ["content.delta", "content.done",
                             "tool_calls.function.arguments.delta", "tool_calls.function.arguments.delta",
                             "tool_calls.function.arguments.done",
                             "tool_calls.function.arguments.delta", "tool_calls.function.arguments.done"]
    calls = [e for e in events if isinstance(e, FunctionToolCallArgumentsDeltaEvent | FunctionToolCallArgumentsDoneEvent)]
    assert calls[0] == FunctionToolCallArgumentsDeltaEvent("get_weather", 0, '{"ci', {}, '{"ci')  # no key yet
    assert calls[1] == FunctionToolCallArgumentsDeltaEvent("get_weather", 0, '{"city": "Oslo"}', {"city": "Oslo"},
                                                           'ty": "Oslo"}')
    assert calls[2] == FunctionToolCallArgumentsDoneEvent("get_weather", 0, '{"city": "Oslo"}', {"city": "Oslo"})
    assert calls[4] == FunctionToolCallArgumentsDoneEvent("get_time", 1, '{"utc_offset": 2}', {"utc_offset": 2})
    assert [c.function.name for c in final.choices[0].message.tool_calls] == ["get_weather", "get_time"]


def test_prompted_tool_calls_on_nvidia_come_as_events(serve) -> None:
    """NVIDIA takes no tools: the calls travel in the prompt and are read back; the events follow them."""
    answer = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    server = serve(streaming(sse(chunk(answer[:20]), chunk(answer[20:]), chunk(finish="stop"))))

    events, final = run("sync", server, client={"provider": "nvidia"},
                        tools=[{"type": "function", "function": {"name": "get_weather"}}])

    assert "tools" not in server.requests[0].json()
    (done,) = [e for e in events if isinstance(e, FunctionToolCallArgumentsDoneEvent)]
    assert (done.name, done.parsed_arguments) == ("get_weather", {"city": "Oslo"})
    assert not [e for e in events if isinstance(e, ContentDeltaEvent)]
    assert final.choices[0].finish_reason == "tool_calls"


def test_logprobs_come_as_their_own_events(serve) -> None:
    def with_logprobs(text: str, logprob: float) -> dict[str, Any]:
        out = chunk(text)
        out["choices"][0]["logprobs"] = {"content": [{"token": text, "logprob": logprob, "bytes": None,
                                                      "top_logprobs": []}]}
        return out

    server = serve(streaming(sse(with_logprobs("a", -0.5), with_logprobs("b", -0.25), chunk(finish="stop"))))

    events, _ = run("sync", server, logprobs=True)

    deltas = [e for e in events if isinstance(e, LogprobsContentDeltaEvent)]
    assert [[t.token for t in e.snapshot] for e in deltas] == [["a"], ["a", "b"]]
    (done,) = [e for e in events if isinstance(e, LogprobsContentDoneEvent)]
    assert [t.logprob for t in done.content] == [-0.5, -0.25]


def test_each_choice_has_its_own_events(serve) -> None:
    body = sse(chunk("x", index=0), chunk("y", index=1), chunk("z", index=1), chunk(finish="stop", index=0),
               chunk(finish="stop", index=1))
    server = serve(streaming(body))

    events, _ = run("sync", server, n=2)

    done = [e for e in events if isinstance(e, ContentDoneEvent)]
    assert [(e.choice_index, e.content) for e in done] == [(0, "x"), (1, "yz")]


def test_a_refused_request_raises_at_the_call_and_sends_nothing(serve) -> None:
    server = serve(replying(200, {}))
    with httpx.Client() as http, MixtralClient(base_url=server.url, api_key="k", http_client=http) as client:
        with pytest.raises(InvalidRequestError, match="temperature"):
            client.chat.completions.stream(messages=MESSAGES, temperature=7)
        with pytest.raises(TypeError, match="stream"):
            client.chat.completions.stream(messages=MESSAGES, stream=True)  # type: ignore[call-overload]
    assert server.requests == []


def test_a_stream_cut_midway_raises_with_the_partial_answer(mode: str, serve) -> None:
    server = serve(cut_stream(chunk("Hel"), chunk("lo")))

    with pytest.raises(APIError) as caught:
        run(mode, server, client={"max_retries": 0})

    assert caught.value.partial is not None and caught.value.partial.choices[0].message.content == "Hello"


def test_a_loop_left_early_is_finished_by_get_final_completion(mode: str, serve) -> None:
    body = sse(*(chunk(str(i)) for i in range(50)), chunk(finish="stop"))
    server = serve(streaming(body))

    events, final = run(mode, server, early=4)

    assert [e.snapshot for e in events if isinstance(e, ContentDeltaEvent)] == ["0", "01"]
    assert final.choices[0].message.content == "".join(str(i) for i in range(50))  # the rest was read


def test_leaving_the_block_closes_the_stream(serve) -> None:
    body = sse(*(chunk(str(i)) for i in range(50)), chunk(finish="stop"))
    server = serve(streaming(body))
    with httpx.Client() as http, MixtralClient(base_url=server.url, api_key="k", http_client=http) as client:
        with client.chat.completions.stream(messages=MESSAGES) as stream:
            assert next(iter(stream)).type == "chunk"
        assert list(stream) == []
        assert stream.get_final_completion().choices[0].message.content == "0"

        async def main() -> None:
            async with httpx.AsyncClient() as ahttp, \
                    AsyncMixtralClient(base_url=server.url, api_key="k", http_client=ahttp) as aclient:
                async with aclient.chat.completions.stream(messages=MESSAGES) as astream:
                    assert (await astream.__anext__()).type == "chunk"
                assert [e async for e in astream] == []

        anyio.run(main)


@pytest.mark.parametrize(("text", "expected"), [
    ("", None), ("  ", None), ("Sure: {", None), ('{"a": "b', {"a": "b"}), ("[1, 2", [1, 2]),
    ('{"a": {"b": [tr', {"a": {"b": []}}), ('"x', "x"),
])
def test_partial_json(text: str, expected: Any) -> None:
    assert partial_json(text) == expected

