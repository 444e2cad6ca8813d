"""What ``ChatMixtral`` and ``MixtralLLM`` share: the provider configuration, checked when the model is built,
and the clients, built on first use (one sync client; one async client per event loop, closed with it)."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from langchain_core.language_models import LangSmithParams
from pydantic import BaseModel, Field, PrivateAttr, SecretStr, model_validator

from mixtral_client import PROVIDERS, AsyncMixtralClient, MixtralClient, ProviderPreset, RateLimiter, Timeout
from mixtral_client._config import resolve_config
from mixtral_client._providers import get_preset

__all__ = ["MixtralClients"]


class _EnvSecret(SecretStr):
    """A key read from an environment variable; it remembers which one.

    ``configurable_fields`` rebuilds the model from its field values when a config switches ``provider``:
    a key that came from the old provider's variable is then read again for the new provider instead of
    being sent to another host.
    """

    def __init__(self, value: str, variable: str) -> None:
        super().__init__(value)
        self.variable = variable


def _key_variables(preset: ProviderPreset) -> list[str]:
    """Where a provider's key is looked up, in order (its own variable, then ``MIXTRAL_API_KEY``)."""
    return [v for v in (preset.api_key_env, "MIXTRAL_API_KEY") if v]


async def _close_at_loop_shutdown(client: AsyncMixtralClient, clients: weakref.WeakKeyDictionary[Any, Any],
                                  loop: asyncio.AbstractEventLoop) -> AsyncIterator[None]:
    """Parked on its event loop; ``asyncio.run`` (and any loop shut down properly) finalizes it on the way out."""
    try:
        yield
    finally:
        clients.pop(loop, None)
        await client.aclose()


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str | None) -> Any:
    """The checkpoint's sentencepiece tokenizer (None: mistral-common's v1, which is Mixtral's), loaded once."""
    from mixtral_local.tokenizer import MixtralTokenizer

    return MixtralTokenizer.from_pretrained(model_path)


