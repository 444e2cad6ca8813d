"""The I/O-free SSE decoder, fed bytes exactly as a socket might deliver them."""

from __future__ import annotations

import anyio
import pytest

from mixtral_client._sse import ServerSentEvent, SSEDecoder, aiter_sse, iter_sse


def decode(*feeds: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = [e for feed in feeds for e in decoder.feed(feed)]
    return events + decoder.end()


def data(*events: ServerSentEvent) -> list[str]:
    return [e.data for e in events]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
def test_each_line_end_separates_events(eol: bytes) -> None:
    stream = b"data: one" + eol + eol + b"data: two" + eol + eol

    assert data(*decode(stream)) == ["one", "two"]


def test_mixed_line_ends_in_one_stream() -> None:
    assert data(*decode(b"data: a\r\n\r\ndata: b\n\ndata: c\r\r")) == ["a", "b", "c"]


def test_cr_at_end_of_one_feed_and_lf_at_start_of_next_is_one_line_end() -> None:
    events = decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")

    assert data(*events) == ["a\nb"]


def test_cr_then_lf_in_separate_feeds_does_not_make_an_empty_line() -> None:
    decoder = SSEDecoder()

    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\n") == []  # the LF completes the CRLF; it is not a blank line
    assert data(*decoder.feed(b"\r\n")) == ["x"]


@pytest.mark.parametrize("eol", ["\n", "\r", "\r\n"], ids=["LF", "CR", "CRLF"])
def test_every_split_point_of_a_stream_gives_the_same_events(eol: str) -> None:
    text = eol.join([": hello", "event: message", "id: 7", "data: first", "data: 😀 second", "", "data: [DONE]", "", ""])
    raw = text.encode()
    whole = decode(raw)

    for cut in range(len(raw) + 1):
        assert decode(raw[:cut], raw[cut:]) == whole, f"split at byte {cut}"
    assert decode(*[raw[i:i + 1] for i in range(len(raw))]) == whole


def test_multi_byte_utf8_split_at_every_byte_offset() -> None:
    text = "data: Grüße 日本語 🌍🚀\n\n".encode()

    for cut in range(len(text) + 1):
        assert data(*decode(text[:cut], text[cut:])) == ["Grüße 日本語 🌍🚀"], f"split at byte {cut}"


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert data(*decode(b"data: line one\ndata: line two\ndata:\n\n")) == ["line one\nline two\n"]


def test_only_one_leading_space_is_removed_from_a_value() -> None:
    assert data(*decode(b"data:no space\n\ndata:  two spaces\n\n")) == ["no space", " two spaces"]


def test_field_without_colon_is_an_empty_value() -> None:
    assert data(*decode(b"data\n\n")) == [""]


def test_comments_are_ignored_and_counted() -> None:
    decoder = SSEDecoder()

    events = decoder.feed(b": OPENROUTER PROCESSING\n\n:\n\ndata: x\n\n: keep-alive\n")

    assert data(*events) == ["x"]
    assert decoder.comments == 3


def test_event_name_is_read_and_reset_after_dispatch() -> None:
    first, second = decode(b"event: error\ndata: {}\n\ndata: plain\n\n")

    assert (first.event, first.data) == ("error", "{}")
    assert second.event is None


def test_event_without_data_is_not_dispatched() -> None:
    assert decode(b"event: ping\n\ndata: real\n\n") == [ServerSentEvent("real")]


def test_id_persists_until_changed_and_null_byte_ids_are_ignored() -> None:
    events = decode(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0\ndata: c\n\nid: 3\ndata: d\n\n")

    assert [e.id for e in events] == ["1", "1", "1", "3"]


def test_retry_field_is_read_when_it_is_ascii_digits() -> None:
    events = decode(b"retry: 3000\ndata: a\n\nretry: soon\ndata: b\n\nretry: \xc2\xb2\ndata: c\n\n")

    assert [e.retry for e in events] == [3000, None, None]


def test_unknown_fields_are_ignored() -> None:
    assert decode(b"foo: bar\ndata: x\n\n") == [ServerSentEvent("x")]


def test_done_marker_is_an_ordinary_event_for_the_caller_to_interpret() -> None:
    assert data(*decode(b"data: [DONE]\n\n")) == ["[DONE]"]


def test_clean_end_without_blank_line_dispatches_the_last_event() -> None:
    assert data(*decode(b"data: a\n\ndata: tail")) == ["a", "tail"]


def test_end_with_nothing_pending_gives_nothing() -> None:
    assert decode(b"data: a\n\n") == [ServerSentEvent("a")]
    assert decode(b"") == []
    assert decode(b": only a comment\n") == []


def test_truncated_utf8_at_end_is_replaced_not_raised() -> None:
    assert data(*decode(b"data: caf\xc3")) == ["caf\ufffd"]


def test_leading_byte_order_mark_is_skipped() -> None:
    assert decode(b"\xef\xbb\xbfdata: x\n\n") == [ServerSentEvent("x")]


def test_bom_split_across_feeds_is_skipped() -> None:
    assert decode(b"\xef", b"\xbb", b"\xbfdata: x\n\n") == [ServerSentEvent("x")]


def test_iter_sse_drives_the_decoder() -> None:
    assert data(*iter_sse(iter([b"data: a\n", b"\ndata: b"]))) == ["a", "b"]


@pytest.mark.anyio
async def test_aiter_sse_drives_the_decoder() -> None:
    async def chunks():
        for piece in [b"data: a\r", b"\n\r\ndata: b"]:
            await anyio.sleep(0)
            yield piece

    assert data(*[e async for e in aiter_sse(chunks())]) == ["a", "b"]
