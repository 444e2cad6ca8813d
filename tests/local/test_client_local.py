"""End to end through the public client: MixtralClient(provider="local") against transformers' generate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtral_local.tokenizer import MixtralTokenizer

client_module = pytest.importorskip("mixtral_client._client", reason="the public client has not landed yet")
MixtralClient = client_module.MixtralClient
AsyncMixtralClient = client_module.AsyncMixtralClient

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]
LOCAL = {"local_options": {"dtype": "float32", "device": "cpu"}}


def test_greedy_text_equals_transformers_generate(tiny_dir: Path, hf_model: Callable[..., Any],
                                                  tokenizer: MixtralTokenizer) -> None:
    prompt = tokenizer.encode_chat(MESSAGES)
    with torch.no_grad():
        out = hf_model(tiny_dir).generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                                          pad_token_id=tokenizer.eos_id)
    expected = tokenizer.decode([t for t in out[0, len(prompt):].tolist() if t != tokenizer.eos_id])
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        done = client.chat.completions.create(messages=MESSAGES, temperature=0, max_tokens=20)
    assert done.choices[0].message.content == expected
    assert done.usage.prompt_tokens == len(prompt)


def test_provider_and_path_from_the_environment(tiny_dir: Path) -> None:
    env = {"MIXTRAL_PROVIDER": "local", "MIXTRAL_MODEL_PATH": str(tiny_dir)}
    with MixtralClient(env=env, **LOCAL) as client:
        assert client.provider == "local"
        chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, max_tokens=4))
    assert chunks[-1].usage.completion_tokens == 4


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_client_streams(tiny_dir: Path, anyio_backend: str) -> None:
    async with AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        stream = await client.chat.completions.create(messages=MESSAGES, stream=True, temperature=0, max_tokens=6)
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(messages=MESSAGES, temperature=0, max_tokens=6)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_tools_are_written_into_the_prompt_that_transformers_is_given_too(
        tiny_dir: Path, hf_model: Callable[..., Any], tokenizer: MixtralTokenizer, stream: bool) -> None:
    """The local backend has no tool tokens (v1): the tools and the earlier call and result travel as prompt
    text, and the answer is what transformers generates from exactly that prompt."""
    from mixtral_client._tools import ToolPrompt

    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "snow"}]
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        request = client._core.request(messages, False, {"tools": TOOLS})
        prompt_messages = ToolPrompt.for_request(request).request.messages
        if stream:
            with client.chat.completions.create(messages=messages, tools=TOOLS, stream=True, temperature=0,
                                                max_tokens=12) as chunks:
                done = chunks.get_final_completion()
        else:
            done = client.chat.completions.create(messages=messages, tools=TOOLS, temperature=0, max_tokens=12)

    prompt = tokenizer.encode_chat(prompt_messages)
    text = tokenizer.decode(prompt)
    assert "[AVAILABLE_TOOLS]" in text and '"name": "get_weather"' in text
    assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "abc123def"}]' in text
    assert '[TOOL_RESULTS] {"call_id": "abc123def", "name": "get_weather", "content": "snow"} [/TOOL_RESULTS]' in text
    with torch.no_grad():
        out = hf_model(tiny_dir).generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                          pad_token_id=tokenizer.eos_id)
    expected = tokenizer.decode([t for t in out[0, len(prompt):].tolist() if t != tokenizer.eos_id])
    assert done.usage.prompt_tokens == len(prompt)
    assert done.choices[0].message.content == expected  # random weights: text, not a call
    assert done.choices[0].message.tool_calls is None


def test_n_choices_through_the_client_stream_and_whole_agree(tiny_dir: Path) -> None:
    client = MixtralClient(provider="local", model_path=str(tiny_dir), local_options={"device": "cpu"})
    args: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "seed": 1, "max_tokens": 6}
    with client.chat.completions.create(stream=True, **args) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion()
    whole = client.chat.completions.create(**args)
    assert [c.message.content for c in streamed.choices] == [c.message.content for c in whole.choices]
    assert len(whole.choices) == 2 and whole.choices[0].message.content != whole.choices[1].message.content
    assert streamed.usage == whole.usage and whole.usage is not None and whole.usage.completion_tokens == 12


def test_with_raw_response_on_local_weights_has_no_http_but_the_same_answer(tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        direct = client.chat.completions.create(messages=MESSAGES, temperature=0, max_tokens=6)
        raw = client.chat.completions.with_raw_response.create(messages=MESSAGES, temperature=0, max_tokens=6)
        streamed = client.chat.completions.with_raw_response.create(messages=MESSAGES, temperature=0, max_tokens=6,
                                                                     stream=True)
        with streamed.parse() as stream:
            merged = stream.get_final_completion()
    assert (raw.status_code, len(raw.headers), raw.http_response, raw.retries_taken, raw.request_id) == \
        (200, 0, None, 0, None)
    assert raw.parse().choices[0].message.content == direct.choices[0].message.content
    assert merged.choices[0].message.content == direct.choices[0].message.content


def test_a_local_request_is_a_genai_span_too(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace_sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import mixtral_client._tracing as tracing

    exporter = InMemorySpanExporter()
    provider = trace_sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        done = client.chat.completions.create(messages=MESSAGES, max_tokens=5, temperature=0)
        streamed = list(client.chat.completions.create(messages=MESSAGES, max_tokens=3, stream=True))
    whole, stream = exporter.get_finished_spans()
    assert whole.name == "chat mixtral-local" and whole.attributes["gen_ai.provider.name"] == "local"
    assert "server.address" not in whole.attributes
    assert whole.attributes["gen_ai.usage.output_tokens"] == done.usage.completion_tokens == 5
    assert stream.attributes["gen_ai.response.finish_reasons"] == ("length",) and len(streamed) >= 3


def test_a_hosted_provider_falls_back_to_local_weights(tiny_dir: Path) -> None:
    """The host is down: the same request is answered by the weights, by configuration alone."""
    from tests.client.conftest import replying
    from tests.loopback import LoopbackServer

    env = {"MIXTRAL_API_KEY": "k", "MIXTRAL_FALLBACKS": "local", "MIXTRAL_MODEL_PATH": str(tiny_dir),
           "MIXTRAL_LOCAL_DTYPE": "float32", "MIXTRAL_LOCAL_DEVICE": "cpu"}
    with LoopbackServer(replying(503, "down")) as host:
        with MixtralClient(base_url=host.url, env=env, max_retries=0) as client:
            assert client.fallbacks == ["local"]
            answer = client.chat.completions.create(messages=MESSAGES, max_tokens=4, temperature=0)
        assert len(host.requests) == 1
    assert answer.model == "mixtral-local" and answer.usage.completion_tokens == 4


def test_a_batch_on_local_weights_decodes_together_and_answers_as_one_by_one(tiny_dir: Path) -> None:
    """Eight greedy requests: the same answers as one at a time, in far fewer decode steps (they share them)."""
    batch = [{"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 24, "temperature": 0}
             for i in range(8)]
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        alone = [client.chat.completions.create(**request).choices[0].message.content for request in batch]
        before = client._backend.stats()["decode_steps"]
        together = client.chat.completions.batch(batch, max_concurrency=8)
        steps = client._backend.stats()["decode_steps"] - before
    assert [a.choices[0].message.content for a in together] == alone
    assert steps < 8 * 24 / 2, steps  # one after another would take about 8 * 23 steps


def test_the_command_line_falls_back_and_paces(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixtral_client._cli import main
    from tests.client.conftest import replying
    from tests.loopback import LoopbackServer

    env = {"MIXTRAL_API_KEY": "k", "MIXTRAL_MODEL_PATH": str(tiny_dir), "MIXTRAL_LOCAL_DTYPE": "float32",
           "MIXTRAL_LOCAL_DEVICE": "cpu"}
    with LoopbackServer(replying(503, "down")) as host:
        code = main(["chat", "hi", "--base-url", host.url, "--fallback", "local", "--rate-limit", "600",
                     "--max-tokens", "3", "--no-stream"], env=env)
        assert code == 0 and capsys.readouterr().out.strip()
        assert len(host.requests) == 3  # its own two retries, then the weights answered
    assert main(["chat", "hi", "--base-url", "http://127.0.0.1:9/v1", "--rate-limit", "0"], env=env) == 2
    assert "requests per minute must be a number > 0" in capsys.readouterr().err


def test_doctor_describes_local_weights(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixtral_client._cli import main

    env = {"MIXTRAL_LOCAL_DTYPE": "float32", "MIXTRAL_LOCAL_DEVICE": "cpu"}
    assert main(["doctor", "--model-path", str(tiny_dir), "--no-request", "--local", "max_batch=8"], env=env) == 0
    out = capsys.readouterr().out
    assert f"checkpoint  {tiny_dir}  (RANDOM weights: answers are noise)" in out
    assert "shape       2 layers, 4 experts (top 2), hidden 64, vocabulary 32000" in out
    assert "in float32 on cpu" in out and "moe         torch reference" in out
    assert "batch       up to 8 rows; KV cache unbound (CPU)" in out and "request" not in out
    assert main(["doctor", "--model-path", str(tiny_dir)], env=env) == 0
    assert "request     ok: model mixtral-local" in capsys.readouterr().out
    (tiny_dir.parent / "broken").mkdir(exist_ok=True)
    assert main(["doctor", "--model-path", str(tiny_dir.parent / "broken"), "--no-request"], env=env) == 2


RENDERED = "<s>[INST] You are terse.\n\nName three rivers. [/INST]"  # MESSAGES in Mixtral's prompt format


def test_a_raw_prompt_in_the_chat_format_answers_as_the_chat_request(tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        chat = client.chat.completions.create(messages=MESSAGES, temperature=0, max_tokens=12)
        text = client.completions.create(prompt=RENDERED, temperature=0, max_tokens=12)
        with client.completions.create(prompt=RENDERED, temperature=0, max_tokens=12, stream=True) as stream:
            pieces = [c.choices[0].text for c in stream if c.choices]
            streamed = stream.get_final_completion()

    assert text.object == "text_completion"
    assert text.choices[0].text == chat.choices[0].message.content
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (chat.usage.prompt_tokens,
                                                                       chat.usage.completion_tokens)
    assert "".join(pieces) == streamed.choices[0].text == text.choices[0].text
    assert streamed.choices[0].finish_reason == text.choices[0].finish_reason


def test_a_raw_prompt_continues_text_with_no_chat_template(tiny_dir: Path, tokenizer: MixtralTokenizer) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        text = client.completions.create(prompt="The river", temperature=0, max_tokens=4)

    assert text.usage.prompt_tokens == len(tokenizer.encode_prompt("The river")) == 1 + len(tokenizer.sp.encode("The river"))


def test_raw_prompt_logprobs_come_in_the_legacy_shape(tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        text = client.completions.create(prompt=RENDERED, temperature=0, max_tokens=6, logprobs=2)

    logprobs = text.choices[0].logprobs
    assert logprobs is not None and not isinstance(logprobs, dict)
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == text.usage.completion_tokens == 6
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.top_logprobs is not None and all(len(top) == 2 for top in logprobs.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert [max(top, key=top.__getitem__) for top in logprobs.top_logprobs] == logprobs.tokens
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_raw_prompt_streams(tiny_dir: Path, anyio_backend: str) -> None:
    async with AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        whole = await client.completions.create(prompt=RENDERED, temperature=0, max_tokens=6)
        async with await client.completions.create(prompt=RENDERED, temperature=0, max_tokens=6,
                                                   stream=True) as stream:
            pieces = [c.choices[0].text async for c in stream if c.choices]

    assert "".join(pieces) == whole.choices[0].text


@pytest.mark.parametrize("rows", [512, 4], ids=["one-slice", "slices-of-4"])  # PROMPT_LOGPROB_ROWS
@pytest.mark.parametrize("prompt", ["The river runs to the sea.", RENDERED])
def test_echo_scores_the_prompt_as_transformers_does(tiny_dir: Path, hf_model: Callable[..., Any],
                                                     tokenizer: MixtralTokenizer, prompt: str, rows: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``echo`` with ``max_tokens=0``: the prompt alone, each token's log probability given those before it (the
    first, BOS, has none), its texts adding up to the prompt: an implicit BOS is "", a written one "<s>"; the
    same whether the vocabulary's logits are taken at once or a few positions at a time, the last slice short."""
    import mixtral_local.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "PROMPT_LOGPROB_ROWS", rows)
    ids = tokenizer.encode_prompt(prompt)
    assert rows > len(ids) or (len(ids) - 1) % rows != 0
    with torch.no_grad():
        expected = torch.log_softmax(hf_model(tiny_dir)(torch.tensor([ids])).logits[0, :-1].float(), -1)
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        text = client.completions.create(prompt=prompt, echo=True, max_tokens=0, logprobs=3)

    (choice,) = text.choices
    assert (choice.text, choice.finish_reason) == (prompt, "length")
    assert text.usage is not None and (text.usage.prompt_tokens, text.usage.completion_tokens) == (len(ids), 0)
    logprobs = choice.logprobs
    assert logprobs is not None and not isinstance(logprobs, dict) and logprobs.top_logprobs is not None
    assert "".join(logprobs.tokens) == prompt and len(logprobs.tokens) == len(ids)
    assert logprobs.tokens[0] == ("<s>" if prompt.startswith("<s>") else "")
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([float(expected[i, t]) for i, t in enumerate(ids[1:])],
                                                        abs=1e-4)
    for row, top in zip(expected, logprobs.top_logprobs[1:], strict=True):
        assert top is not None and sorted(top.values(), reverse=True) == pytest.approx(
            torch.topk(row, 3).values.tolist(), abs=1e-4)


