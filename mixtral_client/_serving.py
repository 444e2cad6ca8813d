"""The pure half of ``mixtral serve``: OpenAI request bodies in, ``create()`` arguments out; errors and stream
chunks out as OpenAI's JSON and server-sent events. No I/O, no web framework (``server.py`` is the shell).

A body is read the way OpenAI's API reads it: ``null`` is the same as absent, ``max_completion_tokens`` is
``max_tokens``, and the ``model`` must name the model this server serves. Fields that are not OpenAI
chat-completions parameters travel as ``extra_body``, so the backend decides: the local one takes ``top_k``,
OpenRouter its routing fields, and a strict host (NVIDIA) or the local backend refuses the others with an
``InvalidRequestError`` before anything is sent or computed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from ._exceptions import (
    APIError,
    APIStatusError,
    APITimeoutError,
    InvalidRequestError,
    MixtralError,
    UnsupportedFeatureError,
)
from ._params import CompletionParams, TextCompletionParams
from .types import ChatCompletionChunk, Completion, Usage

#: a stream's chunk: a chat one, or a raw prompt's (a ``Completion``, as OpenAI streams them)
Chunk = TypeVar("Chunk", ChatCompletionChunk, Completion)

__all__ = ["BodyTooLarge", "ModelNotFound", "ServedRequest", "StreamShaper", "Unauthorized", "check_model",
           "error_response", "read_body", "sse"]

_TRANSPORT = frozenset({"extra_headers", "extra_query", "extra_body", "timeout", "model"})
#: ``create()`` parameters a body may set directly; transport options (``extra_*``, ``timeout``) it may not
_PARAMS = frozenset(CompletionParams.__annotations__) - _TRANSPORT
#: the same for ``completions.create()`` (a raw prompt)
_TEXT_PARAMS = frozenset(TextCompletionParams.__annotations__) - _TRANSPORT
#: statuses of a host behind this server that are this server's fault, not the caller's: its own key
_UPSTREAM_AUTH = frozenset({401, 403})
#: response headers of a host's error worth handing on (how long to wait before a retry)
_PASSED_HEADERS = ("retry-after", "retry-after-ms")


class ModelNotFound(MixtralError):
    """The body names a model this server does not serve (HTTP 404, as OpenAI answers)."""


class Unauthorized(MixtralError):
    """The request carries no key, or not the server's (HTTP 401)."""


class BodyTooLarge(MixtralError):
    """The request body is larger than the server takes (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than this server takes ({limit} bytes)")


@dataclass(slots=True)
class ServedRequest:
    """One body, read: the arguments of ``create()`` (``messages``, or for a raw prompt ``prompt``) and whether
    the stream ends with a usage chunk."""

    messages: Any
    stream: bool
    params: dict[str, Any] = field(default_factory=dict)
    include_usage: bool = False
    prompt: Any = None


def check_model(model: str, served: frozenset[str]) -> None:
    """``ModelNotFound`` (404) unless ``model`` is one of the ``served`` names."""
    if model not in served:
        raise ModelNotFound(f"The model {model!r} does not exist; this server serves {', '.join(sorted(served))}")


def read_body(raw: bytes, served: frozenset[str], *, text: bool = False) -> ServedRequest:
    """Read a chat-completions body (with ``text``, a completions body: a raw ``prompt``); a body that is not one
    raises ``InvalidRequestError`` (400), a model not in ``served`` ``ModelNotFound`` (404). The parameters
    themselves are checked by ``create()``."""
    given = {k: v for k, v in _json_object(raw, served).items() if v is not None}
    given.pop("model", None)
    what = "prompt" if text else "messages"
    if what not in given:
        raise InvalidRequestError(f"{what}: required", param=what)
    payload, stream = given.pop(what), given.pop("stream", False)
    limit = given.pop("max_completion_tokens", None)
    if limit is not None:
        if given.setdefault("max_tokens", limit) != limit:
            raise InvalidRequestError("max_tokens and max_completion_tokens differ; send one of them",
                                      param="max_completion_tokens")
    options = given.get("stream_options")
    include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
    known = _TEXT_PARAMS if text else _PARAMS
    params = {k: v for k, v in given.items() if k in known}
    extra = {k: v for k, v in given.items() if k not in known}
    if extra:
        params["extra_body"] = extra
    if text:
        return ServedRequest(messages=None, prompt=payload, stream=stream, params=params, include_usage=include_usage)
    return ServedRequest(messages=payload, stream=stream, params=params, include_usage=include_usage)


def _json_object(raw: bytes, served: frozenset[str]) -> dict[str, Any]:
    """A request body: a JSON object (else ``InvalidRequestError``) whose ``model``, where given, is served (else
    ``ModelNotFound``)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the body must be a JSON object, got {type(body).__name__}")
    if body.get("model") is not None:
        check_model(body["model"], served)
    return body


#: the chat request's parameters that change its prompt (tools and a response format may travel in it)
_PROMPT_PARAMS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


