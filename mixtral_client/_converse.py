"""Bedrock's Converse API for Mixtral (and InvokeModel for raw prompts): request bodies, answers, stream events
and errors, with no I/O.

- ``converse_body()`` turns a validated ``ChatRequest`` into a Converse body. Mixtral on Bedrock refuses
  system messages, so they are folded into the first user turn (``system + "\\n\\n" + user``, as
  Mixtral's own chat template does); consecutive turns of one role are merged (Bedrock wants user and
  assistant to alternate); a last assistant turn stays (a prefill). Parameters Converse cannot carry
  for Mixtral raise ``UnsupportedFeatureError`` before anything is signed or sent.
- ``completion_from_converse()`` and ``chunk_from_event()`` map answers and stream events onto the
  OpenAI-shaped types; ``finish_reason()`` maps stop reasons.
- ``api_error()`` is the one place a Bedrock error type (``x-amzn-errortype`` header, exception frame)
  becomes a class of the error tree.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

from ._exceptions import APIStatusError, InvalidRequestError, UnsupportedFeatureError, status_error_for
from ._request import ChatRequest, join_turns, message_text
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    Usage,
)

__all__ = [
    "ERROR_STATUS",
    "api_error",
    "chunk_from_event",
    "completion_from_converse",
    "completion_from_invoke",
    "converse_body",
    "converse_messages",
    "converse_path",
    "finish_reason",
    "invoke_body",
    "invoke_path",
    "model_from_path",
]

#: Converse stop reasons that are not OpenAI finish reasons already
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "content_filtered": "content_filter",
    "guardrail_intervened": "content_filter",
}

#: Bedrock error types (lower-cased: headers say ``ThrottlingException``, frames ``throttlingException``)
#: and the HTTP status Bedrock documents for each; a frame carries no status of its own.
#: ``modelTimeoutException`` is a 408 status error (retried before the first chunk like any 408), not an
#: ``APITimeoutError``: that class is kept for the client's own deadlines.
ERROR_STATUS: Mapping[str, int] = {
    "validationexception": 400,
    "servicequotaexceededexception": 400,
    "unrecognizedclientexception": 403,
    "invalidsignatureexception": 403,
    "expiredtokenexception": 403,
    "accessdeniedexception": 403,
    "resourcenotfoundexception": 404,
    "modeltimeoutexception": 408,
    "modelerrorexception": 424,
    "throttlingexception": 429,
    "modelnotreadyexception": 429,
    "internalserverexception": 500,
    "modelstreamerrorexception": 500,
    "serviceunavailableexception": 503,
}

#: request parameters Converse and InvokeModel cannot carry for Mixtral (sending them would be ignored at best)
_UNSUPPORTED = ("seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias", "echo")
#: parameters with no effect on Bedrock that are dropped: n is at most 1 (checked by the preset),
#: usage is always streamed, ``user`` has no Converse field
_IGNORED = frozenset({"n", "stream_options", "user"})


# --------------------------------------------------------------------------- requests


def converse_path(model: str, stream: bool) -> str:
    """``/model/{id}/converse`` or ``/converse-stream``, the id percent-encoded whole (``:`` -> ``%3A``)."""
    return f"/model/{quote(model, safe='')}/{'converse-stream' if stream else 'converse'}"


def model_from_path(raw_path: str) -> str:
    """The model id from a raw ``converse_path()`` (the inverse; a query string is ignored)."""
    segments = raw_path.partition("?")[0].split("/")
    return unquote(segments[-2]) if len(segments) >= 3 else ""


def _unsupported(message: str, param: str, provider: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"{param}: {message}", param=param, provider=provider)


def converse_messages(messages: list[dict[str, Any]], provider: str = "bedrock") -> list[dict[str, Any]]:
    """OpenAI messages as Converse messages, in the shape Mixtral on Bedrock accepts.

    System (and developer) messages are joined with blank lines and prefixed to the first user turn;
    blank turns are dropped (Bedrock refuses blank text); consecutive turns of one role are joined with
    blank lines. A conversation that opens with an assistant turn gets the system text as its first
    user turn, and is refused when there is none (an empty user turn would be refused by Bedrock).
    """
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "tool" or message.get("tool_calls"):
            raise _unsupported("Mixtral on Bedrock has no tool turns; the client sends them as text "
                               "(mixtral_client._tools)", f"messages[{i}]", provider)
        text = message_text(message.get("content"))
        if role in ("system", "developer"):
            if text.strip():
                system.append(text)
        elif text.strip():
            turns.append((role, text))
    if system:
        prompt = "\n\n".join(system)
        if turns and turns[0][0] == "user":
            turns[0] = ("user", f"{prompt}\n\n{turns[0][1]}")
        else:
            turns.insert(0, ("user", prompt))
    if not turns:
        raise InvalidRequestError("messages: no message has any text", param="messages", provider=provider)
    if turns[0][0] != "user":
        raise InvalidRequestError(
            "messages: Mixtral on Bedrock needs a user (or system) message before the first assistant message",
            param="messages", provider=provider,
        )
    return [{"role": role, "content": [{"text": text}]} for role, text in join_turns(turns)]


def converse_body(request: ChatRequest) -> dict[str, Any]:
    """The Converse (and ConverseStream) body for a validated request.

    ``extra_body["top_k"]`` goes to ``additionalModelRequestFields``; any other ``extra_body`` key is
    merged into the body as given (``guardrailConfig``, ``performanceConfig``, ``requestMetadata``, ...).
    """
    provider = request.provider.name
    params = _checked_params(request)
    config: dict[str, Any] = {}
    if "max_tokens" in params:
        config["maxTokens"] = params["max_tokens"]
    if "temperature" in params:
        config["temperature"] = params["temperature"]
    if "top_p" in params:
        config["topP"] = params["top_p"]
    if "stop" in params:
        config["stopSequences"] = _stops(params["stop"])

    body: dict[str, Any] = {"messages": converse_messages(request.messages, provider)}
    if config:
        body["inferenceConfig"] = config
    extra = dict(request.options.extra_body)
    top_k = extra.pop("top_k", None)
    if top_k is not None:
        body["additionalModelRequestFields"] = {"top_k": top_k}
    return _merged(body, extra)


def invoke_path(model: str, stream: bool) -> str:
    """InvokeModel's ``/model/{id}/invoke`` or ``/invoke-with-response-stream`` (raw prompts)."""
    return f"/model/{quote(model, safe='')}/{'invoke-with-response-stream' if stream else 'invoke'}"


