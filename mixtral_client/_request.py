"""Building and validating a chat request, with no I/O.

``build_request()`` turns the keyword arguments of ``create()`` into a ``ChatRequest`` or raises
``InvalidRequestError`` naming the parameter and the limit. Every backend receives a validated
``ChatRequest``; an invalid request never reaches a socket, a signer or a GPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import InvalidRequestError, UnsupportedFeatureError
from ._params import Prompt
from ._providers import ProviderPreset
from ._response import ResponseRecord
from ._timeouts import Timeout

__all__ = ["ChatRequest", "RequestOptions", "build_request", "join_turns", "message_text"]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOOL_CHOICE_WORDS = frozenset({"auto", "none", "required", "any"})
_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
#: the body fields of OpenAI's chat-completions API (what a strict host accepts)
_OPENAI_BODY_FIELDS = frozenset({
    "model", "messages", "stream", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
    "n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "tools", "tool_choice",
    "response_format", "stream_options", "user", "logit_bias", "parallel_tool_calls",
})


@dataclass(slots=True)
class RequestOptions:
    """Per-request transport options (the ``extra_*`` and ``timeout`` arguments of ``create``)."""

    timeout: Timeout
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    extra_query: Mapping[str, Any] = field(default_factory=dict)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    record: ResponseRecord | None = None  # with_raw_response: the sender notes its attempts and the answering response


@dataclass(frozen=True, slots=True)
class PromptedCalls:
    """How the answer may call tools when they travel in the prompt: ``marker`` and a JSON list of calls
    (``{"name", "arguments"}``) of ``functions``, exactly one when ``one``; ``required`` (``tool_choice``
    demands a call): nothing else, else the answer may also be text that does not open with ``marker``. Set
    by ``ToolPrompt``; a backend that constrains its decoding (local) enforces it, a host only reads the prompt.
    """

    functions: tuple[Mapping[str, Any], ...]
    marker: str
    one: bool
    required: bool


@dataclass(slots=True)
class ChatRequest:
    """A validated chat-completions request for one provider.

    ``params`` holds only the OpenAI sampling/tool parameters the caller gave (never ``None`` values);
    ``options.extra_body`` is merged into the wire body last, so it can add or override fields.
    """

    provider: ProviderPreset
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    stream: bool
    options: RequestOptions
    prompted_calls: PromptedCalls | None = None
    #: a raw prompt (``client.completions``): sent as it is, with no chat template; ``messages`` is then empty.
    #: A text, or (checked) several texts, token ids, or several lists of ids: ``prompts()`` lists them
    prompt: Prompt | None = None

    def prompts(self) -> list[str | list[int]]:
        """A raw-prompt request's prompts, each a text or a list of token ids (the answer has ``n`` choices for
        each, prompt ``i``'s at indices ``i * n`` to ``i * n + n - 1``)."""
        prompt = self.prompt
        if prompt is None:
            return []
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def body(self) -> dict[str, Any]:
        """The OpenAI chat-completions JSON body; for a raw prompt, the completions body (whose ``logprobs`` is
        the number of alternatives, which a chat request gives as ``top_logprobs``)."""
        if self.prompt is None:
            body: dict[str, Any] = {"model": self.model, "messages": self.messages, **self.params}
        else:
            params = dict(self.params)
            if params.pop("logprobs", False):
                params["logprobs"] = params.pop("top_logprobs", 0)
            body = {"model": self.model, "prompt": self.prompt, **params}
        if self.stream:
            body["stream"] = True
        if self.options.extra_body:
            body.update(self.options.extra_body)
        return body

    def extra(self, key: str, default: Any = None) -> Any:
        """A provider-specific field given through ``extra_body`` (e.g. ``top_k``)."""
        return self.options.extra_body.get(key, default)


def _fail(message: str, param: str, preset: ProviderPreset) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param, provider=preset.name)


