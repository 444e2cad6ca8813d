"""Provider presets: where each host lives, which key it reads, its Mixtral id and its parameter limits.

The facts come from each host's documentation (see docs/providers.md). A preset is plain data; request
validation reads it, the HTTP backend reads it, nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["MODEL_ALIAS", "PROVIDERS", "Limits", "ProviderPreset", "get_preset"]

#: the provider-neutral name users may pass as ``model``; each preset maps it to its own id
MODEL_ALIAS = "mixtral-8x7b-instruct"


@dataclass(frozen=True, slots=True)
class Limits:
    """Inclusive parameter ranges a host accepts; ``None`` means no limit is known."""

    temperature: tuple[float, float] = (0.0, 2.0)
    top_p: tuple[float, float] = (0.0, 1.0)
    max_tokens: tuple[int, int | None] = (1, None)
    seed: tuple[int, int | None] | None = None
    max_stop: int | None = None
    top_logprobs: tuple[int, int] = (0, 20)
    penalty: tuple[float, float] = (-2.0, 2.0)
    top_k: tuple[int, int | None] | None = None
    min_p: tuple[float, float] | None = None  # extra_body sampling keys, where the host documents a range
    repetition_penalty: tuple[float, float] | None = None  # above the first bound (excluded), up to the second
    n_max: int | None = None


@dataclass(frozen=True, slots=True)
class ProviderPreset:
    name: str
    base_url: str | None
    model: str
    api_key_env: str | None
    limits: Limits = field(default_factory=Limits)
    #: how tools reach the model: the host's OpenAI ``tools`` field ("native"), written into the prompt with
    #: the calls read back from the answer ("prompt", ``_tools.py``), or not at all ("none")
    tools: Literal["native", "prompt", "none"] = "native"
    #: the host takes ``response_format`` itself; False: it is written into the prompt and the JSON is cut out
    #: of the answer (``_format.py``)
    supports_response_format: bool = True
    #: request-body keys this host accepts beyond the OpenAI ones (OpenRouter's routing, ...)
    extra_body_keys: frozenset[str] = frozenset()
    #: the host rejects unknown body fields, so only OpenAI fields and ``extra_body_keys`` may be sent
    strict_body: bool = False
    #: the backend that serves it: "http" (OpenAI-compatible), "bedrock" or "local"
    kind: str = "http"
    #: how the host names its request ids in response headers, most specific first
    request_id_headers: tuple[str, ...] = ("x-request-id",)
    context_window: int = 32768
    notes: str = ""

    @property
    def prompts_tools(self) -> bool:
        return self.tools == "prompt"

    def resolve_model(self, model: str | None) -> str:
        if model is None or model == MODEL_ALIAS:
            return self.model
        return model


PROVIDERS: Mapping[str, ProviderPreset] = {
    p.name: p
    for p in (
        ProviderPreset(
            name="nvidia",
            base_url="https://integrate.api.nvidia.com/v1",
            model="mistralai/mixtral-8x7b-instruct-v0.1",
            api_key_env="NVIDIA_API_KEY",
            limits=Limits(temperature=(0.0, 2.0), top_p=(0.0, 1.0), seed=(0, None)),
            tools="prompt",
            supports_response_format=False,
            strict_body=True,
            request_id_headers=("nvcf-reqid", "x-request-id"),
            notes="May answer 202 with NVCF-REQID; the client polls until the answer is ready.",
        ),
        ProviderPreset(
            name="openrouter",
            base_url="https://openrouter.ai/api/v1",
            model="mistralai/mixtral-8x7b-instruct",
            api_key_env="OPENROUTER_API_KEY",
            limits=Limits(min_p=(0.0, 1.0), repetition_penalty=(0.0, 2.0)),
            extra_body_keys=frozenset({"provider", "models", "route", "transforms", "top_k", "min_p",
                                       "repetition_penalty", "top_a", "usage", "reasoning"}),
            request_id_headers=("x-request-id", "x-generation-id"),
        ),
        ProviderPreset(
            name="aimlapi",
            base_url="https://api.aimlapi.com/v1",
            model="mistralai/Mixtral-8x7B-Instruct-v0.1",
            api_key_env="AIMLAPI_API_KEY",
            limits=Limits(temperature=(0.0, 2.0), top_p=(0.01, 1.0), seed=(1, None), max_stop=4,
                          top_logprobs=(0, 20), top_k=(1, None)),
            tools="prompt",
            supports_response_format=False,
            extra_body_keys=frozenset({"top_k", "min_p", "repetition_penalty"}),
        ),
        ProviderPreset(
            # T-Systems AI Foundation Services ("LLM Hub"), served from Open Telekom Cloud: OpenAI-compatible, with
            # model ids as the Hugging Face names without the organisation (its GET /models lists them)
            name="otc",
            base_url="https://llm-server.llmhub.t-systems.net/v2",
            model="Mixtral-8x7B-Instruct-v0.1",
            api_key_env="OTC_API_KEY",
            notes="T-Systems AI Foundation Services on Open Telekom Cloud; client.models.list() shows the ids.",
        ),
        ProviderPreset(
            # any OpenAI-compatible endpoint (vLLM, TGI, a gateway, ...)
            name="openai",
            base_url=None,
            model="mistralai/Mixtral-8x7B-Instruct-v0.1",
            api_key_env="MIXTRAL_API_KEY",
        ),
        ProviderPreset(
            name="bedrock",
            base_url=None,
            model="mistral.mixtral-8x7b-instruct-v0:1",
            api_key_env="AWS_BEARER_TOKEN_BEDROCK",
            limits=Limits(temperature=(0.0, 1.0), top_p=(0.0, 1.0), max_tokens=(1, 4096), max_stop=10,
                          top_k=(1, 200), n_max=1),
            tools="prompt",
            supports_response_format=False,
            kind="bedrock",
            request_id_headers=("x-amzn-requestid",),
        ),
        ProviderPreset(
            name="local",
            base_url=None,
            model="mixtral-local",
            api_key_env=None,
            limits=Limits(top_k=(1, None), seed=(0, None), n_max=64, min_p=(0.0, 1.0), repetition_penalty=(0.0, 2.0)),
            tools="prompt",
            kind="local",
        ),
    )
}


def get_preset(name: str) -> ProviderPreset:
    from ._exceptions import ConfigurationError

    try:
        return PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ConfigurationError(f"unknown provider {name!r}; known providers: {known}") from None
