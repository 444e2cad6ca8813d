"""Configuration from arguments and an environment mapping (never ``os.environ`` in tests)."""

from __future__ import annotations

import logging

import pytest

from mixtral_client import AsyncMixtralClient, ConfigurationError, MixtralClient, Timeout
from mixtral_client._config import resolve_config
from tests.client.conftest import MESSAGES, completion, replying


def test_provider_reads_its_own_key_variable() -> None:
    config = resolve_config({"NVIDIA_API_KEY": "nvapi-1"}, provider="nvidia")

    assert (config.provider, config.api_key, config.base_url) == ("nvidia", "nvapi-1",
                                                                  "https://integrate.api.nvidia.com/v1")


def test_mixtral_api_key_works_for_any_provider() -> None:
    assert resolve_config({"MIXTRAL_API_KEY": "k"}, provider="openrouter").api_key == "k"


def test_argument_beats_environment() -> None:
    env = {"OPENROUTER_API_KEY": "env-key", "MIXTRAL_MODEL": "env-model"}
    config = resolve_config(env, provider="openrouter", api_key="arg-key", model="arg-model")

    assert (config.api_key, config.model) == ("arg-key", "arg-model")


def test_environment_picks_the_provider() -> None:
    config = resolve_config({"MIXTRAL_PROVIDER": " AIMLAPI ", "AIMLAPI_API_KEY": "k"})

    assert config.provider == "aimlapi"


def test_base_url_alone_means_an_openai_compatible_host() -> None:
    config = resolve_config({"MIXTRAL_BASE_URL": "http://127.0.0.1:8000/v1/", "MIXTRAL_API_KEY": "k"})

    assert (config.provider, config.base_url) == ("openai", "http://127.0.0.1:8000/v1")


def test_model_path_alone_means_local() -> None:
    assert resolve_config({"MIXTRAL_MODEL_PATH": "/ckpt"}).provider == "local"