#: the most prompts one request may carry (OpenAI's limit for a list of prompts)
MAX_PROMPTS = 2048


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def _check_prompt(prompt: Any, preset: ProviderPreset) -> Prompt:
    """A raw prompt as OpenAI takes it, copied: a non-empty text, a list of them, a non-empty list of token ids
    (integers >= 0), or a list of those lists; anything else (an empty one, a mix) is refused."""
    if isinstance(prompt, str) and prompt:
        return prompt
    what = ("must be a non-empty string, a list of strings, a list of token ids (integers >= 0) or a list of "
            "such lists")
    if not isinstance(prompt, list) or not prompt:
        raise _fail(f"{what}, got {_short(prompt)}", "prompt", preset)
    if len(prompt) > MAX_PROMPTS and not all(isinstance(t, int) for t in prompt):
        raise _fail(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}", "prompt", preset)
    if all(isinstance(p, str) for p in prompt):
        empty = [i for i, p in enumerate(prompt) if not p]
        if empty:
            raise _fail(f"prompt[{empty[0]}] is empty", "prompt", preset)
        return list(prompt)
    if _token_ids(prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        bad = [i for i, p in enumerate(prompt) if not _token_ids(p)]
        if bad:
            raise _fail(f"prompt[{bad[0]}] is not a non-empty list of token ids (integers >= 0)", "prompt", preset)
        return [list(p) for p in prompt]
    raise _fail(f"{what}, not a mix of them", "prompt", preset)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value: Any, param: str, preset: ProviderPreset, lo: float, hi: float | None,
            integer: bool = False, above: bool = False) -> None:
    """``value`` is a finite number (an integer with ``integer``) from ``lo`` (excluded with ``above``) to
    ``hi``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise _fail(f"must be {kind}, got {value!r}", param, preset)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(f"must be finite, got {value!r}", param, preset)
    if value < lo or (above and value == lo) or (hi is not None and value > hi):
        rng = f"between {lo:g}{' (excluded)' if above else ''} and {hi:g}" if hi is not None else \
            f"{'>' if above else '>='} {lo:g}"
        raise _fail(f"{preset.name} accepts {rng}, got {value!r}", param, preset)


def message_text(content: Any) -> str:
    """A validated message's content as one string (``None`` is empty, text parts are joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def join_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive turns of one role as one turn, their non-empty texts joined with a blank line (Mixtral's
    template wants the roles to alternate; mistral-common joins them the same way)."""
    merged: list[tuple[str, list[str]]] = []
    for role, text in turns:
        if merged and merged[-1][0] == role:
            merged[-1][1].append(text)
        else:
            merged.append((role, [text]))
    return [(role, "\n\n".join(t for t in texts if t)) for role, texts in merged]


def _check_content(content: Any, where: str, preset: ProviderPreset, *, may_be_none: bool) -> None:
    if content is None:
        if not may_be_none:
            raise _fail("content is missing", where, preset)
        return
    if isinstance(content, str):
        return
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _fail(f"content part {j} must be {{'type': 'text', 'text': str}} (Mixtral reads text only)",
                            where, preset)
        return
    raise _fail(f"content must be a string, a list of text parts or None, got {type(content).__name__}",
                where, preset)


def _check_messages(messages: Any, preset: ProviderPreset) -> list[dict[str, Any]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise _fail("must be a list of message dicts", "messages", preset)
    if not messages:
        raise _fail("must not be empty", "messages", preset)
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise _fail(f"must be a dict, got {type(msg).__name__}", where, preset)
        role = msg.get("role")
        if role not in ROLES:
            raise _fail(f"role must be one of {sorted(ROLES)}, got {role!r}", where, preset)
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise _fail("only assistant messages carry tool_calls", where, preset)
            if not isinstance(tool_calls, list):
                raise _fail("tool_calls must be a list", where, preset)
            for j, call in enumerate(tool_calls):
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(call, Mapping) or not isinstance(call.get("id"), str) or not isinstance(fn, Mapping) \
                        or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
                    raise _fail(f"tool_calls[{j}] needs id, function.name and function.arguments (strings)",
                                where, preset)
        if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
            raise _fail("a tool message needs tool_call_id", where, preset)
        _check_content(msg.get("content"), where, preset, may_be_none=role == "assistant" and bool(tool_calls))
        out.append(dict(msg))
    return out


def _check_tools(tools: Any, tool_choice: Any, preset: ProviderPreset) -> None:
    if tools is not None:
        if preset.tools == "none":
            raise UnsupportedFeatureError(
                f"tools: {preset.name} does not support tool calling for Mixtral", param="tools", provider=preset.name
            )
        if not isinstance(tools, list) or not tools:
            raise _fail("must be a non-empty list of tool dicts", "tools", preset)
        names = set()
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, Mapping) else None
            if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
                raise _fail(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools", preset)
            name = fn.get("name")
            if not isinstance(name, str) or not _TOOL_NAME.match(name):
                raise _fail(f"tools[{i}].function.name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}", "tools", preset)
            if name in names:
                raise _fail(f"tool name {name!r} is declared twice", "tools", preset)
            names.add(name)
            params = fn.get("parameters")
            if params is not None and not isinstance(params, Mapping):
                raise _fail(f"tools[{i}].function.parameters must be a JSON-schema dict", "tools", preset)
    if tool_choice is not None:
        if tools is None:
            raise _fail("tool_choice needs tools", "tool_choice", preset)
        if isinstance(tool_choice, str):
            if tool_choice not in _TOOL_CHOICE_WORDS:
                raise _fail(f"must be one of {sorted(_TOOL_CHOICE_WORDS)} or a function dict", "tool_choice", preset)
        elif isinstance(tool_choice, Mapping):
            fn = tool_choice.get("function")
            name = fn.get("name") if isinstance(fn, Mapping) else None
            declared = {t["function"]["name"] for t in tools}
            if name not in declared:
                raise _fail(f"names {name!r}, which is not among the tools", "tool_choice", preset)
        else:
            raise _fail(f"must be a string or a dict, got {tool_choice!r}", "tool_choice", preset)


LOGIT_BIAS_MAX = 300  # the most tokens one request may bias (OpenAI's limit)


def _logit_bias(value: Any, preset: ProviderPreset) -> dict[str, float]:
    """``{token id: bias}`` with ids as OpenAI's JSON has them (strings of digits), each bias in -100..100."""
    if not isinstance(value, Mapping):
        raise _fail(f"must be a dict of token id -> bias, got {value!r}", "logit_bias", preset)
    if len(value) > LOGIT_BIAS_MAX:
        raise _fail(f"biases at most {LOGIT_BIAS_MAX} tokens, got {len(value)}", "logit_bias", preset)
    checked: dict[str, float] = {}
    for key, bias in value.items():
        token = str(key)
        if isinstance(key, bool) or not token.isdigit():
            raise _fail(f"keys are token ids (integers >= 0), got {key!r}", "logit_bias", preset)
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise _fail(f"token {token}: the bias must be a number from -100 to 100, got {bias!r}", "logit_bias",
                        preset)
        checked[str(int(token))] = bias
    return checked


