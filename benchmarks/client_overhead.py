"""Client CPU overhead: mixtral-sdk's ``MixtralClient`` against openai-python's ``OpenAI``, in the same run.

    python benchmarks/client_overhead.py            # about 2.5 minutes on 2 cores
    python benchmarks/client_overhead.py --quick    # a smoke run (about 40 s; numbers are noisy)
    python benchmarks/client_overhead.py --events   # the streaming helpers: chat.completions.stream() events
    python benchmarks/client_overhead.py --text     # raw prompts: completions.create(prompt=...), sync only

A minimal HTTP/1.1 keep-alive server runs in a *separate process* (this file, ``--serve``), so none of its
CPU lands in the measured process. It answers ``POST .../chat/completions`` with a canned, realistic chat
completion, or (``"stream": true``) with a canned SSE stream of ``max_tokens`` chunks in OpenAI's chunk
format, each sent as its own HTTP chunk and TCP write, ended by ``data: [DONE]``; ``POST .../completions``
(``--text``) gets the legacy completions API's shapes (``text_completion``, ``choices[0].text``). Two routes:

- ``/paced/v1``: a short pause between stream events, so each event arrives in its own socket read, as a
  real token stream does (the realistic case, used for the headline ratio);
- ``/burst/v1``: the whole stream written at once, so reads carry many events (pure parsing throughput).

What is measured: client-process CPU time (``time.process_time()``: user + system, all threads), never
wall time, so waiting on the server costs nothing. Both clients are used the same way: the sync client,
default settings (openai: ``max_retries=2``), one client reused for every request (a pooled keep-alive
connection), identical messages, model and ``max_tokens``. Each measurement is a block of calls; blocks
alternate between the clients (A/B/A/B...) after a warm-up, and the median over blocks is reported.

Definitions:
- **per request**: CPU of one non-streaming ``create()`` (build, send, read, parse), averaged over a block.
- **per chunk**: (CPU of a streamed request of 200 chunks - CPU of a streamed request of 1 chunk) / 199,
  with every chunk iterated by the caller; it is the marginal cost of one more chunk. The per-stream cost
  (1-chunk stream) is shown as well.

Results are printed as a table and written to ``benchmarks/results/client_overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Explain in two sentences what a mixture-of-experts layer does."},
]
STREAM_CHUNKS = 200
PACE_S = 0.0003  # pause between events on /paced (one event per socket read)
RESULTS = Path(__file__).resolve().parent / "results" / "client_overhead.json"
EVENTS_RESULTS = RESULTS.with_name("client_overhead_events.json")
TEXT_RESULTS = RESULTS.with_name("client_overhead_text.json")
PROMPT = "<s>[INST] You are a concise assistant.\n\nExplain in two sentences what a mixture-of-experts layer does. [/INST]"
ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- the server (other process)

_CREATED = 1732240000
_ID = "chatcmpl-9f1c2b7e4d3a4b5c8e6f7a8b9c0d1e2f"
_WORDS = ("A mixture-of-experts layer routes each token to a few of its expert feed-forward networks, "
          "chosen by a learned gate, and sums their outputs weighted by the gate's scores. ").split(" ")


def _text_completion() -> bytes:
    body = {"id": "cmpl-9f1c2b7e", "object": "text_completion", "created": _CREATED, "model": MODEL,
            "choices": [{"index": 0, "text": " ".join(_WORDS * 2).strip(), "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 31, "completion_tokens": 64, "total_tokens": 95}}
    return json.dumps(body).encode()


def _text_events(n: int) -> list[bytes]:
    """``n`` legacy completions chunks (``choices[0].text``; the last with the finish reason) and ``[DONE]``."""
    events = []
    for i in range(n):
        body = {"id": "cmpl-9f1c2b7e", "object": "text_completion", "created": _CREATED, "model": MODEL,
                "choices": [{"index": 0, "text": _WORDS[i % len(_WORDS)] + " ", "logprobs": None,
                             "finish_reason": "stop" if i == n - 1 else None}]}
        events.append(b"data: " + json.dumps(body).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _completion() -> bytes:
    text = " ".join(_WORDS * 2).strip()
    body = {
        "id": _ID, "object": "chat.completion", "created": _CREATED, "model": MODEL,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 31, "completion_tokens": 64, "total_tokens": 95},
    }
    return json.dumps(body).encode()


def _chunk(delta: dict[str, Any], finish: str | None) -> bytes:
    body = {"id": _ID, "object": "chat.completion.chunk", "created": _CREATED, "model": MODEL,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _events(n: int) -> list[bytes]:
    """``n`` chunk events (the first carries the role, the last the finish reason) and ``[DONE]``."""
    events = []
    for i in range(n):
        delta: dict[str, Any] = {"content": _WORDS[i % len(_WORDS)] + " "}
        if i == 0:
            delta = {"role": "assistant", **delta}
        events.append(_chunk(delta, "stop" if i == n - 1 else None))
    events.append(b"data: [DONE]\n\n")
    return events


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _serve_connection(conn: socket.socket, completion: bytes, cache: dict[Any, list[bytes]]) -> None:
    with conn, contextlib.suppress(OSError):  # a client closing mid-stream is normal
        _serve_requests(conn, completion, cache)


def read_request(conn: socket.socket, buf: bytes) -> tuple[str, bytes, bytes] | None:
    """The next HTTP/1.1 request on a keep-alive ``conn``: (path, body, bytes read past it), or None at EOF.
    ``buf`` holds what the previous call read past its request."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(buf) < length:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    return path, buf[:length], buf[length:]


