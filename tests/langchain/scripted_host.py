"""A scripted OpenAI-compatible chat-completions host on the loopback server, for the LangChain tests.

It answers the way a real host does, without a model:

- ``tools`` and the last message from the user (or a forcing ``tool_choice``): a call to the first tool (or the
  named one), with arguments generated from the tool's JSON schema (its defaults, examples, enums, else simple
  values); ``parallel=True`` calls every tool at once, interleaving their fragments when streaming;
- ``response_format`` ``json_schema``: a JSON object generated from the schema; ``json_object``: a JSON object;
- otherwise text that echoes the last message, cut by ``stop`` (finish reason ``stop``) or ``max_tokens``
  (finish reason ``length``); ``n`` choices; ``logprobs``;
- streams as SSE: role chunk, content or tool-call fragments, a finish chunk, and with
  ``stream_options.include_usage`` a usage chunk with empty ``choices``; ``error_after`` chunks, an
  OpenRouter-style error chunk (HTTP 200, top-level ``error``, ``finish_reason: "error"``) ends the stream.

With ``prompted=True`` it is a Mixtral host without native tools (NVIDIA, AIML API): a body with ``tools``
is refused with 400, the tools are read from the ``[AVAILABLE_TOOLS] ... [/AVAILABLE_TOOLS]`` text the client
writes into the system message, calls are answered as ``[TOOL_CALLS] [...]`` text, and a ``[TOOL_RESULTS]``
user turn counts as a tool result. It refuses ``response_format`` too: the format is read from the
instruction the client appends to the last user turn, and the JSON is answered the way Mixtral often writes
it, after a space and inside a code fence with a line after it.

A token is a whitespace-separated word; usage counts words.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from tests.loopback import Conn, LoopbackServer, Received, sse

__all__ = ["ScriptedHost", "example_from_schema"]


def example_from_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None, name: str = "text") -> Any:
    """A simple value that validates against ``schema``: default, example, first enum value, else by type
    (a string is "example <property name>")."""
    defs = defs if defs is not None else schema.get("$defs", schema.get("definitions", {}))
    if "$ref" in schema:
        return example_from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, name)
    for key in ("default", "const"):
        if key in schema:
            return schema[key]
    if schema.get("examples"):
        return schema["examples"][0]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [s for s in schema.get(key, []) if s.get("type") != "null"]
        if options:
            return example_from_schema(options[0], defs, name)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {key: example_from_schema(sub, defs, key) for key, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [example_from_schema(schema.get("items", {}), defs, name)] * max(schema.get("minItems", 1), 1)
    if kind in ("integer", "number"):
        value = 0 if kind == "integer" else 0.5
        if "minimum" in schema:
            value = max(value, schema["minimum"])
        if "exclusiveMinimum" in schema:
            value = max(value, schema["exclusiveMinimum"] + 1)
        return value
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return f"example {name}"


def _words(text: str) -> list[str]:
    return text.split()


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _prompted_tools(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """The tools and tool choice written into the system text of a prompted-tools request."""
    system = _message_text(messages[0]) if messages[0]["role"] == "system" else ""
    if "[AVAILABLE_TOOLS] " not in system:
        return [], "auto"
    tools = json.loads(system.split("[AVAILABLE_TOOLS] ", 1)[1].split(" [/AVAILABLE_TOOLS]", 1)[0])
    if "you must call the tool " in system:
        name = system.split("you must call the tool ", 1)[1].split(".")[0]
        return tools, {"type": "function", "function": {"name": name}}
    return tools, "required" if "must call at least one tool" in system else "auto"


@dataclass
class ScriptedHost:
    """The handler for a ``LoopbackServer``; ``with ScriptedHost() as host: host.url``."""

    #: call every declared tool at once (interleaved fragments when streaming)
    parallel: bool = False
    #: False: tool calls come without ids, as some hosts send them
    tool_call_ids: bool = True
    #: when streaming, fail with an error chunk after this many chunks
    error_after: int | None = None
    #: split tool-call arguments into pieces of this many characters when streaming
    piece: int = 7
    #: a host without native tools: tools only as prompt text, calls answered as text
    prompted: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    _server: LoopbackServer | None = None
    _counter: int = 0

    def __enter__(self) -> ScriptedHost:
        self._server = LoopbackServer(self.handle).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        if self._server.errors:
            raise self._server.errors[0]

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    # -- the protocol -------------------------------------------------------------------------------

    def handle(self, req: Received, conn: Conn) -> None:
        if req.method != "POST" or not req.path.endswith("/chat/completions"):
            conn.respond(404, {"error": {"message": f"no route {req.method} {req.path}", "code": 404}})
            return
        if not req.headers.get("authorization", "").startswith("Bearer "):
            conn.respond(401, {"error": {"message": "missing API key", "code": 401}})
            return
        body = req.json()
        self.requests.append(body)
        if self.prompted and ({"tools", "tool_choice", "response_format"} & body.keys()):
            conn.respond(400, {"error": {"message": "tools and response_format are not supported for this model",
                                         "code": 400}})
            return
        self._counter += 1
        answer = self._answer(body)
        headers = {"x-request-id": f"req-{self._counter}", "x-ratelimit-remaining-requests": str(100 - self._counter)}
        if body.get("stream"):
            chunks = self._chunks(body, answer)
            conn.start(200, {"Content-Type": "text/event-stream", **headers})
            if self.error_after is not None:  # let the good chunks arrive on their own before the error
                conn.write(sse(*chunks[:-1], done=False))
                time.sleep(0.05)
                chunks = chunks[-1:]
            conn.write(sse(*chunks, done=self.error_after is None))
            conn.finish()
        else:
            conn.respond(200, self._completion(body, answer), headers)

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """What to say: {"calls": [(name, args)]} or {"text": str, "finish_reason": str}."""
        messages = body["messages"]
        tools = body.get("tools") or []
        choice = body.get("tool_choice", "auto")
        last = _message_text(messages[-1])
        from_user = messages[-1]["role"] == "user"
        if self.prompted:
            tools, choice = _prompted_tools(messages)
            result = last.rsplit("[TOOL_RESULTS]", 1)[-1] if "[TOOL_RESULTS]" in last else None
            if result is not None:
                from_user, last = False, json.loads(result.split("[/TOOL_RESULTS]")[0])["content"]
        forced = choice == "required" or isinstance(choice, dict)
        if tools and choice != "none" and (forced or from_user):
            if isinstance(choice, dict):
                tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
            chosen = tools if self.parallel else tools[:1]
            fns = [t["function"] for t in chosen]
            calls = [(fn["name"], example_from_schema(fn.get("parameters") or {})) for fn in fns]
            if self.prompted:
                listed = [{"name": name, "arguments": args} for name, args in calls]
                return {"text": "[TOOL_CALLS] " + json.dumps(listed, ensure_ascii=False), "finish_reason": "stop"}
            return {"calls": calls}
        fmt = (body.get("response_format") or {}).get("type")
        if self.prompted and "follows this JSON schema" in last:
            schema = json.loads(last.rsplit("\n", 1)[1])
            text = f" ```json\n{json.dumps(example_from_schema(schema))}\n```\nI hope this helps."
        elif self.prompted and "Reply with one JSON object and nothing else" in last:
            question = last.split("\n\nReply with one JSON object", 1)[0]
            text = f" ```json\n{json.dumps({'answer': question}, ensure_ascii=False)}\n```"
        elif fmt == "json_schema":
            text = json.dumps(example_from_schema(body["response_format"]["json_schema"]["schema"]))
        elif fmt == "json_object":
            text = json.dumps({"answer": _message_text(messages[-1])}, ensure_ascii=False)
        elif messages[-1]["role"] == "tool" or (self.prompted and not from_user):
            text = f"The tool answered: {last}"
        else:
            text = f"Hello! You said: {last}"
        finish = "stop"
        for stop in [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []:
            if stop in text:
                text = text[:text.index(stop)]
        words = text.split(" ")
        if body.get("max_tokens") is not None and len(_words(text)) > body["max_tokens"]:
            text, finish = " ".join(words[:body["max_tokens"]]), "length"
        return {"text": text, "finish_reason": finish}

    def _usage(self, body: dict[str, Any], answer: dict[str, Any]) -> dict[str, int]:
        prompt = sum(len(_words(_message_text(m))) for m in body["messages"])
        completion = len(_words(answer.get("text", ""))) + sum(len(json.dumps(a)) // 4 for _, a in answer.get("calls", []))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _call_id(self, i: int) -> str | None:
        return f"call_{self._counter}_{i}" if self.tool_call_ids else None

    def _logprobs(self, body: dict[str, Any], text: str) -> dict[str, Any] | None:
        if not body.get("logprobs"):
            return None
        return {"content": [{"token": w, "logprob": -0.25, "bytes": list(w.encode()), "top_logprobs": []}
                            for w in text.split(" ") if w]}

    def _completion(self, body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        if "calls" in answer:
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
                {"id": self._call_id(i) or "", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                for i, (name, args) in enumerate(answer["calls"])]}
            finish = "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": answer["text"]}, answer["finish_reason"]
        choices = [{"index": i, "message": message, "finish_reason": finish,
                    "logprobs": self._logprobs(body, answer.get("text", ""))} for i in range(body.get("n", 1))]
        return {"id": f"chatcmpl-{self._counter}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "choices": choices, "usage": self._usage(body, answer)}

    def _chunks(self, body: dict[str, Any], answer: dict[str, Any]) -> list[dict[str, Any]]:
        base = {"id": f"chatcmpl-{self._counter}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body["model"]}
        n = body.get("n", 1)
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if "calls" in answer:
            pieces = []
            for i, (name, args) in enumerate(answer["calls"]):
                arguments = json.dumps(args, ensure_ascii=False)
                parts = [arguments[j:j + self.piece] for j in range(0, len(arguments), self.piece)] or [""]
                first: dict[str, Any] = {"index": i, "type": "function", "function": {"name": name, "arguments": ""}}
                if self.tool_call_ids:
                    first["id"] = self._call_id(i)
                pieces.append([first] + [{"index": i, "function": {"arguments": p}} for p in parts])
            # interleave: each call's first fragment, then their argument pieces in turn
            for step in range(max(len(p) for p in pieces)):
                for call in pieces:
                    if step < len(call):
                        deltas.append({"tool_calls": [call[step]]})
            finish = "tool_calls"
        else:
            words = answer["text"].split(" ")
            deltas += [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
            finish = answer["finish_reason"]
        chunks = []
        for delta in deltas:
            for c in range(n):
                choice: dict[str, Any] = {"index": c, "delta": delta, "finish_reason": None}
                if body.get("logprobs") and delta.get("content"):
                    choice["logprobs"] = self._logprobs(body, delta["content"].strip())
                chunks.append({**base, "choices": [choice]})
        chunks += [{**base, "choices": [{"index": c, "delta": {}, "finish_reason": finish}]} for c in range(n)]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "choices": [], "usage": self._usage(body, answer)})
        if self.error_after is not None:
            chunks = chunks[:self.error_after] + [{**base, "error": {"code": 502, "message": "upstream provider failed"},
                                                   "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]}]
        return chunks
