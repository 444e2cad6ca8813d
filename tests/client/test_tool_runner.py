"""``tool()`` and ``chat.completions.run_tools()``: Python functions as tools, and the agent loop, against a
scripted host on a real loopback server (sync and async)."""

from __future__ import annotations

import json
import threading
from typing import Annotated, Any, Literal

import anyio
import httpx
import pytest
from pydantic import BaseModel, Field

from mixtral_client import AsyncMixtralClient, FunctionTool, InvalidRequestError, MixtralClient, tool
from tests.client.conftest import completion
from tests.loopback import Conn, LoopbackServer, Received

MESSAGES = [{"role": "user", "content": "Weather in Oslo, and the time there?"}]


@tool
def get_weather(city: str, unit: Literal["c", "f"] = "c") -> str:
    """The weather in a city.

    Args:
        city: the city's name,
            as people write it
        unit (str): degrees Celsius or Fahrenheit

    Returns:
        a sentence
    """
    return f"{city}: 4 degrees {unit.upper()}, rain"


class Clock(BaseModel):
    utc_offset: int
    time: str


def get_time(utc_offset: Annotated[int, Field(ge=-12, le=14, description="hours from UTC")]) -> Clock:
    """The time at a UTC offset."""
    return Clock(utc_offset=utc_offset, time="12:00")


def call(id_: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": id_, "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def calling(*calls: dict[str, Any]) -> dict[str, Any]:
    answer = completion("", finish="tool_calls")
    answer["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": list(calls)}
    return answer


def scripted(*answers: dict[str, Any]):
    """Answer the n-th request with ``answers[n]`` (the last one again after that)."""
    def handle(req: Received, conn: Conn) -> None:
        n = min(len(handle.seen), len(answers) - 1)  # type: ignore[attr-defined]
        handle.seen.append(req.json())  # type: ignore[attr-defined]
        conn.respond(200, answers[n])
    handle.seen = []  # type: ignore[attr-defined]
    return handle


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(mode: str, server: LoopbackServer, *, client: dict[str, Any] | None = None, **kwargs: Any) -> tuple[Any, list[Any]]:
    """(the runner after ``until_done()``, every answer it yielded)."""
    kwargs.setdefault("messages", MESSAGES)
    args = {"base_url": server.url, "api_key": "k", **(client or {})}
    if mode == "sync":
        with httpx.Client() as http, MixtralClient(**args, http_client=http) as c:
            runner = c.chat.completions.run_tools(**kwargs)
            answers = list(runner)
            assert runner.until_done() is answers[-1]
            return runner, answers

    async def main() -> tuple[Any, list[Any]]:
        async with httpx.AsyncClient() as http, AsyncMixtralClient(**args, http_client=http) as c:
            runner = c.chat.completions.run_tools(**kwargs)
            answers = [a async for a in runner]
            assert await runner.until_done() is answers[-1]
            return runner, answers

    return anyio.run(main)


# --------------------------------------------------------------------------- the schema


def test_a_function_becomes_its_json_schema() -> None:
    assert get_weather.param == {"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "the city's name, as people write it"},
                "unit": {"type": "string", "enum": ["c", "f"], "default": "c",
                         "description": "degrees Celsius or Fahrenheit"},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    }}
    time_tool = tool(get_time)
    assert time_tool.param["function"]["parameters"]["properties"]["utc_offset"] == {
        "type": "integer", "minimum": -12, "maximum": 14, "description": "hours from UTC"}
    assert tool(name="clock", description="What time is it")(get_time).param["function"]["name"] == "clock"
    assert get_weather("Rome") == "Rome: 4 degrees C, rain"  # still the function


def test_arguments_are_validated_against_the_same_schema() -> None:
    assert get_weather.arguments('{"city": "Oslo"}') == {"city": "Oslo", "unit": "c"}
    for bad, why in [('{"unit": "c"}', "city: Field required"), ('{"city": "Oslo", "unit": "k"}', "unit: Input should be"),
                     ('{"city": "Oslo", "mood": 1}', "mood: Extra inputs"), ("{oops", "Invalid JSON")]:
        with pytest.raises(ValueError, match=why):
            get_weather.arguments(bad)


