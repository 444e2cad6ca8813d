"""mixtral-sdk: one typed sync/async client for Mixtral-8x7B-Instruct on hosted APIs, Bedrock and local weights.

    from mixtral_client import MixtralClient
    client = MixtralClient(provider="nvidia")
    answer = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])

Importing this package never imports torch: the local backend is loaded only when asked for.
"""

from ._client import AsyncMixtralClient, MixtralClient
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InternalServerError,
    InvalidRequestError,
    MixtralError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StructuredOutputError,
    UnprocessableEntityError,
    UnsupportedFeatureError,
)
from ._params import CompletionParams, ParseParams, TextCompletionParams
from ._providers import MODEL_ALIAS, PROVIDERS, ProviderPreset
from ._ratelimit import RateLimiter
from ._response import RawResponse
from ._retry import RetryPolicy
from ._streaming import AsyncStream, Stream
from ._text_client import AsyncTextStream, TextStream
from ._timeouts import Timeout
from ._version import __version__
from .tools import FunctionTool, tool
from .types import ChatCompletion, ChatCompletionChunk, Completion, ParsedChatCompletion

__all__ = [
    "MODEL_ALIAS",
    "PROVIDERS",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncMixtralClient",
    "AsyncStream",
    "AsyncTextStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "CompletionParams",
    "ConfigurationError",
    "FunctionTool",
    "InternalServerError",
    "InvalidRequestError",
    "MixtralClient",
    "MixtralError",
    "NotFoundError",
    "ParseParams",
    "ParsedChatCompletion",
    "PermissionDeniedError",
    "ProviderPreset",
    "RateLimitError",
    "RateLimiter",
    "RawResponse",
    "RetryPolicy",
    "Stream",
    "StructuredOutputError",
    "TextCompletionParams",
    "TextStream",
    "Timeout",
    "UnprocessableEntityError",
    "UnsupportedFeatureError",
    "__version__",
    "tool",
]