@pytest.mark.parametrize(("env", "kwargs", "message"), [
    ({}, {}, "no provider configured"),
    ({}, {"provider": "mistral-cloud"}, "unknown provider 'mistral-cloud'"),
    ({}, {"provider": "nvidia"}, "NVIDIA_API_KEY"),
    ({"MIXTRAL_API_KEY": "k"}, {"provider": "openai"}, "needs base_url"),
    ({"MIXTRAL_API_KEY": "k"}, {"base_url": "ftp://host/v1"}, "http:// or https://"),
    ({"MIXTRAL_API_KEY": "k"}, {"base_url": "https:///v1"}, "names no host"),
    ({"MIXTRAL_API_KEY": "k"}, {"base_url": "https://host:abc/v1"}, "not a valid URL"),
    ({"MIXTRAL_API_KEY": "k"}, {"base_url": "https://host/v1#chat"}, "fragment"),
    ({"NVIDIA_API_KEY": "k"}, {"provider": "nvidia", "max_retries": -1}, "max_retries"),
    ({"NVIDIA_API_KEY": "k"}, {"provider": "nvidia", "timeout": 0}, "timeout"),
    ({"NVIDIA_API_KEY": "k"}, {"provider": "nvidia", "timeout": "30"}, "timeout"),
    ({}, {"provider": "local"}, "model_path"),
    ({}, {"model_path": "/ckpt", "local_options": {"dtipe": "float32"}}, "local_options: unknown dtipe; known: dtype"),
    ({"MIXTRAL_MODEL_PATH": "/ckpt", "MIXTRAL_LOCAL_MAX_BATCH": "eight"}, {},
     "MIXTRAL_LOCAL_MAX_BATCH must be an integer, got 'eight'"),
    ({"MIXTRAL_MODEL_PATH": "/ckpt", "MIXTRAL_LOCAL_PROGRESS": "maybe"}, {}, "MIXTRAL_LOCAL_PROGRESS must be one of"),
])
def test_unusable_configuration_is_refused_at_construction(env: dict[str, str], kwargs: dict[str, object],
                                                           message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        resolve_config(env, **kwargs)  # type: ignore[arg-type]


def test_local_options_come_from_mixtral_local_variables_typed_as_arguments() -> None:
    env = {"MIXTRAL_MODEL_PATH": "/ckpt", "MIXTRAL_LOCAL_QUANTIZE": "int8", "MIXTRAL_LOCAL_DTYPE": " bf16 ",
           "MIXTRAL_LOCAL_MAX_BATCH": "32", "MIXTRAL_LOCAL_PREFIX_CACHE": "0", "MIXTRAL_LOCAL_PROGRESS": "Off",
           "MIXTRAL_LOCAL_DEVICE": ""}
    config = resolve_config(env)
    assert config.local_options == {"quantize": "int8", "dtype": "bf16", "max_batch": 32, "prefix_cache": 0,
                                    "progress": False}
    assert config.local_option_source("max_batch") == "MIXTRAL_LOCAL_MAX_BATCH"
    assert resolve_config({**env, "MIXTRAL_LOCAL_QUANTIZE": "none"}).local_options["quantize"] is None


def test_local_options_argument_beats_the_environment_key_by_key() -> None:
    env = {"MIXTRAL_LOCAL_QUANTIZE": "int8", "MIXTRAL_LOCAL_MAX_BATCH": "bad"}
    config = resolve_config(env, model_path="/ckpt", local_options={"max_batch": 4, "quantize": None})
    assert config.local_options == {"max_batch": 4, "quantize": None}  # the bad variable is never read
    assert config.local_from_env == frozenset()


def test_local_variables_do_not_touch_hosted_providers() -> None:
    config = resolve_config({"NVIDIA_API_KEY": "k", "MIXTRAL_LOCAL_MAX_BATCH": "bad"}, provider="nvidia",
                            local_options={"anything": 1})
    assert config.local_options == {"anything": 1} and config.local_from_env == frozenset()


def test_unknown_client_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        MixtralClient("openai", base_url="http://127.0.0.1:1/v1", api_key="k", retries=3)  # type: ignore[call-arg]


def test_client_timeout_number_is_the_total_and_caps_the_others() -> None:
    client = MixtralClient(base_url="http://127.0.0.1:1/v1", api_key="k", timeout=5)

    assert client.config.timeout == Timeout(connect=5, idle=5, total=5)


def test_default_timeout_and_retries() -> None:
    client = MixtralClient(base_url="http://127.0.0.1:1/v1", api_key="k")

    assert client.config.timeout == Timeout(connect=10.0, idle=60.0, total=600.0)
    assert client.config.max_retries == 2


def test_repr_and_provider_show_no_key() -> None:
    client = MixtralClient(base_url="http://127.0.0.1:1/v1", api_key="sk-secret")

    assert "sk-secret" not in repr(client) and "sk-secret" not in repr(client.config)
    assert client.provider == "openai"


def test_from_env_reads_the_mapping(serve) -> None:
    server = serve(replying(200, completion("from env")))

    with MixtralClient.from_env({"MIXTRAL_BASE_URL": server.url, "MIXTRAL_API_KEY": "k"}) as client:
        answer = client.chat.completions.create(messages=MESSAGES)

    assert answer.choices[0].message.content == "from env"


def test_default_headers_are_sent_and_user_agent_names_the_sdk(serve) -> None:
    server = serve(replying(200, completion()))

    with MixtralClient(base_url=server.url, api_key="k", default_headers={"X-Team": "ml"}) as client:
        client.chat.completions.create(messages=MESSAGES)

    headers = server.requests[0].headers
    assert headers["x-team"] == "ml"
    assert headers["user-agent"].startswith("mixtral-sdk/")


@pytest.mark.anyio
async def test_async_client_from_env_and_async_with(serve) -> None:
    server = serve(replying(200, completion("async env")))

    async with AsyncMixtralClient.from_env({"MIXTRAL_BASE_URL": server.url, "MIXTRAL_API_KEY": "k"}) as client:
        answer = await client.chat.completions.create(messages=MESSAGES)

    assert answer.choices[0].message.content == "async env"
    assert repr(client) == "AsyncMixtralClient(provider='openai')"


def test_mixtral_log_debug_logs_requests_with_keys_redacted(serve, caplog: pytest.LogCaptureFixture) -> None:
    server = serve(replying(200, completion()))
    logger = logging.getLogger("mixtral_client")
    handlers, level = list(logger.handlers), logger.level
    try:
        with caplog.at_level(logging.DEBUG, logger="mixtral_client"), \
                MixtralClient(base_url=server.url, api_key="sk-very-secret", env={"MIXTRAL_LOG": "debug"}) as client:
            client.chat.completions.create(messages=MESSAGES, extra_headers={"X-Api-Key": "other-secret"})
    finally:
        logger.handlers[:], logger.level = handlers, level

    text = caplog.text
    assert "POST http://127.0.0.1" in text and "/v1/chat/completions" in text
    assert '"messages"' in text
    assert "sk-very-secret" not in text and "other-secret" not in text
    assert "<redacted>" in text


def test_debug_logging_set_up_after_the_client_is_honoured(serve, caplog: pytest.LogCaptureFixture) -> None:
    server = serve(replying(200, completion()))

    with MixtralClient(base_url=server.url, api_key="k", env={}) as client:
        with caplog.at_level(logging.DEBUG, logger="mixtral_client"):
            client.chat.completions.create(messages=MESSAGES)

    assert "POST http://127.0.0.1" in caplog.text


def test_logging_is_silent_without_mixtral_log(serve, caplog: pytest.LogCaptureFixture) -> None:
    server = serve(replying(200, completion()))

    with caplog.at_level(logging.INFO, logger="mixtral_client"), \
            MixtralClient(base_url=server.url, api_key="k", env={}) as client:
        client.chat.completions.create(messages=MESSAGES)

    assert caplog.records == []