def test_what_cannot_be_a_tool_is_refused() -> None:
    def spread(*args: int) -> None: ...

    with pytest.raises(ValueError, match=r"\*args"):
        tool(spread)
    with pytest.raises(ValueError, match="tool name"):
        tool(name="two words")(get_time)


# --------------------------------------------------------------------------- the loop


def test_the_loop_runs_the_calls_and_sends_their_results_back(mode: str, serve) -> None:
    handle = scripted(calling(call("call_a", "get_weather", {"city": "Oslo"}), call("call_b", "get_time", {"utc_offset": 1})),
                      completion("Oslo: rain, 4 C; it is noon."))
    server = serve(handle)

    runner, answers = run(mode, server, tools=[get_weather, get_time], temperature=0.2, max_tokens=99)

    assert [a.choices[0].finish_reason for a in answers] == ["tool_calls", "stop"]
    first, second = handle.seen
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather", "get_time"]
    assert (first["temperature"], first["max_tokens"]) == (0.2, 99)
    assert second["messages"][1]["tool_calls"][0]["id"] == "call_a"
    results = second["messages"][2:]
    assert results == [{"role": "tool", "tool_call_id": "call_a", "content": "Oslo: 4 degrees C, rain"},
                       {"role": "tool", "tool_call_id": "call_b", "content": '{"utc_offset":1,"time":"12:00"}'}]
    assert runner.messages[-1] == {"role": "assistant", "content": "Oslo: rain, 4 C; it is noon."}
    assert runner.rounds == 2 and len(runner.messages) == 5


def test_failures_go_back_to_the_model_and_the_loop_goes_on(mode: str, serve) -> None:
    def flaky(city: str) -> str:
        raise RuntimeError(f"no station in {city}")

    handle = scripted(calling(call("c1", "flaky", {"city": "Oslo"}), call("c2", "get_weather", {"town": "Oslo"}),
                              call("c3", "get_news", {}), call("c4", "get_weather", "{not json")),
                      completion("Sorry."))
    server = serve(handle)

    _, answers = run(mode, server, tools=[flaky, get_weather])

    contents = [m["content"] for m in handle.seen[1]["messages"] if m["role"] == "tool"]
    assert contents[0] == "Error: RuntimeError: no station in Oslo"
    assert contents[1].startswith("Error: invalid arguments for get_weather: ") and "city: Field required" in contents[1]
    assert "town: Extra inputs are not permitted" in contents[1]
    assert contents[2] == "Error: there is no tool named 'get_news'; the tools are flaky, get_weather"
    assert contents[3].startswith("Error: invalid arguments for get_weather: ") and "Invalid JSON" in contents[3]
    assert answers[-1].choices[0].message.content == "Sorry."


def test_max_rounds_ends_a_model_that_never_stops_calling(mode: str, serve) -> None:
    handle = scripted(calling(call("c", "get_weather", {"city": "Oslo"})))
    server = serve(handle)

    runner, answers = run(mode, server, tools=[get_weather], max_rounds=3)

    assert len(handle.seen) == 3 and len(answers) == 3
    assert answers[-1].choices[0].finish_reason == "tool_calls"  # the last answer's calls were not run
    assert runner.messages[-1]["role"] == "assistant" and runner.messages[-1]["tool_calls"]


def test_the_async_runner_runs_one_answers_calls_concurrently(serve) -> None:
    """Two sync tools that only return when both are running at once (a barrier of two)."""
    barrier = threading.Barrier(2, timeout=5)

    def left() -> str:
        barrier.wait()
        return "L"

    async def right() -> str:
        await anyio.to_thread.run_sync(barrier.wait)
        return "R"

    handle = scripted(calling(call("a", "left", {}), call("b", "right", {})), completion("done"))
    server = serve(handle)

    run("async", server, tools=[left, right])

    assert [m["content"] for m in handle.seen[1]["messages"] if m["role"] == "tool"] == ["L", "R"]


