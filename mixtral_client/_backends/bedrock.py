"""The Amazon Bedrock backend: Mixtral through the Converse and ConverseStream APIs (raw prompts through
InvokeModel and InvokeModelWithResponseStream).

``BedrockCore`` does the Bedrock-specific work without I/O: the Converse body (``_converse``), the URL
(``/model/{id}/converse`` or ``/converse-stream``), authentication (a Bedrock API key as a bearer token,
or SigV4 computed by botocore over the exact URL, headers and bytes httpx then sends), Bedrock's errors
(``x-amzn-errortype``) and its event-stream frames (``_eventstream``). Sending, retrying (before the
first chunk only), deadlines and connection handling are the HTTP backend's senders, unchanged.

botocore (the ``bedrock`` extra) is imported here, and this module is imported only when a client is
built with ``provider="bedrock"``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import botocore.session
import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError

from mixtral_client._config import ClientConfig
from mixtral_client._converse import (
    api_error,
    completion_from_converse,
    completion_from_invoke,
    converse_body,
    converse_path,
    invoke_body,
    invoke_path,
    model_from_path,
)
from mixtral_client._eventstream import ConverseStreamDecoder
from mixtral_client._exceptions import APIConnectionError, APIStatusError, ConfigurationError
from mixtral_client._request import ChatRequest
from mixtral_client._retry import RetryPolicy
from mixtral_client._timeouts import Deadline
from mixtral_client._version import __version__
from mixtral_client.types import ChatCompletion, ChatCompletionChunk

from .http import AsyncHTTPBackend, HTTPBackend, HTTPCore, log_request, read_error

__all__ = ["AsyncBedrockBackend", "BedrockBackend", "BedrockCore", "region_from_url"]

log = logging.getLogger("mixtral_client")

#: the SigV4 signing name (the host prefix is bedrock-runtime)
SIGNING_NAME = "bedrock"
#: headers httpx (or a proxy) manages on the wire: left out of the signature
_UNSIGNED = frozenset({"accept-encoding", "connection", "content-length", "user-agent"})
_REGION_IN_HOST = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z]{2}(?:-[a-z]+)+-\d+)\.")


def region_from_url(url: str | None) -> str | None:
    """The region in a Bedrock endpoint's host name (``bedrock-runtime.eu-west-3.amazonaws.com``,
    ``vpce-...bedrock-runtime.us-east-1.vpce.amazonaws.com``), or None."""
    match = _REGION_IN_HOST.search(httpx.URL(url).host) if url else None
    return match.group(1) if match else None


class BedrockCore:
    """Request building and answer interpretation for Bedrock (a ``WireCore``; signing is pure computation)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.provider = config.preset.name
        self.policy = RetryPolicy(max_retries=config.max_retries)
        # one botocore session: the region and credentials of the AWS profile (AWS_PROFILE, ~/.aws/config)
        session = botocore.session.Session()
        try:
            self.region: str | None = (config.region or region_from_url(config.base_url)
                                       or session.get_config_variable("region"))
        except BotoCoreError as exc:
            raise ConfigurationError(f"provider 'bedrock' could not read the AWS configuration: {exc}") from exc
        if self.region is None and config.base_url is None:
            raise ConfigurationError("provider 'bedrock' needs a region: region=, AWS_REGION / AWS_DEFAULT_REGION, "
                                     "or a region in your AWS profile (~/.aws/config)")
        endpoint = httpx.URL(config.base_url or f"https://bedrock-runtime.{self.region}.amazonaws.com")
        # a query in base_url (a proxy's ?tenant=...) goes on every request, after the path, with extra_query over it
        self.endpoint = str(endpoint.copy_with(query=None)).rstrip("/")
        self._base_query = httpx.QueryParams(endpoint.query)
        self.headers = {"Content-Type": "application/json", "User-Agent": f"mixtral-sdk/{__version__}",
                        **config.default_headers}
        self._credentials: Any = None
        if config.api_key:
            return
        # botocore's chain (environment, shared files and profiles, SSO, container and instance roles),
        # resolved once; get_frozen_credentials() refreshes temporary credentials when they near expiry
        try:
            self._credentials = session.get_credentials()
        except BotoCoreError as exc:
            raise ConfigurationError(f"provider 'bedrock' could not load AWS credentials: {exc}") from exc
        if self._credentials is None:
            raise ConfigurationError(
                "provider 'bedrock' found no credentials: pass api_key= (or set AWS_BEARER_TOKEN_BEDROCK) for a "
                "Bedrock API key, or configure AWS credentials for SigV4 (AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, SSO, an instance or container role)"
            )
        if self.region is None:
            raise ConfigurationError("provider 'bedrock' signs with SigV4 and needs region= "
                                     "(or AWS_REGION / AWS_DEFAULT_REGION) when base_url names no region")

    # -- requests ----------------------------------------------------------------------------------

    def build(self, client: httpx.Client | httpx.AsyncClient, request: ChatRequest, deadline: Deadline) -> httpx.Request:
        opts = request.options
        if request.prompt is None:
            body, path = converse_body(request), converse_path(request.model, request.stream)
        else:  # a raw prompt: InvokeModel, Mistral's native text API
            body, path = invoke_body(request), invoke_path(request.model, request.stream)
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        headers = httpx.Headers(self.headers)  # case-insensitive: extra_headers replace, never duplicate
        headers["Accept"] = "application/vnd.amazon.eventstream" if request.stream else "application/json"
        headers.update(opts.extra_headers)
        built = client.build_request(
            "POST", self.endpoint + path, content=content,
            headers=headers, params=self._base_query.merge(opts.extra_query) or None,
            timeout=HTTPCore.timeout(request, deadline),
        )
        built.headers.update(self._authorization(built, content))
        if log.isEnabledFor(logging.DEBUG):  # asked per request: logging may be set up after the client
            log_request(built, content)
        return built

    def _authorization(self, built: httpx.Request, content: bytes) -> dict[str, str]:
        """A bearer header for an API key; otherwise SigV4 over the URL, headers and bytes being sent."""
        if self.config.api_key:
            return {"Authorization": f"Bearer {self.config.api_key}"}
        try:
            credentials = self._credentials.get_frozen_credentials()
        except Exception as exc:  # a failed refresh: expired SSO session, credential process, role, ...
            raise ConfigurationError(f"provider 'bedrock' could not refresh AWS credentials: "
                                     f"{type(exc).__name__}: {exc}") from exc
        signed = AWSRequest(method=built.method, url=str(built.url), data=content,
                            headers={k: v for k, v in built.headers.items() if k.lower() not in _UNSIGNED})
        SigV4Auth(credentials, SIGNING_NAME, self.region).add_auth(signed)
        return {k: str(v) for k, v in signed.headers.items()
                if k.lower() in ("authorization", "x-amz-date", "x-amz-security-token")}

    def poll_request(self, _client: httpx.Client | httpx.AsyncClient, _response: httpx.Response,
                     _request: ChatRequest, _deadline: Deadline, /) -> httpx.Request | None:
        """Bedrock answers at once: there is nothing to poll."""
        return None

    def poll_delay(self, _deadline: Deadline, /) -> float:
        return 0.0

    # -- answers -----------------------------------------------------------------------------------

    def request_id(self, headers: httpx.Headers) -> str | None:
        value: str | None = headers.get("x-amzn-requestid")
        return value

    def status_error(self, response: httpx.Response, raw: bytes) -> APIStatusError:
        body, message, _ = read_error(raw, response.status_code)  # Bedrock's body: {"message": ...}
        return api_error(response.headers.get("x-amzn-errortype"), message, status=response.status_code,
                         provider=self.provider, request_id=self.request_id(response.headers), body=body,
                         headers=dict(response.headers))

    def parse_completion(self, response: httpx.Response, raw: bytes) -> ChatCompletion:
        rid = self.request_id(response.headers)
        invoked = response.request.url.path.endswith("/invoke")
        try:
            body = json.loads(raw)
            if invoked:
                if not isinstance(body, dict):
                    raise ValueError("not a JSON object")
                return completion_from_invoke(body, response.headers, id=rid or "", model=self._model(response),
                                              created=int(time.time()))
            if not isinstance(body, dict) or not isinstance(body.get("output"), dict):
                raise ValueError("no 'output' object")
            return completion_from_converse(body, id=rid or "", model=self._model(response),
                                            created=int(time.time()))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            kind = "an InvokeModel" if invoked else "a Converse"
            raise APIConnectionError(f"{self.provider} sent an answer that is not {kind} answer: {exc}",
                                     provider=self.provider, request_id=rid,
                                     body=raw.decode("utf-8", errors="replace")) from exc

    def decoder(self, response: httpx.Response, /) -> ConverseStreamDecoder:
        return ConverseStreamDecoder(provider=self.provider, model=self._model(response),
                                     request_id=self.request_id(response.headers))

    def chunk(self, event: ChatCompletionChunk, _request_id: str | None, /) -> ChatCompletionChunk:
        """The decoder yields chunks already (and raises for exception frames): they pass through."""
        return event

    @staticmethod
    def _model(response: httpx.Response) -> str:
        return model_from_path(response.request.url.raw_path.decode("ascii"))


class BedrockBackend(HTTPBackend):
    """Synchronous Bedrock backend: the HTTP backend's sender over a ``BedrockCore``."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__(config, BedrockCore(config))


class AsyncBedrockBackend(AsyncHTTPBackend):
    """Asynchronous Bedrock backend (asyncio or trio): the async HTTP sender over a ``BedrockCore``."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__(config, BedrockCore(config))
