"""``mixtral serve`` over local weights, called by the official openai SDK: the answers are the in-process
client's, tools and JSON schemas are enforced, refusals are OpenAI's error types, and a caller that goes away
takes its row out of the batch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from mixtral_client import AsyncMixtralClient, MixtralClient
from tests.server.conftest import LOCAL, async_openai_client, openai_client, running

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}]


@pytest.fixture
def sdk(local_url: str) -> Iterator[openai.OpenAI]:
    with openai_client(local_url) as client:
        yield client


def served_engine(tiny_dir: Path) -> Any:
    """The engine the server's local backend shares (one per checkpoint and load options)."""
    from mixtral_local.backend import _engines

    return next(engine for key, engine in _engines.items() if key[0] == str(tiny_dir.resolve()))


def in_process(tiny_dir: Path, **params: Any) -> Any:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        return client.chat.completions.create(messages=MESSAGES, **params)


def test_whole_answer_is_the_in_process_clients(sdk: openai.OpenAI, tiny_dir: Path) -> None:
    answer = sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES,
                                                              temperature=0, max_tokens=12)
    expected = in_process(tiny_dir, temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (expected.usage.prompt_tokens, 12)
    assert expected._request_id is None  # local weights: no host, no host request id; the server makes one
    assert answer._request_id.startswith("req_") and len(answer._request_id) == 36


def test_stream_carries_usage_in_a_last_chunk_only_when_asked(sdk: openai.OpenAI) -> None:
    plain = list(sdk.chat.completions.create(model="mixtral-8x7b-instruct", messages=MESSAGES, temperature=0,
                                                max_tokens=6, stream=True))
    assert all(chunk.choices and chunk.usage is None for chunk in plain)
    assert plain[0].choices[0].delta.role == "assistant" and plain[-1].choices[0].finish_reason == "length"
    counted = list(sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, temperature=0,
                                                  max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert [c.usage is None for c in counted] == [True] * (len(counted) - 1) + [False]
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in plain)
    assert text == "".join(c.choices[0].delta.content or "" for c in counted if c.choices)
    whole = sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, temperature=0, max_tokens=6)
    assert text == whole.choices[0].message.content


def test_n_choices_stream_with_every_chunk_holding_a_choice(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(
        model="mixtral-local", messages=MESSAGES, n=3, seed=7, max_tokens=4, stream=True))
    assert all(chunk.choices for chunk in chunks)
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert finished == [0, 1, 2]


def test_required_tool_call_arrives_as_tool_calls(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model="mixtral-local", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
        tool_choice="required", max_tokens=80, seed=1)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 12
    assert len(call.id) == 9


def test_json_schema_format_is_enforced(sdk: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    answer = sdk.chat.completions.create(
        model="mixtral-local", messages=MESSAGES, max_tokens=60, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}})
    value = json.loads(answer.choices[0].message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and isinstance(value["n"], int)


def test_openai_sdk_parse_gets_an_instance_of_its_model(sdk: openai.OpenAI) -> None:
    class Verdict(BaseModel):
        ok: bool
        score: int = Field(ge=0, le=9)

    answer = sdk.chat.completions.parse(model="mixtral-local", messages=MESSAGES, response_format=Verdict,
                                        max_tokens=40, seed=5)
    parsed = answer.choices[0].message.parsed
    assert isinstance(parsed, Verdict) and 0 <= parsed.score <= 9


def test_a_streamed_required_call_accumulates_in_the_openai_sdk(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.stream(model="mixtral-local", messages=[{"role": "user", "content": "Paris?"}],
                                     tools=TOOLS, tool_choice="required", max_tokens=80, seed=2) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}


def test_logprobs_reach_the_openai_sdk_whole_and_streamed(sdk: openai.OpenAI, tiny_dir: Path) -> None:
    params: dict[str, Any] = {"temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 3}
    whole = sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, **params)
    expected = in_process(tiny_dir, **params).choices[0].logprobs
    tokens = whole.choices[0].logprobs.content
    assert [(t.token, t.bytes, t.logprob) for t in tokens] == [(t.token, t.bytes, t.logprob) for t in expected.content]
    assert [[a.token for a in t.top_logprobs] for t in tokens] == [
        [a.token for a in t.top_logprobs] for t in expected.content]
    assert "".join(t.token for t in tokens) == whole.choices[0].message.content
    streamed = [t for chunk in sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, stream=True,
                                                           **params)
                for c in chunk.choices if c.logprobs is not None for t in c.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in tokens]


