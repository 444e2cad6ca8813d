"""The generation engine on the tiny random checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral_client._exceptions import InvalidRequestError
from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.loader import load_model
from mixtral_local.model import MixtralModel
from mixtral_local.tokenizer import MixtralTokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def prompts(tokenizer: MixtralTokenizer) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content": text}])
            for text in ("Hello!", "Write a long poem about the sea and its moods, please.", "Why?")]


def test_kv_cache_decode_matches_full_forward(engine: Engine) -> None:
    model = engine.model
    ids = torch.randint(0, 32000, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = [(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16)) for _ in model.layers]
        prefill = model(ids[:, :6], torch.arange(6)[None], cache)
        steps = [model(ids[:, t:t + 1], torch.tensor([[t]]), cache) for t in range(6, 9)]
    assert torch.allclose(prefill, full[:, :6], atol=1e-5)
    assert torch.allclose(torch.cat(steps, 1), full[:, 6:], atol=1e-5)


def test_rows_at_different_positions_decode_like_each_alone(engine: Engine) -> None:
    model = engine.model
    a, b = torch.randint(0, 32000, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = [(torch.zeros(2, 2, 16, 16), torch.zeros(2, 2, 16, 16)) for _ in model.layers]
        model(a[None, :4], torch.arange(4)[None], [(k[:1], v[:1]) for k, v in cache])
        model(b[None, :6], torch.arange(6)[None], [(k[1:], v[1:]) for k, v in cache])
        step = model(torch.stack([a[4:5], b[6:7]]), torch.tensor([[4], [6]]), cache)
        assert torch.allclose(step[0, 0], model(a[None, :5])[0, -1], atol=1e-5)
        assert torch.allclose(step[1, 0], model(b[None, :7])[0, -1], atol=1e-5)


def test_batched_greedy_gives_the_same_tokens_as_alone(engine: Engine, prompts: list[list[int]]) -> None:
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    together = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    assert together == alone


def test_batched_seeded_sampling_gives_the_same_tokens_as_alone(engine: Engine, prompts: list[list[int]]) -> None:
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=s, max_tokens=10) for s in (1, 2, 3)]
    alone = [engine.generate([p], q)[0].token_ids for p, q in zip(prompts, params, strict=True)]
    assert [c.token_ids for c in engine.generate(prompts, params)] == alone


def test_same_seed_same_tokens_other_seed_other_tokens(engine: Engine, prompts: list[list[int]]) -> None:
    def run(seed: int) -> list[int]:
        return engine.generate([prompts[0]], SamplingParams(temperature=1.0, seed=seed, max_tokens=16))[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_max_tokens_finishes_with_length(engine: Engine, prompts: list[list[int]]) -> None:
    done = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=5))[0]
    assert (done.finish_reason, done.completion_tokens) == ("length", 5)


def test_stop_string_across_tokens_ends_the_text_before_it(engine: Engine, prompts: list[list[int]],
                                                           tokenizer: MixtralTokenizer) -> None:
    free = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=20))[0]
    pieces = [tokenizer.decode(free.token_ids[:n]) for n in range(1, len(free.token_ids) + 1)]
    # a stop string made of the last character of one token's text and the first of the next one's
    n = next(n for n in range(2, len(pieces)) if len(pieces[n]) - len(pieces[n - 1]) >= 2
             and len(pieces[n - 1]) > len(pieces[n - 2]))
    cut = len(pieces[n - 1])
    stop = free.text[cut - 1:cut + 1]
    done = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=20, stop=(stop,)))[0]
    assert done.finish_reason == "stop"
    assert done.text == free.text[:free.text.index(stop)]
    assert done.token_ids == free.token_ids[:len(done.token_ids)]


def test_streamed_deltas_add_up_to_the_generated_text(engine: Engine, prompts: list[list[int]]) -> None:
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=15)
    deltas = list(engine.stream([prompts[0]], params))
    assert "".join(d.text for d in deltas) == engine.generate([prompts[0]], params)[0].text
    assert [d.finish_reason for d in deltas][-1] == "length" and deltas[-1].completion_tokens == 15


def test_should_stop_ends_the_stream_early(engine: Engine, prompts: list[list[int]]) -> None:
    seen: list[int] = []
    stream = engine.stream([prompts[0]], SamplingParams(temperature=0, max_tokens=50), lambda: len(seen) >= 3)
    for delta in stream:
        seen.append(delta.completion_tokens)
    assert seen == [1, 2, 3]


def test_presence_penalty_stops_repetition(engine: Engine, prompts: list[list[int]]) -> None:
    tokens = engine.generate([prompts[0]], SamplingParams(temperature=0, presence_penalty=100.0,
                                                          max_tokens=40))[0].token_ids
    assert len(set(tokens)) == len(tokens)


class _EosAfterThree(MixtralModel):
    """The tiny model, except that the fourth generated token is always EOS."""

    prompt_len = 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *args: object,
                **kwargs: object) -> torch.Tensor:
        logits = super().forward(input_ids, positions, *args, **kwargs)
        if positions is not None and int(positions.max()) == self.prompt_len + 2:
            logits[..., 2] = 1e4
        return logits


def test_eos_finishes_with_stop_and_no_text(tiny_dir: Path, engine: Engine, prompts: list[list[int]],
                                            tokenizer: MixtralTokenizer) -> None:
    model = load_model(tiny_dir, dtype="float32", device="cpu")
    model.__class__ = _EosAfterThree
    model.prompt_len = len(prompts[0])
    done = Engine(model, tokenizer).generate([prompts[0]], GREEDY)[0]
    plain = engine.generate([prompts[0]], GREEDY)[0]
    assert (done.finish_reason, done.token_ids) == ("stop", [*plain.token_ids[:3], tokenizer.eos_id])
    assert done.text == tokenizer.decode(plain.token_ids[:3])


def test_prompt_longer_than_the_context_is_refused_with_the_numbers(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="the prompt is 1030 tokens; the model's context is 1024 tokens"):
        engine.generate([[1] * 1030], GREEDY)


def test_prompt_plus_max_tokens_beyond_the_context_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match=r"prompt \(1000 tokens\) plus max_tokens \(100\) is 1100"):
        engine.generate([[1] * 1000], SamplingParams(temperature=0, max_tokens=100))


def test_without_max_tokens_generation_may_fill_the_context(engine: Engine) -> None:
    done = engine.generate([[1] * 1020], SamplingParams(temperature=0))[0]
    assert done.completion_tokens <= 4 and (done.finish_reason == "length" or done.token_ids[-1] == 2)
