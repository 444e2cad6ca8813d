"""``logprobs`` / ``top_logprobs`` on local weights: the model's own log probabilities (transformers is the
oracle), token texts that add up to the answer, and each token once, on the chunk that shows its text."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mixtral_client._config import ClientConfig
from mixtral_client._exceptions import InvalidRequestError
from mixtral_client._request import ChatRequest
from mixtral_client.types import ChoiceLogprobs
from mixtral_local.backend import LocalBackend
from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.loader import load_model
from mixtral_local.tokenizer import MixtralTokenizer

MakeRequest = Callable[..., ChatRequest]
PROMPT = [{"role": "user", "content": "Write a short poem about the sea, with an emoji or two."}]


@pytest.fixture(scope="module")
def backend(local_config: ClientConfig) -> LocalBackend:
    return LocalBackend(local_config)


def _texts(logprobs: ChoiceLogprobs | dict[str, Any] | None) -> str:
    """The tokens' bytes joined and decoded as the detokenizer decodes them (a cut character is U+FFFD)."""
    assert isinstance(logprobs, ChoiceLogprobs) and logprobs.content is not None
    return b"".join(bytes(t.bytes or []) for t in logprobs.content).decode("utf-8", errors="replace")


def test_greedy_logprobs_are_transformers_log_softmax(tiny_dir: Path, engine: Engine, hf_model: Callable[..., Any],
                                                      tokenizer: MixtralTokenizer) -> None:
    prompt = tokenizer.encode_chat(PROMPT)
    ours = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, logprobs=5))[0]
    with torch.no_grad():
        out = hf_model(tiny_dir).generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                          pad_token_id=tokenizer.eos_id, output_logits=True,
                                          return_dict_in_generate=True)
    theirs = [torch.log_softmax(step[0].float(), -1) for step in out.logits]

    assert [t.token_id for t in ours.logprobs] == out.sequences[0, len(prompt):].tolist() == ours.token_ids
    for token, expected in zip(ours.logprobs, theirs, strict=True):
        assert token.logprob == pytest.approx(float(expected[token.token_id]), abs=1e-4)
        values, ids = torch.topk(expected, 5)
        assert [i for i, _, _ in token.top] == ids.tolist()
        assert [lp for _, _, lp in token.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert token.top[0][0] == token.token_id  # greedy takes the most likely token


def test_logprobs_are_the_models_whatever_the_sampling(engine: Engine, tokenizer: MixtralTokenizer) -> None:
    """Temperature, top-k, top-p and penalties change which token is drawn, never the reported distribution:
    the first position's alternatives are the same as a greedy request's."""
    prompt = tokenizer.encode_chat(PROMPT)
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=4))[0].logprobs[0]
    sampled = engine.generate([prompt], SamplingParams(temperature=1.7, top_k=3, top_p=0.5, presence_penalty=1.5,
                                                       seed=3, max_tokens=1, logprobs=4))[0].logprobs[0]
    assert [i for i, _, _ in sampled.top] == [i for i, _, _ in greedy.top]
    assert [lp for _, _, lp in sampled.top] == pytest.approx([lp for _, _, lp in greedy.top], abs=1e-5)
    drawn = {i: lp for i, _, lp in greedy.top[:3]}  # top_k=3 draws one of these
    assert sampled.logprob == pytest.approx(drawn[sampled.token_id], abs=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_token_texts_add_up_to_the_answer(backend: LocalBackend, make_request: MakeRequest, seed: int) -> None:
    """Sampled from the random model, answers hold byte tokens (parts of characters), words and a first token
    whose space the answer drops."""
    answer = backend.complete(make_request(PROMPT, temperature=1.0, seed=seed, max_tokens=40, logprobs=True))
    choice = answer.choices[0]
    assert answer.usage is not None and choice.finish_reason == "length"
    assert isinstance(choice.logprobs, ChoiceLogprobs) and len(choice.logprobs.content or []) == 40
    assert _texts(choice.logprobs) == choice.message.content
    for token in choice.logprobs.content or []:
        assert token.token == bytes(token.bytes or []).decode("utf-8", errors="backslashreplace")
        assert token.logprob <= 0 and token.top_logprobs == []


def test_top_logprobs_are_the_most_likely_first_and_hold_the_greedy_token(backend: LocalBackend,
                                                                          make_request: MakeRequest) -> None:
    answer = backend.complete(make_request(PROMPT, temperature=0, max_tokens=8, logprobs=True, top_logprobs=20))
    for token in answer.choices[0].logprobs.content:  # type: ignore[union-attr]
        top = [t.logprob for t in token.top_logprobs]
        assert len(top) == 20 and top == sorted(top, reverse=True)
        assert sum(math.exp(lp) for lp in top) <= 1 + 1e-5
        assert (token.token, token.logprob) == (token.top_logprobs[0].token, top[0])


def test_no_logprobs_unless_asked(backend: LocalBackend, make_request: MakeRequest) -> None:
    answer = backend.complete(make_request(PROMPT, temperature=0, max_tokens=3))
    assert answer.choices[0].logprobs is None
    assert all(c.logprobs is None for chunk in backend.stream(make_request(PROMPT, stream=True, max_tokens=3))
               for c in chunk.choices)


def test_each_streamed_token_comes_once_with_the_chunk_that_shows_its_text(backend: LocalBackend,
                                                                           make_request: MakeRequest) -> None:
    """A stop string holds text back: the tokens of held text wait for the next chunk that carries text, or for
    the finish chunk; every token drawn is streamed once, in order, the stop string's too."""
    whole = backend.complete(make_request(PROMPT, temperature=1.0, seed=4, max_tokens=30, logprobs=True))
    drawn = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    content = whole.choices[0].message.content or ""

    def stop_at(k: int) -> str:  # token k's whole text and the next one's start: token k's text is all held
        return drawn[k].token + drawn[k + 1].token[:2]

    k = next(k for k in range(3, 25) if drawn[k].token.isalpha() and drawn[k + 1].token[:2].isalpha()
             and content.find(stop_at(k)) == len(_texts(ChoiceLogprobs(content=drawn[:k]))))
    stop = stop_at(k)
    chunks = list(backend.stream(make_request(PROMPT, stream=True, temperature=1.0, seed=4, max_tokens=30,
                                              logprobs=True, top_logprobs=2, stop=[stop])))
    shown = [c for chunk in chunks for c in chunk.choices if c.logprobs is not None]
    assert all(c.delta.content or c.finish_reason for c in shown)
    assert shown[-1].finish_reason == "stop"
    streamed = [t for c in shown for t in c.logprobs.content]  # type: ignore[union-attr]
    text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    assert text == content[:content.index(stop)]
    assert chunks[-1].usage is not None and len(streamed) == chunks[-1].usage.completion_tokens
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in drawn[:len(streamed)]]
    assert _texts(ChoiceLogprobs(content=streamed)).startswith(text + stop)


