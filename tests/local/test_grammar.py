"""Structured output on the local backend: ``response_format`` and required tool calls as a grammar.

The tiny checkpoint's weights are random, so left alone it never writes JSON (the first test shows it):
every answer below that parses and follows its schema does so because the grammar masked its logits.
Schemas bound their strings and numbers, so a random model reaches the end within ``max_tokens``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import torch
from pydantic import BaseModel, Field

from mixtral_client import AsyncMixtralClient, InvalidRequestError, MixtralClient, tool
from mixtral_client._request import ChatRequest
from mixtral_client._tools import ToolPrompt
from mixtral_local import backend as backend_module
from mixtral_local.backend import LocalCore
from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.engine import engine as engine_module
from mixtral_local.engine import grammar as grammar_module
from mixtral_local.engine.grammar import (
    Constraint,
    GrammarError,
    check_grammar,
    json_grammar,
    tool_calls_grammar,
)
from mixtral_local.engine.kv_cache import KVCache
from mixtral_local.tokenizer import MixtralTokenizer

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
LOCAL = {"local_options": {"dtype": "float32", "device": "cpu"}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
    },
    "required": ["name", "age", "tags", "pet"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["utc_offset"], "additionalProperties": False}}}


def ends_as(table: Any, grammar: str, tokenizer: MixtralTokenizer, text: str) -> str:
    """Feed ``text``'s tokens to a ``Constraint``: "refused" (a token was masked), "done" (the grammar can take
    nothing more) or "open" (it could go on, and may end here: end of sequence is allowed)."""
    check = Constraint(table, grammar)
    for token in tokenizer.encode(text) if text else []:
        if not torch.isfinite(check.mask(torch.zeros(32000)))[token]:
            return "refused"
        check.accept(token)
    if check.done:
        return "done"
    assert torch.isfinite(check.mask(torch.zeros(32000)))[tokenizer.eos_id]
    return "open"


def follows_person(value: Any) -> bool:
    """``PERSON``'s schema, checked by hand (no validator library): the keys, the types and the bounds."""
    return (isinstance(value, dict) and set(value) == {"name", "age", "tags", "pet"}
            and isinstance(value["name"], str) and len(value["name"]) <= 8
            and type(value["age"]) is int and 0 <= value["age"] <= 120
            and isinstance(value["tags"], list) and len(value["tags"]) <= 3
            and all(t in ("red", "blue") for t in value["tags"])
            and (value["pet"] is None or isinstance(value["pet"], bool)))


@pytest.fixture
def client(tiny_dir: Path) -> Iterator[MixtralClient]:
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as c:
        yield c


def schema_grammar() -> str:
    return json_grammar(PERSON)


# --------------------------------------------------------------------------- the engine


def test_the_random_model_alone_writes_no_json(engine: Engine, tokenizer: MixtralTokenizer) -> None:
    prompt = tokenizer.encode_chat(MESSAGES)
    for seed in range(4):
        text = engine.generate([prompt], SamplingParams(seed=seed, max_tokens=40))[0].text
        with pytest.raises(ValueError):
            json.loads(text)


@pytest.mark.parametrize("seed", range(6))
def test_a_schema_grammar_makes_the_random_model_write_that_schema(engine: Engine, tokenizer: MixtralTokenizer,
                                                                  seed: int) -> None:
    prompt = tokenizer.encode_chat(MESSAGES)
    done = engine.generate([prompt], SamplingParams(seed=seed, max_tokens=200, grammar=schema_grammar()))[0]
    assert done.finish_reason == "stop"
    assert follows_person(json.loads(done.text)), done.text
    # it ends where the JSON ends: the last token closes the object, no step is spent on an end of sequence
    assert done.token_ids[-1] != tokenizer.eos_id
    assert tokenizer.decode(done.token_ids).strip() == done.text