class MixtralClients(BaseModel):
    """The provider configuration of a LangChain model over ``mixtral_client``, and its clients."""

    provider: str | None = None
    """nvidia | openrouter | aimlapi | otc | openai | bedrock | local (default: ``MIXTRAL_PROVIDER``, else inferred
    from ``base_url`` / ``model_path``)."""
    model: str | None = None
    """Model id sent to the host (default: the provider's own Mixtral-8x7B-Instruct id)."""
    base_url: str | None = None
    api_key: SecretStr | None = None
    model_path: str | None = None
    """Checkpoint directory for ``provider="local"``."""
    local_options: dict[str, Any] | None = None
    """How ``provider="local"`` loads the checkpoint (``{"quantize": "int8"}``, ``dtype``, ``device``, ...);
    keys not given come from ``MIXTRAL_LOCAL_<KEY>``. See docs/local.md."""
    region: str | None = None
    """AWS region for ``provider="bedrock"`` (default: ``AWS_REGION``, then the AWS profile)."""
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    """Token id -> a bias from -100 (never) to 100 (always) added to its logit before sampling."""
    timeout: float | Timeout | None = None
    """Seconds for the whole call (retries included), or a ``mixtral_client.Timeout``."""
    max_retries: int = 2
    fallbacks: list[str] | None = None
    """Providers to try, in order, when this one fails (``["openrouter", "local"]``; default:
    ``MIXTRAL_FALLBACKS``). Each gets the request built for it; see docs/providers.md."""
    rate_limit: float | None = None
    """Requests a minute to pace this model's calls to, sync and async together (default:
    ``MIXTRAL_RATE_LIMIT``). LangChain's own ``rate_limiter`` works too."""
    streaming: bool = False
    """Stream internally on ``invoke`` (callbacks see tokens as they arrive)."""
    stream_usage: bool = True
    """Ask for token usage when streaming (``stream_options.include_usage``)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other ``create()`` parameters (``n``, ``presence_penalty``, ...); unknown ones go to ``extra_body``."""

    #: keys ``model_kwargs`` may not set beyond the fields (the request's own: ``messages`` or ``prompt``)
    _reserved: ClassVar[frozenset[str]] = frozenset({"stream"})
    #: the keyword arguments the client's ``create()`` takes; any other key of a call goes to ``extra_body``
    _known: ClassVar[frozenset[str]] = frozenset()
    _ls_model_type: ClassVar[Literal["chat", "llm"]] = "chat"

    _clients_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _rate_limiter_shared: RateLimiter | None = PrivateAttr(default=None)
    _sync_client: MixtralClient | None = PrivateAttr(default=None)
    _close_sync_client: weakref.finalize[Any, Any] | None = PrivateAttr(default=None)
    _async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[AsyncMixtralClient, Any]] = (
        PrivateAttr(default_factory=weakref.WeakKeyDictionary))

    def _config_options(self) -> dict[str, Any]:
        """Client configuration beyond the shared fields (``ChatMixtral``: how tools and formats travel)."""
        return {}

    @model_validator(mode="after")
    def _resolve(self) -> Any:
        """Check the configuration now (nothing is built or sent); fill ``provider`` and ``api_key`` from the env."""
        preset = PROVIDERS.get((self.provider or "").strip().lower())
        if isinstance(self.api_key, _EnvSecret) and preset and self.api_key.variable not in _key_variables(preset):
            self.api_key = None  # read for another provider: look again for this one's variables
        bad = self.model_kwargs.keys() & (self._reserved | type(self).model_fields.keys())
        if bad:
            raise ValueError(f"model_kwargs must not set {sorted(bad)}: pass them as {type(self).__name__} arguments")
        config = resolve_config(
            os.environ, provider=self.provider, base_url=self.base_url, model_path=self.model_path,
            local_options=self.local_options, region=self.region,
            api_key=self.api_key.get_secret_value() if self.api_key else None, model=self.model,
            timeout=self.timeout, max_retries=self.max_retries, **self._config_options(),
        )
        self.provider = config.provider
        if self.rate_limit is not None:
            RateLimiter(self.rate_limit)  # a bad value fails here (ConfigurationError), not at the first call
        for name in self.fallbacks or []:
            get_preset(name.strip().lower())  # an unknown provider fails here too
        if self.api_key is None and config.api_key:
            variable = next((v for v in _key_variables(config.preset) if os.environ.get(v) == config.api_key),
                            "MIXTRAL_API_KEY")
            self.api_key = _EnvSecret(config.api_key, variable)
        return self

    @property
    def _preset(self) -> ProviderPreset:
        return PROVIDERS[self.provider or "openai"]

    @property
    def _model_name(self) -> str:
        return self._preset.resolve_model(self.model or os.environ.get("MIXTRAL_MODEL") or None)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self._model_name, "base_url": self.base_url,
                **self._default_params()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith's view of a call: the provider, the model (a per-call ``model=`` wins), sampling, stops."""
        params = LangSmithParams(
            ls_provider=self.provider or "mixtral",
            ls_model_name=kwargs.get("model") or self._model_name,
            ls_model_type=self._ls_model_type,
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := stop or kwargs.get("stop") or self.stop:
            params["ls_stop"] = [stop] if isinstance(stop, str) else stop
        return params

    def _own_params(self) -> dict[str, Any]:
        """Sampling fields of one model class (``ChatMixtral``'s ``logprobs`` and ``top_logprobs``, ...)."""
        return {}

    def _default_params(self) -> dict[str, Any]:
        params = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                  "seed": self.seed, **self._own_params(), "logit_bias": self.logit_bias, **self.model_kwargs}
        return {k: v for k, v in params.items() if v is not None}

    def _call_params(self, stop: list[str] | None, stream: bool, /, **kwargs: Any) -> dict[str, Any]:
        """The ``create()`` arguments of one call but the prompt: sampling, stops, usage on streams; keys the
        client does not take go into ``extra_body``."""
        stream_usage = kwargs.pop("stream_usage", self.stream_usage)
        kwargs.pop("stream", None)  # LangChain's own switch (``invoke(..., stream=True)``), already acted on
        params: dict[str, Any] = {**self._default_params(), **kwargs}
        params = {k: v for k, v in params.items() if v is not None}
        stops = stop if stop is not None else params.pop("stop", None) or self.stop
        params.pop("stop", None)
        if stops:
            params["stop"] = list(stops)
        if stream and stream_usage:
            params["stream_options"] = {"include_usage": True, **params.get("stream_options", {})}
        extra = {k: params.pop(k) for k in list(params) if k not in self._known}
        if extra:
            params["extra_body"] = {**extra, **params.get("extra_body", {})}
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Mixtral's sentencepiece ids for ``text`` (LangChain's default would fetch GPT-2's tokenizer)."""
        ids: list[int] = _tokenizer(self.model_path).encode(text)
        return ids

    def _client_args(self) -> dict[str, Any]:
        args = {"base_url": self.base_url, "model": self.model, "model_path": self.model_path,
                "local_options": self.local_options, "region": self.region,
                "timeout": self.timeout, "max_retries": self.max_retries, "fallbacks": self.fallbacks,
                "rate_limit": self._limiter(),
                "api_key": self.api_key.get_secret_value() if self.api_key else None, **self._config_options()}
        return {k: v for k, v in args.items() if v is not None}

    def _limiter(self) -> RateLimiter | None:
        """One ``RateLimiter`` for this model's sync client and every async one (one budget)."""
        if self.rate_limit is None:
            return None
        if self._rate_limiter_shared is None:
            self._rate_limiter_shared = RateLimiter(self.rate_limit)
        return self._rate_limiter_shared

    def _client(self) -> MixtralClient:
        with self._clients_lock:
            if self._sync_client is None:
                self._sync_client = MixtralClient(self.provider, **self._client_args())
                # a model dropped without close() still returns its connections (at exit at the latest)
                self._close_sync_client = weakref.finalize(self, self._sync_client.close)
            return self._sync_client

    async def _aclient(self) -> AsyncMixtralClient:
        """One async client per event loop (connections cannot cross loops), closed when that loop shuts down."""
        loop = asyncio.get_running_loop()
        entry = self._async_clients.get(loop)
        if entry is None:
            client = AsyncMixtralClient(self.provider, **self._client_args())
            guard = _close_at_loop_shutdown(client, self._async_clients, loop)
            await guard.__anext__()
            entry = self._async_clients[loop] = (client, guard)
        return entry[0]

    def close(self) -> None:
        """Close the synchronous client's connections (async clients close with their event loop)."""
        with self._clients_lock:
            close, self._close_sync_client, self._sync_client = self._close_sync_client, None, None
        if close is not None:
            close()  # a finalizer runs at most once