def test_logit_bias_reaches_local_weights(sdk: openai.OpenAI) -> None:
    yes = 5592  # "▁Yes" in the v1 tokenizer
    answer = sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, max_tokens=3, seed=1,
                                         logit_bias={str(yes): 100})
    assert answer.choices[0].message.content == "Yes Yes Yes"


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": 9}, "temperature"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_refused_request_is_a_bad_request_naming_the_parameter(sdk: openai.OpenAI, body: dict[str, Any],
                                                               param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(**{"model": "mixtral-local", "messages": MESSAGES, **body})
    assert caught.value.param == param
    assert caught.value.body["param"] == param


def test_unknown_model_is_not_found(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


def test_health_shows_the_local_batch_at_work(sdk: openai.OpenAI, local_url: str) -> None:
    health = local_url.removesuffix("/v1") + "/health"
    calm = httpx.get(health).json()
    assert calm["status"] == "ok" and calm["local"]["loaded"] is True and calm["local"]["decoding"] == 0
    stream = sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, max_tokens=900, stream=True)
    next(iter(stream))
    deadline = time.monotonic() + 5
    while (busy := httpx.get(health).json()["local"])["decoding"] != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    stream.close()
    assert busy["decoding"] == 1 and busy["kv_cache_bytes"] > 0 and busy["max_batch"] == 32
    deadline = time.monotonic() + 5
    while httpx.get(health).json()["local"]["decoding"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(health).json()["local"]["decoding"] == 0


def test_models_lists_the_served_name(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["mixtral-local"]
    assert sdk.models.retrieve("mixtral-local").owned_by == "local"
    assert sdk.models.retrieve("mixtral-8x7b-instruct").id == "mixtral-8x7b-instruct"  # the alias is served too
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("mistralai/gpt-4o")


def settled_steps(engine: Any) -> int:
    """The engine's decode-step count once it has stopped growing for a second (no row left running)."""
    settled, last = time.monotonic(), engine.scheduler.steps
    while time.monotonic() - settled < 1.0:
        time.sleep(0.1)
        if engine.scheduler.steps != last:
            settled, last = time.monotonic(), engine.scheduler.steps
    return last


LONG = {"model": "mixtral-local", "messages": MESSAGES, "max_tokens": 900}  # 899 decode steps when let run


def test_stream_caller_that_hangs_up_leaves_the_batch(local_url: str, tiny_dir: Path) -> None:
    engine = served_engine(tiny_dir)
    before = settled_steps(engine)
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{local_url}/chat/completions",
                                                       json={**LONG, "stream": True}) as response:
        events = []
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(line)
            if len(events) == 3:
                break  # and hang up
    assert settled_steps(engine) - before < 200


def test_whole_answer_caller_that_hangs_up_leaves_the_batch(local_url: str, tiny_dir: Path) -> None:
    engine = served_engine(tiny_dir)
    before = settled_steps(engine)
    with httpx.Client(timeout=httpx.Timeout(30, read=0.3)) as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"{local_url}/chat/completions", json=LONG)
    assert settled_steps(engine) - before < 200


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_concurrent_streams_decode_in_one_batch(local_url: str, tiny_dir: Path, anyio_backend: str) -> None:
    engine = served_engine(tiny_dir)
    prompts = [[{"role": "user", "content": f"Count to {i}"}] for i in range(4)]
    texts: dict[int, str] = {}
    client = async_openai_client(local_url)

    async def one(i: int) -> None:
        stream = await client.chat.completions.create(model="mixtral-local", messages=prompts[i], temperature=0,
                                                      max_tokens=24, stream=True)
        texts[i] = "".join([c.choices[0].delta.content or "" async for c in stream])

    before = engine.scheduler.steps
    async with client, anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i)
    assert engine.scheduler.steps - before < 4 * 24  # rows shared steps
    async with AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as own:
        for i, messages in enumerate(prompts):
            alone = await own.chat.completions.create(messages=messages, temperature=0, max_tokens=24)
            assert texts[i] == alone.choices[0].message.content


