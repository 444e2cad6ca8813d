"""Event-stream decoding, with no network: frames split anywhere, corrupt or cut bytes, exception frames."""

from __future__ import annotations

import json
import struct

import pytest

from mixtral_client import APIConnectionError, APIStatusError, BadRequestError, RateLimitError
from mixtral_client._eventstream import ConverseStreamDecoder, Frame, FrameDecoder, FrameError
from mixtral_client.types import ChatCompletionChunk
from tests.bedrock.standin import answer_frames, event, exception, frame

STREAM = b"".join(answer_frames(["Hé", "llo", " wörld"]))
FIRST = answer_frames()[0]  # messageStart: 12-byte prelude, then headers, payload, 4-byte CRC


def _decoder() -> ConverseStreamDecoder:
    return ConverseStreamDecoder(provider="bedrock", model="m", request_id="rid")


def _decode(pieces: list[bytes]) -> list[ChatCompletionChunk]:
    decoder = _decoder()
    chunks = [c for piece in pieces for c in decoder.feed(piece)]
    return chunks + decoder.end()


def _summary(chunks: list[ChatCompletionChunk]) -> tuple[str, str | None, int | None]:
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage.total_tokens for c in chunks if c.usage is not None]
    return text, reasons[-1] if reasons else None, usage[-1] if usage else None


EXPECTED = ("Héllo wörld", "stop", 15)


def test_a_whole_stream_in_one_feed() -> None:
    chunks = _decode([STREAM])
    assert _summary(chunks) == EXPECTED
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # usage rides on the last chunk
    assert {(c.id, c.model) for c in chunks} == {("rid", "m")}


def test_one_byte_per_feed() -> None:
    assert _summary(_decode([STREAM[i:i + 1] for i in range(len(STREAM))])) == EXPECTED


def test_every_single_split_point() -> None:
    for cut in range(len(STREAM) + 1):
        assert _summary(_decode([STREAM[:cut], STREAM[cut:]])) == EXPECTED, cut


@pytest.mark.parametrize(("where", "offset"), [
    ("inside the prelude lengths", 5),
    ("inside the prelude CRC", 10),
    ("between prelude and headers", 12),
    ("inside the headers", 20),
    ("inside the payload", len(FIRST) - 8),
    ("inside the message CRC", len(FIRST) - 2),
    ("inside the next frame's prelude", len(FIRST) + 3),
])
def test_awkward_split_points(where: str, offset: int) -> None:
    assert _summary(_decode([STREAM[:offset], STREAM[offset:offset + 7], STREAM[offset + 7:]])) == EXPECTED


def test_frames_decode_headers_and_json_payloads() -> None:
    decoder = FrameDecoder()
    frames = decoder.feed(event("contentBlockDelta", {"delta": {"text": "x"}}) + exception("validationException", "no"))
    assert frames == [Frame("event", "contentBlockDelta", {"delta": {"text": "x"}}),
                      Frame("exception", "validationException", {"message": "no"})]
    decoder.end()


def test_an_error_frame_takes_code_and_message_from_its_headers() -> None:
    raw = frame({":message-type": "error", ":error-code": "InternalFailure", ":error-message": "oops"}, b"")
    assert FrameDecoder().feed(raw) == [Frame("error", "InternalFailure", {"message": "oops"})]


def test_a_payload_that_is_not_json_is_kept_as_text() -> None:
    raw = frame({":message-type": "event", ":event-type": "odd"}, b"plain")
    assert FrameDecoder().feed(raw) == [Frame("event", "odd", "plain")]


def test_a_bad_message_crc_is_refused() -> None:
    corrupt = FIRST[:-1] + bytes([FIRST[-1] ^ 0xFF])
    with pytest.raises(FrameError, match="ChecksumMismatch"):
        FrameDecoder().feed(corrupt)
    with pytest.raises(APIConnectionError, match="unreadable event stream") as info:
        _decoder().feed(corrupt)
    assert info.value.request_id == "rid"


def test_a_bad_prelude_crc_is_refused() -> None:
    corrupt = FIRST[:8] + struct.pack(">I", 0) + FIRST[12:]
    with pytest.raises(APIConnectionError):
        _decoder().feed(corrupt)


def test_a_stream_cut_inside_a_frame_raises_at_the_end() -> None:
    decoder = _decoder()
    assert decoder.feed(STREAM[:-3])  # every whole frame before the cut still decodes
    with pytest.raises(APIConnectionError, match="inside a frame"):
        decoder.end()


def test_an_exception_frame_alone_raises_at_once() -> None:
    with pytest.raises(RateLimitError) as info:
        _decoder().feed(exception("throttlingException", "Too many tokens, please wait."))
    error = info.value
    assert (error.status_code, error.code, error.request_id) == (429, "throttlingException", "rid")
    assert error.body == {"message": "Too many tokens, please wait."}
    assert "Too many tokens" in str(error)


def test_chunks_before_an_exception_frame_are_returned_first() -> None:
    frames = answer_frames(["Half an"])[:3]
    decoder = _decoder()
    chunks = decoder.feed(b"".join(frames) + exception("validationException", "bad input"))
    assert _summary(chunks)[0] == "Half an"
    with pytest.raises(BadRequestError, match="bad input"):
        decoder.end()


def test_a_pending_error_is_raised_by_the_next_feed() -> None:
    decoder = _decoder()
    assert decoder.feed(FIRST + exception("modelStreamErrorException", "model failed"))
    with pytest.raises(APIStatusError) as info:
        decoder.feed(b"")
    assert info.value.status_code == 500


def test_an_exception_frame_without_a_json_body_still_raises() -> None:
    raw = frame({":message-type": "exception", ":exception-type": "serviceUnavailableException"}, b"down")
    with pytest.raises(APIStatusError, match="down") as info:
        _decoder().feed(raw)
    assert info.value.status_code == 503


def test_unknown_events_are_skipped() -> None:
    raw = event("somethingNew", {"x": 1}) + event("contentBlockDelta", {"delta": {"text": "ok"}})
    assert [c.choices[0].delta.content for c in _decode([raw])] == ["ok"]


def test_the_encoder_matches_the_documented_prelude() -> None:
    total, headers_length = struct.unpack(">II", FIRST[:8])
    assert total == len(FIRST)
    assert json.loads(FIRST[12 + headers_length:-4]) == {"role": "assistant"}
