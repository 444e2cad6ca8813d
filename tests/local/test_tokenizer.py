"""The v1 tokenizer and chat format, against mistral-common's own encoder."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mixtral_client._exceptions import InvalidRequestError, UnsupportedFeatureError
from mixtral_local.config import CheckpointError
from mixtral_local.tokenizer import MixtralTokenizer

mc = pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.messages import (  # noqa: E402
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

_WORDS = ["hello", "world", "Mixtral", "[INST]", "[/INST]", "</s>", "<s>", "é", "naïve", "你好", "日本語",
          "🙂", "👍🏽", "مرحبا", "Ελληνικά", "x" * 30, "  ", "\t", "\n", "\n\n", " ", "42", "{\"a\": 1}", "'", "—"]
_NEXT = {None: ["system", "user", "assistant"], "system": ["system", "user", "assistant"],
         "user": ["user", "assistant", "system"], "assistant": ["assistant", "user"]}


def _text(rng: random.Random, empty_ok: bool) -> str:
    text = "".join(rng.choice(_WORDS) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(0, 8)))
    if not text and not empty_ok:
        text = rng.choice(_WORDS[:3])
    return text


def _content(rng: random.Random, empty_ok: bool) -> Any:
    if rng.random() < 0.15:  # a list of text parts
        return [{"type": "text", "text": _text(rng, empty_ok=False)} for _ in range(rng.randint(1, 3))]
    return _text(rng, empty_ok)


def _conversation(rng: random.Random) -> list[dict[str, Any]]:
    """A random conversation mistral-common accepts: it ends on a user turn, assistants say something."""
    messages: list[dict[str, Any]] = []
    role = None
    for _ in range(rng.randint(0, 7)):
        role = rng.choice(_NEXT[role])
        messages.append({"role": role, "content": _content(rng, empty_ok=role != "assistant")})
    if role in ("assistant", None) or (len(messages) == 1 and role != "user"):
        messages.append({"role": "user", "content": _content(rng, empty_ok=True)})
    return messages


def _oracle(ref: MistralTokenizer, messages: list[dict[str, Any]], prefix: bool = False) -> list[int]:
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    converted = [classes[m["role"]](content=m["content"]) for m in messages]
    if prefix:
        converted[-1] = AssistantMessage(content=messages[-1]["content"], prefix=True)
    return ref.encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens


@pytest.fixture(scope="module")
def reference() -> MistralTokenizer:
    return MistralTokenizer.v1()


def test_encode_chat_matches_mistral_common_on_300_random_conversations(
    tokenizer: MixtralTokenizer, reference: MistralTokenizer
) -> None:
    rng = random.Random(1234)
    for n in range(300):
        messages = _conversation(rng)
        assert tokenizer.encode_chat(messages) == _oracle(reference, messages), (n, messages)


def test_encode_chat_puts_the_system_prompt_in_the_first_user_turn(tokenizer: MixtralTokenizer) -> None:
    ids = tokenizer.encode_chat([{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    pieces = "".join(tokenizer.sp.id_to_piece(ids))
    assert pieces == "<s>▁[INST]▁SYSTEM<0x0A><0x0A>a▁[/INST]▁b</s>▁[INST]▁c▁[/INST]"


def test_encode_chat_leaves_a_final_assistant_message_open(
    tokenizer: MixtralTokenizer, reference: MistralTokenizer
) -> None:
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue and"}]
    ids = tokenizer.encode_chat(messages)
    assert ids == _oracle(reference, messages, prefix=True)
    assert ids[-1] != tokenizer.eos_id


def test_encode_chat_treats_developer_as_system(tokenizer: MixtralTokenizer) -> None:
    user = {"role": "user", "content": "hi"}
    assert tokenizer.encode_chat([{"role": "developer", "content": "be brief"}, user]) == \
        tokenizer.encode_chat([{"role": "system", "content": "be brief"}, user])


@pytest.mark.parametrize("message", [
    {"role": "tool", "tool_call_id": "abc123def", "content": "{}"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "abc123def", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
])
def test_encode_chat_refuses_tools(tokenizer: MixtralTokenizer, message: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedFeatureError, match="tool"):
        tokenizer.encode_chat([{"role": "user", "content": "hi"}, message, {"role": "user", "content": "and?"}])


def test_encode_chat_refuses_an_empty_assistant_message(tokenizer: MixtralTokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="assistant"):
        tokenizer.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                               {"role": "user", "content": "b"}])


def test_decode_inverts_encode_on_unicode(tokenizer: MixtralTokenizer) -> None:
    text = "naïve café — 你好, 👍🏽 مرحبا\n\tend"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_detokenizer_never_emits_part_of_a_character(tokenizer: MixtralTokenizer) -> None:
    text = "emoji 👍🏽 and 🦜 and 絵文字"
    ids = tokenizer.encode(text)
    assert any(tokenizer.byte_value(i) is not None for i in ids)  # byte-fallback pieces are in play
    detok = tokenizer.detokenizer()
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_deltas_add_up_to_decode_for_any_ids(tokenizer: MixtralTokenizer) -> None:
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(3, 259), rng.randrange(259, 32000), rng.randrange(0, 3)])
               for _ in range(rng.randint(1, 30))]
        detok = tokenizer.detokenizer()
        assert "".join(detok.push(i) for i in ids) + detok.flush() == tokenizer.decode(ids), ids


def test_from_pretrained_none_is_mistral_commons_v1(tokenizer: MixtralTokenizer, reference: MistralTokenizer) -> None:
    text = "The quick brown fox, 你好!"
    assert tokenizer.encode(text, bos=True) == reference.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 32000)


def test_from_pretrained_without_tokenizer_model_raises(tmp_path: Any) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        MixtralTokenizer.from_pretrained(tmp_path)


def _rendered(messages: list[dict[str, str]]) -> str:
    """A conversation written out in Mixtral's prompt format, as a raw-prompt user writes it."""
    text, system = "<s>", "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if i == 0 and system else m["content"]
            text += f"[INST] {content} [/INST]"
        else:
            text += f" {m['content']}" + ("</s>" if i < len(turns) - 1 else "")
    return text


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a river."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}, {"role": "user", "content": "日本語?"}],
    [{"role": "user", "content": "Write JSON"}, {"role": "assistant", "content": "{\"a\":"}],  # a prefill
])
def test_encode_prompt_of_the_written_out_format_is_mistral_commons_encoding(
    tokenizer: MixtralTokenizer, reference: MistralTokenizer, messages: list[dict[str, str]]
) -> None:
    prefix = messages[-1]["role"] == "assistant"

    assert tokenizer.encode_prompt(_rendered(messages)) == _oracle(reference, messages, prefix=prefix)


def test_encode_prompt_adds_bos_once_and_reads_eos(tokenizer: MixtralTokenizer) -> None:
    plain = tokenizer.encode_prompt("Once upon a time")

    assert plain == [tokenizer.bos_id, *tokenizer.sp.encode("Once upon a time")]
    assert tokenizer.encode_prompt("<s>Once upon a time") == plain
    assert tokenizer.encode_prompt("a</s>b") == [tokenizer.bos_id, *tokenizer.sp.encode("a"), tokenizer.eos_id,
                                                 *tokenizer.sp.encode("b")]
    assert tokenizer.encode_prompt("<s>") == [tokenizer.bos_id]