#: the chat parameters a raw prompt cannot take (they act on messages or on a chat answer)
_CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


def build_request(
    preset: ProviderPreset,
    *,
    model: str | None,
    messages: Any,
    stream: bool,
    options: RequestOptions,
    params: dict[str, Any],
    prompt: Any = None,
) -> ChatRequest:
    """Validate everything ``create()`` was given against the provider's limits. With ``prompt`` (and
    ``messages`` None) it is a raw-prompt request (``client.completions.create``)."""
    limits = preset.limits
    given = {k: v for k, v in params.items() if v is not None}
    if model is not None and (not isinstance(model, str) or not model):
        raise _fail(f"must be a non-empty string, got {model!r}", "model", preset)
    if messages is None:
        prompt = _check_prompt(prompt, preset)
        for name in _CHAT_ONLY:
            if name in given:
                raise _fail("applies to chat completions only (client.chat.completions.create)", name, preset)
        checked: list[dict[str, Any]] = []
    else:
        checked = _check_messages(messages, preset)
    if not isinstance(stream, bool):
        raise _fail(f"must be True or False, got {stream!r}", "stream", preset)

    if "temperature" in given:
        _number(given["temperature"], "temperature", preset, *limits.temperature)
    if "top_p" in given:
        _number(given["top_p"], "top_p", preset, *limits.top_p)
    if "echo" in given:
        if messages is not None:
            raise _fail("applies to raw prompts only (client.completions.create)", "echo", preset)
        if not isinstance(given["echo"], bool):
            raise _fail(f"must be True or False, got {given['echo']!r}", "echo", preset)
    if "max_tokens" in given:
        lo, hi = limits.max_tokens
        if given.get("echo") is True:
            lo = 0  # echo with max_tokens=0 scores the prompt alone
        _number(given["max_tokens"], "max_tokens", preset, lo, hi, integer=True)
    if "seed" in given:
        lo_s, hi_s = limits.seed or (-(2**63), 2**63 - 1)
        _number(given["seed"], "seed", preset, lo_s, hi_s, integer=True)
    if "n" in given:
        _number(given["n"], "n", preset, 1, limits.n_max, integer=True)
    for name in ("presence_penalty", "frequency_penalty"):
        if name in given:
            _number(given[name], name, preset, *limits.penalty)
    if "stop" in given:
        stop = given["stop"]
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not stops or not all(isinstance(s, str) and s for s in stops):
            raise _fail("must be a non-empty string or a list of them", "stop", preset)
        if limits.max_stop is not None and len(stops) > limits.max_stop:
            raise _fail(f"{preset.name} accepts at most {limits.max_stop} stop sequences, got {len(stops)}",
                        "stop", preset)
    if "logprobs" in given and not isinstance(given["logprobs"], bool):
        raise _fail("must be True or False", "logprobs", preset)
    if "top_logprobs" in given:
        _number(given["top_logprobs"], "top_logprobs", preset, *limits.top_logprobs, integer=True)
        if not given.get("logprobs"):
            raise _fail("needs logprobs=True", "top_logprobs", preset)
    if "logit_bias" in given:
        given["logit_bias"] = _logit_bias(given["logit_bias"], preset)
    _check_tools(given.get("tools"), given.get("tool_choice"), preset)
    if "parallel_tool_calls" in given:
        if not isinstance(given["parallel_tool_calls"], bool):
            raise _fail(f"must be True or False, got {given['parallel_tool_calls']!r}", "parallel_tool_calls", preset)
        if "tools" not in given:
            raise _fail("parallel_tool_calls needs tools", "parallel_tool_calls", preset)
    if "response_format" in given:
        fmt = given["response_format"]
        kind = fmt.get("type") if isinstance(fmt, Mapping) else None
        if kind not in _RESPONSE_FORMATS:
            raise _fail(f"type must be one of {sorted(_RESPONSE_FORMATS)}", "response_format", preset)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, Mapping):
                raise _fail("json_schema format needs a 'json_schema' dict", "response_format", preset)
            if "schema" in spec and not isinstance(spec["schema"], Mapping):
                raise _fail(f"json_schema.schema must be a JSON schema object (a dict), got {spec['schema']!r}",
                            "response_format", preset)
    if "stream_options" in given:
        if not stream:
            raise _fail("only applies when stream=True", "stream_options", preset)
        if not isinstance(given["stream_options"], Mapping):
            raise _fail("must be a dict such as {'include_usage': True}", "stream_options", preset)
    if "user" in given and not isinstance(given["user"], str):
        raise _fail("must be a string", "user", preset)
    if preset.strict_body:
        unknown = sorted(set(options.extra_body) - _OPENAI_BODY_FIELDS - preset.extra_body_keys)
        if unknown:
            raise _fail(f"{preset.name} rejects unknown body fields ({', '.join(unknown)}); send only the "
                        "OpenAI chat-completions fields", "extra_body", preset)
    top_k = options.extra_body.get("top_k")
    if top_k is not None and limits.top_k is not None:
        _number(top_k, "top_k", preset, *limits.top_k, integer=True)
    min_p = options.extra_body.get("min_p")
    if min_p is not None and limits.min_p is not None:
        _number(min_p, "min_p", preset, *limits.min_p)
    repetition = options.extra_body.get("repetition_penalty")
    if repetition is not None and limits.repetition_penalty is not None:
        _number(repetition, "repetition_penalty", preset, *limits.repetition_penalty, above=True)

    return ChatRequest(
        provider=preset,
        model=preset.resolve_model(model),
        messages=checked,
        params=given,
        stream=stream,
        options=options,
        prompt=prompt if messages is None else None,
    )