def test_echo_opens_each_answer_with_the_prompt(tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        plain = client.completions.create(prompt=RENDERED, temperature=0, max_tokens=5, logprobs=1)
        echoed = client.completions.create(prompt=RENDERED, temperature=0, max_tokens=5, logprobs=1, echo=True)
        with client.completions.create(prompt=RENDERED, temperature=0, max_tokens=5, echo=True,
                                       stream=True) as stream:
            pieces = [c.choices[0].text for c in stream if c.choices]
        two = client.completions.create(prompt=RENDERED, max_tokens=3, echo=True, n=2, seed=1)

    assert echoed.choices[0].text == RENDERED + plain.choices[0].text
    assert pieces[0] == RENDERED and "".join(pieces) == echoed.choices[0].text
    assert echoed.usage is not None and plain.usage is not None
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens == 5
    mine, theirs = echoed.choices[0].logprobs, plain.choices[0].logprobs
    assert mine is not None and theirs is not None and not isinstance(mine, dict) and not isinstance(theirs, dict)
    assert mine.tokens[-5:] == theirs.tokens and mine.token_logprobs[-5:] == pytest.approx(theirs.token_logprobs)
    assert mine.text_offset[-5:] == [len(RENDERED) + offset for offset in theirs.text_offset]
    assert [c.index for c in two.choices] == [0, 1] and all(c.text.startswith(RENDERED) for c in two.choices)


def test_echo_needs_a_prompt_that_fits(tiny_dir: Path, engine: Any) -> None:
    from mixtral_client import InvalidRequestError
    from mixtral_local.engine.kv_cache import KVCache

    eight = 8 * KVCache.nbytes(engine.model.config, 1, 1, torch.float32)  # a KV cache of 8 positions
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={},
                       local_options={**LOCAL["local_options"], "kv_cache_memory": eight}) as client:
        with pytest.raises(InvalidRequestError, match="the prompt is 10 tokens; the KV cache"):
            client.completions.create(prompt="one two three four five six seven eight nine", echo=True,
                                      max_tokens=0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_echo_alone_streams_the_prompt_then_ends(tiny_dir: Path, anyio_backend: str) -> None:
    async with AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        async with await client.completions.create(prompt=RENDERED, echo=True, max_tokens=0, logprobs=0,
                                                   stream=True) as stream:
            chunks = [c async for c in stream]
            final = await stream.get_final_completion()

    assert [c.choices[0].text for c in chunks if c.choices] == [RENDERED, ""]
    assert final.choices[0].text == RENDERED and final.choices[0].finish_reason == "length"
    logprobs = final.choices[0].logprobs
    assert logprobs is not None and not isinstance(logprobs, dict) and "".join(logprobs.tokens) == RENDERED


def test_several_prompts_answer_as_one_request_each(tiny_dir: Path, tokenizer: MixtralTokenizer) -> None:
    """A list of prompts: prompt i's n choices at indices i * n ..., the usage adding up every prompt once; a
    prompt of token ids answers as the text they encode."""
    texts = ["The river", "A cat sat"]
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        alone = [client.completions.create(prompt=p, temperature=0, max_tokens=4) for p in texts]
        together = client.completions.create(prompt=texts, temperature=0, max_tokens=4, n=2)
        ids = client.completions.create(prompt=[tokenizer.encode_prompt(p) for p in texts], temperature=0,
                                        max_tokens=4)
        counted = client.completions.count_tokens(prompt=texts)
        with client.completions.create(prompt=texts, temperature=0, max_tokens=4, stream=True) as stream:
            streamed = stream.get_final_completion()

    assert [(c.index, c.text) for c in together.choices] == [
        (i * 2 + j, alone[i].choices[0].text) for i in range(2) for j in range(2)]
    assert [c.text for c in ids.choices] == [c.text for c in streamed.choices] == [a.choices[0].text for a in alone]
    assert together.usage is not None and streamed.usage is not None
    assert together.usage.prompt_tokens == streamed.usage.prompt_tokens == counted == sum(
        a.usage.prompt_tokens for a in alone if a.usage is not None)
    assert together.usage.completion_tokens == 16 and streamed.usage.completion_tokens == 8


def test_echo_writes_token_ids_out(tiny_dir: Path, tokenizer: MixtralTokenizer) -> None:
    ids = tokenizer.encode_prompt("The river runs")
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        scored = client.completions.create(prompt=[ids, ids[1:]], echo=True, max_tokens=0, logprobs=1)
        text = client.completions.create(prompt="The river runs", echo=True, max_tokens=0, logprobs=1)

    with_bos, without = scored.choices
    assert (with_bos.text, without.text) == ("<s>The river runs", "The river runs")
    for choice in scored.choices:
        assert choice.logprobs is not None and not isinstance(choice.logprobs, dict)
        assert "".join(choice.logprobs.tokens) == choice.text and choice.logprobs.token_logprobs[0] is None
    assert with_bos.logprobs.token_logprobs == text.choices[0].logprobs.token_logprobs  # type: ignore[union-attr]


def test_a_token_id_outside_the_vocabulary_is_refused(tiny_dir: Path) -> None:
    from mixtral_client import InvalidRequestError

    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        with pytest.raises(InvalidRequestError, match=r"token 32000 \(in prompt 1\) is not in the model's vocab"):
            client.completions.create(prompt=[[1, 415], [1, 32000]], max_tokens=2)