def invoke_body(request: ChatRequest) -> dict[str, Any]:
    """The InvokeModel body for a raw prompt (``client.completions``): Mistral's native request, ``prompt``
    as written, the sampling parameters by their own names, ``extra_body`` (``top_k``, ...) merged in."""
    params = _checked_params(request)
    if not isinstance(request.prompt, str):
        raise _unsupported("InvokeModel takes one prompt, as text (not a list of prompts or token ids)", "prompt",
                           request.provider.name)
    body: dict[str, Any] = {"prompt": request.prompt}
    body.update({name: params[name] for name in ("max_tokens", "temperature", "top_p") if name in params})
    if "stop" in params:
        body["stop"] = _stops(params["stop"])
    return _merged(body, dict(request.options.extra_body))


def _stops(stop: str | list[str]) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop)


def _merged(body: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra_body`` over ``body``: a dict given for a dict field is merged into it."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


def _checked_params(request: ChatRequest) -> dict[str, Any]:
    """The request's parameters, once none is one that Mixtral on Bedrock cannot take."""
    provider = request.provider.name
    params = request.params
    for name in _UNSUPPORTED:
        if name in params and params[name] is not False:
            raise _unsupported("Mixtral on Bedrock does not support it", name, provider)
    for name in ("tools", "tool_choice"):  # the client writes tools into the prompt before this is reached
        if name in params:
            raise _unsupported("Mixtral on Bedrock has no toolConfig; the client sends tools in the prompt "
                               "(mixtral_client._tools)", name, provider)
    fmt = params.get("response_format")
    if fmt is not None and fmt.get("type") != "text":
        raise _unsupported("Mixtral on Bedrock has no structured output; the client writes response_format "
                           "into the prompt (mixtral_client._format)", "response_format", provider)

    known = {"max_tokens", "temperature", "top_p", "stop", "response_format", *_UNSUPPORTED, *_IGNORED}
    leftover = sorted(params.keys() - known)
    if leftover:  # build_request() admits nothing else today; refuse rather than drop what a newer one admits
        raise _unsupported("not supported by Mixtral on Bedrock", leftover[0], provider)
    return params


# --------------------------------------------------------------------------- answers


def finish_reason(stop_reason: Any) -> str | None:
    """A Converse ``stopReason`` as an OpenAI ``finish_reason`` (unknown reasons pass through)."""
    if stop_reason is None:
        return None
    reason = str(stop_reason)
    return _FINISH_REASONS.get(reason, reason)


def _usage(payload: Any) -> Usage | None:
    usage = payload.get("usage") if isinstance(payload, Mapping) else None
    if not isinstance(usage, Mapping):
        return None
    prompt = int(usage.get("inputTokens") or 0)
    completion = int(usage.get("outputTokens") or 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=int(usage.get("totalTokens") or prompt + completion))


def completion_from_converse(body: Mapping[str, Any], *, id: str, model: str, created: int) -> ChatCompletion:
    """A Converse answer as a ``ChatCompletion``; ``metrics`` (``latencyMs``) is kept as an extra field."""
    message = body.get("output", {}).get("message", {})
    text = "".join(block.get("text", "") for block in message.get("content", []) if isinstance(block, Mapping))
    choice = Choice(index=0, message=ChatCompletionMessage(role=message.get("role", "assistant"), content=text),
                    finish_reason=finish_reason(body.get("stopReason")))
    extra = {"metrics": body["metrics"]} if "metrics" in body else {}
    return ChatCompletion(id=id, created=created, model=model, choices=[choice], usage=_usage(body), **extra)


def _invoke_usage(input_tokens: Any, output_tokens: Any) -> Usage | None:
    if input_tokens is None and output_tokens is None:
        return None
    prompt, completion = int(input_tokens or 0), int(output_tokens or 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_from_invoke(body: Mapping[str, Any], headers: Mapping[str, str], *, id: str, model: str,
                           created: int) -> ChatCompletion:
    """An InvokeModel answer (``{"outputs": [{"text", "stop_reason"}]}``) as a ``ChatCompletion``, its token
    counts from the ``x-amzn-bedrock-*-token-count`` headers."""
    outputs = body["outputs"]
    if not isinstance(outputs, list):
        raise ValueError("'outputs' is not a list")
    choices = [Choice(index=i, message=ChatCompletionMessage(content=out.get("text") or ""),
                      finish_reason=finish_reason(out.get("stop_reason"))) for i, out in enumerate(outputs)]
    usage = _invoke_usage(headers.get("x-amzn-bedrock-input-token-count"),
                          headers.get("x-amzn-bedrock-output-token-count"))
    return ChatCompletion(id=id, created=created, model=model, choices=choices, usage=usage)


def _invoke_chunk(payload: Mapping[str, Any], *, id: str, model: str, created: int) -> ChatCompletionChunk | None:
    """An InvokeModelWithResponseStream ``chunk`` event: ``{"bytes": base64 of {"outputs": [...]}}``; the last
    adds ``amazon-bedrock-invocationMetrics`` (the usage)."""
    try:
        inner = json.loads(base64.b64decode(payload.get("bytes") or "", validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"a chunk event whose bytes are not base64 JSON: {exc}") from exc
    if not isinstance(inner, Mapping):
        return None
    choices = [ChunkChoice(index=i, delta=ChoiceDelta(content=out.get("text") or None),
                           finish_reason=finish_reason(out.get("stop_reason")))
               for i, out in enumerate(inner.get("outputs") or []) if isinstance(out, Mapping)]
    metrics = inner.get("amazon-bedrock-invocationMetrics")
    usage = _invoke_usage(metrics.get("inputTokenCount"), metrics.get("outputTokenCount")) \
        if isinstance(metrics, Mapping) else None
    if not choices and usage is None:
        return None
    extra = {"metrics": metrics} if isinstance(metrics, Mapping) else {}
    return ChatCompletionChunk(id=id, created=created, model=model, choices=choices, usage=usage, **extra)


def chunk_from_event(event_type: str, payload: Any, *, id: str, model: str,
                     created: int) -> ChatCompletionChunk | None:
    """One ConverseStream (or InvokeModelWithResponseStream) event as a chunk, or None for events that carry
    nothing for the caller.

    ``messageStart`` gives the role, ``contentBlockDelta`` text, ``messageStop`` the finish reason and
    ``metadata`` (the last event) the usage, on a chunk without choices as OpenAI streams it. InvokeModel's
    ``chunk`` events carry text, the stop reason and, on the last, the usage (``_invoke_chunk``).
    """
    if not isinstance(payload, Mapping):
        return None
    delta: ChoiceDelta | None = None
    reason: str | None = None
    if event_type == "chunk":
        return _invoke_chunk(payload, id=id, model=model, created=created)
    if event_type == "messageStart":
        delta = ChoiceDelta(role=payload.get("role") or "assistant")
    elif event_type == "contentBlockDelta":
        inner = payload.get("delta")
        text = inner.get("text") if isinstance(inner, Mapping) else None
        if not text:
            return None
        delta = ChoiceDelta(content=text)
    elif event_type == "messageStop":
        delta, reason = ChoiceDelta(), finish_reason(payload.get("stopReason") or "end_turn")
    elif event_type == "metadata":
        extra = {"metrics": payload["metrics"]} if "metrics" in payload else {}
        return ChatCompletionChunk(id=id, created=created, model=model, choices=[], usage=_usage(payload),
                                   **extra)
    else:  # contentBlockStart, contentBlockStop, events added later
        return None
    return ChatCompletionChunk(id=id, created=created, model=model,
                               choices=[ChunkChoice(index=0, delta=delta, finish_reason=reason)])


# --------------------------------------------------------------------------- errors


def api_error(error_type: str | None, message: str, *, status: int | None = None, provider: str,
              request_id: str | None, body: Any = None, headers: Mapping[str, str] | None = None) -> APIStatusError:
    """The typed error for a Bedrock error type (``x-amzn-errortype`` or ``:exception-type``).

    ``status`` is the HTTP status when there is one; an exception frame has none, so the status Bedrock
    documents for its type is used (unknown types stay a plain ``APIStatusError``).
    """
    kind = (error_type or "").split(":", 1)[0].strip() or None
    if status is None and kind is not None:
        status = ERROR_STATUS.get(kind.lower())
    where = f"{kind}: " if kind else ""
    return status_error_for(status)(f"{where}{message}", status_code=status, provider=provider,
                                    request_id=request_id, body=body, code=kind, headers=dict(headers or {}))
