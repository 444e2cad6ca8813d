"""Sampling functions and the stop-string matcher: pure, no model."""

from __future__ import annotations

import math

import pytest
import torch

from mixtral_local.engine import (
    SamplingParams,
    StopMatcher,
    apply_penalties,
    apply_repetition_penalty,
    logits_to_probs,
    sample,
)

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])


def test_temperature_zero_is_argmax() -> None:
    assert sample(LOGITS, SamplingParams(temperature=0)) == 1


def test_top_k_keeps_the_k_best() -> None:
    probs = logits_to_probs(LOGITS, temperature=1.0, top_k=2)
    assert (probs > 0).tolist() == [False, True, False, False, True]
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    full = torch.softmax(LOGITS, -1)  # sorted: 1 (0.43), 4 (0.26), 2 (0.16), ...
    probs = logits_to_probs(LOGITS, temperature=1.0, top_p=0.6)
    assert (probs > 0).tolist() == [False, True, False, False, True]
    assert torch.allclose(probs[[1, 4]], full[[1, 4]] / full[[1, 4]].sum())


def test_top_p_zero_keeps_only_the_best_token() -> None:
    assert (logits_to_probs(LOGITS, temperature=1.0, top_p=0.0) > 0).sum() == 1


def test_low_temperature_sharpens() -> None:
    assert logits_to_probs(LOGITS, temperature=0.1)[1] > logits_to_probs(LOGITS, temperature=1.0)[1]


def test_penalties_follow_openai() -> None:
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0])
    out = apply_penalties(LOGITS, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [1.0, 3.0 - 0.5 - 0.5, 2.0 - 0.25 - 0.5, 0.5, 2.5]


def test_penalties_change_the_greedy_choice() -> None:
    counts = torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0])
    assert sample(LOGITS, SamplingParams(temperature=0, frequency_penalty=1.0), counts) == 4


def test_a_seeded_generator_samples_reproducibly() -> None:
    params = SamplingParams(temperature=1.0)
    draw = [sample(LOGITS, params, generator=torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draw)) == 1


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 1.5}, {"top_k": -1}, {"max_tokens": 0},
                                 {"stop": ("",)}])
def test_sampling_params_refuse_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("penalty", [0.6, 1.3, 2.0])
def test_repetition_penalty_is_transformers(penalty: float) -> None:
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(1)) * 3
    ids = torch.tensor([[5, 17, 17, 250, 3]])
    seen = torch.zeros(300, dtype=torch.bool)
    seen[ids[0]] = True
    expected = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())[0]
    ours = apply_repetition_penalty(logits[0], seen, penalty)
    assert torch.allclose(ours, expected) and not torch.equal(ours, logits[0])


@pytest.mark.parametrize(("min_p", "temperature"), [(0.05, 1.0), (0.3, 0.7), (0.5, 3.0)])
def test_min_p_is_transformers(min_p: float, temperature: float) -> None:
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(2)) * 2
    ids = torch.tensor([[1]])
    warped = transformers.MinPLogitsWarper(min_p)(ids, transformers.TemperatureLogitsWarper(temperature)(
        ids, logits.clone()))
    expected = torch.softmax(warped[0], -1)
    ours = logits_to_probs(logits[0], temperature, min_p=min_p)
    assert torch.equal(ours > 0, expected > 0) and 1 < int((ours > 0).sum()) < 300
    assert torch.allclose(ours, expected, atol=1e-6)


def test_repetition_penalty_in_sample_moves_the_greedy_choice_off_seen_tokens() -> None:
    seen = torch.zeros(5, dtype=torch.bool)
    seen[1] = True  # the best token (3.0) was seen: 3.0 / 1.5 = 2.0 < 2.5
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert sample(LOGITS, params, seen=seen) == 4
    assert sample(LOGITS, SamplingParams(temperature=0), seen=seen) == 1


def test_stop_matcher_finds_a_stop_split_over_deltas() -> None:
    m = StopMatcher(["END"])
    shown = [m.feed(d) for d in ["abc E", "N", "Dxyz"]]
    assert shown == ["abc ", "", ""] and m.stopped


def test_stop_matcher_releases_held_text_that_was_not_a_stop() -> None:
    m = StopMatcher(["END"])
    assert [m.feed(d) for d in ["a E", "Nx", "y"]] == ["a ", "ENx", "y"]
    assert not m.stopped and m.flush() == ""


def test_stop_matcher_returns_held_text_on_flush() -> None:
    m = StopMatcher(["###"])
    assert m.feed("tail #") == "tail "
    assert m.flush() == "#"


def test_stop_matcher_takes_the_earliest_of_several_stops() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel" and m.stopped
