"""``chat.completions.batch()``: many requests, answered concurrently, returned in order.

    answers = client.chat.completions.batch([{"messages": [...]} for text in texts], max_concurrency=16)

Every request is checked before the first is sent (an invalid one raises ``InvalidRequestError`` naming its
index, and nothing goes out). Then at most ``max_concurrency`` are in flight at once: worker threads for the
sync client, tasks for the async one. Hosted backends answer them over the client's connection pool; on local
weights they decode together in the running batch, which is where the gain is. With
``return_exceptions=False`` (the default) the first failure stops the batch: what has not started is not
sent, what is running finishes, and that failure is raised with a note naming its index. With ``True`` each
failure takes its request's place in the list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._exceptions import InvalidRequestError

if TYPE_CHECKING:
    from ._client import _ClientCore

__all__ = ["checked_batch"]


def checked_batch(requests: Iterable[Mapping[str, Any]], core: _ClientCore,
                  max_concurrency: int) -> list[tuple[Any, dict[str, Any]]]:
    """The requests as (messages, the other ``create()`` arguments), each validated as its request would be."""
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise InvalidRequestError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}",
                                  param="max_concurrency")
    items: list[tuple[Any, dict[str, Any]]] = []
    for i, request in enumerate(requests):
        if not isinstance(request, Mapping) or "messages" not in request:
            raise InvalidRequestError(f"requests[{i}]: each request is a dict of create() arguments with 'messages'",
                                      param="requests")
        item = dict(request)
        if item.get("stream"):
            raise InvalidRequestError(f"requests[{i}]: batch() returns whole answers; stream one with create()",
                                      param="stream")
        item.pop("stream", None)
        params = {k: v for k, v in item.items() if k != "messages"}
        try:
            core.request(item["messages"], False, params)
        except InvalidRequestError as exc:
            raise type(exc)(f"requests[{i}]: {exc}", param=exc.param, provider=exc.provider) from None
        except TypeError as exc:
            raise TypeError(f"requests[{i}]: {exc}") from None
        items.append((item["messages"], params))
    return items
