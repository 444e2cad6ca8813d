"""``MixtralLLM``: LangChain's text-model interface over ``client.completions``, against a loopback host (what
goes on the wire, streams, callbacks) and the tiny local checkpoint (the same answer as ``ChatMixtral`` for the
conversation its prompt writes out)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from pydantic import ValidationError

from langchain_mixtral import ChatMixtral, MixtralLLM
from tests.loopback import Conn, LoopbackServer, Received, sse

pytest.importorskip("mixtral_local.backend", reason="the local backend is not installed")

RENDERED = "<s>[INST] You are terse.\n\nName three rivers. [/INST]"
MESSAGES = [("system", "You are terse."), ("user", "Name three rivers.")]


def _text(piece: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "t", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": piece, "finish_reason": finish}], **extra}


def _host(req: Received, conn: Conn) -> None:
    if req.json().get("stream"):
        conn.start(200, {"Content-Type": "text/event-stream"})
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        conn.write(sse(_text(" upon"), _text(" a time", "length"), {**_text(""), "choices": [], "usage": usage}),
                   one_byte=True)
        conn.finish()
    else:
        conn.respond(200, {**_text(" upon a time", "length"),
                           "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})


@pytest.fixture
def host() -> Iterator[LoopbackServer]:
    with LoopbackServer(_host) as server:
        yield server


def test_invoke_sends_the_prompt_as_written_with_the_models_parameters(host: LoopbackServer) -> None:
    llm = MixtralLLM(base_url=host.url, api_key="k", temperature=0.2, max_tokens=3, stop=["\n"],
                     model_kwargs={"top_k": 40})

    assert llm.invoke("Once", presence_penalty=0.5) == " upon a time"

    (req,) = host.requests
    assert req.path.endswith("/completions") and not req.path.endswith("/chat/completions")
    assert req.json() == {"model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "prompt": "Once", "temperature": 0.2,
                          "max_tokens": 3, "presence_penalty": 0.5, "stop": ["\n"], "top_k": 40}


def test_generate_reports_finish_reason_and_summed_usage(host: LoopbackServer) -> None:
    result = MixtralLLM(base_url=host.url, api_key="k").generate(["a", "b"])

    assert [[g.text for g in gens] for gens in result.generations] == [[" upon a time"], [" upon a time"]]
    assert result.generations[0][0].generation_info == {"finish_reason": "length"}
    assert result.llm_output is not None
    assert result.llm_output["token_usage"] == {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
    assert result.llm_output["model_name"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"


class _Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_stream_gives_text_chunks_and_streaming_invoke_calls_back_each_token(host: LoopbackServer) -> None:
    llm = MixtralLLM(base_url=host.url, api_key="k")
    chunks = list(llm.stream("Once"))
    seen = _Tokens()
    streamed = MixtralLLM(base_url=host.url, api_key="k", streaming=True).invoke("Once",
                                                                                config={"callbacks": [seen]})

    assert chunks == [" upon", " a time", ""]  # the last one carries the usage only
    assert host.requests[0].json()["stream_options"] == {"include_usage": True}
    assert streamed == " upon a time"
    assert [t for t in seen.tokens if t] == [" upon", " a time"]


def test_async_generate_and_stream(host: LoopbackServer) -> None:
    llm = MixtralLLM(base_url=host.url, api_key="k")

    async def run() -> tuple[Any, list[str]]:
        result = await llm.agenerate(["a", "b", "c"])
        return result, [chunk async for chunk in llm.astream("Once")]

    result, chunks = anyio.run(run)
    assert [gens[0].text for gens in result.generations] == [" upon a time"] * 3
    assert chunks == [" upon", " a time", ""]
    assert len(host.requests) == 4


def test_model_kwargs_may_not_set_the_prompt() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        MixtralLLM(base_url="http://127.0.0.1:9/v1", api_key="k", model_kwargs={"prompt": "x"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mixtral_local import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-llm")
    write_tiny_checkpoint(path)
    return str(path)


def test_on_local_weights_the_written_out_prompt_answers_as_chat_mixtral(tiny_dir: str) -> None:
    options: dict[str, Any] = {"provider": "local", "model_path": str(tiny_dir), "temperature": 0, "max_tokens": 8,
                               "local_options": {"dtype": "float32", "device": "cpu"}}
    llm, chat = MixtralLLM(**options, logprobs=2), ChatMixtral(**options)
    try:
        text = llm.invoke(RENDERED)
        streamed = "".join(llm.stream(RENDERED))
        result = llm.generate([RENDERED])
        expected = chat.invoke(MESSAGES).content
    finally:
        llm.close()
        chat.close()

    assert text == streamed == expected
    info = result.generations[0][0].generation_info
    assert info is not None and len(info["logprobs"]["tokens"]) == 8
    assert json.dumps(info["logprobs"])  # plain JSON, as LangChain serializes generation_info


def test_on_local_weights_a_batch_of_prompts_is_one_request_with_each_prompts_own_answer(
        tiny_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_client._text_client import TextCompletions

    llm = MixtralLLM(provider="local", model_path=str(tiny_dir), temperature=0, max_tokens=6, model_kwargs={"n": 2},
                     local_options={"dtype": "float32", "device": "cpu"})
    prompts = [RENDERED, "<s>[INST] Count to three. [/INST]", "Once upon a time"]
    try:
        alone = [llm.generate([prompt]) for prompt in prompts]
        sent: list[Any] = []
        create = TextCompletions.create
        monkeypatch.setattr(TextCompletions, "create", lambda self, **kw: sent.append(kw["prompt"]) or create(self, **kw))
        batch = llm.generate(prompts)
    finally:
        llm.close()

    assert sent == [prompts]  # one request, every prompt in it
    assert [[g.text for g in gens] for gens in batch.generations] == [[g.text for g in r.generations[0]]
                                                                      for r in alone]
    assert all(len(gens) == 2 for gens in batch.generations)
    assert batch.generations[1][0].text != batch.generations[2][0].text  # not one prompt's answer repeated
    total = {k: sum(r.llm_output["token_usage"][k] for r in alone) for k in ("prompt_tokens", "completion_tokens")}
    assert {k: batch.llm_output["token_usage"][k] for k in total} == total


def test_langsmith_sees_an_llm_with_its_provider_and_per_call_model() -> None:
    llm = MixtralLLM(provider="openrouter", api_key="k", temperature=0.3)

    params = llm._get_ls_params(stop=["\n"], model="other/model")

    assert params == {"ls_provider": "openrouter", "ls_model_name": "other/model", "ls_model_type": "llm",
                      "ls_temperature": 0.3, "ls_stop": ["\n"]}
    assert llm._identifying_params["model"] == "mistralai/mixtral-8x7b-instruct"