def test_greedy_under_a_grammar_is_the_best_allowed_token_each_step(engine: Engine,
                                                                    tokenizer: MixtralTokenizer) -> None:
    """Greedy decoding with a grammar: each token is the argmax of the model's logits among the tokens the
    grammar allows there (recomputed here with a fresh matcher and the full forward pass)."""
    prompt = tokenizer.encode_chat(MESSAGES)
    done = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=60, grammar=schema_grammar()))[0]
    check = Constraint(grammar_module.token_table(tokenizer), schema_grammar())
    ids, overruled = list(prompt), 0
    with torch.inference_mode():
        for token in done.token_ids:
            cache = KVCache(engine.model.config, 1, len(ids), dtype=engine.dtype, device=engine.device)
            logits = engine._forward([ids], [list(range(len(ids)))], cache.slots(0, 1), len(ids))[0]
            assert token == int(torch.argmax(check.mask(logits)))
            overruled += token != int(torch.argmax(logits))
            check.accept(token)
            ids.append(token)
    assert check.done
    assert overruled > len(done.token_ids) // 2  # the model's own choice was mostly not JSON


def test_json_mode_allows_only_an_object_and_ends_with_it(tokenizer: MixtralTokenizer) -> None:
    check = Constraint(grammar_module.token_table(tokenizer), json_grammar(None))
    allowed = torch.isfinite(check.mask(torch.zeros(32000)))
    opening = {tokenizer.sp.id_to_piece(i) for i in torch.nonzero(allowed).flatten().tolist()}
    assert opening and all(piece.lstrip("▁").startswith("{") or piece in ("▁", "<0x20>", "<0x7B>")
                           for piece in opening), opening
    assert not allowed[tokenizer.eos_id]  # nothing is not an object
    for token in tokenizer.encode('{"a": [1, {"b": null}], "c": "d"}'):
        assert torch.isfinite(check.mask(torch.zeros(32000)))[token]
        check.accept(token)
    assert check.done
    assert torch.nonzero(torch.isfinite(check.mask(torch.zeros(32000)))).flatten().tolist() == [tokenizer.eos_id]


def test_a_token_the_grammar_refuses_raises(tokenizer: MixtralTokenizer) -> None:
    check = Constraint(grammar_module.token_table(tokenizer), json_grammar(None))
    with pytest.raises(GrammarError, match="doesn't satisfy the grammar") as caught:
        check.accept(tokenizer.encode("hello")[0])
    assert "\n" not in str(caught.value)


def test_constrained_and_free_rows_share_a_batch(engine: Engine, tokenizer: MixtralTokenizer) -> None:
    prompt = tokenizer.encode_chat(MESSAGES)
    constrained = SamplingParams(temperature=0, max_tokens=200, grammar=schema_grammar())
    free = SamplingParams(temperature=0, max_tokens=12)
    alone = [engine.generate([prompt], p)[0].token_ids for p in (constrained, free)]
    tickets = [engine.submit(prompt, p) for p in (constrained, free, constrained)]
    texts = ["".join(d.text for d in ticket) for ticket in tickets]
    assert [t.row.tokens for t in tickets] == [alone[0], alone[1], alone[0]]
    assert follows_person(json.loads(texts[0]))


def test_a_failing_grammar_ends_its_own_request_only(engine: Engine, tokenizer: MixtralTokenizer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = tokenizer.encode_chat(MESSAGES)
    real_accept = Constraint.accept
    calls = {"n": 0}

    def accept(self: Constraint, token: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise GrammarError("the matcher broke")
        real_accept(self, token)

    monkeypatch.setattr(Constraint, "accept", accept)
    tickets = [engine.submit(prompt, SamplingParams(temperature=0, max_tokens=8)),
               engine.submit(prompt, SamplingParams(temperature=0, max_tokens=50, grammar=schema_grammar()))]
    free = list(tickets[0])
    with pytest.raises(GrammarError, match="the matcher broke"):
        list(tickets[1])
    assert free[-1].finish_reason == "length" and free[-1].completion_tokens == 8
    calls["n"] = 0
    with pytest.raises(GrammarError, match="the matcher broke"):  # generate() raises it too
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=50, grammar=schema_grammar()))


# --------------------------------------------------------------------------- grammars


@pytest.mark.parametrize(("schema", "lenient", "reason"), [
    ({"type": "objectx"}, True, "Invalid type"),
    ({"type": "string", "format": "postcode"}, False, "Unknown format"),
    ({"type": "object", "if": {"type": "object"}}, False, "Unimplemented keys"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, True, "does not exist"),
])
def test_a_schema_that_cannot_be_enforced_is_refused_with_the_reason(schema: dict[str, Any], lenient: bool,
                                                                     reason: str) -> None:
    with pytest.raises(GrammarError, match=reason):
        check_grammar(json_grammar(schema, lenient=lenient))


