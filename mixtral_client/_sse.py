"""An I/O-free Server-Sent Events decoder (the WHATWG "event stream" rules).

Feed it bytes as they arrive; it returns the events completed by them. It handles CR, LF and CRLF
line ends (a CR at the end of one feed and LF at the start of the next are one line end), UTF-8
characters split across feeds, a leading byte-order mark, multi-line ``data:`` (joined with ``\\n``), ``event:``/``id:``/``retry:``
fields and ``:`` comments (counted, so a driver can tell keep-alives from content).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterator, Iterator

__all__ = ["SSEDecoder", "ServerSentEvent", "aiter_sse", "iter_sse"]

_LINE_END = re.compile(r"\r\n|\r|\n")


class ServerSentEvent:
    __slots__ = ("data", "event", "id", "retry")

    def __init__(self, data: str, event: str | None = None, id: str | None = None, retry: int | None = None) -> None:
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry

    def __repr__(self) -> str:
        return f"ServerSentEvent(event={self.event!r}, data={self.data!r}, id={self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServerSentEvent) and (self.data, self.event, self.id, self.retry) == (
            other.data, other.event, other.id, other.retry)

    __hash__ = None  # type: ignore[assignment]


class SSEDecoder:
    __slots__ = ("_buffer", "_data", "_decoder", "_event", "_id", "_retry", "_pending_cr", "comments")

    def __init__(self) -> None:
        # utf-8-sig: a byte-order mark at the very start is dropped, as the spec asks
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._buffer = ""
        self._pending_cr = False
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        #: comment lines seen so far (keep-alives such as ``: OPENROUTER PROCESSING``)
        self.comments = 0

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        return self._text(self._decoder.decode(chunk))

    def _text(self, text: str) -> list[ServerSentEvent]:
        if not text:
            return []
        if self._pending_cr:
            self._pending_cr = False
            if text[0] == "\n":
                text = text[1:]
        buffer = self._buffer + text
        if "\r" in buffer:
            lines = _LINE_END.split(buffer)
            if buffer.endswith("\r"):
                # the LF of a CRLF may come in the next feed; this CR already ended the line
                self._pending_cr = True
        else:
            lines = buffer.split("\n")
        self._buffer = lines.pop()
        events: list[ServerSentEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def end(self) -> list[ServerSentEvent]:
        """The stream closed: flush what is buffered (an unterminated last event is dispatched)."""
        events = self._text(self._decoder.decode(b"", final=True))
        if self._buffer:
            line, self._buffer = self._buffer, ""
            event = self._line(line)
            if event is not None:
                events.append(event)
        event = self._line("")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data:
                self._event = None
                return None
            event = ServerSentEvent("\n".join(self._data), self._event, self._id, self._retry)
            self._data = []
            self._event = None
            self._retry = None
            return event
        if line[0] == ":":
            self.comments += 1
            return None
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None


def iter_sse(chunks: Iterator[bytes]) -> Iterator[ServerSentEvent]:
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.end()


async def aiter_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[ServerSentEvent]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.end():
        yield event
