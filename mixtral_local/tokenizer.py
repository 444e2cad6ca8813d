"""The Mixtral-8x7B-Instruct tokenizer (sentencepiece, "v1") and its chat format.

``encode_chat`` produces the token ids of mistral-common's v1 encoding (``MistralTokenizer.v1()``)::

    <s>[INST] {system}\n\n{user 1} [/INST] {assistant 1}</s>[INST] {user 2} [/INST]

Each ``[INST] ... [/INST]`` block and each assistant turn is sentencepiece-encoded on its own (so each
starts with a "▁"). System messages are joined with a blank line and prepended to the first user turn;
consecutive messages of one role are merged with a blank line; a conversation that does not start with a
user turn gets an empty one first; a final assistant message is left open (no EOS), so the model continues
it. v1 has no tool tokens: tool messages and tool calls are refused.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece

from mixtral_client._exceptions import UnsupportedFeatureError

from .config import CheckpointError

__all__ = ["IncrementalDetokenizer", "MixtralTokenizer", "v1_tokenizer_path"]

_JOIN = "\n\n"
_CONTROL = re.compile("(<s>|</s>)")  # BOS and EOS as a raw prompt writes them


def v1_tokenizer_path() -> Path:
    """The v1 sentencepiece model that ships in mistral-common (Apache-2.0)."""
    path = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; reinstall mistral-common")
    return path


def _text(content: Any) -> list[str]:
    """The non-empty texts of a message's content (a string or a list of text parts)."""
    if isinstance(content, str):
        return [content] if content else []
    if isinstance(content, Sequence):
        return [p["text"] for p in content if isinstance(p, Mapping) and p.get("text")]
    return []


class MixtralTokenizer:
    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        self.path = Path(model_file)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: not a sentencepiece model ({exc})") from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.vocab_size()
        self._bytes = {i: int(self.sp.id_to_piece(i)[3:5], 16) for i in range(self.vocab_size) if self.sp.IsByte(i)}
        self._pieces: list[bytes] | None = None  # token_bytes(), built on first use

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None) -> MixtralTokenizer:
        """A checkpoint directory's ``tokenizer.model`` (or that file itself); ``None``: mistral-common's v1."""
        if path is None:
            return cls(v1_tokenizer_path())
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.model"
        if not file.is_file():
            raise CheckpointError(f"{file}: no such file (the local backend reads the sentencepiece tokenizer.model)")
        return cls(file)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.sp.decode(list(ids))
        return text

    def encode_prompt(self, text: str, *, bos: bool = True) -> list[int]:
        """A raw prompt's ids (``client.completions``): ``<s>`` and ``</s>`` written in it are BOS and EOS, as
        Mixtral's prompt format writes them, and the text between them is sentencepiece-encoded piece by piece
        (``<s>[INST] a [/INST] b</s>[INST] c [/INST]`` gives ``encode_chat``'s ids for that conversation). A
        prompt that does not open with ``<s>`` gets BOS first, as every Mixtral prompt has one (unless ``bos`` is
        False: a piece of text to be joined to others, as ``/tokenize`` with ``add_special_tokens: false``)."""
        ids: list[int] = []
        for part in _CONTROL.split(text):
            if part == "<s>":
                ids.append(self.bos_id)
            elif part == "</s>":
                ids.append(self.eos_id)
            elif part:
                ids += self.sp.encode(part)
        if bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """OpenAI-style message dicts -> prompt token ids (see the module docstring)."""
        system: list[str] = []
        turns: list[tuple[str, list[str]]] = []  # (role, texts) of merged user / assistant runs
        previous = None
        for i, msg in enumerate(messages):
            role = "system" if msg.get("role") == "developer" else msg.get("role")
            if role == "tool" or msg.get("tool_calls"):
                raise UnsupportedFeatureError(
                    f"messages[{i}]: the Mixtral v1 chat format has no tool calls or tool results",
                    param="messages", provider="local",
                )
            if role == "system":
                if msg.get("content"):
                    system.append(_JOIN.join(_text(msg["content"])))
            elif role in ("user", "assistant"):
                if role == previous:
                    turns[-1][1].extend(_text(msg.get("content")))
                else:
                    turns.append((role, _text(msg.get("content"))))
            else:
                raise UnsupportedFeatureError(f"messages[{i}]: unknown role {role!r}", param="messages",
                                              provider="local")
            previous = role  # a system message ends a run: user, system, user gives two user turns
        if not turns or turns[0][0] != "user":
            turns.insert(0, ("user", []))
        system_prompt = _JOIN.join(system)

        ids = [self.bos_id]
        for n, (role, texts) in enumerate(turns):
            text = _JOIN.join(texts)
            if role == "user":
                if n == 0 and system_prompt:
                    text = system_prompt + _JOIN + text
                ids += self.sp.encode(f"[INST] {text} [/INST]")
            elif not text:
                raise UnsupportedFeatureError("messages: an assistant message needs non-empty content",
                                              param="messages", provider="local")
            else:
                ids += self.sp.encode(text)
                if n < len(turns) - 1:
                    ids.append(self.eos_id)
        return ids

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback token (``<0xE2>``) stands for; None for other tokens."""
        return self._bytes.get(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for in a text (its "▁" a space); b"" for a control token (EOS)."""
        if self._pieces is None:
            self._pieces = [self._piece_bytes(i) for i in range(self.vocab_size)]
        return self._pieces[token_id]

    def _piece_bytes(self, token_id: int) -> bytes:
        byte = self.byte_value(token_id)
        if byte is not None:
            return bytes([byte])
        if self.sp.IsControl(token_id) or self.sp.IsUnknown(token_id):
            return b""
        return self.sp.id_to_piece(token_id).replace("\u2581", " ").encode()

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Text deltas for tokens as they arrive, never splitting a UTF-8 character.

    Byte-fallback tokens (``<0xE2>``) may carry part of a character: while the trailing byte tokens end
    inside a character that more bytes could complete, the delta waits. Each delta is the difference between
    decoding a short window with and without the new tokens, so sentencepiece's spacing rules apply as in a
    decode of the whole sequence, and the deltas add up to that decode.
    """

    def __init__(self, tokenizer: MixtralTokenizer) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        tail = bytearray()
        for i in reversed(self.ids[-4:]):
            byte = self._tok.byte_value(i)
            if byte is None:
                break
            tail.insert(0, byte)
        return "" if _inside_character(tail) else self._delta()

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to U+FFFD)."""
        return self._delta()

    def _delta(self) -> str:
        before = self._tok.decode(self.ids[self._prefix:self._read])
        after = self._tok.decode(self.ids[self._prefix:])
        if len(after) <= len(before):  # e.g. a control token, which decodes to nothing
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]


def _inside_character(tail: bytes | bytearray) -> bool:
    """Does ``tail`` end inside a UTF-8 character that more bytes could complete?"""
    for back in range(1, len(tail) + 1):
        lead = tail[-back]
        if lead & 0xC0 == 0x80:  # a continuation byte: the lead is further back
            continue
        need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
        return back < need
    return False