def test_lenient_schemas_skip_what_cannot_be_enforced() -> None:
    check_grammar(json_grammar({"type": "string", "format": "postcode"}, lenient=True))
    check_grammar(tool_calls_grammar([{"name": "f", "parameters": {"type": "object", "if": {}}}],
                                     marker="[TOOL_CALLS]", one=False))


def test_tool_call_grammar_takes_calls_of_the_declared_tools_only(tokenizer: MixtralTokenizer) -> None:
    grammar = tool_calls_grammar([WEATHER["function"], TIME["function"]], marker="[TOOL_CALLS]", one=False)
    table = grammar_module.token_table(tokenizer)

    def takes(text: str) -> bool:
        check = Constraint(table, grammar)
        for token in tokenizer.encode(text):
            if not torch.isfinite(check.mask(torch.zeros(32000)))[token]:
                return False
            check.accept(token)
        return check.done

    assert takes('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]')
    assert takes('[TOOL_CALLS] [{"name": "get_time", "arguments": {"utc_offset": -3}}, '
                 '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}]')
    assert not takes('[TOOL_CALLS] [{"name": "get_news", "arguments": {}}]')  # not declared
    assert not takes('[TOOL_CALLS] [{"name": "get_time", "arguments": {"utc_offset": 99}}]')  # out of range
    assert not takes('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]')  # unit missing
    assert not takes('[TOOL_CALLS] []')  # no call
    assert not takes('Sure! [TOOL_CALLS] [{"name": "get_time", "arguments": {"utc_offset": 1}}]')


