"""Tool calling by prompt, for the hosts that serve Mixtral without native tools (pure; no I/O).

Mixtral-8x7B-Instruct v0.1 has no tool tokens, and NVIDIA, AIML API, Bedrock and the local backend take no
``tools`` for it. For those presets ``ToolPrompt`` turns a request with tools into a plain chat request and
the answer back into tool calls, so agent code runs unchanged on every backend:

- the tools go into the system text as ``[AVAILABLE_TOOLS] [...] [/AVAILABLE_TOOLS]`` (Mistral's own
  function-calling layout, as plain text), with how to call them and what ``tool_choice`` demands;
- earlier assistant calls become ``[TOOL_CALLS] [{"name", "arguments", "id"}]`` text, tool results become user
  text ``[TOOL_RESULTS] {"call_id", "name", "content"} [/TOOL_RESULTS]``; turns of one role are then joined;
- the answer is stopped at ``[TOOL_RESULTS]`` (a stop sequence added to the caller's, where the host takes one
  more), so a model cannot go on to invent a result;
- an answer that is ``[TOOL_CALLS]`` followed by a JSON call or list of calls, or that is nothing but such
  JSON (fenced or not) naming declared tools, becomes ``message.tool_calls`` with fresh 9-character ids and
  ``finish_reason="tool_calls"``. Text before or after the calls stays in ``content``; an answer whose calls
  do not parse, or name a tool that was not declared, is returned as the text it is: nothing is dropped.

Streams: text is passed on as it comes, except while it may still turn out to be a call. An answer that
opens with ``[TOOL_CALLS]``, ``[{``, ``{"`` or a code fence is held to its end, then given as tool-call
deltas (whole calls, one per index) or as the text; a ``[TOOL_CALLS]`` inside a text answer ends the text
there. A stream that fails gives what it held as text before the error, so ``error.partial`` has it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ._accumulate import whole_call_deltas
from ._request import ChatRequest, PromptedCalls, join_turns, message_text
from ._rewrite import held_chunk, passing
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    FunctionCall,
    ToolCall,
)

__all__ = ["CALLS", "ToolPrompt", "parse_tool_calls"]

CALLS = "[TOOL_CALLS]"
RESULTS, RESULTS_END = "[TOOL_RESULTS]", "[/TOOL_RESULTS]"
TOOLS, TOOLS_END = "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"
_TOOL_PARAMS = ("tools", "tool_choice", "parallel_tool_calls")
_FENCE_OPEN = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?")
_JSON = json.JSONDecoder()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _json_or_text(text: str) -> Any:
    """A tool result that is a JSON object or list goes into the prompt as JSON, not as an escaped string."""
    if text.lstrip().startswith(("{", "[")):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, dict | list):
            return value
    return text


def _instructions(functions: list[dict[str, Any]], choice: Any, one_at_a_time: bool) -> str:
    listing = [{"type": "function", "function": fn} for fn in functions]
    lines = [
        f"{TOOLS} {_dumps(listing)} {TOOLS_END}",
        "",
        f"To call tools, reply with {CALLS} followed by a JSON list of calls, and nothing else:",
        f'{CALLS} [{{"name": "<tool name>", "arguments": {{<arguments, as the tool\'s JSON schema says>}}}}]',
        f"Each result comes back as {RESULTS} {{...}} {RESULTS_END}.",
    ]
    if one_at_a_time:
        lines.append("Call one tool at a time.")
    else:
        lines.append("Put calls that do not depend on each other in one list.")
    if isinstance(choice, Mapping):
        lines.append(f"In this reply you must call the tool {choice['function']['name']}.")
    elif choice in ("required", "any"):
        lines.append("In this reply you must call at least one tool.")
    else:
        lines.append(f"When no tool is needed, or the results answer the question, reply in plain text without "
                     f"{CALLS}.")
    return "\n".join(lines)


def _call_text(calls: list[Mapping[str, Any]]) -> str:
    rendered = []
    for call in calls:
        fn = call["function"]
        try:
            arguments = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
        except ValueError:
            arguments = fn["arguments"]
        rendered.append({"name": fn["name"], "arguments": arguments, "id": call["id"]})
    return f"{CALLS} {_dumps(rendered)}"


def rewrite_messages(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The conversation as plain chat turns: tool calls and results as text, ``system`` added to the
    system text (after the caller's own), and consecutive turns of one role joined with a blank line."""
    names: dict[str, str] = {}
    turns: list[tuple[str, str]] = []
    for message in messages:
        role, text = message["role"], message_text(message.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            names.update((call["id"], call["function"]["name"]) for call in calls)
            text = f"{text.rstrip()}\n{_call_text(calls)}" if text.strip() else _call_text(calls)
        elif role == "tool":
            result: dict[str, Any] = {"call_id": message["tool_call_id"]}
            name = message.get("name") or names.get(message["tool_call_id"])
            if name:
                result["name"] = name
            result["content"] = _json_or_text(text)
            role, text = "user", f"{RESULTS} {_dumps(result)} {RESULTS_END}"
        turns.append((role, text))
    if system:
        leading = 0
        while leading < len(turns) and turns[leading][0] == "system":
            leading += 1
        turns.insert(leading, ("system", system))
    return [{"role": role, "content": text} for role, text in join_turns(turns)]


# --------------------------------------------------------------------------- parsing answers


def _arguments(call: Mapping[str, Any]) -> str | None:
    """The call's arguments as a JSON object string, or None when they are not an object."""
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    return _dumps(arguments) if isinstance(arguments, dict) else None


def _decode(text: str, tools: Mapping[str, Any]) -> tuple[list[FunctionCall], str] | None:
    """Calls at the start of ``text`` (after blanks and an optional code fence), and the text after them."""
    body = text.lstrip()
    fence = _FENCE_OPEN.match(body)
    if fence:
        body = body[fence.end():].lstrip()
    try:
        value, end = _JSON.raw_decode(body)
    except ValueError:
        return None
    rest = body[end:]
    if fence:
        rest = rest.lstrip()
        if not rest.startswith("```"):
            return None
        rest = rest[3:]
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, Mapping) or item.get("name") not in tools:
            return None
        arguments = _arguments(item)
        if arguments is None:
            return None
        calls.append(FunctionCall(name=item["name"], arguments=arguments))
    return (calls, rest) if calls else None