def _serve_requests(conn: socket.socket, completion: bytes, cache: dict[Any, list[bytes]]) -> None:
    buf = b""
    text_completion = _text_completion()
    while (request := read_request(conn, buf)) is not None:
        path, raw, buf = request
        body = json.loads(raw)
        text = not path.endswith("/chat/completions")
        base = (b"HTTP/1.1 200 OK\r\nx-request-id: req_0123456789abcdef\r\n"
                b"openai-processing-ms: 12\r\n")
        if not body.get("stream"):
            answer = text_completion if text else completion
            conn.sendall(base + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(answer), answer))
            continue
        n = int(body.get("max_tokens") or 16)
        events = cache.get((n, text)) or cache.setdefault((n, text), (_text_events if text else _events)(n))
        conn.sendall(base + b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        if path.startswith("/paced/"):
            for event in events:
                time.sleep(PACE_S)
                conn.sendall(_http_chunk(event))
            conn.sendall(b"0\r\n\r\n")
        else:
            conn.sendall(b"".join(_http_chunk(e) for e in events) + b"0\r\n\r\n")


def serve() -> None:
    """Listen on 127.0.0.1, print the port, serve each connection on its own thread until killed."""
    completion = _completion()
    cache: dict[Any, list[bytes]] = {}
    with socket.create_server(("127.0.0.1", 0), backlog=128) as sock:
        print(sock.getsockname()[1], flush=True)
        while True:
            conn, _ = sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_serve_connection, args=(conn, completion, cache), daemon=True).start()


# --------------------------------------------------------------------------- the clients (this process)



def _workloads() -> dict[str, dict[str, Any]]:
    """For each client: the sync client factory and the async one (base_url -> client)."""
    import openai

    sys.path.insert(0, str(ROOT))  # measure this checkout, not whichever copy is installed
    from mixtral_client import AsyncMixtralClient, MixtralClient

    return {
        "mixtral-sdk": {
            "sync": lambda base: MixtralClient(base_url=base, api_key="x"),
            "async": lambda base: AsyncMixtralClient(base_url=base, api_key="x"),
            "close": lambda c: c.close(),
            "aclose": lambda c: c.aclose(),
        },
        "openai": {
            "sync": lambda base: openai.OpenAI(base_url=base, api_key="x", max_retries=2),
            "async": lambda base: openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=2),
            "close": lambda c: c.close(),
            "aclose": lambda c: c.close(),
        },
    }