# --------------------------------------------------------------------------- through the client


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_on_the_local_backend(client: MixtralClient, stream: bool) -> None:
    for seed in range(3):
        if stream:
            chunks = list(client.chat.completions.create(messages=MESSAGES, response_format=PERSON_FORMAT,
                                                         max_tokens=200, seed=seed, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            done = client.chat.completions.create(messages=MESSAGES, response_format=PERSON_FORMAT, max_tokens=200,
                                                  seed=seed)
            text, finish = done.choices[0].message.content or "", done.choices[0].finish_reason
        assert finish == "stop"
        assert follows_person(json.loads(text)), text


class Pet(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog"]
    vaccinated: bool | None


def test_parse_gives_model_instances_from_the_random_model(client: MixtralClient) -> None:
    """The model's schema is closed to other keys and enforced, so every answer validates."""
    done = client.chat.completions.parse(messages=MESSAGES, response_format=Pet, max_tokens=200, seed=5, n=3)

    pets = [c.message.parsed for c in done.choices]
    assert all(isinstance(p, Pet) for p in pets), [c.message.content for c in done.choices]
    assert [Pet.model_validate_json(c.message.content or "") for c in done.choices] == pets
    assert set(json.loads(done.choices[0].message.content or "")) == {"name", "age", "kind", "vaccinated"}


def test_n_choices_each_follow_the_schema(client: MixtralClient) -> None:
    done = client.chat.completions.create(messages=MESSAGES, response_format=PERSON_FORMAT, max_tokens=200, seed=3,
                                          n=4)
    texts = [c.message.content or "" for c in done.choices]
    assert all(follows_person(json.loads(t)) for t in texts)
    assert len(set(texts)) > 1  # seed + i per choice: they differ


def test_json_mode_gives_an_object_or_a_length_cut(client: MixtralClient) -> None:
    """JSON mode bounds nothing, so a random model may still be inside a string at max_tokens; what it wrote
    is then the beginning of an object, and with room enough some answers close it."""
    closed = 0
    for seed in range(6):
        done = client.chat.completions.create(messages=MESSAGES, response_format={"type": "json_object"},
                                              max_tokens=60, seed=seed)
        text, finish = done.choices[0].message.content or "", done.choices[0].finish_reason
        assert text.startswith("{")
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
            closed += 1
        else:
            assert finish == "length" and done.usage.completion_tokens == 60
    assert closed >= 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_a_required_tool_call_is_always_a_valid_call(client: MixtralClient, choice: Any, stream: bool) -> None:
    for seed in range(3):
        kwargs: dict[str, Any] = {"messages": MESSAGES, "tools": [WEATHER, TIME], "tool_choice": choice,
                                  "max_tokens": 200, "seed": seed}
        if stream:
            with client.chat.completions.create(stream=True, **kwargs) as chunks:
                done = chunks.get_final_completion()
        else:
            done = client.chat.completions.create(**kwargs)
        message = done.choices[0].message
        assert done.choices[0].finish_reason == "tool_calls", message.content
        assert message.tool_calls
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)
            if isinstance(choice, dict):
                assert call.function.name == "get_time"
            if call.function.name == "get_time":
                assert set(arguments) == {"utc_offset"} and -12 <= arguments["utc_offset"] <= 14
            else:
                assert call.function.name == "get_weather"
                assert arguments["unit"] in ("c", "f") and len(arguments["city"]) <= 12


def test_one_call_at_a_time_means_exactly_one(client: MixtralClient) -> None:
    for seed in range(4):
        done = client.chat.completions.create(messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=200, seed=seed)
        assert len(done.choices[0].message.tool_calls or []) == 1


def test_auto_tool_choice_leaves_a_text_answer_as_the_model_writes_it(
        client: MixtralClient, engine: Engine, tokenizer: MixtralTokenizer,
        make_request: Callable[..., ChatRequest]) -> None:
    """Under "auto" the grammar only bites when an answer opens with [TOOL_CALLS]: the random model's greedy
    text, which does not, comes out exactly as without a grammar."""
    rewritten = ToolPrompt.for_request(make_request(MESSAGES, tools=[WEATHER]))
    assert rewritten is not None and backend_module._sampling(rewritten.request).grammar is not None
    prompt = tokenizer.encode_chat(rewritten.request.messages)
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    done = client.chat.completions.create(messages=MESSAGES, tools=[WEATHER], max_tokens=12, temperature=0)
    assert done.choices[0].finish_reason == "length" and not done.choices[0].message.tool_calls
    assert done.choices[0].message.content == free.text


def test_auto_tool_grammar_takes_text_or_calls_that_parse(tokenizer: MixtralTokenizer) -> None:
    grammar = tool_calls_grammar([WEATHER["function"], TIME["function"]], marker="[TOOL_CALLS]", one=False,
                                 required=False)
    table = grammar_module.token_table(tokenizer)
    assert ends_as(table, grammar, tokenizer, "The weather in Oslo is fine.\n\nAsk me [more] {later}.") == "open"
    assert ends_as(table, grammar, tokenizer, "") == "open"  # an empty answer may end at once
    assert ends_as(table, grammar, tokenizer, "Sure. [TOOL_CALLS] later, maybe") == "open"  # only the opening counts
    call = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]'
    assert ends_as(table, grammar, tokenizer, call) == "done"
    assert ends_as(table, grammar, tokenizer, " " + call) == "refused"  # the marker after more than the opening
    # space ("▁" of the first token): neither a call's opening nor text, so the model is turned away from it
    assert ends_as(table, grammar, tokenizer, '[TOOL_CALLS] [{"name": "get_news", "arguments": {}}]') == "refused"
    assert ends_as(table, grammar, tokenizer, "[TOOL_CALLS] I will not call anything") == "refused"
    assert ends_as(table, grammar, tokenizer, " [TOOL_CALLS][{'name': 'get_time'}]") == "refused"


def test_under_auto_the_grammar_lets_go_once_the_answer_cannot_open_with_calls(tokenizer: MixtralTokenizer) -> None:
    grammar = tool_calls_grammar([WEATHER["function"]], marker="[TOOL_CALLS]", one=False, required=False)
    table = grammar_module.token_table(tokenizer)

    def fed(text: str) -> Constraint:
        check = Constraint(table, grammar, lazy_marker="[TOOL_CALLS]")
        for token in tokenizer.encode(text):
            assert torch.isfinite(check.mask(torch.zeros(32000)))[token]
            check.accept(token)
        return check

    text = fed("Hello [TOOL_CALLS] there")
    logits = torch.randn(32000)
    assert text.free and text.mask(logits) is logits  # no mask computed for a text answer
    for opening in ("[TOOL", "[TOOL_CALLS]", '[TOOL_CALLS] [{"name": "get_'):
        assert not fed(opening).free
    call = fed('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "')
    allowed = torch.isfinite(call.mask(torch.zeros(32000)))
    assert allowed[tokenizer.sp.piece_to_id("c")] and not allowed[tokenizer.sp.piece_to_id("x")]  # still enforced


def test_auto_tool_grammar_with_a_format_takes_that_json_or_calls(tokenizer: MixtralTokenizer) -> None:
    grammar = tool_calls_grammar([TIME["function"]], marker="[TOOL_CALLS]", one=True, required=False,
                                 otherwise=PERSON)
    table = grammar_module.token_table(tokenizer)
    person = '{"name": "Ada", "age": 36, "tags": ["red"], "pet": null}'
    assert follows_person(json.loads(person))
    assert ends_as(table, grammar, tokenizer, person) == "done"
    assert ends_as(table, grammar, tokenizer, '[TOOL_CALLS] [{"name": "get_time", "arguments": {"utc_offset": 2}}]') \
        == "done"
    assert ends_as(table, grammar, tokenizer, "Here is a person.") == "refused"
    assert ends_as(table, grammar, tokenizer, '{"name": "Ada"}') == "refused"  # not the schema


def test_auto_tool_choice_with_json_mode_gives_an_object_or_a_call(client: MixtralClient) -> None:
    for seed in range(4):
        done = client.chat.completions.create(messages=MESSAGES, tools=[WEATHER], response_format={
            "type": "json_object"}, max_tokens=60, seed=seed)
        choice = done.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            assert json.loads(choice.message.tool_calls[0].function.arguments).keys() == {"city", "unit"}
        else:
            assert (choice.message.content or "").startswith("{")
            assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content or ""), dict)


