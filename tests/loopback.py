"""A real HTTP/1.1 server on 127.0.0.1 for tests, scripted per test and controlled byte by byte.

A test installs a handler ``handler(req: Received, conn: Conn) -> None`` that reads the parsed request
and writes whatever it likes: a JSON answer, an SSE stream one byte per TCP write, keep-alive comments,
a stall, a connection dropped mid-body. Every request is recorded in ``server.requests``.

    with LoopbackServer(handler) as server:
        client = MixtralClient(base_url=server.url, api_key="k")
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Conn", "LoopbackServer", "Received", "in_turn", "sse", "unanswered_port"]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection_id: int
    #: every header line as sent, in order (``headers`` keeps only the last of a repeated name)
    header_lines: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Conn:
    sock: socket.socket
    chunked: bool = False
    closed: bool = False
    keep_alive: bool = True
    sent: list[bytes] = field(default_factory=list)
    #: set when the server shuts down; ``pause`` wakes on it so a stalled handler never delays a test's end
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self, status: int = 200, headers: dict[str, str] | None = None, *, chunked: bool = True,
              content_length: int | None = None) -> None:
        reason = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 402: "Payment Required",
                  404: "Not Found", 408: "Request Timeout", 429: "Too Many Requests", 500: "Internal Server Error",
                  502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Status")
        lines = [f"HTTP/1.1 {status} {reason}"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        elif content_length is not None:
            lines.append(f"Content-Length: {content_length}")
        self.chunked = chunked
        self._raw(("\r\n".join(lines) + "\r\n\r\n").encode())

    def write(self, data: bytes, *, one_byte: bool = False, delay: float = 0.0) -> None:
        """Send body bytes (as HTTP chunks when chunked); ``one_byte`` sends each byte in its own TCP write."""
        pieces: Iterable[bytes] = [data[i:i + 1] for i in range(len(data))] if one_byte else [data]
        for piece in pieces:
            if not piece:
                continue
            if self.chunked:
                self._raw(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            else:
                self._raw(piece)
            if delay:
                time.sleep(delay)

    def pause(self, seconds: float) -> bool:
        """Stall for ``seconds`` (or until the server stops); True when the server is stopping."""
        return self.stopping.wait(seconds)

    def finish(self) -> None:
        if self.chunked:
            self._raw(b"0\r\n\r\n")

    def respond(self, status: int, body: bytes | str | dict[str, Any] | list[Any],
                headers: dict[str, str] | None = None) -> None:
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        elif isinstance(body, str):
            body = body.encode()
        self.start(status, headers, chunked=False, content_length=len(body))
        self._raw(body)

    def drop(self) -> None:
        """Close the TCP connection abruptly (mid-body, mid-headers, wherever)."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _raw(self, data: bytes) -> None:
        self.sent.append(data)
        self.sock.sendall(data)


Handler = Callable[[Received, Conn], None]


def in_turn(*handlers: Handler) -> Handler:
    """A handler that serves the n-th request with the n-th handler (the last one serves the rest)."""
    lock = threading.Lock()
    served = [0]

    def handle(req: Received, conn: Conn) -> None:
        with lock:
            n = served[0]
            served[0] += 1
        handlers[min(n, len(handlers) - 1)](req, conn)

    return handle


def sse(*events: Any, done: bool = True) -> bytes:
    """An SSE body from dicts (JSON data events) or raw strings (sent verbatim)."""
    out = []
    for event in events:
        out.append(event if isinstance(event, str) else f"data: {json.dumps(event)}\n\n")
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A 127.0.0.1 port whose accept queue is full, so a new connection attempt hangs (for connect timeouts)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    try:
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        time.sleep(0.05)
        yield port
    finally:
        for sock in [*fillers, listener]:
            sock.close()


class LoopbackServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Received] = []
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self.errors: list[BaseException] = []

    def __enter__(self) -> LoopbackServer:
        self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for sock in [self._sock, *self._socks]:  # wakes threads blocked in accept() or recv() at once
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accepter.join(timeout=5)
        self._sock.close()
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write leaves at once
            self.connections += 1
            self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock, self.connections), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, connection_id: int) -> None:
        sock.settimeout(0.2)
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        if self._stop.is_set():
                            return
                        continue
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                header_lines = []
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                    header_lines.append((k.strip(), v.strip()))
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                received = Received(method, path, headers, body, connection_id, header_lines)
                self.requests.append(received)
                conn = Conn(sock, stopping=self._stop)
                self.handler(received, conn)
                if conn.closed:
                    return
        except (ConnectionError, OSError):
            return
        except BaseException as exc:  # a broken handler must fail the test, not hang it
            self.errors.append(exc)
        finally:
            try:
                sock.close()
            except OSError:
                pass