def test_nvidia_gets_the_tools_in_the_prompt_and_the_loop_still_runs(serve) -> None:
    handle = scripted(completion('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
                      completion("Rain in Oslo."))
    server = serve(handle)

    runner, answers = run("sync", server, client={"provider": "nvidia"}, tools=[get_weather])

    assert "tools" not in handle.seen[0] and "get_weather" in json.dumps(handle.seen[0]["messages"])
    assert "Oslo: 4 degrees C, rain" in json.dumps(handle.seen[1]["messages"])  # the result, as prompt text
    assert answers[0].choices[0].message.tool_calls[0].function.name == "get_weather"
    assert runner.until_done().choices[0].message.content == "Rain in Oslo."


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"tools": [{"type": "function", "function": {"name": "x"}}]}, InvalidRequestError, "runs Python functions"),
    ({"tools": []}, InvalidRequestError, "at least one tool"),
    ({"tools": [get_weather, tool(name="get_weather")(get_time)]}, InvalidRequestError, "two tools are named"),
    ({"tools": [get_weather], "n": 2}, InvalidRequestError, "n must be 1"),
    ({"tools": [get_weather], "max_rounds": 0}, InvalidRequestError, "max_rounds"),
    ({"tools": [get_weather], "stream": True}, TypeError, "stream"),
    ({"tools": [get_weather], "temperature": 9}, InvalidRequestError, "temperature"),
])
def test_bad_arguments_are_refused_before_anything_is_sent(serve, kwargs: dict[str, Any], error: type[Exception],
                                                           match: str) -> None:
    handle = scripted(completion("hi"))
    server = serve(handle)
    with httpx.Client() as http, MixtralClient(base_url=server.url, api_key="k", http_client=http) as client:
        with pytest.raises(error, match=match):
            client.chat.completions.run_tools(messages=MESSAGES, **kwargs)  # at the call, not on iteration
    assert handle.seen == []


def test_async_functions_need_the_async_client() -> None:
    async def slow() -> str:
        return "x"

    with MixtralClient(base_url="http://127.0.0.1:9/v1", api_key="k") as client, \
            pytest.raises(InvalidRequestError, match="async functions need AsyncMixtralClient"):
        client.chat.completions.run_tools(messages=MESSAGES, tools=[slow])
    assert isinstance(tool(slow), FunctionTool) and tool(slow).is_async


def test_an_annotation_naming_a_local_is_refused_with_the_reason() -> None:
    from typing import Annotated as LocalName  # noqa: F401  (the string annotation below cannot see it)

    def odd(x: LocalName[int, Field(ge=0)]) -> int:  # type: ignore[valid-type]
        return x

    with pytest.raises(ValueError, match="tool 'odd': its annotations cannot be resolved .*LocalName"):
        tool(odd)


def test_a_loop_left_after_an_answer_runs_its_calls_when_taken_up_again(mode: str, serve) -> None:
    handle = scripted(calling(call("c1", "get_weather", {"city": "Oslo"})), completion("Rain."))
    server = serve(handle)
    args = {"base_url": server.url, "api_key": "k"}

    if mode == "sync":
        with MixtralClient(**args) as client:
            runner = client.chat.completions.run_tools(messages=MESSAGES, tools=[get_weather])
            for _ in runner:
                break
            final = runner.until_done()
    else:
        async def main() -> Any:
            async with AsyncMixtralClient(**args) as client:
                runner = client.chat.completions.run_tools(messages=MESSAGES, tools=[get_weather])
                async for _ in runner:
                    break
                return await runner.until_done()

        final = anyio.run(main)

    assert final.choices[0].message.content == "Rain."
    assert handle.seen[1]["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": "Oslo: 4 degrees C, rain"}
