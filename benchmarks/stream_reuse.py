"""Sync streams over TLS: does the next request reuse the connection, and what does the stream's end cost?

    python benchmarks/stream_reuse.py               # about 20 s
    python benchmarks/stream_reuse.py --streams 50  # a quicker run

A TLS server in a *separate process* (this file, ``--serve``; a self-signed certificate made with the ``openssl``
command) answers each ``POST .../chat/completions`` with a short SSE stream (a role chunk, one text chunk, a
``finish_reason`` chunk, ``data: [DONE]``). Two routes:

- ``/end/v1``: the chunked body's end follows ``[DONE]`` at once, as hosts do;
- ``/held/v1``: the body is held open for ``--hold`` seconds after ``[DONE]`` before it ends (a slow proxy).

Each client runs ``--streams`` sync streams one after another, iterating each to its end, with one client
reused for all of them. Reported: wall time per stream (mean) and the TLS connections the server accepted.
Rows: mixtral-sdk as shipped; mixtral-sdk with keep-alive turned off (``max_keepalive_connections=0``: a new
connection per stream, what a client that drops the connection at ``[DONE]`` pays); openai-python (which reads
every body to its end, however long that takes).

Results are printed as a table and written to ``benchmarks/results/stream_reuse.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client_overhead import read_request

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "stream_reuse.json"
MESSAGES = [{"role": "user", "content": "Hi"}]
MODEL = "mistralai/mixtral-8x7b-instruct-v0.1"


# --------------------------------------------------------------------------- the server (its own process)

def _events() -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        data = b"data: " + json.dumps(body).encode() + b"\n\n"
        return b"%x\r\n%s\r\n" % (len(data), data)

    done = b"data: [DONE]\n\n"
    return (chunk({"role": "assistant", "content": ""}) + chunk({"content": "Hello"}) + chunk({}, "stop")
            + b"%x\r\n%s\r\n" % (len(done), done))


def _serve_requests(conn: ssl.SSLSocket, hold_s: float) -> None:
    buf = b""
    events = _events()
    while (request := read_request(conn, buf)) is not None:
        path, _, buf = request
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + events)
        if path.startswith("/held/"):
            time.sleep(hold_s)
        conn.sendall(b"0\r\n\r\n")


def serve(cert: str, key: str, hold_s: float) -> None:
    """Print the TLS port and the plain stats port, then serve until killed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    accepted = 0

    def handle(raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with context.wrap_socket(raw, server_side=True) as conn:
                _serve_requests(conn, hold_s)
        except OSError:  # a client dropping the connection is part of the test
            pass

    def stats(listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(str(accepted).encode())

    with socket.create_server(("127.0.0.1", 0), backlog=128) as tls, \
            socket.create_server(("127.0.0.1", 0)) as plain:
        print(tls.getsockname()[1], plain.getsockname()[1], flush=True)
        threading.Thread(target=stats, args=(plain,), daemon=True).start()
        while True:
            raw, _ = tls.accept()
            accepted += 1
            threading.Thread(target=handle, args=(raw,), daemon=True).start()


# --------------------------------------------------------------------------- the clients (this process)

def _accepted(stats_port: int) -> int:
    with socket.create_connection(("127.0.0.1", stats_port)) as conn:
        return int(conn.recv(64))


def _clients(cert: str) -> dict[str, Callable[[str], Any]]:
    import httpx
    import openai

    sys.path.insert(0, str(ROOT))  # measure this checkout, not whichever copy is installed
    from mixtral_client import MixtralClient

    def trusting() -> ssl.SSLContext:
        return ssl.create_default_context(cafile=cert)

    return {
        "mixtral-sdk": lambda base: MixtralClient(base_url=base, api_key="x",
                                                  http_client=httpx.Client(verify=trusting())),
        "mixtral-sdk, no keep-alive": lambda base: MixtralClient(
            base_url=base, api_key="x",
            http_client=httpx.Client(verify=trusting(), limits=httpx.Limits(max_keepalive_connections=0))),
        "openai": lambda base: openai.OpenAI(base_url=base, api_key="x",
                                             http_client=openai.DefaultHttpxClient(verify=trusting())),
    }


def _run(client: Any, streams: int) -> float:
    started = time.perf_counter()
    for _ in range(streams):
        text = ""
        for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        assert text == "Hello", text
    return (time.perf_counter() - started) / streams


def _certificate(folder: str) -> tuple[str, str]:
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def _machine() -> dict[str, Any]:
    import httpx
    import openai

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return {"commit": commit, "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "httpx": httpx.__version__, "openai": openai.__version__, "ssl": ssl.OPENSSL_VERSION}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=3, metavar=("CERT", "KEY", "HOLD"), help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=200, help="streams per client and route (default 200)")
    parser.add_argument("--hold", type=float, default=0.5, help="seconds /held/ keeps a body open (default 0.5)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], float(args.serve[2]))
        return

    with tempfile.TemporaryDirectory() as folder:
        cert, key = _certificate(folder)
        server = subprocess.Popen([sys.executable, __file__, "--serve", cert, key, str(args.hold)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            tls_port, stats_port = map(int, server.stdout.readline().split())
            rows = []
            for route, streams in (("end", args.streams), ("held", max(4, args.streams // 20))):
                for name, make in _clients(cert).items():
                    client = make(f"https://127.0.0.1:{tls_port}/{route}/v1")
                    _run(client, 2)  # warm-up: imports, the first handshake
                    before = _accepted(stats_port)
                    per_stream = _run(client, streams)
                    rows.append({"route": route, "client": name, "streams": streams,
                                 "ms_per_stream": per_stream * 1e3,
                                 "connections": _accepted(stats_port) - before})
                    client.close()
        finally:
            server.kill()

    print(f"{'route':6} {'client':28} {'streams':>8} {'ms/stream':>10} {'new connections':>16}")
    for row in rows:
        print(f"{row['route']:6} {row['client']:28} {row['streams']:8d} {row['ms_per_stream']:10.2f} "
              f"{row['connections']:16d}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": _machine(), "hold_s": args.hold, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