def parse_tool_calls(text: str, tools: Mapping[str, Any]) -> tuple[str | None, list[FunctionCall]] | None:
    """``(content, calls)`` when ``text`` calls declared ``tools``, else None.

    ``[TOOL_CALLS]`` may follow some text, which is kept as ``content`` as it is (a stream has sent it
    already), and may repeat; without the marker
    the whole answer must be the JSON of the calls.
    """
    start = text.find(CALLS)
    marked = start >= 0
    before, rest = (text[:start], text[start + len(CALLS):]) if marked else ("", text)
    calls: list[FunctionCall] = []
    while True:
        decoded = _decode(rest, tools)
        if decoded is None:
            if not calls:
                return None
            break
        found, rest = decoded
        calls.extend(found)
        following = rest.lstrip()
        if not following.startswith(CALLS):
            break
        rest = following[len(CALLS):]
    if not marked and rest.strip():
        return None
    content = (before if before.strip() else "") + rest.strip()  # the text before went out as it came
    return content or None, calls


# --------------------------------------------------------------------------- streams


def _call_start(head: str) -> bool | None:
    """Whether an answer opening with ``head`` (no leading blanks) may be a call; None: too short to tell."""
    if head.startswith((CALLS, "```")):
        return True
    if CALLS.startswith(head) or "```".startswith(head):
        return None
    if head[0] in "[{":  # a list of calls opens with [{, a call with {"
        rest = head[1:].lstrip()
        return None if not rest else rest[0] == ("{" if head[0] == "[" else '"')
    return False


