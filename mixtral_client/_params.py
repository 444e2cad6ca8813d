"""The keyword arguments of the request methods, as TypedDicts (for ``Unpack``: editors and type checkers see
each name and type). The methods reject any other key with ``TypeError``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from ._timeouts import Timeout
from .types import ChatCompletionToolParam

__all__ = ["CompletionParams", "ParseParams", "Prompt", "SamplingParams", "StreamParams", "TextCompletionParams"]

#: a raw prompt as OpenAI's completions API takes it: a text, several texts, token ids, or several lists of ids
Prompt = str | list[str] | list[int] | list[list[int]]


class SamplingParams(TypedDict, total=False):
    """What chat and raw-prompt requests share: the model, the sampling parameters and the transport options."""

    model: str
    temperature: float
    top_p: float
    max_tokens: int
    stop: str | list[str]
    seed: int
    n: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[str | int, float]
    user: str
    extra_headers: Mapping[str, str]
    extra_query: Mapping[str, Any]
    extra_body: Mapping[str, Any]
    timeout: float | Timeout


class ParseParams(SamplingParams, total=False):
    """The optional arguments of ``parse()``: those of ``create()`` but ``response_format`` and ``stream_options``."""

    logprobs: bool
    top_logprobs: int
    tools: list[ChatCompletionToolParam]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool


class StreamParams(ParseParams, total=False):
    """The optional arguments of ``stream()``: those of ``parse()`` and ``stream_options``."""

    stream_options: dict[str, Any]


class CompletionParams(StreamParams, total=False):
    """The optional arguments of ``create()`` (the OpenAI chat-completions parameters, plus transport options)."""

    response_format: dict[str, Any]


class TextCompletionParams(SamplingParams, total=False):
    """The optional arguments of ``completions.create()`` (OpenAI's legacy completions parameters that Mixtral's
    backends take, plus transport options)."""

    logprobs: int  # the legacy API's: how many most likely tokens to list at each position (0: the chosen one)
    echo: bool  # the answer's text (and logprobs) begin with the prompt's; with max_tokens=0, the prompt alone
    stream_options: dict[str, Any]