def test_api_key_guards_v1_but_not_health(tiny_dir: Path) -> None:
    client = AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL)
    with running(client, api_key="s3cret", model_name="mixtral", warmup=False) as url:
        with openai_client(url, api_key="wrong") as wrong, openai_client(url, api_key="s3cret") as right:
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(model="mixtral", messages=MESSAGES)
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
            answer = right.chat.completions.create(model="mixtral", messages=MESSAGES, max_tokens=2)
        assert answer.usage.completion_tokens == 2
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["model"] == "mixtral"


def test_chat_mixtral_talks_to_the_server_as_to_any_openai_host(local_url: str, tiny_dir: Path) -> None:
    langchain_mixtral = pytest.importorskip("langchain_mixtral")
    llm = langchain_mixtral.ChatMixtral(provider="openai", base_url=local_url, api_key="unused",
                                        model="mixtral-local", temperature=0, max_tokens=6)
    said = llm.invoke([("system", "You are terse."), ("user", "Name three rivers.")])
    assert said.content == in_process(tiny_dir, temperature=0, max_tokens=6).choices[0].message.content
    assert said.usage_metadata is not None and said.usage_metadata["output_tokens"] == 6


def test_metrics_count_answers_tokens_and_the_local_batch(tiny_dir: Path) -> None:
    def scrape(base: str) -> dict[str, float]:
        text = httpx.get(base.removesuffix("/v1") + "/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    with running(AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL),
                 warmup=False) as url, openai_client(url) as sdk:
        whole = sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, max_tokens=3)
        with sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}) as stream:
            streamed = [c for c in stream if c.usage is not None][-1].usage
        with pytest.raises(openai.BadRequestError):
            sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, temperature=9)
        seen = scrape(url)

    assert seen['mixtral_serve_requests_total{code="200",stream="false"}'] == 1
    assert seen['mixtral_serve_requests_total{code="200",stream="true"}'] == 1
    assert seen['mixtral_serve_requests_total{code="400",stream="false"}'] == 1
    assert seen['mixtral_serve_tokens_total{type="completion"}'] == whole.usage.completion_tokens + 4 == 7
    assert seen['mixtral_serve_tokens_total{type="prompt"}'] == whole.usage.prompt_tokens + streamed.prompt_tokens
    assert seen['mixtral_serve_request_duration_seconds_count{stream="false"}'] == 2
    assert seen['mixtral_serve_request_duration_seconds_bucket{stream="true",le="+Inf"}'] == 1
    assert seen["mixtral_serve_requests_in_flight"] == 0 and seen["mixtral_serve_stream_errors_total"] == 0
    # the first token of each answer comes from its prefill: (3 - 1) + (4 - 1) decode steps at least (the engine
    # may be shared with this module's other server)
    assert seen["mixtral_local_decode_steps_total"] >= 5 and seen["mixtral_local_max_batch"] == 32


RENDERED = "<s>[INST] You are terse.\n\nName three rivers. [/INST]"  # MESSAGES in Mixtral's prompt format


def test_openai_sdk_completions_answer_a_raw_prompt_as_the_chat_request(sdk: openai.OpenAI, tiny_dir: Path) -> None:
    text = sdk.completions.create(model="mixtral-local", prompt=RENDERED, temperature=0, max_tokens=8)
    expected = in_process(tiny_dir, temperature=0, max_tokens=8)

    assert text.object == "text_completion"
    assert text.choices[0].text == expected.choices[0].message.content
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (expected.usage.prompt_tokens, 8)
    assert text._request_id.startswith("req_")


