"""Resolving what the user configured (arguments first, then environment variables) into a ClientConfig.

Pure: the environment is passed in, so tests never touch ``os.environ``.

Environment variables:
    MIXTRAL_PROVIDER     nvidia | openrouter | aimlapi | otc | openai | bedrock | local
    MIXTRAL_BASE_URL     an OpenAI-compatible base URL (implies provider "openai" when no provider is set)
    MIXTRAL_API_KEY      a key for any provider (the provider's own variable, e.g. NVIDIA_API_KEY, also works)
    MIXTRAL_MODEL        the model id (default: the provider's Mixtral id)
    MIXTRAL_MODEL_PATH   a local checkpoint directory (implies provider "local" when no provider is set)
    MIXTRAL_TOOL_CALLING auto | native | prompt: how tools reach the model (default: what the provider does)
    MIXTRAL_STRUCTURED_OUTPUT  auto | native | prompt: how response_format reaches the model (likewise)
    MIXTRAL_LOCAL_<KEY>  one ``local_options`` key for provider "local": MIXTRAL_LOCAL_QUANTIZE=int8,
                         MIXTRAL_LOCAL_DTYPE, _DEVICE, _MOE_BACKEND, _MAX_BATCH, _PREFIX_CACHE, _PROGRESS
                         (a ``local_options=`` argument wins key by key)
    MIXTRAL_FALLBACKS    providers to try, in order, when this one fails (read by the client: _fallback.py)
    MIXTRAL_RATE_LIMIT   requests a minute to pace this client to (read by the client: _ratelimit.py)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from ._exceptions import ConfigurationError, InvalidRequestError
from ._hub import resolve_model_path
from ._providers import ProviderPreset, get_preset
from ._timeouts import DEFAULT_TIMEOUT, NO_TIMEOUT, Timeout, coerce_timeout

__all__ = ["LOCAL_OPTION_VARS", "STRUCTURED_OUTPUT", "TOOL_CALLING", "ClientConfig", "resolve_config"]

#: ``tool_calling=`` values: the provider's own way, the host's ``tools`` field, or tools in the prompt
TOOL_CALLING = ("auto", "native", "prompt")
#: ``structured_output=`` values: the provider's own way, the host's ``response_format``, or the prompt
STRUCTURED_OUTPUT = ("auto", "native", "prompt")

#: every ``local_options`` key and the environment variable that supplies it when the argument does not
LOCAL_OPTION_VARS: Mapping[str, str] = {
    name: f"MIXTRAL_LOCAL_{name.upper()}"
    for name in ("dtype", "device", "moe_backend", "quantize", "progress", "max_batch", "prefix_cache",
                 "kv_cache_memory")
}
_INT_OPTIONS = ("max_batch", "prefix_cache")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    preset: ProviderPreset
    base_url: str | None
    api_key: str | None = field(repr=False)
    model: str | None
    timeout: Timeout
    max_retries: int
    default_headers: Mapping[str, str]
    #: OpenRouter attribution
    app_url: str | None = None
    app_name: str | None = None
    #: Bedrock
    region: str | None = None
    #: local backend: checkpoint directory and load options (dtype, device, moe_backend, ...)
    model_path: str | None = None
    local_options: Mapping[str, Any] = field(default_factory=dict)
    #: the ``local_options`` keys read from ``MIXTRAL_LOCAL_<KEY>`` rather than passed
    local_from_env: frozenset[str] = frozenset()
    #: user-supplied httpx clients (connection pools, proxies, transports)
    http_client: httpx.Client | None = None
    async_http_client: httpx.AsyncClient | None = None

    @property
    def provider(self) -> str:
        return self.preset.name

    def local_option_source(self, name: str) -> str:
        """Where ``local_options[name]`` came from, for error messages: its variable, or ``local_options``."""
        return LOCAL_OPTION_VARS[name] if name in self.local_from_env else "local_options"


def _with_tool_calling(preset: ProviderPreset, mode: str) -> ProviderPreset:
    """The preset with tools sent natively or written into the prompt, as ``tool_calling`` asks."""
    mode = mode.strip().lower()
    if mode not in TOOL_CALLING:
        raise ConfigurationError(f"tool_calling must be one of {', '.join(TOOL_CALLING)}, got {mode!r}")
    if mode == "auto":
        return preset
    if mode == "prompt":
        return replace(preset, tools="prompt")
    if preset.kind != "http":
        raise ConfigurationError(f"tool_calling='native' needs an OpenAI-compatible host; {preset.name!r} "
                                 "serves Mixtral without a tools field, so tools go in the prompt")
    return replace(preset, tools="native")


def _with_structured_output(preset: ProviderPreset, mode: str) -> ProviderPreset:
    """The preset with ``response_format`` sent as it is or written into the prompt, as ``structured_output``
    asks."""
    mode = mode.strip().lower()
    if mode not in STRUCTURED_OUTPUT:
        raise ConfigurationError(f"structured_output must be one of {', '.join(STRUCTURED_OUTPUT)}, got {mode!r}")
    if mode == "auto":
        return preset
    if mode == "prompt":
        return replace(preset, supports_response_format=False)
    if preset.kind == "bedrock":
        raise ConfigurationError("structured_output='native' needs a host with response_format; Bedrock serves "
                                 "Mixtral without structured output, so the format goes in the prompt")
    return replace(preset, supports_response_format=True)


def _local_option(name: str, variable: str, raw: str) -> Any:
    """The value of ``local_options[name]`` that the variable's text stands for (typed as the argument is)."""
    if name in _INT_OPTIONS:
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{variable} must be an integer, got {raw!r}") from None
    if name == "progress":
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ConfigurationError(f"{variable} must be one of {', '.join(_TRUE + _FALSE)}, got {raw!r}")
    if name == "quantize" and raw.lower() == "none":
        return None
    return raw


