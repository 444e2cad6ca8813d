"""Python functions as tools, and ``chat.completions.run_tools()``: the agent loop, on every backend.

    @tool
    def get_weather(city: str, unit: Literal["c", "f"] = "c") -> str:
        \"\"\"The weather in a city.

        Args:
            city: the city's name
            unit: degrees Celsius or Fahrenheit
        \"\"\"
        return lookup(city, unit)

    runner = client.chat.completions.run_tools(messages=[...], tools=[get_weather], max_tokens=300)
    for completion in runner:        # each answer of the model; its tool calls have run before the next
        ...
    final = runner.until_done()       # the answer that called no tool
    runner.messages                   # the conversation: calls, results, the answer

``tool(fn)`` builds the function's JSON schema from its signature with pydantic (types, defaults,
``Annotated[..., Field(description=...)]``, and the ``Args:`` section of a Google-style docstring), and
validates the model's arguments against the same schema before the function is called. ``run_tools`` sends
the conversation, runs every call of the answer (in order; the async runner runs them concurrently and sync
functions in worker threads), appends the results as ``tool`` messages and asks again, until an answer
calls no tool or ``max_rounds`` answers have come. A tool that raises, arguments that do not validate, or a
call of an unknown tool do not end the loop: the error goes back to the model as that call's result, as a
person would report it, so that it can correct itself. The calls go natively or through the prompt as each
backend needs (``ToolPrompt``), so the same loop runs on NVIDIA, Bedrock and local weights.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, get_type_hints

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ._exceptions import InvalidRequestError
from .types import ChatCompletion, ChatCompletionToolParam, ToolCall

if TYPE_CHECKING:
    from ._client import AsyncCompletions, Completions, _ClientCore

__all__ = ["AsyncToolRunner", "FunctionTool", "ToolRunner", "tool"]

R = TypeVar("R")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ARG_LINE = re.compile(r"^\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _docstring(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(the description: the docstring before its ``Args:`` section; each argument's text from that section,
    Google style: ``name: text`` or ``name (type): text``, continued on more indented lines)."""
    lines = (inspect.getdoc(fn) or "").splitlines()
    if "Args:" not in (line.strip() for line in lines):
        return "\n".join(lines).strip(), {}
    at = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    described: dict[str, str] = {}
    name, indent = None, None
    for line in lines[at + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break  # the next section (Returns:, Raises:, ...)
        match = _ARG_LINE.match(line)
        if match and (indent is None or depth == indent):
            name, indent = match.group(1), depth
            described[name] = match.group(2).strip()
        elif name is not None:
            described[name] = f"{described[name]} {line.strip()}".strip()
    return "\n".join(lines[:at]).strip(), described


class FunctionTool(Generic[R]):
    """A Python function the model may call: ``param`` (the tool as sent), ``arguments(json)`` (a call's JSON
    arguments validated into keyword arguments), and the function itself when called. Made by ``tool()``."""

    def __init__(self, fn: Callable[..., R], *, name: str | None = None, description: str | None = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not _NAME.match(self.name):
            raise ValueError(f"a tool name must be 1-64 letters, digits, _ or -, got {self.name!r}")
        doc, described = _docstring(fn)
        try:
            hints = get_type_hints(fn, include_extras=True)
        except NameError as exc:  # a string annotation (``from __future__ import annotations``) naming a local
            raise ValueError(f"tool {self.name!r}: its annotations cannot be resolved ({exc}); the names they use "
                             "must be importable from the function's module") from None
        fields: dict[str, Any] = {}
        for pname, parameter in inspect.signature(fn).parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise ValueError(f"tool {self.name!r}: *args and **kwargs cannot be described to the model")
            annotation = hints.get(pname, Any)
            default = ... if parameter.default is parameter.empty else parameter.default
            # a docstring's text, else (no description= at all) what Annotated[..., Field(...)] says stays
            info = Field(default, description=described[pname]) if pname in described else Field(default)
            fields[pname] = (annotation, info)
        self.arguments_model: type[BaseModel] = create_model(
            f"{self.name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        schema = self.arguments_model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        self.description = description if description is not None else doc
        function: dict[str, Any] = {"name": self.name, "parameters": schema}
        if self.description:
            function["description"] = self.description
        self.param: ChatCompletionToolParam = {"type": "function", "function": function}  # type: ignore[typeddict-item]
        self.is_async = inspect.iscoroutinefunction(fn)

    def arguments(self, arguments: str) -> dict[str, Any]:
        """The call's JSON arguments, validated: the keyword arguments for the function (``ValueError`` with
        the reason when they are not JSON or not valid)."""
        try:
            validated = self.arguments_model.model_validate_json(arguments or "{}")
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"invalid arguments for {self.name}: {problems}") from None
        return {name: getattr(validated, name) for name in type(validated).model_fields}

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FunctionTool({self.name!r})"


def tool(fn: Callable[..., R] | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """``@tool`` (or ``@tool(name=..., description=...)``, or ``tool(fn)``): a function as a ``FunctionTool``.
    The function stays callable as before."""
    if fn is None:
        return lambda f: FunctionTool(f, name=name, description=description)
    return FunctionTool(fn, name=name, description=description)


def as_tools(tools: Sequence[Any]) -> dict[str, FunctionTool[Any]]:
    """``run_tools``' tools by name: ``FunctionTool``s, or plain functions (wrapped); anything else, or two of
    one name, is an ``InvalidRequestError`` before anything is sent."""
    out: dict[str, FunctionTool[Any]] = {}
    for i, item in enumerate(tools):
        if isinstance(item, FunctionTool):
            made = item
        elif callable(item) and not isinstance(item, Mapping):
            try:
                made = FunctionTool(item)
            except (ValueError, TypeError) as exc:  # pydantic's schema errors are TypeErrors
                raise InvalidRequestError(f"tools[{i}]: {exc}", param="tools") from None
        else:
            raise InvalidRequestError(
                f"tools[{i}]: run_tools runs Python functions (plain, or made with tool()), got {type(item).__name__};"
                " use create(tools=...) for tools you run yourself", param="tools")
        if made.name in out:
            raise InvalidRequestError(f"tools[{i}]: two tools are named {made.name!r}", param="tools")
        out[made.name] = made
    if not out:
        raise InvalidRequestError("run_tools needs at least one tool", param="tools")
    return out


def _result_text(value: Any) -> str:
    """A tool's return value as the ``tool`` message's content: text as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _failure(exc: BaseException) -> str:
    """What the model is told when a tool raises."""
    return f"Error: {type(exc).__name__}: {exc}"


def _assistant_turn(completion: ChatCompletion) -> dict[str, Any]:
    message = completion.choices[0].message
    turn: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function",
                               "function": {"name": c.function.name, "arguments": c.function.arguments}}
                              for c in message.tool_calls]
    return turn


class _Loop:
    """What both runners share: the conversation, the rounds, the checks."""

    def __init__(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any], max_rounds: int,
                 params: Mapping[str, Any], known: frozenset[str], asynchronous: bool) -> None:
        unknown = params.keys() - known
        if unknown:
            raise TypeError(f"run_tools() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise InvalidRequestError(f"max_rounds must be an integer >= 1, got {max_rounds!r}", param="max_rounds")
        if params.get("n", 1) != 1:
            raise InvalidRequestError("run_tools answers one conversation: n must be 1", param="n")
        self.tools = as_tools(tools)
        if not asynchronous and (slow := [t.name for t in self.tools.values() if t.is_async]):
            raise InvalidRequestError(f"{', '.join(slow)}: async functions need AsyncMixtralClient's run_tools",
                                      param="tools")
        self.messages: list[dict[str, Any]] = [dict(m) for m in messages]
        self.max_rounds = max_rounds
        self.params = {**params, "tools": [t.param for t in self.tools.values()]}
        self.rounds = 0
        self.last: ChatCompletion | None = None
        self.done = False

    def check(self, core: _ClientCore) -> None:
        """Validate the first request now (``InvalidRequestError``), though it is sent only on iteration."""
        core.request(self.messages, False, self.params)  # type: ignore[arg-type]

    def answered(self, completion: ChatCompletion) -> list[ToolCall]:
        """Take an answer into the conversation; the calls to run (none: the loop is over)."""
        self.rounds += 1
        self.last = completion
        self.messages.append(_assistant_turn(completion))
        calls = completion.choices[0].message.tool_calls or []
        if not calls or self.rounds >= self.max_rounds:
            self.done = True
        return [] if self.done else list(calls)

    def prepare(self, call: ToolCall) -> tuple[FunctionTool[Any], dict[str, Any]] | str:
        """The tool and its validated arguments, or the error text to answer the call with."""
        found = self.tools.get(call.function.name)
        if found is None:
            return f"Error: there is no tool named {call.function.name!r}; the tools are {', '.join(self.tools)}"
        try:
            return found, found.arguments(call.function.arguments)
        except ValueError as exc:
            return f"Error: {exc}"

    def result(self, call: ToolCall, content: str) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call.id, "content": content})


class _Runner:
    """What both runners show of their loop."""

    _loop: _Loop

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation so far: what was given, then every answer, call and result."""
        return self._loop.messages

    @property
    def rounds(self) -> int:
        """How many answers have come."""
        return self._loop.rounds


class ToolRunner(_Runner):
    """``client.chat.completions.run_tools(...)``: iterate it for each answer of the model; its calls run
    before the next one is asked for. ``until_done()`` runs the loop out and returns the last answer."""

    def __init__(self, completions: Completions, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any],
                 max_rounds: int, params: Mapping[str, Any], known: frozenset[str]) -> None:
        self._completions = completions
        self._loop = _Loop(messages, tools, max_rounds, params, known, asynchronous=False)
        self._loop.check(completions._core)
        self._iterator = self._iterate()

    def __iter__(self) -> Iterator[ChatCompletion]:
        return self._iterator  # one iterator: a loop left after an answer resumes by running that answer's calls

    def __next__(self) -> ChatCompletion:
        return next(self._iterator)

    def _iterate(self) -> Iterator[ChatCompletion]:
        loop = self._loop
        while not loop.done:
            completion = self._completions.create(messages=loop.messages, **loop.params)  # type: ignore[arg-type]
            calls = loop.answered(completion)
            yield completion
            for call in calls:
                prepared = loop.prepare(call)
                if isinstance(prepared, str):
                    loop.result(call, prepared)
                    continue
                fn, kwargs = prepared
                try:
                    value = fn(**kwargs)
                except Exception as exc:  # the model hears of it, as a person would tell it
                    loop.result(call, _failure(exc))
                else:
                    loop.result(call, _result_text(value))

    def until_done(self) -> ChatCompletion:
        """Run the loop out: the answer that called no tool (or the last, after ``max_rounds``)."""
        for _ in self._iterator:
            pass
        assert self._loop.last is not None
        return self._loop.last


class AsyncToolRunner(_Runner):
    """The async ``ToolRunner``: ``async for completion in runner``, ``await runner.until_done()``. The calls of
    one answer run concurrently; sync functions run in worker threads, so the event loop never blocks."""

    def __init__(self, completions: AsyncCompletions, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any],
                 max_rounds: int, params: Mapping[str, Any], known: frozenset[str]) -> None:
        self._completions = completions
        self._loop = _Loop(messages, tools, max_rounds, params, known, asynchronous=True)
        self._loop.check(completions._core)
        self._calls: list[ToolCall] = []

    def __aiter__(self) -> AsyncIterator[ChatCompletion]:
        return self

    async def __anext__(self) -> ChatCompletion:
        loop = self._loop
        if self._calls:
            calls, self._calls = self._calls, []
            await self._run(calls)
        if loop.done:
            raise StopAsyncIteration
        completion = await self._completions.create(messages=loop.messages, **loop.params)  # type: ignore[arg-type]
        self._calls = loop.answered(completion)
        return completion

    async def _run(self, calls: list[ToolCall]) -> None:
        loop = self._loop
        results: list[str] = [""] * len(calls)

        async def run(i: int, fn: FunctionTool[Any], kwargs: dict[str, Any]) -> None:
            try:
                value = await fn(**kwargs) if fn.is_async else await anyio.to_thread.run_sync(lambda: fn(**kwargs))
            except Exception as exc:
                results[i] = _failure(exc)
            else:
                results[i] = _result_text(value)

        async with anyio.create_task_group() as group:
            for i, call in enumerate(calls):
                prepared = loop.prepare(call)
                if isinstance(prepared, str):
                    results[i] = prepared
                else:
                    group.start_soon(run, i, *prepared)
        for call, content in zip(calls, results, strict=True):
            loop.result(call, content)

    async def until_done(self) -> ChatCompletion:
        async for _ in self:
            pass
        assert self._loop.last is not None
        return self._loop.last

