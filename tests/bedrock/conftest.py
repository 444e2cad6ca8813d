"""Fixtures for the Bedrock backend: a clean AWS environment, the stand-in, clients on both auth paths."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bedrock.standin import ACCESS_KEY, API_KEY, REGION, SECRET_KEY, BedrockStandIn

_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_BEARER_TOKEN_BEDROCK", "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CREDENTIAL_EXPIRATION",
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No credentials from this machine: no AWS variables, no shared files, no instance metadata."""
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path_factory.mktemp("aws")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in's access key in the environment, where botocore's credential chain finds it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


@pytest.fixture(scope="session")
def _shared_standin() -> Iterator[BedrockStandIn]:
    with BedrockStandIn() as standin:
        yield standin


@pytest.fixture
def bedrock(_shared_standin: BedrockStandIn) -> Iterator[BedrockStandIn]:
    """The stand-in (region REGION, the stand-in keys), with no request seen and nothing scripted."""
    _shared_standin.reset()
    yield _shared_standin
    _shared_standin.raise_handler_errors()


@pytest.fixture(params=["sigv4", "api-key"])
def auth(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Client arguments for each way to authenticate (SigV4 from the environment, or an API key)."""
    if request.param == "sigv4":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        return {"region": REGION}
    return {"api_key": API_KEY}
