"""``client.models``: the model ids a backend serves.

``list()`` asks a host's ``GET /models`` through the HTTP senders (retried and timed out as a request is);
Bedrock and local weights answer from the configuration, with the one model the client uses.
"""

from __future__ import annotations

from collections.abc import Iterator

from ._backends.base import AsyncBackend, SyncBackend
from ._config import ClientConfig
from ._timeouts import Timeout, coerce_timeout
from .types import Model

__all__ = ["AsyncModels", "ModelPage", "Models"]


class ModelPage:
    """What ``client.models.list()`` returns: ``data``, a list of ``Model``; iterate it for the models."""

    object = "list"

    def __init__(self, data: list[Model]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"ModelPage({[m.id for m in self.data]!r})"


def _own_model(config: ClientConfig) -> list[Model]:
    """What a backend without a listing serves: the model it sends to (Bedrock) or runs (local weights)."""
    where = {"path": config.model_path} if config.model_path is not None else {}
    return [Model(id=config.preset.resolve_model(config.model), owned_by=config.provider, **where)]


class Models:
    """``client.models``: ``list()`` asks a host's ``GET /models`` (retried as a request is); Bedrock and local
    weights answer with the one model the client uses, without a request."""

    def __init__(self, config: ClientConfig, backend: SyncBackend) -> None:
        self._config = config
        self._backend = backend

    def list(self, *, timeout: float | Timeout | None = None) -> ModelPage:
        if self._config.preset.kind != "http":
            return ModelPage(_own_model(self._config))
        listing = self._backend.list_models  # type: ignore[attr-defined]
        return ModelPage(listing(coerce_timeout(timeout, self._config.timeout)))


class AsyncModels:
    """``async_client.models``: ``await client.models.list()``."""

    def __init__(self, config: ClientConfig, backend: AsyncBackend) -> None:
        self._config = config
        self._backend = backend

    async def list(self, *, timeout: float | Timeout | None = None) -> ModelPage:
        if self._config.preset.kind != "http":
            return ModelPage(_own_model(self._config))
        listing = self._backend.list_models  # type: ignore[attr-defined]
        return ModelPage(await listing(coerce_timeout(timeout, self._config.timeout)))
