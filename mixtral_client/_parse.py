"""``chat.completions.parse()``: a pydantic model in, validated instances out (pure, no I/O).

``format_for(Model)`` is the ``response_format`` sent for a model: its JSON schema, with every object that
lists its properties closed to other keys (``additionalProperties: false``, unless the model says
otherwise), so a backend that enforces the schema keeps to the model's fields. ``parsed(completion, Model)``
validates each choice's content into the model, or raises ``StructuredOutputError`` naming the choice and
why, with the whole completion on the error.
"""

from __future__ import annotations

import re
from typing import Any, Generic, cast

from pydantic import BaseModel, ValidationError
from pydantic.errors import PydanticUserError

from ._exceptions import InvalidRequestError, StructuredOutputError
from .types import ChatCompletion, ParsedChatCompletion, ParsedT, Usage

__all__ = ["Repairs", "format_for", "parse_choice", "parsed"]

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def _closed(node: Any) -> Any:
    """``node`` with ``additionalProperties: false`` on every object schema that lists properties and says
    nothing about other keys."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _closed(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def format_for(model: Any) -> dict[str, Any]:
    """The ``json_schema`` response format for a pydantic model class."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise InvalidRequestError(
            f"response_format: parse() takes a pydantic model class, got {model!r}; for a dict format use create()",
            param="response_format",
        )
    try:
        schema = model.model_json_schema()
    except PydanticUserError as exc:
        raise InvalidRequestError(f"response_format: {model.__name__} has no JSON schema: {exc}",
                                  param="response_format") from exc
    name = _NAME_CHARS.sub("_", model.__name__)[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": _closed(schema)}}


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "the answer"
    return f"{where}: {error['msg']}"


def _clip(text: str, size: int = 200) -> str:
    return text if len(text) <= size else f"{text[:size]}..."


def parse_choice(completion: ChatCompletion, i: int, model: type[ParsedT]) -> ParsedT | None:
    """Choice ``i``'s content validated into ``model`` (None when it calls tools), else ``StructuredOutputError``."""
    choice = completion.choices[i]
    message = choice.message
    if message.tool_calls:
        return None
    name = model.__name__
    why = None
    if choice.finish_reason == "length":
        why = f"the answer was cut short by max_tokens (finish_reason 'length'), so it is not a whole {name}"
    elif choice.finish_reason == "content_filter":
        why = "the host filtered the answer (finish_reason 'content_filter')"
    elif not message.content:
        why = "the answer is empty"
    if why is not None:
        raise StructuredOutputError(f"choice {i}: {why}", completion=completion, choice=i)
    try:
        return model.model_validate_json(message.content or "")
    except ValidationError as exc:
        raise StructuredOutputError(
            f"choice {i}: the answer is not a valid {name} ({exc.error_count()} error(s); first, "
            f"{_first_error(exc)}): {_clip(message.content or '')!r}", completion=completion, choice=i,
        ) from exc


def parsed(completion: ChatCompletion, model: type[ParsedT]) -> ParsedChatCompletion[ParsedT]:
    """``completion`` with each message's content validated into ``model`` as ``message.parsed`` (None for a
    choice that calls tools)."""
    choices = []
    for i, choice in enumerate(completion.choices):
        value = parse_choice(completion, i, model)
        choices.append({**choice.model_dump(), "message": {**choice.message.model_dump(), "parsed": value}})
    result: ParsedChatCompletion[Any] = ParsedChatCompletion.model_validate({**completion.model_dump(), "choices": choices})
    result._request_id = completion._request_id
    return cast("ParsedChatCompletion[ParsedT]", result)


def _spent(total: Usage | None, more: Usage | None) -> Usage | None:
    if total is None or more is None:
        return more or total
    return Usage(prompt_tokens=total.prompt_tokens + more.prompt_tokens,
                 completion_tokens=total.completion_tokens + more.completion_tokens,
                 total_tokens=total.total_tokens + more.total_tokens)


class Repairs(Generic[ParsedT]):
    """``parse(max_repairs=k)``: an answer that is not the model goes back to the model with the reason, up to
    ``k`` times, before ``StructuredOutputError`` is raised (pure: the caller sends ``messages`` each round).

    A repair is two more turns: the answer as the model gave it, and a user turn naming what is wrong. The
    completion returned (or the error's) counts the tokens of every round in its ``usage``.
    """

    def __init__(self, messages: Any, model: type[ParsedT], max_repairs: int, n: int) -> None:
        if isinstance(max_repairs, bool) or not isinstance(max_repairs, int) or max_repairs < 0:
            raise InvalidRequestError(f"max_repairs must be an integer >= 0, got {max_repairs!r}", param="max_repairs")
        if max_repairs and n != 1:
            raise InvalidRequestError("max_repairs repairs one answer: n must be 1", param="max_repairs")
        self.messages: list[Any] = list(messages)
        self._model = model
        self._left = max_repairs
        self._usage: Usage | None = None
        self.repairs = 0

    def take(self, completion: ChatCompletion) -> ParsedChatCompletion[ParsedT] | None:
        """The parsed completion, or None when the answer went back for repair (send ``messages`` again)."""
        self._usage = _spent(self._usage, completion.usage)
        try:
            result = parsed(completion, self._model)
        except StructuredOutputError as exc:
            exc.completion.usage = self._usage
            if not self._left:
                raise
            self._left -= 1
            self.repairs += 1
            reason = str(exc).split(": ", 1)[-1]  # without the "choice 0" prefix
            self.messages += [
                {"role": "assistant", "content": completion.choices[exc.choice].message.content or ""},
                {"role": "user", "content": f"That answer is not valid: {reason}. Answer again with only the "
                                            f"JSON of the {self._model.__name__}, complete and valid."},
            ]
            return None
        result.usage = self._usage
        return result
