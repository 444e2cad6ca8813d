"""Streams over a real loopback HTTP server, sync and async (asyncio and trio)."""

from __future__ import annotations

import json

import pytest

from mixtral_client import APIConnectionError, APIStatusError, InternalServerError, RateLimitError
from tests.client.conftest import (
    Driver,
    chunk,
    cut_stream,
    dropping,
    replying,
    streaming,
    text_stream,
    tool_delta,
)
from tests.loopback import Conn, Received, in_turn, sse


def test_one_byte_writes_with_crlf_keepalives_and_split_utf8(driver: Driver, serve) -> None:
    body = (": OPENROUTER PROCESSING\r\n\r\n"
            + "".join(f"data: {json.dumps(chunk(p), ensure_ascii=False)}\r\n\r\n: keep-alive\r\n\r\n"
                      for p in ["Grüß", " dich ", "🌍", " 日本"])
            + f"data: {json.dumps(chunk(finish='stop'))}\r\n\r\ndata: [DONE]\r\n\r\n").encode()
    server = serve(streaming(body, one_byte=True))

    assert driver.text(server) == "Grüß dich 🌍 日本"


def test_stream_request_asks_for_event_stream_and_sets_stream_true(driver: Driver, serve) -> None:
    server = serve(streaming(text_stream("ok")))

    driver.text(server)

    (req,) = server.requests
    assert req.headers["accept"] == "text/event-stream"
    assert req.json()["stream"] is True


def test_stream_without_done_that_finished_ends_cleanly(driver: Driver, serve) -> None:
    server = serve(streaming(text_stream("a", "b", done=False)))

    assert driver.text(server) == "ab"


def test_interleaved_parallel_tool_call_deltas_stay_apart(driver: Driver, serve) -> None:
    body = sse(
        chunk(role="assistant", tool_calls=[tool_delta(0, id="call_a", name="get_weather", arguments="")]),
        chunk(tool_calls=[tool_delta(1, id="call_b", name="get_time", arguments="")]),
        chunk(tool_calls=[tool_delta(0, arguments='{"city": ')]),
        chunk(tool_calls=[tool_delta(1, arguments='{"tz": ')]),
        chunk(tool_calls=[tool_delta(0, arguments='"Paris"}')]),
        chunk(tool_calls=[tool_delta(1, arguments='"CET"}')]),
        chunk(finish="tool_calls"),
    )
    server = serve(streaming(body, one_byte=True))

    final = driver.final(server)

    calls = final.choices[0].message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_time", {"tz": "CET"}),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.content is None


def test_get_final_completion_merges_text_usage_and_extras(driver: Driver, serve) -> None:
    body = sse(chunk(role="assistant"), chunk("Hel"), chunk("lo"), chunk(finish="stop"),
               {**chunk(), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                     "total_tokens": 5, "cost": 0.0001},
                "provider": "Together"})
    server = serve(streaming(body))

    final = driver.final(server)

    assert final.choices[0].message.content == "Hello"
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None and final.usage.total_tokens == 5
    assert final.usage.model_extra == {"cost": 0.0001}
    assert final.model_extra is not None and final.model_extra["provider"] == "Together"


def test_error_chunk_mid_stream_raises_typed_error_with_partial(driver: Driver, serve) -> None:
    body = sse(chunk("Hello"), chunk(" wor"),
               {**chunk(finish="error"), "error": {"code": 502, "message": "upstream died"}})
    server = serve(streaming(body))

    with pytest.raises(InternalServerError) as info:
        driver.chunks(server)

    assert info.value.status_code == 502
    assert info.value.message == "upstream died"
    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == "Hello wor"
    assert len(server.requests) == 1, "a stream is never retried once an event reached the caller"


def test_error_chunk_in_the_same_write_as_content_keeps_the_content(driver: Driver, serve) -> None:
    body = sse(chunk("Hello"), {**chunk(finish="error"), "error": {"code": 429, "message": "slow down"}})
    server = serve(streaming(body))

    with pytest.raises(RateLimitError) as info:
        driver.chunks(server, client={"max_retries": 0})

    assert [c.choices[0].delta.content for c in driver.seen] == ["Hello"]
    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == "Hello"


def test_event_error_raises_typed_error_with_partial(driver: Driver, serve) -> None:
    body = sse(chunk("Par"), chunk("tial"),
               'event: error\ndata: {"error": {"code": 503, "message": "overloaded"}}\n\n', done=False)
    server = serve(streaming(body))

    with pytest.raises(InternalServerError) as info:
        driver.chunks(server)

    assert info.value.status_code == 503
    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == "Partial"


def test_finish_reason_error_without_error_object_raises(driver: Driver, serve) -> None:
    server = serve(streaming(sse(chunk("so far"), chunk(finish="error"))))

    with pytest.raises(APIStatusError) as info:
        driver.chunks(server)

    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == "so far"


def test_connection_cut_after_an_event_raises_with_partial_and_no_retry(driver: Driver, serve) -> None:
    server = serve(cut_stream(chunk("Hello")))

    with pytest.raises(APIConnectionError) as info:
        driver.chunks(server)

    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == "Hello"
    assert len(server.requests) == 1


def test_clean_close_before_the_answer_finished_is_an_error_not_a_short_answer(driver: Driver, serve) -> None:
    def handler(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(chunk("Hel"), done=False))
        conn.finish()

    server = serve(handler)

    with pytest.raises(APIConnectionError) as info:
        driver.chunks(server, client={"max_retries": 0})

    assert info.value.partial is not None
    assert info.value.partial.choices[0].message.content == "Hel"


def test_connection_dropped_before_any_event_is_retried(driver: Driver, serve) -> None:
    server = serve(in_turn(dropping, streaming(text_stream("after", " retry"))))

    assert driver.text(server) == "after retry"
    assert len(server.requests) == 2


def test_stream_cut_before_first_event_is_retried(sync_or_async: Driver, serve) -> None:
    def cut(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(b": processing\n\n")
        conn.drop()

    server = serve(in_turn(cut, streaming(text_stream("ok"))))

    assert sync_or_async.text(server) == "ok"
    assert len(server.requests) == 2


def test_stream_error_status_raises_before_iteration(driver: Driver, serve) -> None:
    server = serve(replying(429, {"error": {"code": 429, "message": "no"}}, {"x-should-retry": "false"}))

    with pytest.raises(RateLimitError):
        driver.chunks(server)
    assert driver.seen == []
