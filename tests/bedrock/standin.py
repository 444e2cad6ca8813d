"""A Bedrock runtime stand-in on 127.0.0.1, written for the tests, and an event-stream encoder.

``BedrockStandIn`` serves ``POST /model/{id}/converse`` and ``/converse-stream`` over the loopback
server. It authenticates every request as Bedrock does: a bearer API key, or SigV4, which it checks by
recomputing the signature with botocore from the method, path, signed headers and body bytes it
received (at the ``X-Amz-Date`` the client sent) and refusing a mismatch with 403
``InvalidSignatureException``. Each request is answered by the next scripted reply in ``replies``
(an answer, an HTTP error, raw frames), or by ``answer()`` when none is left.

    with BedrockStandIn() as bedrock:
        bedrock.replies.append(http_error(429, "ThrottlingException", "Too many requests"))
        client = MixtralClient(provider="bedrock", base_url=bedrock.url, region=REGION)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.loopback import Conn, LoopbackServer, Received

ACCESS_KEY = "AKIDSTANDIN0000001"
SECRET_KEY = "standin-secret-key/0123456789abcdefghijkl"
API_KEY = "bedrock-api-key-standin"
REGION = "eu-west-3"
MODEL = "mistral.mixtral-8x7b-instruct-v0:1"

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})"
)
_PATH = re.compile(r"(?:/[^?]*)?/model/(?P<model>[^/?]+)/(?P<op>converse|converse-stream|invoke|invoke-with-response-stream)"
                   r"(?:\?.*)?")  # behind a proxy's path too


# --------------------------------------------------------------------------- event-stream encoding


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths + CRC), string headers (type 7), payload, message CRC."""
    encoded = b"".join(
        struct.pack(">B", len(name)) + name.encode() + b"\x07" + struct.pack(">H", len(value.encode())) + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def event(event_type: str, payload: dict[str, Any]) -> bytes:
    return frame({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
                 json.dumps(payload).encode())


def exception(exception_type: str, message: str) -> bytes:
    return frame({":exception-type": exception_type, ":content-type": "application/json",
                  ":message-type": "exception"}, json.dumps({"message": message}).encode())


def answer_frames(pieces: Sequence[str] = ("Hello", " from", " Bedrock"), stop: str = "end_turn",
                  usage: tuple[int, int] = (12, 3)) -> list[bytes]:
    """The frames of a whole ConverseStream answer."""
    return [
        event("messageStart", {"role": "assistant"}),
        event("contentBlockStart", {"contentBlockIndex": 0, "start": {}}),
        *(event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": p}}) for p in pieces),
        event("contentBlockStop", {"contentBlockIndex": 0}),
        event("messageStop", {"stopReason": stop}),
        event("metadata", {"usage": {"inputTokens": usage[0], "outputTokens": usage[1],
                                     "totalTokens": sum(usage)}, "metrics": {"latencyMs": 42}}),
    ]


# --------------------------------------------------------------------------- scripted replies

Reply = Callable[["Call", Conn], None]


@dataclass
class Call:
    """One authenticated request, as the stand-in understood it."""

    received: Received
    model: str
    stream: bool
    request_id: str
    auth: str  # "sigv4" or "api-key"
    op: str = "converse"  # converse, converse-stream, invoke, invoke-with-response-stream

    def json(self) -> Any:
        return self.received.json()


def _error_headers(error_type: str, request_id: str) -> dict[str, str]:
    return {"x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-RequestId": request_id}


def http_error(status: int, error_type: str, message: str) -> Reply:
    def reply(call: Call, conn: Conn) -> None:
        conn.respond(status, {"message": message}, _error_headers(error_type, call.request_id))
    return reply


def stream_bytes(frames: Sequence[bytes], *, cuts: Sequence[int] | None = None, one_byte: bool = False,
                 truncate: int = 0) -> Reply:
    """A ConverseStream answer made of ``frames``, written as HTTP chunks cut at the byte offsets ``cuts``
    (or one byte per chunk), less its last ``truncate`` bytes; each chunk reaches the client's decoder
    as one feed."""
    data = b"".join(frames)
    data = data[: len(data) - truncate]

    def reply(call: Call, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "application/vnd.amazon.eventstream", "x-amzn-RequestId": call.request_id})
        bounds = [0, *sorted(cuts or ()), len(data)]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            conn.write(data[lo:hi], one_byte=one_byte)
        if truncate:
            conn.drop()
        else:
            conn.finish()
    return reply


def invoke_chunk(text: str, stop: str | None = None, usage: tuple[int, int] | None = None) -> bytes:
    """One InvokeModelWithResponseStream ``chunk`` event: base64 of ``{"outputs": [...]}``, the last with the
    invocation metrics."""
    inner: dict[str, Any] = {"outputs": [{"text": text, "stop_reason": stop}]}
    if usage is not None:
        inner["amazon-bedrock-invocationMetrics"] = {"inputTokenCount": usage[0], "outputTokenCount": usage[1],
                                                     "invocationLatency": 42, "firstByteLatency": 7}
    return event("chunk", {"bytes": base64.b64encode(json.dumps(inner).encode()).decode()})


def answer(text: str = "Hello from Bedrock", stop: str = "end_turn", usage: tuple[int, int] = (12, 3)) -> Reply:
    """A whole answer: a Converse JSON body, or ConverseStream frames (a delta per word); for InvokeModel, its
    JSON body (token counts in headers) or its ``chunk`` events."""
    def reply(call: Call, conn: Conn) -> None:
        if call.op.startswith("invoke"):
            words = re.findall(r"\s*\S+", text) or [text]
            reason = {"end_turn": "stop", "max_tokens": "length"}.get(stop, stop)
            if call.stream:
                stream_bytes([*(invoke_chunk(w) for w in words[:-1]), invoke_chunk(words[-1], reason, usage)])(call, conn)
            else:
                conn.respond(200, {"outputs": [{"text": text, "stop_reason": reason}]},
                             {"x-amzn-RequestId": call.request_id, "x-amzn-bedrock-input-token-count": str(usage[0]),
                              "x-amzn-bedrock-output-token-count": str(usage[1])})
            return
        if call.stream:
            words = re.findall(r"\s*\S+", text) or [text]
            stream_bytes(answer_frames(words, stop, usage))(call, conn)
            return
        conn.respond(200, {
            "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": stop,
            "usage": {"inputTokens": usage[0], "outputTokens": usage[1], "totalTokens": sum(usage)},
            "metrics": {"latencyMs": 42},
        }, {"x-amzn-RequestId": call.request_id})
    return reply


# --------------------------------------------------------------------------- the stand-in


@dataclass
class BedrockStandIn:
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    session_token: str | None = None
    api_key: str = API_KEY
    region: str = REGION
    replies: list[Reply] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = LoopbackServer(self._handle)
        self.url = f"http://127.0.0.1:{self.server.port}"

    def __enter__(self) -> BedrockStandIn:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()
        self.raise_handler_errors()

    def reset(self) -> None:
        """Forget every request and script, so that one stand-in can serve test after test."""
        self.server.requests.clear()
        self.replies.clear()
        self.calls.clear()
        self.refused.clear()

    def raise_handler_errors(self) -> None:
        if self.server.errors:
            error = self.server.errors[0]
            self.server.errors.clear()
            raise error

    @property
    def requests(self) -> list[Received]:
        """Every request received, refused ones included."""
        return self.server.requests

    def _handle(self, received: Received, conn: Conn) -> None:
        request_id = f"standin-{len(self.server.requests)}"
        match = _PATH.fullmatch(received.path)
        if received.method != "POST" or match is None:
            conn.respond(404, {"message": f"no route {received.method} {received.path}"},
                         _error_headers("UnknownOperationException", request_id))
            return
        auth, refusal = self._authenticate(received)
        if refusal is not None:
            self.refused.append(refusal)
            conn.respond(403, {"message": refusal}, _error_headers(auth, request_id))
            return
        call = Call(received, unquote(match["model"]), match["op"].endswith("stream"), request_id, auth, match["op"])
        self.calls.append(call)
        (self.replies.pop(0) if self.replies else answer())(call, conn)

    def _authenticate(self, received: Received) -> tuple[str, str | None]:
        """("sigv4" | "api-key", None), or (an error type, why) for a refused request."""
        authorization = received.headers.get("authorization", "")
        if authorization.startswith("Bearer "):
            if hmac.compare_digest(authorization.removeprefix("Bearer "), self.api_key):
                return "api-key", None
            return "UnrecognizedClientException", "The API key is not valid."
        match = _AUTH.fullmatch(authorization)
        if match is None:
            return "MissingAuthenticationTokenException", "Missing or malformed Authorization header."
        if match["key"] != self.access_key:
            return "UnrecognizedClientException", "The security token included in the request is invalid."
        if (match["service"], match["region"]) != ("bedrock", self.region):
            return "InvalidSignatureException", f"Credential should be scoped to {self.region}/bedrock."
        signed = match["signed"].split(";")
        required = {"host", "x-amz-date", "content-type"} | ({"x-amz-security-token"} if self.session_token else set())
        if not required <= set(signed) or not set(signed) <= received.headers.keys():
            return "InvalidSignatureException", f"Signed headers {signed} must cover {sorted(required)} and be sent."
        if received.headers.get("x-amz-security-token") != self.session_token:
            return "UnrecognizedClientException", "The security token included in the request is invalid."
        timestamp = received.headers["x-amz-date"]
        if timestamp[:8] != match["date"]:
            return "InvalidSignatureException", "Date in Credential scope does not match X-Amz-Date."
        # rebuild the request from what arrived and sign it again, at the client's timestamp
        rebuilt = AWSRequest(method=received.method, url=f"http://{received.headers['host']}{received.path}",
                             data=received.body, headers={name: received.headers[name] for name in signed})
        rebuilt.context["timestamp"] = timestamp
        signer = SigV4Auth(Credentials(self.access_key, self.secret_key, self.session_token), "bedrock", self.region)
        expected = signer.signature(signer.string_to_sign(rebuilt, signer.canonical_request(rebuilt)), rebuilt)
        if not hmac.compare_digest(expected, match["signature"]):
            return "InvalidSignatureException", (
                "The request signature we calculated does not match the signature you provided.")
        return "sigv4", None
