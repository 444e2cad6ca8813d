"""``chat.completions.parse()``: the schema a pydantic model sends, validated answers, and the typed error
for every answer that is not the model, on the loopback server (OpenAI-compatible and NVIDIA)."""

from __future__ import annotations

import json
from typing import Any, Generic, Literal, TypeVar

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mixtral_client import InvalidRequestError, ParsedChatCompletion, StructuredOutputError
from mixtral_client._parse import format_for
from tests.client.conftest import Driver, completion, replying


class Address(BaseModel):
    city: str
    zip: str | None = None


class Person(BaseModel):
    """Someone the user asked about."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0)
    role: Literal["author", "editor"]
    address: Address
    tags: dict[str, int] = {}


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")
    a: int


T = TypeVar("T")


class Box(BaseModel, Generic[T]):
    item: T


ADA = {"name": "Ada", "age": 36, "role": "author", "address": {"city": "London"}}
TOOL_CALL = {"id": "abcdefghi", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}


def parse(driver: Driver, server: Any, *, client: dict[str, Any] | None = None, **params: Any) -> Any:
    """``parse()`` through the driver's client (sync, or async under asyncio / trio)."""
    params.setdefault("messages", [{"role": "user", "content": "Who?"}])
    if driver.mode == "sync":
        with driver._sync(server, client) as c:
            return c.chat.completions.parse(**params)

    async def run() -> Any:
        async with driver._async(server, client) as c:
            return await c.chat.completions.parse(**params)

    return driver._run(run)


# --------------------------------------------------------------------------- the format a model sends


def test_a_model_becomes_a_json_schema_format_closed_to_other_keys() -> None:
    fmt = format_for(Person)

    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Person"
    schema = fmt["json_schema"]["schema"]
    assert schema["description"] == "Someone the user asked about."
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Address"]["additionalProperties"] is False
    assert schema["properties"]["tags"]["additionalProperties"] == {"type": "integer"}  # a dict field stays open
    assert schema["properties"]["role"]["enum"] == ["author", "editor"]
    assert set(schema["required"]) == {"name", "age", "role", "address"}


def test_a_model_that_allows_extra_keys_keeps_them_allowed_and_odd_names_are_cleaned() -> None:
    assert format_for(Open)["json_schema"]["schema"]["additionalProperties"] is True
    assert format_for(Box[int])["json_schema"]["name"] == "Box_int_"


@pytest.mark.parametrize("bad", [ADA, "Person", dict, Person(**ADA)])
def test_parse_takes_only_a_model_class_and_sends_nothing_otherwise(driver: Driver, serve, bad: Any) -> None:
    server = serve(replying(200, completion(json.dumps(ADA))))

    with pytest.raises(InvalidRequestError, match="pydantic model class") as info:
        parse(driver, server, response_format=bad)

    assert info.value.param == "response_format"
    assert server.requests == []


# --------------------------------------------------------------------------- answers


def test_an_answer_is_validated_into_the_model(driver: Driver, serve) -> None:
    body = completion(json.dumps(ADA))
    body["usage"]["cost"] = 0.001  # a host's extra field survives
    server = serve(replying(200, body))

    answer = parse(driver, server, response_format=Person, temperature=0)

    sent = server.requests[0].json()
    assert sent["response_format"] == format_for(Person) and sent["temperature"] == 0
    assert isinstance(answer, ParsedChatCompletion)
    person = answer.choices[0].message.parsed
    assert isinstance(person, Person) and person == Person(**ADA)
    assert answer.choices[0].message.content == json.dumps(ADA)
    assert answer.usage is not None and answer.usage.total_tokens == 5 and answer.usage.cost == 0.001


def test_on_nvidia_the_schema_is_prompted_and_the_fenced_answer_parsed(driver: Driver, serve) -> None:
    server = serve(replying(200, completion(f" Here you are:\n```json\n{json.dumps(ADA)}\n```\nAnything else?")))

    answer = parse(driver, server, client={"provider": "nvidia"}, response_format=Person)

    sent = server.requests[0].json()
    assert "response_format" not in sent
    assert json.loads(sent["messages"][-1]["content"].rsplit("\n", 1)[1]) == format_for(Person)["json_schema"]["schema"]
    assert answer.choices[0].message.parsed == Person(**ADA)


def test_a_choice_that_calls_a_tool_has_nothing_parsed(driver: Driver, serve) -> None:
    body = completion(None, finish="tool_calls")
    body["choices"][0]["message"]["tool_calls"] = [TOOL_CALL]
    server = serve(replying(200, body))

    answer = parse(driver, server, response_format=Person,
                   tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])

    assert answer.choices[0].message.parsed is None
    assert answer.choices[0].message.tool_calls[0].function.name == "lookup"