def test_a_bad_format_beside_auto_tools_is_refused_naming_the_format(client: MixtralClient) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    with pytest.raises(InvalidRequestError, match="Invalid type") as caught:
        client.chat.completions.create(messages=MESSAGES, tools=[WEATHER], response_format=fmt)
    assert caught.value.param == "response_format"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_structured_output_equals_sync(tiny_dir: Path, client: MixtralClient,
                                                   anyio_backend: str) -> None:
    async with AsyncMixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as aclient:
        done = await aclient.chat.completions.create(messages=MESSAGES, response_format=PERSON_FORMAT,
                                                     max_tokens=200, seed=11)
    expected = client.chat.completions.create(messages=MESSAGES, response_format=PERSON_FORMAT, max_tokens=200,
                                              seed=11)
    assert done.choices[0].message.content == expected.choices[0].message.content


@pytest.mark.parametrize(("fmt", "reason"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, "Invalid type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "postcode"},
                                             "strict": True}}, "Unknown format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "an object"}}, "must be a JSON schema object"),
])
def test_a_bad_schema_is_refused_before_the_model_loads(tiny_dir: Path, fmt: dict[str, Any], reason: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Any] = []
    monkeypatch.setattr(backend_module, "_engine_for", lambda options: loads.append(options))
    with MixtralClient(provider="local", model_path=str(tiny_dir), env={}, **LOCAL) as client:
        with pytest.raises(InvalidRequestError, match=reason) as caught:
            client.chat.completions.create(messages=MESSAGES, response_format=fmt)
    assert caught.value.param == "response_format"
    assert loads == []


def test_a_non_strict_schema_with_unknown_keywords_is_taken(client: MixtralClient) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"zip": {"type": "string", "format": "postcode", "maxLength": 5}},
        "required": ["zip"], "additionalProperties": False}}}
    done = client.chat.completions.create(messages=MESSAGES, response_format=fmt, max_tokens=40, seed=0)
    assert set(json.loads(done.choices[0].message.content or "")) == {"zip"}


def test_the_grammar_reaches_the_sampling_parameters(make_request: Callable[..., ChatRequest],
                                                     local_config: Any) -> None:
    core = LocalCore(local_config)
    assert backend_module._sampling(make_request(MESSAGES)).grammar is None
    assert backend_module._sampling(make_request(MESSAGES, response_format={"type": "text"})).grammar is None
    params = backend_module._sampling(make_request(MESSAGES, response_format=PERSON_FORMAT))
    assert params.grammar is not None and '"maxLength": 8' in params.grammar

    def with_tools(**extra: Any) -> Any:
        prompted = ToolPrompt.for_request(make_request(MESSAGES, tools=[WEATHER], **extra))
        assert prompted is not None
        return backend_module._sampling(prompted.request)

    assert with_tools().grammar is not None and with_tools().lazy_marker == "[TOOL_CALLS]"  # "auto": lazy
    assert with_tools(tool_choice="required").lazy_marker is None
    assert with_tools(response_format=PERSON_FORMAT).lazy_marker is None  # calls or that JSON: never let go
    assert with_tools(tool_choice="none").grammar is None
    core.close()


