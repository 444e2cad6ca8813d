"""Conversions between LangChain messages and the OpenAI chat-completions shapes of ``mixtral_client`` (no I/O).

- ``to_wire_messages``: LangChain messages -> request messages (text only: Mixtral reads no images).
- ``to_chat_result``: a ``ChatCompletion`` -> a ``ChatResult`` (one generation per choice).
- ``ChunkConverter``: one stream's ``ChatCompletionChunk`` objects -> ``ChatGenerationChunk`` objects. It is
  stateful (one instance per stream): it numbers tool calls with integer indexes, puts id and name on a call's
  first fragment only, invents Mistral-style ids when the host sends none, and holds usage, finish reason and
  model name back for the single closing chunk, so usage is counted exactly once however the host reports it.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    InvalidToolCall,
    SystemMessage,
    ToolCall,
    ToolCallChunk,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from mixtral_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessageParam,
    ChoiceDeltaToolCall,
    Logprobs,
    ToolCallParam,
    Usage,
)

__all__ = ["ChunkConverter", "new_tool_call_id", "to_chat_result", "to_usage_metadata", "to_wire_messages"]

_ID_ALPHABET = string.ascii_letters + string.digits
_ROLES = {"system", "developer", "user", "assistant", "tool"}
#: content blocks an assistant message may carry that are not text (its tool calls travel in ``tool_calls``)
_ASSISTANT_SKIPPED_BLOCKS = {"tool_use", "tool_call", "function_call", "reasoning", "thinking", "redacted_thinking"}


def new_tool_call_id() -> str:
    """A Mistral-style tool-call id: 9 random ASCII letters and digits."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


# --------------------------------------------------------------------------- requests


def _text(content: str | list[str | dict[str, Any]], role: str) -> str:
    """Message content as one string; Mixtral reads text only, so any other block is refused."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif role == "assistant" and block.get("type") in _ASSISTANT_SKIPPED_BLOCKS:
            continue
        else:
            raise ValueError(
                f"ChatMixtral: a {role} message carries a {block.get('type')!r} content block; "
                "Mixtral-8x7B-Instruct reads text only"
            )
    return "".join(parts)


def _wire_tool_call(call: Mapping[str, Any]) -> ToolCallParam:
    args = call.get("args")
    arguments = args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)
    return {"id": call.get("id") or new_tool_call_id(), "type": "function",
            "function": {"name": call.get("name") or "", "arguments": arguments}}


def _wire_message(message: BaseMessage) -> ChatCompletionMessageParam:
    if isinstance(message, HumanMessage):
        out: ChatCompletionMessageParam = {"role": "user", "content": _text(message.content, "user")}
    elif isinstance(message, SystemMessage):
        out = {"role": "system", "content": _text(message.content, "system")}
    elif isinstance(message, AIMessage):
        out = {"role": "assistant", "content": _text(message.content, "assistant")}
        calls = [*message.tool_calls, *(c for c in message.invalid_tool_calls if c.get("name"))]
        if calls:
            out["tool_calls"] = [_wire_tool_call(c) for c in calls]
    elif isinstance(message, ToolMessage):
        content = message.content
        text = _text(content, "tool") if isinstance(content, str | list) else json.dumps(content)
        return {"role": "tool", "content": text, "tool_call_id": message.tool_call_id}
    elif isinstance(message, ChatMessage) and message.role in _ROLES:
        out = {"role": message.role, "content": _text(message.content, message.role)}  # type: ignore[typeddict-item]
    else:
        raise ValueError(f"ChatMixtral cannot send a {type(message).__name__} (role {message.type!r})")
    if message.name:
        out["name"] = message.name
    return out


def to_wire_messages(messages: Sequence[BaseMessage]) -> list[ChatCompletionMessageParam]:
    """LangChain messages as chat-completions request messages."""
    return [_wire_message(m) for m in messages]


# --------------------------------------------------------------------------- responses


def to_usage_metadata(usage: Usage) -> UsageMetadata:
    metadata = UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    )
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details is not None else None
    if cached is not None:
        metadata["input_token_details"] = InputTokenDetails(cache_read=cached)
    return metadata


def _response_metadata(id_: str, model: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": id_, "model_name": model, "finish_reason": finish_reason}


def _parse_tool_calls(raw: Sequence[Any]) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for call in raw:
        id_ = call.id or new_tool_call_id()
        name, arguments = call.function.name, call.function.arguments
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            invalid.append(InvalidToolCall(type="invalid_tool_call", id=id_, name=name, args=arguments,
                                           error=f"arguments are not valid JSON: {exc}"))
            continue
        if not isinstance(args, dict):
            invalid.append(InvalidToolCall(type="invalid_tool_call", id=id_, name=name, args=arguments,
                                           error="arguments are not a JSON object"))
            continue
        calls.append(ToolCall(type="tool_call", id=id_, name=name, args=args))
    return calls, invalid


def _json(logprobs: Logprobs) -> dict[str, Any]:
    """Log probabilities as the JSON the host sent (what ChatOpenAI puts in ``response_metadata``)."""
    return logprobs if isinstance(logprobs, dict) else logprobs.model_dump()


def to_chat_result(completion: ChatCompletion, requested_model: str) -> ChatResult:
    """One ``ChatGeneration`` per choice; usage and metadata on every generation's message."""
    model = completion.model or requested_model
    usage = to_usage_metadata(completion.usage) if completion.usage is not None else None
    generations = []
    for choice in completion.choices:
        calls, invalid = _parse_tool_calls(choice.message.tool_calls or [])
        message = AIMessage(
            content=choice.message.content or "",
            id=completion.id or None,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=usage,
            response_metadata=_response_metadata(completion.id, model, choice.finish_reason),
        )
        info: dict[str, Any] = {"finish_reason": choice.finish_reason}
        if choice.logprobs is not None:
            info["logprobs"] = _json(choice.logprobs)
        generations.append(ChatGeneration(message=message, generation_info=info))
    llm_output = {"model_name": model, "id": completion.id,
                  "token_usage": completion.usage.model_dump() if completion.usage is not None else {}}
    return ChatResult(generations=generations, llm_output=llm_output)


