"""``MixtralLLM``: the LangChain text model (``BaseLLM``) over ``client.completions``: a prompt string in, the
model's continuation out, with no chat template (write Mixtral's ``[INST] ... [/INST]`` in the prompt, or use
``ChatMixtral``). Like ``ChatMixtral`` it holds no HTTP code: every call goes through our client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, ClassVar, Literal

import anyio
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict

from mixtral_client import Completion, TextCompletionParams
from mixtral_client.types import Usage

from ._clients import MixtralClients

__all__ = ["MixtralLLM"]


class MixtralLLM(MixtralClients, BaseLLM):
    """Mixtral-8x7B-Instruct as a LangChain LLM (text in, text out), on any provider ``mixtral_client`` knows.

    ```python
    from langchain_mixtral import MixtralLLM

    llm = MixtralLLM(provider="bedrock", temperature=0, max_tokens=64)   # Bedrock's InvokeModel
    llm.invoke("<s>[INST] Name three rivers. [/INST]")
    ```

    The prompt is sent as written (``client.completions.create``; see docs/completions.md): a host's
    ``/completions``, Bedrock's InvokeModel, or the local tokenizer. The configuration is ``ChatMixtral``'s.
    """

    model_config = ConfigDict(extra="forbid")

    logprobs: int | None = None
    """How many most likely tokens to list at each position (the legacy completions API's ``logprobs``); the
    lists are in ``generation_info["logprobs"]``."""

    _reserved: ClassVar[frozenset[str]] = frozenset({"stream", "prompt"})
    _known: ClassVar[frozenset[str]] = frozenset(TextCompletionParams.__annotations__)
    _ls_model_type: ClassVar[Literal["chat", "llm"]] = "llm"

    @property
    def _llm_type(self) -> str:
        return "mixtral"

    def _own_params(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs}

    # -- calls ----------------------------------------------------------------------------------------

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        if self.streaming:
            chunks = [_joined(self._stream(prompt, stop, run_manager, **kwargs)) for prompt in prompts]
            return LLMResult(generations=[[chunk] for chunk in chunks], llm_output=self._llm_output(None, kwargs))
        params = self._call_params(stop, False, **kwargs)
        client = self._client()
        if self.provider == "local" and len(prompts) > 1:  # one request: every prompt in one running batch
            return self._result(_per_prompt(client.completions.create(prompt=prompts, **params), len(prompts)),
                                params)
        answers = [client.completions.create(prompt=prompt, **params) for prompt in prompts]  # hosts may take
        return self._result(answers, params)  # a string prompt only (OpenRouter, Bedrock): one request each

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        if self.streaming:
            chunks = [await _ajoined(self._astream(prompt, stop, run_manager, **kwargs)) for prompt in prompts]
            return LLMResult(generations=[[chunk] for chunk in chunks], llm_output=self._llm_output(None, kwargs))
        params = self._call_params(stop, False, **kwargs)
        client = await self._aclient()
        answers: list[Any] = [None] * len(prompts)

        async def one(i: int) -> None:
            answers[i] = await client.completions.create(prompt=prompts[i], **params)

        async with anyio.create_task_group() as group:  # the prompts concurrently (one batch on local weights)
            for i in range(len(prompts)):
                group.start_soon(one, i)
        return self._result(answers, params)

    def _result(self, answers: list[Completion], params: Mapping[str, Any]) -> LLMResult:
        generations = [[Generation(text=choice.text, generation_info=_info(choice.finish_reason, choice.logprobs))
                        for choice in answer.choices] for answer in answers]
        usage = Usage()
        for answer in answers:
            if answer.usage is not None:
                usage.prompt_tokens += answer.usage.prompt_tokens
                usage.completion_tokens += answer.usage.completion_tokens
                usage.total_tokens += answer.usage.total_tokens
        return LLMResult(generations=generations, llm_output=self._llm_output(usage, params))

    def _llm_output(self, usage: Usage | None, params: Mapping[str, Any]) -> dict[str, Any]:
        output: dict[str, Any] = {"model_name": params.get("model") or self._model_name}
        if usage is not None:
            output["token_usage"] = usage.model_dump(exclude_none=True)
        return output

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        params = self._call_params(stop, True, **kwargs)
        with self._client().completions.create(prompt=prompt, stream=True, **params) as stream:
            for completion in stream:
                if (chunk := _chunk(completion)) is not None:
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        params = self._call_params(stop, True, **kwargs)
        async with await (await self._aclient()).completions.create(prompt=prompt, stream=True, **params) as stream:
            async for completion in stream:
                if (chunk := _chunk(completion)) is not None:
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk


def _per_prompt(answer: Completion, count: int) -> list[Completion]:
    """A completion of ``count`` prompts split into one per prompt (prompt i's choices are ``i*n ... i*n+n-1``,
    renumbered from 0); the usage stays with the first, so the sum over them is the request's."""
    n = len(answer.choices) // count
    return [answer.model_copy(update={
        "choices": [choice.model_copy(update={"index": j}) for j, choice in enumerate(answer.choices[i * n:i * n + n])],
        "usage": answer.usage if i == 0 else None,
    }) for i in range(count)]


def _info(finish_reason: str | None, logprobs: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"finish_reason": finish_reason}
    if logprobs is not None:
        info["logprobs"] = logprobs if isinstance(logprobs, dict) else logprobs.model_dump()
    return info


def _chunk(completion: Completion) -> GenerationChunk | None:
    """A stream's ``Completion`` as a LangChain chunk: choice 0's text; the finish reason, when it comes; the
    usage, on the chunk that carries it."""
    choice = next((c for c in completion.choices if c.index == 0), None)
    info: dict[str, Any] = {}
    if choice is not None and (choice.finish_reason is not None or choice.logprobs is not None):
        info.update(_info(choice.finish_reason, choice.logprobs))
    if completion.usage is not None:
        info["token_usage"] = completion.usage.model_dump(exclude_none=True)
    text = choice.text if choice is not None else ""
    if not text and not info:
        return None
    return GenerationChunk(text=text, generation_info=info or None)


def _joined(chunks: Iterator[GenerationChunk]) -> GenerationChunk:
    whole = GenerationChunk(text="")
    for chunk in chunks:
        whole += chunk
    return whole


async def _ajoined(chunks: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    whole = GenerationChunk(text="")
    async for chunk in chunks:
        whole += chunk
    return whole
