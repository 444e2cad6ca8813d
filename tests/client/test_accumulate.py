"""Merging stream chunks into one completion (pure)."""

from __future__ import annotations

import re
from typing import Any

from mixtral_client import ChatCompletionChunk
from mixtral_client._accumulate import ChunkAccumulator
from mixtral_client.types import ChoiceLogprobs
from tests.client.conftest import chunk, tool_delta


def merged(*chunks: dict[str, Any]):
    acc = ChunkAccumulator()
    for c in chunks:
        acc.add(ChatCompletionChunk.model_validate(c))
    return acc.completion()


def calls(completion) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in completion.choices[0].message.tool_calls or []]


MISTRAL_ID = re.compile(r"^[A-Za-z0-9]{9}$")


def named(completion) -> list[tuple[str, str]]:
    """(name, arguments) of each call, after checking the ids the accumulator made up: Mistral-style, distinct."""
    ids = [c.id for c in completion.choices[0].message.tool_calls or []]
    assert all(MISTRAL_ID.match(i) for i in ids) and len(set(ids)) == len(ids), ids
    return [(name, arguments) for _, name, arguments in calls(completion)]


def test_text_deltas_are_joined_with_role_and_finish_reason() -> None:
    result = merged(chunk(role="assistant"), chunk("Hel"), chunk("lo"), chunk(finish="length"))

    choice = result.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "Hello", "length")
    assert (result.id, result.model, result.created) == ("chatcmpl-1", "m", 1)


def test_nothing_added_gives_an_empty_completion() -> None:
    assert ChunkAccumulator().completion().choices == []


def test_tool_calls_are_keyed_by_index_when_interleaved() -> None:
    result = merged(
        chunk(tool_calls=[tool_delta(0, id="a", name="f", arguments='{"x"')]),
        chunk(tool_calls=[tool_delta(1, id="b", name="g", arguments='{"y"')]),
        chunk(tool_calls=[tool_delta(1, arguments=": 2}")]),
        chunk(tool_calls=[tool_delta(0, arguments=": 1}")]),
    )

    assert calls(result) == [("a", "f", '{"x": 1}'), ("b", "g", '{"y": 2}')]
    assert result.choices[0].message.content is None


def test_two_calls_in_one_delta_stay_apart() -> None:
    result = merged(chunk(tool_calls=[tool_delta(0, id="a", name="f", arguments="{}"),
                                      tool_delta(1, id="b", name="g", arguments="[]")]))

    assert calls(result) == [("a", "f", "{}"), ("b", "g", "[]")]


def test_null_index_with_new_ids_opens_new_calls() -> None:
    result = merged(
        chunk(tool_calls=[tool_delta(None, id="a", name="f", arguments="1")]),
        chunk(tool_calls=[tool_delta(None, id="b", name="g", arguments="2")]),
    )

    assert calls(result) == [("a", "f", "1"), ("b", "g", "2")]


def test_null_index_with_a_known_id_continues_that_call() -> None:
    result = merged(
        chunk(tool_calls=[tool_delta(None, id="a", name="f", arguments="{")]),
        chunk(tool_calls=[tool_delta(None, id="b", name="g", arguments="[")]),
        chunk(tool_calls=[tool_delta(None, id="a", arguments="}")]),
        chunk(tool_calls=[tool_delta(None, id="b", arguments="]")]),
    )

    assert calls(result) == [("a", "f", "{}"), ("b", "g", "[]")]


def test_null_index_without_id_continues_the_last_call() -> None:
    result = merged(
        chunk(tool_calls=[tool_delta(None, id="a", name="f", arguments='{"q": ')]),
        chunk(tool_calls=[tool_delta(None, arguments='"x"}')]),
    )

    assert calls(result) == [("a", "f", '{"q": "x"}')]


def test_index_and_id_may_both_be_used_by_one_host() -> None:
    result = merged(
        chunk(tool_calls=[tool_delta(0, id="a", name="f", arguments="{")]),
        chunk(tool_calls=[tool_delta(None, id="a", arguments="}")]),
    )

    assert calls(result) == [("a", "f", "{}")]