def _events_runner(client: Any) -> dict[str, Callable[[int], None]]:
    """``--events``: both clients' streaming helper, ``chat.completions.stream()``, every event iterated."""
    def stream(n: int) -> Callable[[int], None]:
        def run(k: int) -> None:
            for _ in range(k):
                text = 0
                with client.chat.completions.stream(model=MODEL, messages=MESSAGES, max_tokens=n) as events:
                    for event in events:
                        text += event.type == "content.delta"
                assert text == n, text
        return run

    return {"stream_1": stream(1), f"stream_{STREAM_CHUNKS}": stream(STREAM_CHUNKS)}


def _sync_runner(client: Any, text: bool = False) -> dict[str, Callable[[int], None]]:
    """The sync client's ``chat.completions.create()``; with ``text`` (``--text``) ``completions.create(prompt=...)``."""
    create = client.completions.create if text else client.chat.completions.create
    ask: dict[str, Any] = {"prompt": PROMPT} if text else {"messages": MESSAGES}

    def complete(k: int) -> None:
        for _ in range(k):
            choice = create(model=MODEL, max_tokens=64, **ask).choices[0]
            assert choice.text if text else choice.message.content

    def stream(n: int) -> Callable[[int], None]:
        def run(k: int) -> None:
            for _ in range(k):
                got = 0
                for chunk in create(model=MODEL, max_tokens=n, stream=True, **ask):
                    got += len(chunk.choices)
                assert got == n, got
        return run

    return {"complete": complete, "stream_1": stream(1), f"stream_{STREAM_CHUNKS}": stream(STREAM_CHUNKS)}


def _async_runner(client: Any, loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[int], None]]:
    create = client.chat.completions.create

    async def complete_many(k: int) -> None:
        for _ in range(k):
            answer = await create(model=MODEL, messages=MESSAGES, max_tokens=64)
            assert answer.choices[0].message.content

    async def stream_many(n: int, k: int) -> None:
        for _ in range(k):
            got = 0
            async for chunk in await create(model=MODEL, messages=MESSAGES, max_tokens=n, stream=True):
                got += len(chunk.choices)
            assert got == n, got

    return {
        "complete": lambda k: loop.run_until_complete(complete_many(k)),
        "stream_1": lambda k: loop.run_until_complete(stream_many(1, k)),
        f"stream_{STREAM_CHUNKS}": lambda k: loop.run_until_complete(stream_many(STREAM_CHUNKS, k)),
    }


def _cpu(fn: Callable[[int], None], k: int) -> float:
    """CPU seconds per call of ``fn(k)`` (k calls)."""
    gc.collect()
    t0 = time.process_time()
    fn(k)
    return (time.process_time() - t0) / k