@dataclass(frozen=True)
class Tokenize:
    """A ``/tokenize`` request: a raw ``prompt`` (with ``add_special_tokens``: BOS first), or a chat's
    ``messages`` with the parameters in ``_PROMPT_PARAMS`` (``params``)."""

    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def read_tokenize(raw: bytes, served: frozenset[str]) -> Tokenize:
    """A ``/tokenize`` body, vLLM's two shapes: ``prompt`` (a string) and ``add_special_tokens`` (default true: BOS
    first), or ``messages`` and the chat request's prompt-changing parameters (``tools``, ...): the ids the chat
    request would be prompted with. vLLM's chat flags that Mixtral's format has nothing to do with
    (``add_generation_prompt``: its ``[/INST]`` closes every user turn; ``add_special_tokens``: the format writes
    its BOS) are taken as booleans and change nothing; ``continue_final_message`` it cannot do."""
    body = _json_object(raw, served)
    flags = ("add_special_tokens", "add_generation_prompt", "continue_final_message")
    for flag in flags:
        if not isinstance(body.get(flag, False), bool):
            raise InvalidRequestError(f"{flag}: must be true or false, got {body[flag]!r}", param=flag)
    if "messages" in body:
        if "prompt" in body:
            raise InvalidRequestError("give prompt or messages, not both", param="messages")
        if body.get("continue_final_message"):
            raise InvalidRequestError("continue_final_message: Mixtral's chat format cannot leave the last "
                                      "message open", param="continue_final_message")
        messages = body["messages"]
        if not isinstance(messages, list):
            raise InvalidRequestError(f"messages: must be a list, got {messages!r}", param="messages")
        return Tokenize(messages=messages, params={k: body[k] for k in _PROMPT_PARAMS if k in body})
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt: must be a string, got {prompt!r}", param="prompt")
    return Tokenize(prompt=prompt, add_special_tokens=body.get("add_special_tokens", True))


def read_detokenize(raw: bytes, served: frozenset[str], vocab_size: int) -> list[int]:
    """A ``/detokenize`` body (vLLM's): ``tokens``, a list of token ids in the vocabulary."""
    body = _json_object(raw, served)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in tokens):
        raise InvalidRequestError(f"tokens: must be a list of token ids from 0 to {vocab_size - 1}", param="tokens")
    return tokens


def _error(message: str, kind: str, *, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _kind(status: int) -> str:
    if status >= 500:
        return "server_error"
    return {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")


def error_response(exc: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, OpenAI error body and headers for an exception raised while answering.

    A refused request is a 400 naming its parameter. A host's error keeps its status (a 429 keeps its
    ``Retry-After``), except 401/403: the key that failed is this server's, so the caller gets a 502.
    A host that cannot be reached is a 502, one that timed out a 504. Anything else is a 500.
    """
    if isinstance(exc, ModelNotFound):
        return 404, _error(str(exc), "invalid_request_error", param="model", code="model_not_found"), {}
    if isinstance(exc, Unauthorized):
        return 401, _error(str(exc), "invalid_request_error", code="invalid_api_key"), {}
    if isinstance(exc, BodyTooLarge):
        return 413, _error(str(exc), "invalid_request_error", code="request_too_large"), {}
    if isinstance(exc, InvalidRequestError):
        code = "unsupported_feature" if isinstance(exc, UnsupportedFeatureError) else None
        return 400, _error(str(exc), "invalid_request_error", param=exc.param, code=code), {}
    if isinstance(exc, APIStatusError):
        if exc.status_code in _UPSTREAM_AUTH:
            return 502, _error(f"the backend refused this server's credentials: {exc}", "authentication_error",
                               code=exc.code), {}
        if exc.status_code is None:  # an error chunk or frame that names no status
            return 502, _error(f"the backend failed: {exc}", "server_error", code=exc.code), {}
        headers = {k: v for k, v in exc.headers.items() if k.lower() in _PASSED_HEADERS}
        return exc.status_code, _error(str(exc), _kind(exc.status_code), code=exc.code), headers
    if isinstance(exc, APITimeoutError):
        return 504, _error(f"the backend timed out: {exc}", "timeout_error"), {}
    if isinstance(exc, APIError):  # refused, reset, cut or unreadable
        return 502, _error(f"the backend could not be reached: {exc}", "api_connection_error", code=exc.code), {}
    return 500, _error(f"internal error: {type(exc).__name__}", "server_error"), {}


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    payload = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return b"data: " + payload.encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class StreamShaper(Generic[Chunk]):
    """Backends put ``usage`` where they like (on the finish chunk, in a chunk of its own); OpenAI's stream
    carries it in one last chunk with no choices, and only when ``stream_options.include_usage`` asked.
    ``feed`` gives the chunk to send (usage taken off) or ``None``; ``end`` gives the usage chunk, if owed."""

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.usage: Usage | None = None
        self.last: Chunk | None = None

    def feed(self, chunk: Chunk) -> Chunk | None:
        self.last = chunk
        if chunk.usage is not None:
            self.usage = chunk.usage
            chunk = chunk.model_copy(update={"usage": None})
        return chunk if chunk.choices else None

    def end(self) -> Chunk | None:
        if not self.include_usage or self.last is None:
            return None
        return self.last.model_copy(update={"choices": [], "usage": self.usage})