def test_openai_sdk_completions_stream_with_usage_last(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.completions.create(model="mixtral-local", prompt=RENDERED, temperature=0, max_tokens=6,
                                         stream=True, stream_options={"include_usage": True}))
    whole = sdk.completions.create(model="mixtral-local", prompt=RENDERED, temperature=0, max_tokens=6)

    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.usage is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_openai_sdk_completions_logprobs_are_the_legacy_lists(sdk: openai.OpenAI) -> None:
    text = sdk.completions.create(model="mixtral-local", prompt=RENDERED, temperature=0, max_tokens=4, logprobs=3)

    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) == 3 for top in logprobs.top_logprobs)


def test_openai_sdk_completions_echo_scores_the_prompt(sdk: openai.OpenAI, tiny_dir: Path) -> None:
    """A text scored: ``echo=True, max_tokens=0, logprobs=1`` gives the in-process client's numbers."""
    text = sdk.completions.create(model="mixtral-local", prompt=RENDERED, echo=True, max_tokens=0, logprobs=1)
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        expected = client.completions.create(prompt=RENDERED, echo=True, max_tokens=0, logprobs=1)

    logprobs, theirs = text.choices[0].logprobs, expected.choices[0].logprobs
    assert text.choices[0].text == RENDERED == "".join(logprobs.tokens)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert (logprobs.tokens, logprobs.token_logprobs, logprobs.text_offset) == (
        theirs.tokens, theirs.token_logprobs, theirs.text_offset)
    assert text.usage.completion_tokens == 0 and text.usage.prompt_tokens == len(logprobs.tokens)