def _marker_prefix_at_end(text: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``[TOOL_CALLS]``."""
    for size in range(min(len(text), len(CALLS) - 1), 0, -1):
        if CALLS.startswith(text[-size:]):
            return size
    return 0


class _ChoiceText:
    """One choice's content while it may still be a call: ``feed`` returns the text that can go out now."""

    __slots__ = ("held", "mode")

    def __init__(self) -> None:
        self.mode = "undecided"  # -> "text" (passed on) or "calls" (held to the end)
        self.held = ""

    def feed(self, text: str) -> str:
        self.held += text
        if self.mode == "calls":
            return ""
        if self.mode == "undecided":
            head = self.held.lstrip()
            start = _call_start(head) if head else None
            if start is None:
                return ""
            if start:
                self.mode = "calls"
                return ""
            self.mode = "text"
        at = self.held.find(CALLS)
        if at >= 0:
            out, self.held, self.mode = self.held[:at], self.held[at:], "calls"
            return out
        keep = _marker_prefix_at_end(self.held)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out


def _stop_before_made_up_results(params: dict[str, Any], max_stop: int | None) -> None:
    """Stop the answer where the model would start writing a tool's result itself (a model that calls tools
    by prompt tends to go on with an invented ``[TOOL_RESULTS]``), when the host takes one more stop."""
    stop = params.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if RESULTS not in stops and (max_stop is None or len(stops) < max_stop):
        params["stop"] = [*stops, RESULTS]


@dataclass(frozen=True, slots=True)
class ToolPrompt:
    """One request's tools, written into its prompt; reads the answer's calls back out."""

    request: ChatRequest
    #: the declared tools the model may call in this answer (empty: nothing is parsed)
    tools: Mapping[str, Any]
    one_at_a_time: bool

    @classmethod
    def for_request(cls, request: ChatRequest) -> ToolPrompt | None:
        """None when the request needs no rewriting: the preset has native tools, or the request names no
        tools and carries no tool calls or results."""
        if not request.provider.prompts_tools:
            return None
        params = request.params
        history = any(m["role"] == "tool" or m.get("tool_calls") for m in request.messages)
        if "tools" not in params and not history:
            return None
        functions = [t["function"] for t in params.get("tools", ())]
        choice = params.get("tool_choice", "auto")
        one_at_a_time = params.get("parallel_tool_calls") is False
        callable_ = [] if choice == "none" else functions
        if isinstance(choice, Mapping):
            callable_ = [fn for fn in functions if fn["name"] == choice["function"]["name"]]
        system = None
        plain = {k: v for k, v in params.items() if k not in _TOOL_PARAMS}
        if callable_:
            shown = [{k: fn[k] for k in ("name", "description", "parameters") if k in fn} for fn in callable_]
            system = _instructions(shown, choice, one_at_a_time)
            _stop_before_made_up_results(plain, request.provider.limits.max_stop)
        calls = None
        if callable_:
            calls = PromptedCalls(tuple(callable_), CALLS, one_at_a_time,
                                  required=isinstance(choice, Mapping) or choice in ("required", "any"))
        rewritten = replace(request, messages=rewrite_messages(request.messages, system), params=plain,
                            prompted_calls=calls)
        return cls(rewritten, {fn["name"]: fn for fn in callable_}, one_at_a_time)

    def _calls(self, text: str) -> tuple[str | None, list[ToolCall]] | None:
        """The answer's content and its calls, each with a fresh id; None when it calls nothing."""
        parsed = parse_tool_calls(text, self.tools) if self.tools else None
        if parsed is None:
            return None
        content, calls = parsed
        return content, [ToolCall(function=fn) for fn in calls[:1 if self.one_at_a_time else None]]

    # -- whole answers

    def completion(self, completion: ChatCompletion) -> ChatCompletion:
        choices = []
        for choice in completion.choices:
            message = choice.message
            parsed = None if message.tool_calls else self._calls(message.content or "")
            if parsed is not None:
                content, calls = parsed
                message = message.model_copy(update={"content": content, "tool_calls": calls})
                choice = choice.model_copy(update={"message": message, "finish_reason": "tool_calls"})
            choices.append(choice)
        return completion.model_copy(update={"choices": choices})

    # -- streams

    def chunks(self) -> _StreamRewrite:
        return _StreamRewrite(self)


class _StreamRewrite:
    """Chunks in, chunks out: content held per choice while it may be a call, calls given at the finish."""

    __slots__ = ("last", "open", "prompt")

    def __init__(self, prompt: ToolPrompt) -> None:
        self.prompt = prompt
        self.open: dict[int, _ChoiceText] = {}
        self.last: ChatCompletionChunk | None = None

    def _finish(self, state: _ChoiceText, text: str,
                read_calls: bool = True) -> tuple[str, list[ChoiceDeltaToolCall] | None]:
        """What a choice's last chunk carries: the text still held (or what is left of it), and its calls."""
        parsed = self.prompt._calls(state.held) if read_calls and state.mode != "text" else None
        if parsed is None:
            return text + state.held, None
        content, calls = parsed
        return text + (content or ""), whole_call_deltas(calls)

    def feed(self, chunk: ChatCompletionChunk) -> list[ChatCompletionChunk]:
        """The chunk to pass on for ``chunk`` (none when all it had is held)."""
        self.last = chunk
        if not self.prompt.tools:
            return [chunk]
        choices = []
        for choice in chunk.choices:
            if choice.delta.tool_calls:  # the host called natively after all: pass it on
                choices.append(choice)
                continue
            state = self.open.setdefault(choice.index, _ChoiceText())
            text = state.feed(choice.delta.content) if choice.delta.content else ""
            update: dict[str, Any] = {}
            if choice.finish_reason is not None:
                text, calls = self._finish(self.open.pop(choice.index), text)
                if calls:
                    update["finish_reason"] = "tool_calls"
                    update["delta"] = choice.delta.model_copy(update={"content": text or None, "tool_calls": calls})
            if "delta" not in update and text != (choice.delta.content or ""):
                update["delta"] = choice.delta.model_copy(update={"content": text or None})
            choices.append(choice.model_copy(update=update) if update else choice)
        return passing(chunk, choices)

    def end(self, failed: bool) -> list[ChatCompletionChunk]:
        """What is still held when the chunks end without a finish reason (as text or calls), or fail (as
        text)."""
        choices = []
        for index, state in sorted(self.open.items()):
            text, calls = self._finish(state, "", read_calls=not failed)
            if text or calls:
                delta = ChoiceDelta(content=text or None, tool_calls=calls)
                choices.append({"index": index, "delta": delta, "finish_reason": "tool_calls" if calls else None})
        self.open.clear()
        return held_chunk(self.last, choices)