def test_a_grammar_is_compiled_once_for_the_choices_and_the_requests_that_ask_again(
        tiny_dir: Path, tokenizer: MixtralTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_local.loader import load_model

    engine = Engine(load_model(tiny_dir, dtype="float32", device="cpu"), tokenizer)
    compiled: list[str] = []
    init = Constraint.__init__

    def counted(self: Constraint, table: Any, grammar: str, **kwargs: Any) -> None:
        if kwargs.get("_matcher") is None:
            compiled.append(grammar)
        init(self, table, grammar, **kwargs)

    monkeypatch.setattr(Constraint, "__init__", counted)
    person = json_grammar(PERSON)
    params = SamplingParams(max_tokens=200, grammar=person)
    prompt = tokenizer.encode_chat(MESSAGES)
    for seed in (1, 2):
        done = engine.generate([prompt] * 3, [dataclasses.replace(params, seed=seed + i) for i in range(3)])
        assert all(follows_person(json.loads(d.text)) for d in done)  # each choice at its own start
    assert compiled == [person]
    others = [json_grammar({"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]})
              for i in range(engine_module.GRAMMAR_CACHE)]
    for grammar in others:
        engine.generate([prompt], SamplingParams(max_tokens=1, grammar=grammar, seed=0))
    engine.generate([prompt], params)
    assert compiled == [person, *others, person]  # the least recently used went first


def test_the_event_stream_parses_a_pet_as_it_grows_on_local_weights(client: MixtralClient) -> None:
    """``chat.completions.stream(response_format=Pet)``: each content delta carries the JSON so far parsed
    leniently, every one a prefix-consistent view of the last; the done event and the final completion hold
    the validated Pet; a required tool call streams its arguments as events too."""
    with client.chat.completions.stream(messages=MESSAGES, response_format=Pet, max_tokens=200, seed=5) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    deltas = [e for e in events if e.type == "content.delta"]
    (done,) = [e for e in events if e.type == "content.done"]
    assert isinstance(done.parsed, Pet) and final.choices[0].message.parsed == done.parsed
    assert deltas[-1].snapshot == done.content == final.choices[0].message.content
    grown = [e.parsed for e in deltas if isinstance(e.parsed, dict)]
    assert len(grown) > 3 and grown[-1] == done.parsed.model_dump()
    assert [len(g) for g in grown] == sorted(len(g) for g in grown)  # keys only ever added

    with client.chat.completions.stream(messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=200, seed=1) as stream:
        events = list(stream)
    (call_done,) = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    call = stream.get_final_completion().choices[0].message.tool_calls[0]
    assert (call_done.name, call_done.arguments) == (call.function.name, call.function.arguments)
    assert call_done.parsed_arguments == json.loads(call.function.arguments)


def test_run_tools_runs_the_random_models_calls_on_local_weights(client: MixtralClient) -> None:
    """The agent loop on local weights: the grammar keeps every call to a declared tool and its schema, so
    each call reaches the Python function with validated arguments, and its result reaches the next prompt."""
    ran: list[tuple[str, Any]] = []

    @tool
    def get_weather(city: Annotated[str, Field(max_length=12)], unit: Literal["c", "f"]) -> str:
        """Weather in a city."""
        ran.append(("get_weather", (city, unit)))
        return f"rain in {city}"

    @tool
    def get_time(utc_offset: Annotated[int, Field(ge=-12, le=14)]) -> dict[str, Any]:
        ran.append(("get_time", utc_offset))
        return {"time": "12:00", "utc_offset": utc_offset}

    runner = client.chat.completions.run_tools(messages=MESSAGES, tools=[get_weather, get_time],
                                               tool_choice="required", parallel_tool_calls=False, max_rounds=3,
                                               max_tokens=200, seed=2)  # one call each: no list runs past max_tokens
    answers = list(runner)

    assert len(answers) == 3 and all(a.choices[0].finish_reason == "tool_calls" for a in answers)
    calls = [c for a in answers[:2] for c in a.choices[0].message.tool_calls or []]  # the last round's are not run
    assert len(ran) == len(calls) >= 2
    results = [m for m in runner.messages if m["role"] == "tool"]
    assert [r["tool_call_id"] for r in results] == [c.id for c in calls]
    assert all(not r["content"].startswith("Error") for r in results), results