def test_the_end_of_sequence_token_is_not_listed(tiny_dir: Path, tokenizer: MixtralTokenizer) -> None:
    """EOS has no text: an answer that ends with it lists the tokens before it."""
    model = load_model(tiny_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        model.output.weight[tokenizer.eos_id] *= 50  # EOS comes within a few tokens
    done = Engine(model, tokenizer).generate([tokenizer.encode_chat(PROMPT)],
                                             SamplingParams(temperature=0, max_tokens=20, logprobs=2))[0]
    assert done.finish_reason == "stop" and done.token_ids[-1] == tokenizer.eos_id and len(done.token_ids) > 1
    assert [t.token_id for t in done.logprobs] == done.token_ids[:-1]


def test_a_grammar_row_drops_every_opening_space_from_its_tokens(engine: Engine, tokenizer: MixtralTokenizer) -> None:
    """Until a constrained answer shows text, its tokens lose all leading spaces (the answer drops them); after
    its first token, an unconstrained one keeps them."""
    spaces = tokenizer.sp.piece_to_id("\u2581" * 3)
    assert tokenizer.token_bytes(spaces) == b"   "
    logits = torch.zeros(tokenizer.vocab_size)

    def text(**state: Any) -> bytes:
        row = SimpleNamespace(**{"params": SamplingParams(logprobs=0), "tokens": [7], "constraint": None,
                                 "shown": False, **state})
        logprob = engine._logprob(row, logits, spaces)  # type: ignore[arg-type]
        assert logprob is not None
        return logprob.text

    assert text(constraint=object()) == b""
    assert text(constraint=object(), shown=True) == b"   "
    assert text() == b"   "
    assert text(tokens=[]) == b"  "  # sentencepiece drops one space at the start of a text


def test_n_choices_each_have_their_own(backend: LocalBackend, make_request: MakeRequest) -> None:
    answer = backend.complete(make_request(PROMPT, n=3, seed=5, max_tokens=12, logprobs=True, top_logprobs=1))
    assert len({c.message.content for c in answer.choices}) == 3
    for choice in answer.choices:
        assert _texts(choice.logprobs) == choice.message.content


@pytest.mark.parametrize("seed", [1, 20])  # 20: the answer opens with a lone space token
def test_an_answer_held_to_json_has_tokens_that_add_up_to_it(backend: LocalBackend, make_request: MakeRequest,
                                                              seed: int) -> None:
    """A grammar may let the answer open with spaces the answer's text drops: so do its tokens' texts."""
    answer = backend.complete(make_request(PROMPT, seed=seed, max_tokens=60, logprobs=True,
                                           response_format={"type": "json_object"}))
    choice = answer.choices[0]
    assert (choice.message.content or "").startswith("{")
    assert _texts(choice.logprobs) == choice.message.content


def test_logit_bias_of_minus_100_takes_the_greedy_token_away(backend: LocalBackend,
                                                              make_request: MakeRequest) -> None:
    """The greedy first token, banned, gives way to the runner-up that ``top_logprobs`` named; the reported
    log probabilities stay the model's (the bias changes the draw, not them)."""
    engine = backend._core.engine
    plain = engine.generate([engine.tokenizer.encode_chat(PROMPT)],
                            SamplingParams(temperature=0, max_tokens=1, logprobs=2))[0].logprobs[0]
    (best, _, _), (second, text, logprob) = plain.top
    biased = backend.complete(make_request(PROMPT, temperature=0, max_tokens=1, logprobs=True,
                                           logit_bias={best: -100}))
    token = biased.choices[0].logprobs.content[0]  # type: ignore[union-attr]
    assert (bytes(token.bytes or []), token.logprob) == (text, pytest.approx(logprob, abs=1e-5))


def test_logit_bias_of_100_makes_sampling_pick_the_token_every_time(backend: LocalBackend,
                                                                     make_request: MakeRequest,
                                                                     tokenizer: MixtralTokenizer) -> None:
    yes = tokenizer.sp.piece_to_id("\u2581Yes")
    answer = backend.complete(make_request(PROMPT, temperature=1.0, seed=0, max_tokens=5, n=2,
                                           logit_bias={str(yes): 100}))
    assert [c.message.content for c in answer.choices] == ["Yes Yes Yes Yes Yes"] * 2
    nudged = backend.complete(make_request(PROMPT, temperature=0, max_tokens=5, logit_bias={str(yes): 0.5}))
    assert nudged.choices[0].message.content != "Yes Yes Yes Yes Yes"  # a small bias is a nudge, not a ban


def test_logit_bias_outside_the_vocabulary_is_refused_before_loading(local_config: ClientConfig,
                                                                      make_request: MakeRequest) -> None:
    fresh = LocalBackend(local_config)
    with pytest.raises(InvalidRequestError, match="token 32000 is not in the model's vocabulary") as info:
        fresh.complete(make_request(PROMPT, logit_bias={"32000": 1}))
    assert info.value.param == "logit_bias" and fresh._core._engine is None


def test_logprobs_beyond_twenty_are_refused() -> None:
    with pytest.raises(ValueError, match="logprobs must be between 0 and 20"):
        SamplingParams(logprobs=21)
