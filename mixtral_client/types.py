"""Public types: requests as TypedDicts (what users write), responses as pydantic models (what they read).

Response models keep every field a host sends (``extra="allow"``): OpenRouter's ``usage.cost``, its
``provider`` name, NVIDIA's extras, ... are reachable as attributes. ``finish_reason`` is open: one of the
known literals or any string a host invents.
"""

from __future__ import annotations

import secrets
import string
from typing import Any, Generic, Literal, Required, TypeAlias, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "ChatCompletionMessageParam",
    "ChatCompletionTokenLogprob",
    "ChatCompletionToolParam",
    "Choice",
    "ChoiceDelta",
    "ChoiceDeltaToolCall",
    "ChoiceDeltaToolCallFunction",
    "ChoiceLogprobs",
    "ChunkChoice",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "FinishReason",
    "FunctionCall",
    "FunctionDefinition",
    "Logprobs",
    "Model",
    "ParsedChatCompletion",
    "ParsedChatCompletionMessage",
    "ParsedChoice",
    "PromptTokensDetails",
    "ToolCall",
    "ToolCallParam",
    "TopLogprob",
    "Usage",
    "new_tool_call_id",
]

FinishReason: TypeAlias = Literal["stop", "length", "tool_calls", "content_filter", "error"] | str


# --------------------------------------------------------------------------- requests (TypedDicts)


class FunctionCallParam(TypedDict):
    name: str
    arguments: str


class ToolCallParam(TypedDict, total=False):
    id: Required[str]
    type: Literal["function"]
    function: Required[FunctionCallParam]


class ChatCompletionMessageParam(TypedDict, total=False):
    """One message: ``{"role": "user", "content": "Hi"}``. ``content`` may also be a list of text parts."""

    role: Required[Literal["system", "developer", "user", "assistant", "tool"]]
    content: str | list[dict[str, Any]] | None
    name: str
    tool_calls: list[ToolCallParam]
    tool_call_id: str


class FunctionDefinition(TypedDict, total=False):
    name: Required[str]
    description: str
    parameters: dict[str, Any]
    strict: bool


class ChatCompletionToolParam(TypedDict):
    type: Literal["function"]
    function: FunctionDefinition


# --------------------------------------------------------------------------- responses (pydantic)


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class FunctionCall(_Model):
    name: str
    arguments: str = ""


_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """A Mistral-style tool-call id (9 alphanumeric characters), for hosts that send none."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


class ToolCall(_Model):
    #: the host's id; a Mistral-style one is made up when the host sends none
    id: str = Field(default_factory=new_tool_call_id)
    type: str = "function"
    function: FunctionCall

    @field_validator("id", mode="before")
    @classmethod
    def _id_or_new(cls, value: Any) -> Any:
        return value or new_tool_call_id()


class ChatCompletionMessage(_Model):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(_Model):
    """One of the most likely tokens at a position: its text, log probability and UTF-8 bytes."""

    token: str
    logprob: float
    #: the token's UTF-8 bytes: a token that holds part of a character shows as ``"\\xe2"`` in ``token``
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    """One generated token, with the ``top_logprobs`` most likely tokens at its position."""

    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Model):
    """``logprobs=True``: the answer's tokens in order (``content``; OpenAI also has ``refusal``)."""

    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


#: a host's log probabilities: typed when they have OpenAI's shape, else the host's JSON as it came (kept, not lost)
Logprobs: TypeAlias = ChoiceLogprobs | dict[str, Any]
_LOGPROBS = Field(default=None, union_mode="left_to_right")


class Choice(_Model):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReason | None = None
    logprobs: Logprobs | None = _LOGPROBS


class PromptTokensDetails(_Model):
    cached_tokens: int | None = None  # prompt tokens served from a prompt (prefix) cache


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(_Model):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[Choice]
    usage: Usage | None = None
    #: the host's id for the HTTP request that answered (``x-request-id``, NVIDIA's ``nvcf-reqid``, Bedrock's
    #: ``x-amzn-requestid``, ...): what a host's support asks for. None when there was none (local weights).
    #: Not part of the JSON, as in openai-python
    _request_id: str | None = PrivateAttr(default=None)


class ChoiceDeltaToolCallFunction(_Model):
    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(_Model):
    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: ChoiceDeltaToolCallFunction | None = None


class ChoiceDelta(_Model):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChunkChoice(_Model):
    index: int = 0
    delta: ChoiceDelta = Field(default_factory=ChoiceDelta)
    finish_reason: FinishReason | None = None
    logprobs: Logprobs | None = _LOGPROBS


class ChatCompletionChunk(_Model):
    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = []
    usage: Usage | None = None
    _request_id: str | None = PrivateAttr(default=None)  # the stream's HTTP request id (``ChatCompletion``'s)


# --------------------------------------------------------------------------- text completions (client.completions)


class CompletionLogprobs(_Model):
    """The legacy completions API's log probabilities: per generated token its text, log probability, the most
    likely alternatives (token -> log probability) and where it starts in the completion's text."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None  # None at an echoed prompt's first token
    text_offset: list[int] = []


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | dict[str, Any] | None = Field(default=None, union_mode="left_to_right")


class Completion(_Model):
    """A raw-prompt completion (``client.completions.create``), as OpenAI's legacy completions API answers;
    each chunk of its stream is a ``Completion`` too (``choices[i].text`` the new text), as in openai-python."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: Usage | None = None
    _request_id: str | None = PrivateAttr(default=None)


# --------------------------------------------------------------------------- parsed answers (chat.completions.parse)

ParsedT = TypeVar("ParsedT", bound=BaseModel)


class ParsedChatCompletionMessage(ChatCompletionMessage, Generic[ParsedT]):
    #: the content validated into the requested model (None for an answer that calls tools)
    parsed: ParsedT | None = None


class ParsedChoice(Choice, Generic[ParsedT]):
    message: ParsedChatCompletionMessage[ParsedT]


class ParsedChatCompletion(ChatCompletion, Generic[ParsedT]):
    """What ``chat.completions.parse()`` returns: a ``ChatCompletion`` whose messages carry ``parsed``."""

    choices: list[ParsedChoice[ParsedT]]  # type: ignore[assignment]  # narrower, as in openai-python


class Model(_Model):
    """One entry of ``client.models.list()``: a model id the backend serves (a host's other fields are kept:
    OpenRouter's ``context_length`` and ``pricing``, T-Systems' ``meta_data``, ...)."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