def _measure(runners: dict[str, dict[str, Callable[[int], None]]], counts: dict[str, int],
             reps: int) -> dict[str, dict[str, list[float]]]:
    """Blocks alternate between the clients (A/B/A/B...), each workload in turn; warm-up first."""
    samples: dict[str, dict[str, list[float]]] = {name: {w: [] for w in counts} for name in runners}
    for runner in runners.values():
        for workload, k in counts.items():
            runner[workload](max(k // 5, 2))  # warm-up: connection open, caches and imports filled
    for rep in range(reps):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for workload, k in counts.items():
            for name in order:
                samples[name][workload].append(_cpu(runners[name][workload], k))
    return samples


def _summary(samples: dict[str, list[float]]) -> dict[str, float]:
    med = {w: statistics.median(v) for w, v in samples.items()}
    out = {"request_us": med["complete"] * 1e6} if "complete" in med else {}
    out["chunk_us"] = (med[f"stream_{STREAM_CHUNKS}"] - med["stream_1"]) / (STREAM_CHUNKS - 1) * 1e6
    out["stream_us"] = med["stream_1"] * 1e6
    return out


def _machine() -> dict[str, Any]:
    import httpx
    import openai
    import pydantic

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"commit": commit, "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "httpx": httpx.__version__, "openai": openai.__version__,
            "pydantic": pydantic.__version__, "openai_http": _openai_http()}


def _openai_http() -> str:
    """openai 3.x sends through its own httpx fork (``httpx2``), not httpx."""
    try:
        import httpx2  # type: ignore[import-not-found]
    except ImportError:
        return "httpx"
    return f"httpx2 {httpx2.__version__}"


def _start_server() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="few calls and repetitions (a smoke run)")
    parser.add_argument("--reps", type=int, default=None, help="blocks per client and workload (default 5)")
    parser.add_argument("--no-async", action="store_true", help="skip the async clients")
    parser.add_argument("--events", action="store_true",
                        help="measure the streaming helpers (chat.completions.stream() events), sync only")
    parser.add_argument("--text", action="store_true",
                        help="measure raw-prompt completions (completions.create(prompt=...)), sync only")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"default {RESULTS.name} (with --events: {EVENTS_RESULTS.name}, with --text: "
                             f"{TEXT_RESULTS.name}), in {RESULTS.parent}")
    args = parser.parse_args()
    args.output = args.output or (EVENTS_RESULTS if args.events else TEXT_RESULTS if args.text else RESULTS)
    if args.serve:
        serve()
        return

    reps = args.reps or (3 if args.quick else 5)
    scale = 5 if args.quick else 1
    counts = {"complete": 600 // scale, "stream_1": 300 // scale, f"stream_{STREAM_CHUNKS}": 10 // min(scale, 2)}
    if args.events:
        del counts["complete"]
    proc, port = _start_server()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        factories = _workloads()
        for mode in ("sync",) if args.no_async or args.events or args.text else ("sync", "async"):
            loop = asyncio.new_event_loop()
            for route in ("paced", "burst"):
                url = f"http://127.0.0.1:{port}/{route}/v1"
                # the non-streaming answer does not depend on the route: measured once, on /paced
                wanted = {w: k for w, k in counts.items() if route == "paced" or w != "complete"}
                clients = {name: f[mode](url) for name, f in factories.items()}
                runners = {name: _events_runner(c) if args.events else _sync_runner(c, args.text) if mode == "sync"
                           else _async_runner(c, loop) for name, c in clients.items()}
                samples = _measure(runners, wanted, reps)
                for name, c in clients.items():
                    if mode == "sync":
                        factories[name]["close"](c)
                    else:
                        loop.run_until_complete(factories[name]["aclose"](c))
                rows.append({"mode": "events" if args.events else "text" if args.text else mode, "route": route, "samples": samples,
                             **{name: _summary(s) for name, s in samples.items()}})
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    finally:
        proc.kill()
        proc.wait()
    runtime = time.perf_counter() - started

    machine = _machine()
    print(f"client CPU time, median of {reps} blocks; server in another process "
          f"({machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
          f"httpx {machine['httpx']}, openai {machine['openai']})")
    header = f"{'client':<6} {'stream':<6} {'metric':<20} {'mixtral-sdk µs':>15} {'openai µs':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    metrics = [("request_us", "per request"), ("chunk_us", "per chunk"), ("stream_us", "per 1-chunk stream")]
    for row in rows:
        for key, label in metrics:
            if key not in row["openai"]:
                continue
            ours, theirs = row["mixtral-sdk"][key], row["openai"][key]
            row.setdefault("ratios", {})[key] = round(ours / theirs, 3)
            route = "-" if key == "request_us" else row["route"]
            print(f"{row['mode']:<6} {route:<6} {label:<20} {ours:>15.1f} {theirs:>10.1f} {ours / theirs:>6.2f}")
    print(f"runtime {runtime:.0f} s")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/client_overhead.py" + (" --quick" if args.quick else "")
                   + (" --events" if args.events else "") + (" --text" if args.text else ""),
        "machine": machine,
        "settings": {"reps": reps, "calls_per_block": counts, "stream_chunks": STREAM_CHUNKS,
                     "paced_gap_s": PACE_S, "model": MODEL, "messages": MESSAGES},
        "definitions": {
            "request_us": "CPU µs of one non-streaming create(), median over blocks",
            "chunk_us": f"CPU µs per streamed chunk: (CPU of a {STREAM_CHUNKS}-chunk stream - CPU of a 1-chunk stream) / {STREAM_CHUNKS - 1}",
            "stream_us": "CPU µs of one streamed create() of 1 chunk, iterated to the end",
        },
        "runtime_s": round(runtime, 1),
        "rows": rows,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