def test_call_without_any_id_gets_a_mistral_style_one_that_stays_the_same() -> None:
    acc = ChunkAccumulator()
    acc.add(ChatCompletionChunk.model_validate(chunk(tool_calls=[tool_delta(0, name="f", arguments="{}")])))

    first, again = acc.completion(), acc.completion()

    assert named(first) == [("f", "{}")]
    assert calls(first) == calls(again)


def test_text_and_tool_calls_together_keep_both() -> None:
    result = merged(chunk("Let me check. "), chunk(tool_calls=[tool_delta(0, id="a", name="f", arguments="{}")]))

    assert result.choices[0].message.content == "Let me check. "
    assert calls(result) == [("a", "f", "{}")]


def test_choices_are_kept_apart_by_index() -> None:
    result = merged(chunk("a", index=0), chunk("b", index=1), chunk("c", index=0), chunk("d", index=1))

    assert [c.message.content for c in result.choices] == ["ac", "bd"]


def test_usage_chunk_without_choices_sets_usage_and_keeps_its_extras() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "cost": 0.5}
    result = merged(chunk("x"), {**chunk(), "choices": [], "usage": usage})

    assert result.usage is not None
    assert result.usage.total_tokens == 3 and result.usage.model_extra == {"cost": 0.5}


def test_top_level_extras_are_kept_but_not_an_error_object() -> None:
    result = merged(chunk("x", provider="Together", error={"code": 500, "message": "m"}))

    assert result.model_extra == {"provider": "Together"}


def test_logprobs_content_is_concatenated() -> None:
    first = {**chunk("a")}
    first["choices"][0]["logprobs"] = {"content": [{"token": "a", "logprob": -0.1}]}
    second = {**chunk("b")}
    second["choices"][0]["logprobs"] = {"content": [{"token": "b", "logprob": -0.2}]}

    result = merged(first, second)

    logprobs = result.choices[0].logprobs
    assert isinstance(logprobs, ChoiceLogprobs)  # typed, as each piece was
    assert [(t.token, t.logprob) for t in logprobs.content or []] == [("a", -0.1), ("b", -0.2)]


def test_logprobs_without_openais_shape_are_kept_as_they_came() -> None:
    first = {**chunk("a")}
    first["choices"][0]["logprobs"] = {"content": [{"token": "a", "logprob": None}], "extra": 1}
    second = {**chunk("b")}
    second["choices"][0]["logprobs"] = {"content": [{"token": "b", "logprob": -0.2, "bytes": [98]}]}

    logprobs = merged(first, second).choices[0].logprobs

    assert logprobs == {"content": [{"token": "a", "logprob": None},
                                    {"token": "b", "logprob": -0.2, "bytes": [98], "top_logprobs": []}]}


def test_null_index_whole_calls_in_one_delta_stay_apart() -> None:
    result = merged(chunk(tool_calls=[tool_delta(None, name="f", arguments="{}"),
                                      tool_delta(None, name="g", arguments="[]")]))

    assert named(result) == [("f", "{}"), ("g", "[]")]


def test_null_index_without_id_but_a_new_name_opens_a_new_call() -> None:
    result = merged(
        chunk(tool_calls=[tool_delta(None, name="f", arguments="{")]),
        chunk(tool_calls=[tool_delta(None, arguments="}")]),
        chunk(tool_calls=[tool_delta(None, name="g", arguments="[]")]),
    )

    assert named(result) == [("f", "{}"), ("g", "[]")]


def test_a_whole_answer_whose_tool_call_has_no_id_gets_a_mistral_style_one() -> None:
    from mixtral_client import ChatCompletion

    answer = ChatCompletion.model_validate({"choices": [{"message": {"role": "assistant", "content": None,
        "tool_calls": [{"id": None, "type": "function", "function": {"name": "f", "arguments": "{}"}},
                       {"type": "function", "function": {"name": "g", "arguments": "{}"}}]}}]})

    assert [name for name, _ in named(answer)] == ["f", "g"]
