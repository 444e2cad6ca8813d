"""``ChatMixtral``: the LangChain chat model over ``MixtralClient`` / ``AsyncMixtralClient``.

A thin adapter: one payload builder (``_create_params``) feeds ``_generate``/``_agenerate``/``_stream``/
``_astream``; ``_convert`` turns answers and chunks into LangChain objects. Every request goes through our
client, which validates it against the provider's limits, retries, times out and maps errors; this module
holds no HTTP code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.base import OutputParserLike
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_function, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict

from mixtral_client import (
    ChatCompletion,
    CompletionParams,
    FunctionTool,
)

from ._clients import MixtralClients
from ._convert import ChunkConverter, to_chat_result, to_wire_messages

__all__ = ["ChatMixtral"]

_TOOL_CHOICE_WORDS = {"auto": "auto", "none": "none", "required": "required", "any": "required"}
_StructuredMethod = Literal["function_calling", "json_mode", "json_schema"]


class ChatMixtral(MixtralClients, BaseChatModel):
    """Mixtral-8x7B-Instruct as a LangChain chat model, on any provider ``mixtral_client`` knows.

    ```python
    from langchain_mixtral import ChatMixtral

    llm = ChatMixtral(provider="openrouter", temperature=0)  # key from OPENROUTER_API_KEY
    llm.invoke("Hello")
    local = ChatMixtral(provider="local", model_path="/models/mixtral")  # in-process weights
    ```

    Keys are read from the provider's variable (``NVIDIA_API_KEY``, ``OPENROUTER_API_KEY``, ``AIMLAPI_API_KEY``,
    or ``MIXTRAL_API_KEY``) when not given. Tools work on every provider: natively on ``openai``-compatible hosts
    and OpenRouter, written into the prompt on NVIDIA, AIML API, Bedrock and the local backend. So is
    ``response_format`` (``json_mode`` and ``json_schema`` structured output): the host enforces it on
    ``openai``-compatible hosts and OpenRouter, the local backend by constrained decoding (required tool calls
    too), and on NVIDIA, AIML API and Bedrock it is written into the prompt and the JSON is cut out of the
    answer. See docs/langchain.md.
    """

    model_config = ConfigDict(extra="forbid")

    logprobs: bool | None = None
    """Return each answer token's log probability (``response_metadata["logprobs"]``, as ChatOpenAI does)."""
    top_logprobs: int | None = None
    """With ``logprobs``: how many of the most likely tokens to list at each position (0-20)."""
    tool_calling: Literal["auto", "native", "prompt"] | None = None
    """How bound tools reach the model: the provider's way (``auto``), the host's ``tools`` field, or the
    prompt (for an OpenAI-compatible host without tools). Default: ``MIXTRAL_TOOL_CALLING``, else ``auto``."""
    structured_output: Literal["auto", "native", "prompt"] | None = None
    """How ``response_format`` (``json_mode``, ``json_schema``) reaches the model: the provider's way, the host's
    field, or the prompt. Default: ``MIXTRAL_STRUCTURED_OUTPUT``, else ``auto``."""
    include_response_headers: bool = False
    """Put the host's HTTP response headers (rate limits, request id) in ``response_metadata["headers"]``: on
    the answer of ``invoke``, on the first chunk of a stream (as ChatOpenAI does). Empty on local weights."""

    _reserved: ClassVar[frozenset[str]] = frozenset({"stream", "messages"})
    _known: ClassVar[frozenset[str]] = frozenset(CompletionParams.__annotations__)

    def _config_options(self) -> dict[str, Any]:
        return {"tool_calling": self.tool_calling, "structured_output": self.structured_output}

    # -- LangChain metadata ---------------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "mixtral-chat"

    # -- the payload builder --------------------------------------------------------------------------

    def _own_params(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs}

    def _create_params(self, messages: list[BaseMessage], stop: list[str] | None, stream: bool, /,
                       **kwargs: Any) -> dict[str, Any]:
        """Everything ``create()`` gets for one call: messages, sampling, tools; unknown keys into extra_body."""
        return {"messages": to_wire_messages(messages), **self._call_params(stop, stream, **kwargs)}

    # -- calls ----------------------------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,  # noqa: ARG002 (part of the interface)
                  **kwargs: Any) -> ChatResult:
        params = self._create_params(messages, stop, False, **kwargs)
        raw = self._client().chat.completions.with_raw_response.create(**params)
        return self._result(raw.parse(), params, raw.headers)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,  # noqa: ARG002 (part of the interface)
                         **kwargs: Any) -> ChatResult:
        params = self._create_params(messages, stop, False, **kwargs)
        raw = await (await self._aclient()).chat.completions.with_raw_response.create(**params)
        return self._result(raw.parse(), params, raw.headers)

    def _result(self, completion: ChatCompletion, params: Mapping[str, Any], headers: Mapping[str, str]) -> ChatResult:
        result = to_chat_result(completion, params.get("model") or self._model_name)
        if self.include_response_headers:  # LangChain moves generation_info into the message's response_metadata
            for generation in result.generations:
                generation.generation_info = {**(generation.generation_info or {}), "headers": dict(headers)}
        return result

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        params = self._create_params(messages, stop, True, **kwargs)
        raw = self._client().chat.completions.with_raw_response.create(stream=True, **params)
        converter = ChunkConverter(params.get("model") or self._model_name,
                                   dict(raw.headers) if self.include_response_headers else None)
        with raw.parse() as stream:
            for chunk in stream:
                if (generation := converter.convert(chunk)) is not None:
                    if run_manager:
                        run_manager.on_llm_new_token(generation.text, chunk=generation)
                    yield generation
        yield converter.last()

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        params = self._create_params(messages, stop, True, **kwargs)
        raw = await (await self._aclient()).chat.completions.with_raw_response.create(stream=True, **params)
        converter = ChunkConverter(params.get("model") or self._model_name,
                                   dict(raw.headers) if self.include_response_headers else None)
        async with raw.parse() as stream:
            async for chunk in stream:
                if (generation := converter.convert(chunk)) is not None:
                    if run_manager:
                        await run_manager.on_llm_new_token(generation.text, chunk=generation)
                    yield generation
        yield converter.last()

    # -- token counts (LangChain's trim_messages, get_num_tokens) -------------------------------------

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens with Mixtral's own tokenizer and chat format (``client.chat.completions.count_tokens``):
        exact on local weights, and tools that travel in the prompt are counted."""
        params = self._create_params(messages, None, False)
        if tools:
            params["tools"] = [dict(t.param) if isinstance(t, FunctionTool) else convert_to_openai_tool(t)
                               for t in tools]
        count: int = self._client().chat.completions.count_tokens(**params)
        return count

    # -- tools and structured output ------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (OpenAI function format). ``tool_choice``: "auto", "any" (sent as "required"), "none",
        a tool name, or an OpenAI tool-choice dict."""
        formatted: list[dict[str, Any]] = [  # a mixtral_client.tool() keeps the schema it validates with
            dict(t.param) if isinstance(t, FunctionTool) else convert_to_openai_tool(t, strict=strict) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = _format_tool_choice(tool_choice, [t["function"]["name"] for t in formatted])
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: _StructuredMethod = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Answers parsed into ``schema`` (a pydantic class, TypedDict, JSON schema or OpenAI tool).

        ``function_calling`` forces a call to a tool built from the schema; ``json_mode`` asks for any JSON
        object (say which keys in the prompt); ``json_schema`` sends the schema as ``response_format``.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        pydantic_schema = isinstance(schema, type) and is_basemodel_subclass(schema)
        format_kwargs: dict[str, Any] = {"method": method} if method == "json_mode" else {"method": method, "strict": strict}
        ls_format = {"kwargs": format_kwargs, "schema": schema} if schema is not None else None
        parser: OutputParserLike[Any]
        if method != "json_mode" and schema is None:
            raise ValueError(f"method={method!r} needs a schema")
        if method == "function_calling" and schema is not None:
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, strict=strict, ls_structured_output_format=ls_format)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic_schema
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method == "json_mode" or (method == "json_schema" and schema is not None):
            if method == "json_mode" or schema is None:
                response_format: dict[str, Any] = {"type": "json_object"}
            else:
                function = convert_to_openai_function(schema, strict=strict)
                response_format = {"type": "json_schema", "json_schema": {
                    "name": function["name"], "schema": function["parameters"],
                    **({"strict": strict} if strict is not None else {}),
                    **({"description": function["description"]} if function.get("description") else {}),
                }}
            llm = self.bind(response_format=response_format, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic_schema else JsonOutputParser()
        else:
            raise ValueError(f"method must be function_calling, json_mode or json_schema, got {method!r}")
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")


def _format_tool_choice(choice: str | Mapping[str, Any], names: list[str]) -> str | dict[str, Any]:
    if isinstance(choice, Mapping):
        return dict(choice)
    if choice in _TOOL_CHOICE_WORDS:
        return _TOOL_CHOICE_WORDS[choice]
    if choice in names:
        return {"type": "function", "function": {"name": choice}}
    raise ValueError(f"tool_choice {choice!r} is neither auto/any/none/required nor one of the tools {names}")