def test_openai_sdk_completions_take_several_prompts_and_token_ids(sdk: openai.OpenAI, tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        ids = client.completions.create(prompt="Hi", echo=True, max_tokens=0, logprobs=0).usage.prompt_tokens
        expected = client.completions.create(prompt=["Hi", RENDERED], temperature=0, max_tokens=3)
    text = sdk.completions.create(model="mixtral-local", prompt=["Hi", RENDERED], temperature=0, max_tokens=3)
    scored = sdk.completions.create(model="mixtral-local", prompt=[[1, 15359], [1, 15359, 28808]], echo=True,
                                    max_tokens=0, logprobs=1)

    assert [c.text for c in text.choices] == [c.text for c in expected.choices]
    assert text.usage.prompt_tokens == expected.usage.prompt_tokens and ids == 2
    assert [len(c.logprobs.tokens) for c in scored.choices] == [2, 3]
    assert scored.choices[0].logprobs.token_logprobs[1] == scored.choices[1].logprobs.token_logprobs[1]


def test_completions_refusals_are_openai_errors(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as missing:
        sdk.completions.create(model="mixtral-local", prompt="", max_tokens=4)
    assert missing.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as chat_only:
        sdk.completions.create(model="mixtral-local", prompt="Hi", extra_body={"tools": TOOLS})
    assert "tools" in chat_only.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-4", prompt="Hi")


def test_tokenizer_endpoints_are_vllms(local_url: str) -> None:
    from mixtral_local.tokenizer import MixtralTokenizer

    tokenizer = MixtralTokenizer.from_pretrained(None)
    server = local_url.removesuffix("/v1")
    with httpx.Client(base_url=server, timeout=30) as http:
        info = http.get("/tokenizer_info").json()
        plain = http.post("/tokenize", json={"prompt": "The river"}).json()
        piece = http.post("/tokenize", json={"prompt": "The river", "add_special_tokens": False}).json()
        eos = http.post("/tokenize", json={"prompt": "</s>", "add_special_tokens": False}).json()
        text = http.post("/detokenize", json={"tokens": piece["tokens"]}).json()
        bad = http.post("/detokenize", json={"tokens": [1, 32000]})
        wrong = http.post("/tokenize", json={"model": "gpt-4", "prompt": "x"})

    assert (info["bos_token"], info["eos_token"]) == ("<s>", "</s>")
    assert plain["tokens"] == tokenizer.encode_prompt("The river") == [1, *piece["tokens"]]
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == 32768
    assert eos["tokens"] == [tokenizer.eos_id] and text == {"prompt": "The river"}
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert wrong.status_code == 404


def test_tokenize_with_messages_gives_the_ids_the_chat_request_is_prompted_with(sdk: openai.OpenAI,
                                                                               local_url: str) -> None:
    from mixtral_local.tokenizer import MixtralTokenizer

    tokenizer = MixtralTokenizer.from_pretrained(None)
    server = local_url.removesuffix("/v1")
    with httpx.Client(base_url=server, timeout=30) as http:
        chat = http.post("/tokenize", json={"model": "mixtral-local", "messages": MESSAGES,
                                            "add_generation_prompt": True, "add_special_tokens": False}).json()
        tooled = http.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS}).json()
        refused = {name: http.post("/tokenize", json=body) for name, body in {
            "both": {"messages": MESSAGES, "prompt": "x"},
            "continue": {"messages": MESSAGES, "continue_final_message": True},
            "flag": {"messages": MESSAGES, "add_generation_prompt": "yes"},
            "no role": {"messages": [{"content": "hi"}]},
            "bad tools": {"messages": MESSAGES, "tools": [{"type": "function"}]},
        }.items()}
    answered = sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, max_tokens=1)
    with_tools = sdk.chat.completions.create(model="mixtral-local", messages=MESSAGES, tools=TOOLS, max_tokens=1)

    assert chat["tokens"] == tokenizer.encode_chat(MESSAGES) and chat["count"] == len(chat["tokens"])
    assert chat["count"] == answered.usage.prompt_tokens
    assert tooled["count"] == with_tools.usage.prompt_tokens > chat["count"]  # the tools travel in the prompt
    assert {name: (r.status_code, r.json()["error"]["param"]) for name, r in refused.items()} == {
        "both": (400, "messages"), "continue": (400, "continue_final_message"),
        "flag": (400, "add_generation_prompt"), "no role": (400, "messages[0]"), "bad tools": (400, "tools")}


def test_an_evaluation_harness_scores_a_continuation_as_transformers_does(local_url: str, tiny_dir: Path) -> None:
    """lm-eval's local-completions protocol: context and continuation tokenized apart (/tokenize, no special
    tokens), their ids sent with echo, max_tokens=1 and logprobs=1, and the continuation's log probability read
    from token_logprobs[len(context):-1]; the number is the one transformers gives for those ids."""
    server = local_url.removesuffix("/v1")
    context, continuation = "<s> The river runs", " to the sea"
    with httpx.Client(base_url=server, timeout=30) as http:
        ctx = http.post("/tokenize", json={"prompt": context, "add_special_tokens": False}).json()["tokens"]
        cont = http.post("/tokenize", json={"prompt": continuation, "add_special_tokens": False}).json()["tokens"]
        answer = http.post("/v1/completions", json={
            "model": "mixtral-local", "prompt": [ctx + cont, ctx], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}).json()

    choice = sorted(answer["choices"], key=lambda c: c["index"])[0]
    ours = sum(choice["logprobs"]["token_logprobs"][len(ctx):-1])
    transformers = pytest.importorskip("transformers")
    model = transformers.MixtralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model.eval()(ids).logits[0].float(), -1)
    theirs = sum(float(logprobs[i - 1, ids[0, i]]) for i in range(len(ctx), len(ctx) + len(cont)))
    assert ctx[0] == 1 and len(choice["logprobs"]["tokens"]) == len(ctx) + len(cont) + 1
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert [c["index"] for c in answer["choices"]] == [0, 1]