class ChunkConverter:
    """Converts the chunks of one stream (first choice only); ``last()`` gives the closing chunk."""

    def __init__(self, requested_model: str, headers: dict[str, str] | None = None) -> None:
        self._model = requested_model
        self._headers = headers  # include_response_headers: for the first chunk that goes out
        self._id = ""
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        #: tool calls seen so far: host index -> our index, host id -> our index, and the latest call
        self._by_index: dict[int, int] = {}
        self._by_id: dict[str, int] = {}
        self._named: set[int] = set()
        self._latest: int | None = None

    def convert(self, chunk: ChatCompletionChunk) -> ChatGenerationChunk | None:
        """The LangChain chunk for one host chunk, or None when it carries nothing to show yet."""
        if chunk.id and not self._id:
            self._id = chunk.id
        if chunk.model:
            self._model = chunk.model
        if chunk.usage is not None:  # some hosts repeat a running total: keep the latest, report it once
            self._usage = chunk.usage
        choice = next((c for c in chunk.choices if c.index == 0), None)
        if choice is None:
            return None
        if choice.finish_reason is not None:
            self._finish_reason = choice.finish_reason
        delta = choice.delta
        tool_chunks = [self._tool_call_chunk(call) for call in delta.tool_calls or []]
        if not delta.content and not tool_chunks and choice.logprobs is None:
            return None
        message = AIMessageChunk(content=delta.content or "", id=self._id or None, tool_call_chunks=tool_chunks)
        info = {"logprobs": _json(choice.logprobs)} if choice.logprobs is not None else None
        return ChatGenerationChunk(message=message, generation_info=self._first(info))

    def _first(self, info: dict[str, Any] | None) -> dict[str, Any] | None:
        """``info`` with the response headers, if they have not gone out yet."""
        if self._headers is None:
            return info
        headers, self._headers = self._headers, None
        return {**(info or {}), "headers": headers}

    def last(self) -> ChatGenerationChunk:
        """The closing chunk: the only one with usage, finish reason and model name."""
        message = AIMessageChunk(
            content="",
            id=self._id or None,
            usage_metadata=to_usage_metadata(self._usage) if self._usage is not None else None,
            response_metadata=_response_metadata(self._id, self._model, self._finish_reason),
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info=self._first({"finish_reason": self._finish_reason}))

    def _tool_call_chunk(self, call: ChoiceDeltaToolCall) -> ToolCallChunk:
        if call.index is not None and call.index in self._by_index:
            index: int | None = self._by_index[call.index]
        elif call.index is None and call.id is not None and call.id in self._by_id:
            index = self._by_id[call.id]
        elif call.index is None and call.id is None and self._latest is not None:
            index = self._latest
        else:
            index = None
        first = index is None
        if index is None:
            index = len(self._by_id)
            id_ = call.id or new_tool_call_id()
            self._by_id[id_] = index
            if call.index is not None:
                self._by_index[call.index] = index
        self._latest = index
        fn = call.function
        name = fn.name if fn is not None and fn.name and index not in self._named else None
        if name is not None:
            self._named.add(index)
        return ToolCallChunk(
            type="tool_call_chunk",
            index=index,
            id=id_ if first else None,
            name=name,
            args=(fn.arguments if fn is not None else None) or "",
        )