@pytest.mark.parametrize(("content", "finish", "says"), [
    ('{"name": "Ada", "age": 3', "length", "cut short by max_tokens"),
    ("", "stop", "the answer is empty"),
    ("Ada is 36.", "stop", "not a valid Person"),
    (json.dumps({**ADA, "age": -1}), "stop", "age: Input should be greater than or equal to 0"),
    (json.dumps({**ADA, "role": "poet"}), "stop", "role: Input should be 'author' or 'editor'"),
    (json.dumps(ADA), "content_filter", "filtered"),
])
def test_an_answer_that_is_not_the_model_raises_with_the_completion(driver: Driver, serve, content: str,
                                                                    finish: str, says: str) -> None:
    server = serve(replying(200, completion(content, finish=finish)))

    with pytest.raises(StructuredOutputError, match=says) as info:
        parse(driver, server, response_format=Person)

    assert info.value.choice == 0
    assert info.value.completion.choices[0].message.content == content  # nothing is lost
    if "valid Person" in str(info.value) or "Input should" in str(info.value):
        assert isinstance(info.value.__cause__, ValidationError)


def test_the_error_names_the_choice_that_failed(driver: Driver, serve) -> None:
    body = completion(json.dumps(ADA))
    body["choices"].append({"index": 1, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": '{"name": "Bo"}'}})
    server = serve(replying(200, body))

    with pytest.raises(StructuredOutputError, match=r"choice 1: .*\(3 error\(s\); first, age: Field required\)") as info:
        parse(driver, server, response_format=Person, n=2)

    assert info.value.choice == 1 and len(info.value.completion.choices) == 2


def test_parse_takes_neither_stream_nor_a_second_format(driver: Driver, serve) -> None:
    server = serve(replying(200, completion(json.dumps(ADA))))
    with pytest.raises(TypeError):
        parse(driver, server, response_format=Person, stream=True)
    with pytest.raises(TypeError):
        parse(driver, server, response_format=Person, stream_options={"include_usage": True})
    assert server.requests == []


# --------------------------------------------------------------------------- max_repairs


def test_an_invalid_answer_goes_back_with_the_reason_and_the_repair_is_parsed(driver: Driver, serve) -> None:
    from tests.loopback import in_turn

    wrong = {**ADA, "role": "poet"}
    server = serve(in_turn(replying(200, completion(json.dumps(wrong))), replying(200, completion(json.dumps(ADA)))))

    answer = parse(driver, server, client={"provider": "nvidia"}, response_format=Person, max_repairs=2)

    assert answer.choices[0].message.parsed == Person(**ADA)
    assert answer.usage is not None and answer.usage.total_tokens == 10  # both rounds counted
    first, second = (r.json()["messages"] for r in server.requests)
    schema = json.dumps(format_for(Person)["json_schema"]["schema"])
    # NVIDIA takes the schema in the prompt: it rides on the last user turn, first the question, then the repair
    assert first[0]["content"].startswith("Who?") and schema in first[0]["content"]
    assert second[0] == {"role": "user", "content": "Who?"}
    assert second[1] == {"role": "assistant", "content": json.dumps(wrong)}
    repair = second[2]["content"]
    assert repair.startswith("That answer is not valid: ") and "role: Input should be 'author' or 'editor'" in repair
    assert "the Person" in repair and schema in repair


def test_repairs_that_run_out_raise_with_every_round_counted(driver: Driver, serve) -> None:
    server = serve(replying(200, completion('{"name": "Ada"}')))

    with pytest.raises(StructuredOutputError, match="age: Field required") as caught:
        parse(driver, server, response_format=Person, max_repairs=2)

    assert len(server.requests) == 3
    assert caught.value.completion.usage is not None and caught.value.completion.usage.total_tokens == 15
    assert len(server.requests[-1].json()["messages"]) == 1 + 2 * 2


@pytest.mark.parametrize(("kwargs", "match"), [({"max_repairs": -1}, "max_repairs must be"),
                                               ({"max_repairs": 1, "n": 2}, "n must be 1")])
def test_bad_repair_settings_are_refused_before_sending(serve, kwargs: dict[str, Any], match: str) -> None:
    server = serve(replying(200, completion(json.dumps(ADA))))
    with pytest.raises(InvalidRequestError, match=match):
        parse(Driver("sync"), server, response_format=Person, **kwargs)
    assert server.requests == []
