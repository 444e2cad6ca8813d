"""``response_format`` by prompt, for the hosts that take none for Mixtral (NVIDIA, AIML API, Bedrock; pure).

``FormatPrompt`` moves a ``json_object`` or ``json_schema`` format out of the body and into the conversation,
and cuts the JSON out of the answer, so code that asks for JSON runs unchanged on every backend:

- the last user turn gains the instruction: one JSON object (or array, as the schema's root says) and
  nothing else, following the schema written out in full;
- the answer's ``content`` becomes the JSON alone. An answer that opens with ``{`` (or ``[``), after
  blanks, is the JSON up to the bracket that closes it; what follows is dropped. Any other answer (a code
  fence, a sentence first) is searched for the first JSON value of the right kind, and is that value when
  one is found. An answer with no such JSON is returned as the text it is: nothing is dropped.

This asks for the schema; it cannot enforce it. ``chat.completions.parse()`` validates the answer, and the
local backend enforces the schema while it decodes.

Streams: an answer that opens with ``{`` passes as it comes, up to its closing bracket; any other is held to
its end and then given as above. Tool calls are left as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ._request import ChatRequest, message_text
from ._rewrite import held_chunk, passing
from .types import ChatCompletion, ChatCompletionChunk, ChoiceDelta

__all__ = ["FormatPrompt", "cut_json", "find_json"]

_JSON = json.JSONDecoder()
_FENCED = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)```", re.DOTALL)
_OPENS = {"object": "{", "array": "["}
#: how many openings ``find_json`` tries before it gives up on a long answer full of brackets
_MAX_TRIES = 256


def _opening(root: str | None) -> str:
    """The characters a JSON value of the kind ``root`` may open with."""
    return _OPENS.get(root or "", "{[")


def _root(fmt: Mapping[str, Any]) -> str | None:
    """``"object"``, ``"array"``, or None (any JSON) for what the format asks the answer to be."""
    if fmt["type"] == "json_object":
        return "object"
    schema = fmt["json_schema"].get("schema")
    if not isinstance(schema, Mapping):
        return "object"  # OpenAI's default: a schema-less json_schema format is an object
    kind = schema.get("type")
    if kind in _OPENS:
        return str(kind)
    if kind is None and "properties" in schema:
        return "object"
    return None


def _instruction(fmt: Mapping[str, Any], root: str | None, tools_callable: bool) -> str:
    what = {"object": "one JSON object", "array": "one JSON array", None: "JSON"}[root]
    lead = f"When you answer without calling a tool, reply with {what}" if tools_callable else f"Reply with {what}"
    bare = "and nothing else: no code fence, no text before or after it."
    if fmt["type"] == "json_object":
        return f"{lead} {bare}"
    spec = fmt["json_schema"]
    schema = spec.get("schema")
    about = f" {spec['description'].strip()}" if isinstance(spec.get("description"), str) else ""
    if not isinstance(schema, Mapping):
        return f"{lead} {bare}{about}"
    return (f"{lead} that follows this JSON schema, {bare}{about}\n"
            f"{json.dumps(schema, ensure_ascii=False)}")


class _Scan:
    """Where a JSON value that opened with a bracket closes, fed piece by piece (string-aware bracket depth)."""

    __slots__ = ("depth", "escape", "string")

    def __init__(self) -> None:
        self.depth = 0
        self.string = False
        self.escape = False

    def feed(self, text: str) -> int | None:
        """The index in ``text`` just past the closing bracket, or None while the value is still open."""
        for i, c in enumerate(text):
            if self.string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.string = False
            elif c == '"':
                self.string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
        return None


def _fits(value: Any, root: str | None) -> bool:
    if root == "object":
        return isinstance(value, dict)
    if root == "array":
        return isinstance(value, list)
    return True


def find_json(text: str, root: str | None) -> str | None:
    """The first JSON value of the kind ``root`` asks for in ``text``: the whole text, a fenced block, or
    the first bracket that opens one; None when there is none."""
    candidates: list[str] = [text.strip(), *(m.group(1).strip() for m in _FENCED.finditer(text))]
    for n, candidate in enumerate(candidates):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if _fits(value, root) and (n == 0 or isinstance(value, dict | list)):  # a bare 42 only as the whole
            return candidate
    opens = _opening(root)
    tries = 0
    for i, c in enumerate(text):
        if c not in opens:
            continue
        try:
            value, end = _JSON.raw_decode(text, i)
        except ValueError:
            tries += 1
            if tries >= _MAX_TRIES:
                return None
            continue
        if _fits(value, root):
            return text[i:end]
    return None


def cut_json(text: str, root: str | None) -> str:
    """An answer as its JSON (see the module's docstring); the text as it is when it holds none."""
    head = text.lstrip()
    if head and head[0] in _opening(root):
        end = _Scan().feed(head)
        return head if end is None else head[:end]
    found = find_json(text, root)
    return text if found is None else found


@dataclass(frozen=True, slots=True)
class FormatPrompt:
    """One request's ``response_format``, written into its last user turn; cuts the JSON out of the answer."""

    request: ChatRequest
    root: str | None

    @classmethod
    def for_request(cls, request: ChatRequest, *, tools_callable: bool = False) -> FormatPrompt | None:
        """None when the host takes ``response_format`` itself or the request asks for none (or for text)."""
        fmt = request.params.get("response_format")
        if request.provider.supports_response_format or fmt is None or fmt["type"] == "text":
            return None
        root = _root(fmt)
        note = _instruction(fmt, root, tools_callable)
        messages = [dict(m) for m in request.messages]
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
        if last is None:
            messages.append({"role": "user", "content": note})
        else:
            text = message_text(messages[last].get("content")).rstrip()
            messages[last]["content"] = f"{text}\n\n{note}" if text else note
        params = {k: v for k, v in request.params.items() if k != "response_format"}
        return cls(replace(request, messages=messages, params=params), root)

    # -- whole answers

    def completion(self, completion: ChatCompletion) -> ChatCompletion:
        choices = []
        for choice in completion.choices:
            content = choice.message.content
            if content and not choice.message.tool_calls:
                message = choice.message.model_copy(update={"content": cut_json(content, self.root)})
                choice = choice.model_copy(update={"message": message})
            choices.append(choice)
        return completion.model_copy(update={"choices": choices})

    # -- streams

    def chunks(self) -> _FormatChunks:
        return _FormatChunks(self.root)


class _ChoiceJSON:
    """One choice's text: passed on inside a JSON value that opened the answer, held otherwise."""

    __slots__ = ("held", "mode", "opens", "root", "scan")

    def __init__(self, root: str | None) -> None:
        self.root = root
        self.opens = _opening(root)
        self.mode = "undecided"  # -> "json" (passed on), "done" (the value closed) or "held" (to the end)
        self.held = ""
        self.scan = _Scan()

    def feed(self, text: str) -> str:
        if self.mode == "done":
            return ""
        if self.mode != "json":
            self.held += text
            head = self.held.lstrip()
            if self.mode == "held" or not head:
                return ""
            if head[0] not in self.opens:
                self.mode = "held"
                return ""
            self.mode, self.held, text = "json", "", head
        end = self.scan.feed(text)
        if end is None:
            return text
        self.mode = "done"
        return text[:end]

    def finish(self, failed: bool) -> str:
        """What is still held: the JSON found in it (the text itself when none, or when the stream failed)."""
        held, self.held = self.held, ""
        if self.mode != "held" or failed:
            return held
        found = find_json(held, self.root)
        return held if found is None else found


class _FormatChunks:
    """Chunks in, chunks out: each choice's content reduced to its JSON."""

    __slots__ = ("last", "open", "root")

    def __init__(self, root: str | None) -> None:
        self.root = root
        self.open: dict[int, _ChoiceJSON] = {}
        self.last: ChatCompletionChunk | None = None

    def feed(self, chunk: ChatCompletionChunk) -> list[ChatCompletionChunk]:
        self.last = chunk
        choices = []
        for choice in chunk.choices:
            state = self.open.setdefault(choice.index, _ChoiceJSON(self.root))
            text = state.feed(choice.delta.content) if choice.delta.content else ""
            if choice.finish_reason is not None:
                text += state.finish(failed=False)
                del self.open[choice.index]
            if text != (choice.delta.content or ""):
                choice = choice.model_copy(update={"delta": choice.delta.model_copy(update={"content": text or None})})
            choices.append(choice)
        return passing(chunk, choices)

    def end(self, failed: bool) -> list[ChatCompletionChunk]:
        """What is still held when the chunks end without a finish reason, or fail."""
        choices = [{"index": index, "delta": ChoiceDelta(content=text)}
                   for index, state in sorted(self.open.items()) if (text := state.finish(failed))]
        self.open.clear()
        return held_chunk(self.last, choices)
