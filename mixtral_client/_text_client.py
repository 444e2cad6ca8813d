"""``client.completions``: raw-prompt completions (OpenAI's legacy completions API) on every backend.

``client.completions.create(prompt="<s>[INST] Hi [/INST]")`` sends the prompt as it is, with no chat
template: a host's ``/completions`` endpoint, Bedrock's InvokeModel, or the local tokenizer. The request goes
through the chat path (``Completions._create`` with a prompt instead of messages: validation, retries,
deadlines, fallbacks, pacing and tracing are the same); the answer comes back as a ``Completion`` and a
stream's chunks as ``Completion`` objects (``_text.py`` converts).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, Unpack, overload

from ._exceptions import InvalidRequestError, NotFoundError
from ._params import Prompt, TextCompletionParams
from ._response import RawResponse, ResponseRecord, raw_response
from ._streaming import AsyncStream, Stream
from ._text import TextChunks, completion_from_chat
from .types import ChatCompletion, Completion

if TYPE_CHECKING:
    from ._client import AsyncCompletions, Completions

__all__ = ["AsyncTextCompletions", "AsyncTextStream", "TextCompletionParams", "TextCompletions", "TextStream"]


_KNOWN = frozenset(TextCompletionParams.__annotations__)


def _chat_params(params: Mapping[str, Any], chat: Completions | AsyncCompletions) -> dict[str, Any]:
    """The chat path's parameters: the legacy ``logprobs=k`` is ``logprobs=True, top_logprobs=k``."""
    unknown = params.keys() - _KNOWN
    if unknown:
        raise TypeError(f"completions.create() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    out = dict(params)
    k = out.pop("logprobs", None)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidRequestError(f"logprobs: the number of most likely tokens to list at each position, an "
                                      f"integer >= 0, got {k!r}", param="logprobs",
                                      provider=chat._core.config.provider)
        out.update(logprobs=True, top_logprobs=k)
    return out


@contextlib.contextmanager
def _not_served(chat: Completions | AsyncCompletions) -> Iterator[None]:
    """A 404 from a host says why it may be: not every OpenAI-compatible host serves raw prompts."""
    try:
        yield
    except NotFoundError as exc:
        exc.add_note(f"({chat._core.config.provider}: a 404 for a raw prompt may mean this host does not serve the "
                     "completions API for this model; chat.completions.create(messages=...) is served everywhere)")
        raise


class TextStream:
    """A stream of ``Completion`` chunks (``choices[i].text`` the new text); use it in ``with`` and iterate it
    once. An ``APIError`` it raises carries the text so far in ``partial`` (a ``ChatCompletion``, as every
    stream's: ``partial.choices[0].message.content``)."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._chunks = TextChunks()

    @property
    def request_id(self) -> str | None:
        return self._stream.request_id

    def __iter__(self) -> Iterator[Completion]:
        convert = self._chunks.convert
        for chunk in self._stream:
            if (out := convert(chunk)) is not None:
                yield out

    def text(self) -> Iterator[str]:
        """Only the new text of the first choice."""
        return self._stream.text()

    def get_final_completion(self) -> Completion:
        """Read what is left and return the whole answer."""
        return completion_from_chat(self._stream.get_final_completion())

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncTextStream:
    """The asynchronous ``TextStream``: use it in ``async with`` and iterate it once."""

    def __init__(self, stream: AsyncStream) -> None:
        self._stream = stream
        self._chunks = TextChunks()

    @property
    def request_id(self) -> str | None:
        return self._stream.request_id

    def __aiter__(self) -> Self:
        self._stream.__aiter__()  # marks it consumed: a second iteration raises, as a stream's does
        return self

    async def __anext__(self) -> Completion:
        while True:
            if (out := self._chunks.convert(await self._stream.__anext__())) is not None:
                return out

    def text(self) -> AsyncIterator[str]:
        return self._stream.text()

    async def get_final_completion(self) -> Completion:
        return completion_from_chat(await self._stream.get_final_completion())

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class TextCompletions:
    """``client.completions``: a raw prompt in, a ``Completion`` (or a ``TextStream``) out."""

    def __init__(self, chat: Completions) -> None:
        self._chat = chat

    @overload
    def create(self, *, prompt: Prompt, stream: Literal[False] = False,
               **params: Unpack[TextCompletionParams]) -> Completion: ...

    @overload
    def create(self, *, prompt: Prompt, stream: Literal[True], **params: Unpack[TextCompletionParams]) -> TextStream: ...

    @overload
    def create(self, *, prompt: Prompt, stream: bool,
               **params: Unpack[TextCompletionParams]) -> Completion | TextStream: ...

    def create(self, *, prompt: Prompt, stream: bool = False,
               **params: Unpack[TextCompletionParams]) -> Completion | TextStream:
        """Complete ``prompt`` as it is (no chat template: write Mixtral's ``[INST] ... [/INST]`` yourself).

        Validated first, as ``chat.completions.create()`` is; ``tools`` and ``response_format`` are chat-only.
        """
        return self._create(prompt, stream, params)

    def _create(self, prompt: Prompt, stream: bool, params: Mapping[str, Any],
                record: ResponseRecord | None = None) -> Completion | TextStream:
        with _not_served(self._chat):
            answer = self._chat._create(None, stream, _chat_params(params, self._chat), record, prompt)
        if isinstance(answer, ChatCompletion):
            return completion_from_chat(answer)
        return TextStream(answer)

    def count_tokens(self, *, prompt: Prompt, **params: Unpack[TextCompletionParams]) -> int:
        """The prompt tokens of ``create(prompt=..., **params)``, with Mixtral's tokenizer (needs the ``local``
        extra); exact on local weights and on any host that tokenizes raw prompts as written."""
        return self._chat._core.count_prompt_tokens(prompt, _chat_params(params, self._chat))

    @property
    def with_raw_response(self) -> RawTextCompletions:
        """``create()`` returning a ``RawResponse`` (status, headers, retries taken, ``parse()``)."""
        return RawTextCompletions(self)


class RawTextCompletions:
    """``client.completions.with_raw_response``."""

    def __init__(self, completions: TextCompletions) -> None:
        self._completions = completions

    def create(self, *, prompt: Prompt, stream: bool = False,
               **params: Unpack[TextCompletionParams]) -> RawResponse[Completion | TextStream]:
        record = ResponseRecord()
        return raw_response(self._completions._create(prompt, stream, params, record), record)


class AsyncTextCompletions:
    """``client.completions`` of the async client."""

    def __init__(self, chat: AsyncCompletions) -> None:
        self._chat = chat

    @overload
    async def create(self, *, prompt: Prompt, stream: Literal[False] = False,
                     **params: Unpack[TextCompletionParams]) -> Completion: ...

    @overload
    async def create(self, *, prompt: Prompt, stream: Literal[True],
                     **params: Unpack[TextCompletionParams]) -> AsyncTextStream: ...

    @overload
    async def create(self, *, prompt: Prompt, stream: bool,
                     **params: Unpack[TextCompletionParams]) -> Completion | AsyncTextStream: ...

    async def create(self, *, prompt: Prompt, stream: bool = False,
                     **params: Unpack[TextCompletionParams]) -> Completion | AsyncTextStream:
        """See ``TextCompletions.create``."""
        return await self._create(prompt, stream, params)

    async def _create(self, prompt: Prompt, stream: bool, params: Mapping[str, Any],
                      record: ResponseRecord | None = None) -> Completion | AsyncTextStream:
        with _not_served(self._chat):
            answer = await self._chat._create(None, stream, _chat_params(params, self._chat), record, prompt)
        if isinstance(answer, ChatCompletion):
            return completion_from_chat(answer)
        return AsyncTextStream(answer)

    def count_tokens(self, *, prompt: Prompt, **params: Unpack[TextCompletionParams]) -> int:
        """See ``TextCompletions.count_tokens`` (no I/O beyond loading the tokenizer once)."""
        return self._chat._core.count_prompt_tokens(prompt, _chat_params(params, self._chat))

    @property
    def with_raw_response(self) -> AsyncRawTextCompletions:
        return AsyncRawTextCompletions(self)


class AsyncRawTextCompletions:
    """``async_client.completions.with_raw_response``."""

    def __init__(self, completions: AsyncTextCompletions) -> None:
        self._completions = completions

    async def create(self, *, prompt: Prompt, stream: bool = False,
                     **params: Unpack[TextCompletionParams]) -> RawResponse[Completion | AsyncTextStream]:
        record = ResponseRecord()
        return raw_response(await self._completions._create(prompt, stream, params, record), record)