def _local_options_from_env(env: Mapping[str, str], given: Mapping[str, Any]) -> dict[str, Any]:
    """``MIXTRAL_LOCAL_*`` for the keys ``local_options=`` does not set."""
    found = {}
    for name, variable in LOCAL_OPTION_VARS.items():
        raw = (env.get(variable) or "").strip()
        if raw and name not in given:
            found[name] = _local_option(name, variable, raw)
    return found


def check_max_retries(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"max_retries must be an integer >= 0, got {value!r}")


def client_default_timeout(value: float | Timeout | None, default: Timeout) -> Timeout:
    """A client's default ``timeout`` (a number is the total deadline, capping the others of ``default``)."""
    try:
        return coerce_timeout(value, default)
    except InvalidRequestError as exc:  # the same check as per request, but this is the client's setting
        raise ConfigurationError(str(exc)) from exc


def resolve_config(
    env: Mapping[str, str],
    *,
    provider: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    timeout: float | Timeout | None = None,
    max_retries: int = 2,
    default_headers: Mapping[str, str] | None = None,
    app_url: str | None = None,
    app_name: str | None = None,
    region: str | None = None,
    model_path: str | None = None,
    local_options: Mapping[str, Any] | None = None,
    http_client: httpx.Client | None = None,
    async_http_client: httpx.AsyncClient | None = None,
    tool_calling: str | None = None,
    structured_output: str | None = None,
) -> ClientConfig:
    name = provider or env.get("MIXTRAL_PROVIDER") or None
    base_url = base_url or env.get("MIXTRAL_BASE_URL") or None
    model_path = model_path or env.get("MIXTRAL_MODEL_PATH") or None
    if name is None:
        if base_url is not None:
            name = "openai"
        elif model_path is not None:
            name = "local"
        else:
            raise ConfigurationError(
                "no provider configured: pass provider='nvidia' (or openrouter, aimlapi, otc, openai, bedrock, local), "
                "or set MIXTRAL_PROVIDER / MIXTRAL_BASE_URL / MIXTRAL_MODEL_PATH"
            )
    preset = get_preset(name.strip().lower())
    check_max_retries(max_retries)
    client_timeout = client_default_timeout(timeout, NO_TIMEOUT if preset.kind == "local" else DEFAULT_TIMEOUT)

    if preset.kind == "http":
        base_url = base_url or preset.base_url
        if base_url is None:
            raise ConfigurationError(
                f"provider {preset.name!r} needs base_url= (or MIXTRAL_BASE_URL), e.g. https://host/v1"
            )
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"base_url must start with http:// or https://, got {base_url!r}")
        try:
            parsed = httpx.URL(base_url)
        except httpx.InvalidURL as exc:
            raise ConfigurationError(f"base_url is not a valid URL: {base_url!r} ({exc})") from None
        if not parsed.host:
            raise ConfigurationError(f"base_url names no host: {base_url!r}")
        if parsed.fragment:
            raise ConfigurationError(f"base_url must not have a #fragment, got {base_url!r}")
    key = api_key or (env.get(preset.api_key_env) if preset.api_key_env else None) or env.get("MIXTRAL_API_KEY")
    if preset.kind == "http" and not key:
        var = preset.api_key_env or "MIXTRAL_API_KEY"
        raise ConfigurationError(
            f"no API key for provider {preset.name!r}: pass api_key= or set {var}"
            + (" (or MIXTRAL_API_KEY)" if var != "MIXTRAL_API_KEY" else "")
        )
    if preset.kind == "local":
        model_path = resolve_model_path(model_path, env)  # a directory, or a model already in the HF cache
    preset = _with_tool_calling(preset, tool_calling or env.get("MIXTRAL_TOOL_CALLING") or "auto")
    preset = _with_structured_output(preset, structured_output or env.get("MIXTRAL_STRUCTURED_OUTPUT") or "auto")
    local = dict(local_options or {})
    unknown = sorted(set(local) - set(LOCAL_OPTION_VARS)) if preset.kind == "local" else []
    if unknown:
        raise ConfigurationError(f"local_options: unknown {', '.join(unknown)}; known: {', '.join(LOCAL_OPTION_VARS)}")
    from_env = _local_options_from_env(env, local) if preset.kind == "local" else {}
    local.update(from_env)
    if preset.kind == "bedrock":
        # without one, the Bedrock backend asks botocore (the AWS profile) before refusing
        region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None

    return ClientConfig(
        preset=preset,
        base_url=base_url.rstrip("/") if base_url else None,
        api_key=key,
        model=model or env.get("MIXTRAL_MODEL") or None,
        timeout=client_timeout,
        max_retries=max_retries,
        default_headers=dict(default_headers or {}),
        app_url=app_url,
        app_name=app_name,
        region=region,
        model_path=model_path,
        local_options=local,
        local_from_env=frozenset(from_env),
        http_client=http_client,
        async_http_client=async_http_client,
    )
