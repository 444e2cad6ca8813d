"""AWS event-stream decoding for ConverseStream and InvokeModelWithResponseStream, with no I/O: bytes in, chat
chunks out.

``FrameDecoder`` turns bytes, split anywhere, into ``Frame``s with botocore's ``EventStreamBuffer``
(prelude, headers, payload, both CRCs checked). ``ConverseStreamDecoder`` maps the frames of one
ConverseStream (or InvokeModelWithResponseStream) answer onto ``ChatCompletionChunk``s and raises the error tree for exception frames,
corrupt bytes and a stream cut inside a frame. Needs botocore (the ``bedrock`` extra).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from botocore.eventstream import EventStreamBuffer, ParserError

from ._converse import api_error, chunk_from_event
from ._exceptions import APIConnectionError, APIError
from .types import ChatCompletionChunk

__all__ = ["ConverseStreamDecoder", "Frame", "FrameDecoder", "FrameError"]


class FrameError(ValueError):
    """The bytes are not a valid event stream (checksum mismatch, oversized frame, cut inside a frame)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One event-stream message.

    ``kind`` is its ``:message-type`` (``event``, ``exception`` or ``error``); ``name`` its ``:event-type``,
    ``:exception-type`` or ``:error-code``; ``payload`` its body as JSON (or text when it is not JSON).
    """

    kind: str
    name: str
    payload: Any


def _header(headers: dict[str, Any], name: str) -> str:
    value = headers.get(name)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def _frame(headers: dict[str, Any], payload: bytes) -> Frame:
    kind = _header(headers, ":message-type") or "event"
    name = _header(headers, {"exception": ":exception-type", "error": ":error-code"}.get(kind, ":event-type"))
    text = payload.decode("utf-8", "replace")
    try:
        body: Any = json.loads(text) if text.strip() else {}
    except ValueError:
        body = text
    if kind == "error" and not body:
        body = {"message": _header(headers, ":error-message")}
    return Frame(kind, name, body)


class FrameDecoder:
    """Feed bytes as they arrive; get the frames they complete."""

    __slots__ = ("_buffer", "_pending")

    def __init__(self) -> None:
        self._buffer = EventStreamBuffer()
        self._pending = 0  # bytes fed but not yet part of a whole frame

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer.add_data(data)
        self._pending += len(data)
        frames = []
        try:
            for message in self._buffer:
                self._pending -= message.prelude.total_length
                frames.append(_frame(message.headers, message.payload))
        except ParserError as exc:
            raise FrameError(f"{type(exc).__name__}: {exc}") from exc
        return frames

    def end(self) -> None:
        """The bytes ended: raise if they ended inside a frame."""
        if self._pending:
            raise FrameError(f"the stream ended inside a frame ({self._pending} bytes left over)")


class ConverseStreamDecoder:
    """The chunks of one ConverseStream answer (``EventDecoder`` for the HTTP senders).

    An exception frame raises its typed error. When whole chunks came in the same read just before it,
    they are returned first and the error is raised by the next ``feed()`` or ``end()`` (Bedrock closes
    the stream after an exception), so the caller's partial completion keeps them.
    """

    __slots__ = ("_error", "_frames", "created", "id", "model", "provider", "request_id")

    def __init__(self, *, provider: str, model: str, request_id: str | None) -> None:
        self.provider = provider
        self.model = model
        self.request_id = request_id
        self.id = request_id or ""
        self.created = int(time.time())
        self._frames = FrameDecoder()
        self._error: APIError | None = None

    def feed(self, data: bytes, /) -> list[ChatCompletionChunk]:
        self._raise_pending()
        try:
            frames = self._frames.feed(data)
        except FrameError as exc:
            raise self._corrupt(exc) from exc
        chunks = []
        for frame in frames:
            if frame.kind == "event":
                try:
                    chunk = chunk_from_event(frame.name, frame.payload, id=self.id, model=self.model,
                                             created=self.created)
                except ValueError as exc:  # an InvokeModel chunk whose bytes do not decode
                    raise self._corrupt(exc) from exc
                if chunk is not None:
                    chunks.append(chunk)
                continue
            self._error = self._frame_error(frame)
            break
        if not chunks:
            self._raise_pending()
        return chunks

    def end(self) -> list[ChatCompletionChunk]:
        self._raise_pending()
        try:
            self._frames.end()
        except FrameError as exc:
            raise self._corrupt(exc) from exc
        return []

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _frame_error(self, frame: Frame) -> APIError:
        payload = frame.payload
        message = (payload.get("message") or payload.get("Message")) if isinstance(payload, dict) else payload
        return api_error(frame.name or frame.kind, str(message or f"{frame.kind} frame"), provider=self.provider,
                         request_id=self.request_id, body=payload)

    def _corrupt(self, exc: ValueError) -> APIConnectionError:
        return APIConnectionError(f"{self.provider} sent an unreadable event stream: {exc}",
                                  provider=self.provider, request_id=self.request_id)
