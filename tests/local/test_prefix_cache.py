"""Prefix caching: a later prompt that starts like a finished request reuses its keys and values, and gets
the tokens (and logits) a fresh prefill gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtral_client import MixtralClient
from mixtral_client._config import resolve_config
from mixtral_client._exceptions import ConfigurationError
from mixtral_local.backend import LocalBackend, clear_engine_cache
from mixtral_local.engine import Engine, SamplingParams
from mixtral_local.engine.prefix_cache import MIN_REUSE, PrefixCache, common_prefix
from mixtral_local.loader import load_model
from mixtral_local.tokenizer import MixtralTokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=10)
SYSTEM = (
    "You are a careful assistant for a hardware shop. Answer in one short sentence, name the aisle of "
    "every product you mention, and never invent a price that the catalogue does not list."
)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Any:
    return load_model(tiny_dir, dtype="float32", device="cpu")


@pytest.fixture
def engine(model: Any, tokenizer: MixtralTokenizer) -> Engine:
    return Engine(model, tokenizer, max_batch=8)


@pytest.fixture
def cold(model: Any, tokenizer: MixtralTokenizer) -> Engine:
    """The same model with prefix caching off: the oracle."""
    return Engine(model, tokenizer, max_batch=8, prefix_cache=0)


def chat(tokenizer: MixtralTokenizer, *turns: str) -> list[int]:
    """The prompt of a conversation with SYSTEM: user, assistant, user, ... ending with a user turn."""
    messages: list[Any] = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return tokenizer.encode_chat(messages)


@pytest.fixture
def passes(model: Any) -> Iterator[list[tuple[int, int, int]]]:
    """(rows, tokens, first position) of every forward pass of the model."""
    calls: list[tuple[int, int, int]] = []

    def record(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        calls.append((int(args[0].shape[0]), int(args[0].shape[1]), int(args[1][0, 0])))

    handle = model.register_forward_pre_hook(record)
    yield calls
    handle.remove()


# the store


def test_common_prefix_finds_where_two_sequences_part() -> None:
    a = list(range(100))
    assert common_prefix(a, a) == 100
    assert common_prefix(a, a[:40]) == 40
    assert common_prefix(a, []) == 0
    for cut in (0, 1, 37, 63, 99):
        b = [*a[:cut], -1, *a[cut + 1 :]]
        assert common_prefix(a, b) == cut
        assert common_prefix(tuple(b), a) == cut


def _layers(
    tokens: int, layers: int = 2, slots: int = 3, fill: float = 0.0
) -> list[tuple[torch.Tensor, ...]]:
    """A KV cache's layers [slots, Hkv=2, T, D=4] whose values are fill + slot*1000 + position."""
    pos = torch.arange(tokens, dtype=torch.float32)[None, None, :, None]
    base = pos + 1000 * torch.arange(slots, dtype=torch.float32)[:, None, None, None] + fill
    return [
        (base.expand(slots, 2, tokens, 4).clone(), -base.expand(slots, 2, tokens, 4).clone())
        for _ in range(layers)
    ]


def test_a_stored_row_is_matched_by_a_prompt_that_starts_with_it_and_copied_back_exactly() -> None:
    cache = PrefixCache(1000)
    row = list(range(100, 180))  # 80 tokens
    cache.store(row, _layers(80), slot=2)
    entry, n = cache.match([*row[:60], 7, 8, 9])
    assert entry is not None and n == 60
    target = [(torch.zeros(1, 2, 90, 4), torch.zeros(1, 2, 90, 4)) for _ in range(2)]
    entry.copy_into(target, 0, n)
    expected = torch.arange(60, dtype=torch.float32)[None, :, None] + 2000  # slot 2's values
    for k, v in target:
        assert torch.equal(k[0, :, :60], expected.expand(2, 60, 4))
        assert torch.equal(v[0, :, :60], -expected.expand(2, 60, 4))
        assert not k[0, :, 60:].any()  # nothing beyond the reused positions


def test_the_last_prompt_token_is_never_reused_and_short_matches_are_ignored() -> None:
    cache = PrefixCache(1000)
    row = list(range(100, 180))
    cache.store(row, _layers(80), slot=0)
    assert cache.match(row)[1] == 79  # its logits pick the first new token: it must be computed
    assert cache.match(row[:50])[1] == 49
    assert cache.match(row[:MIN_REUSE])[0] is None  # MIN_REUSE - 1 reusable tokens: not worth a lone prefill
    assert cache.match([*row[: MIN_REUSE - 1], 5, *row[MIN_REUSE:]])[0] is None
    assert cache.match([1, *row])[0] is None  # a prefix match, not a substring one
    cache.store(list(range(10)), _layers(10), slot=0)  # too short to keep
    assert len(cache) == 1


def test_the_longest_match_wins_and_dominated_entries_go() -> None:
    cache = PrefixCache(10_000)
    base = list(range(500, 560))
    cache.store(base, _layers(60), slot=0)
    cache.store([*base, *range(60)], _layers(120), slot=1)  # extends the first: the first is dropped
    assert len(cache) == 1 and cache.tokens == 120
    cache.store(base[:50], _layers(50), slot=2)  # covered by the one held: not stored
    assert len(cache) == 1
    cache.store([*base[:40], *range(900, 950)], _layers(90), slot=2)  # parts at 40: a second entry
    assert len(cache) == 2
    entry, n = cache.match([*base, *range(30), 1])
    assert n == 90 and entry is not None and len(entry.tokens) == 120
    entry, n = cache.match([*base[:40], *range(900, 920)])
    assert n == 59 and entry is not None and entry.kv[0, 0, 0, 0, 0] == 2000  # slot 2's copy


def test_the_store_holds_at_most_its_budget_and_forgets_the_least_recently_used() -> None:
    cache = PrefixCache(200)
    rows = [[1000 * i + t for t in range(80)] for i in range(3)]
    for row in rows[:2]:
        cache.store(row, _layers(80), slot=0)
    assert cache.match([*rows[0], 1])[0] is not None  # row 0 is now the most recently used
    cache.store(rows[2], _layers(80), slot=0)  # 240 > 200: row 1 goes
    assert cache.tokens == 160 and cache.tokens <= cache.max_tokens
    assert cache.match([*rows[1], 1])[0] is None
    assert cache.match([*rows[0], 1])[0] is not None and cache.match([*rows[2], 1])[0] is not None
    big = PrefixCache(50)
    big.store(rows[0], _layers(80), slot=0)  # longer than the whole budget: its first 50 positions
    assert big.tokens == 50 and big.match([*rows[0][:50], 1])[1] == 50
    assert cache.hits == 0 and big.hits == 0  # lookups are not hits: only an entry copied into a prompt's slot


@pytest.mark.parametrize("size", [-1, 1.5, "8", True, None])
def test_a_bad_size_is_refused(size: Any) -> None:
    with pytest.raises(ValueError, match="prefix cache size"):
        PrefixCache(size)


def test_size_zero_stores_and_matches_nothing() -> None:
    cache = PrefixCache(0)
    cache.store(list(range(100)), _layers(100), slot=0)
    assert len(cache) == 0 and cache.match(list(range(101))) == (None, 0)


# the engine


def test_a_second_turn_reuses_the_first_and_generates_what_a_cold_engine_does(
    engine: Engine, cold: Engine, tokenizer: MixtralTokenizer, passes: list[tuple[int, int, int]]
) -> None:
    first = chat(tokenizer, "Where are the hammers?")
    done = engine.generate([first], GREEDY)[0]
    answer = tokenizer.decode(done.token_ids).strip()
    second = chat(tokenizer, "Where are the hammers?", answer, "And the nails?")
    passes.clear()
    warm = engine.stream([second], GREEDY)
    deltas = list(warm)
    shared = common_prefix(first + done.token_ids, second)
    assert shared >= len(first)  # at least the whole first prompt is the same
    assert deltas[-1].cached_tokens == shared
    assert passes[0] == (1, len(second) - shared, shared)  # the prefill computed only the new tokens
    expected = cold.generate([second], GREEDY)[0]
    assert "".join(d.text for d in deltas) == expected.text
    assert engine.generate([second], GREEDY)[0].token_ids == expected.token_ids
    assert engine.prefix_cache.hits == 2


def test_reused_keys_and_values_give_the_logits_of_a_fresh_prefill(
    engine: Engine, model: Any, tokenizer: MixtralTokenizer
) -> None:
    prompt = chat(tokenizer, "Do you sell ladders?")
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    longer = chat(tokenizer, "Do you sell ladders? And paint?")
    entry, n = engine.prefix_cache.match(longer)
    assert entry is not None and n >= MIN_REUSE
    cache = [
        (torch.zeros(1, 2, len(longer), 16), torch.zeros(1, 2, len(longer), 16))
        for _ in range(model.config.num_hidden_layers)
    ]
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 16
    entry.copy_into(cache, 0, n)
    with torch.inference_mode():
        warm = model(torch.tensor([longer[n:]]), torch.arange(n, len(longer))[None], cache, len(longer))
        fresh = model(torch.tensor([longer]))
    torch.testing.assert_close(warm[0], fresh[0, n:], atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_the_same_with_a_reused_prefix(
    engine: Engine, cold: Engine, tokenizer: MixtralTokenizer
) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=12)
    prompt = chat(tokenizer, "Which glue holds wood best?")
    engine.generate([prompt], params)
    again = engine.generate([prompt], params)[0]
    assert engine.prefix_cache.hits == 1
    assert again.token_ids == cold.generate([prompt], params)[0].token_ids


def test_requests_in_the_running_batch_reuse_prefixes_too(
    engine: Engine, cold: Engine, tokenizer: MixtralTokenizer, passes: list[tuple[int, int, int]]
) -> None:
    questions = ("Where are the hammers?", "Do you sell rope?", "Is there a café?")
    seed = engine.submit(chat(tokenizer, "Hello."), GREEDY)
    assert list(seed)[-1].finish_reason is not None
    passes.clear()
    tickets = [engine.submit(chat(tokenizer, q), GREEDY) for q in questions]
    got = [list(t) for t in tickets]
    prefills = [p for p in passes if p[1] > 1]  # (before the cold engine's passes, through the same model)
    # one row each, or rows that reuse the same prefix together, as they arrive: none from the start
    assert sum(rows for rows, _, _ in prefills) == 3 and all(start >= MIN_REUSE for _, _, start in prefills)
    for q, deltas in zip(questions, got, strict=True):
        assert deltas[-1].cached_tokens >= MIN_REUSE  # the system prompt came from the first request
        assert "".join(d.text for d in deltas) == cold.generate([chat(tokenizer, q)], GREEDY)[0].text


def test_a_long_new_part_is_prefilled_in_chunks_from_the_end_of_the_reused_prefix(
    engine: Engine,
    cold: Engine,
    tokenizer: MixtralTokenizer,
    passes: list[tuple[int, int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mixtral_local.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 64)
    list(engine.submit(chat(tokenizer, "Hi."), GREEDY))
    question = " ".join(f"shelf {i} holds screws of size {i};" for i in range(25))
    prompt = chat(tokenizer, question)
    shared = common_prefix(engine.prefix_cache.match(prompt)[0].tokens, prompt)  # type: ignore[union-attr]
    assert len(prompt) - shared > 2 * 64
    passes.clear()
    deltas = list(engine.submit(prompt, GREEDY))
    starts = [start for rows, n, start in passes if n > 1]
    assert starts == list(range(shared, len(prompt), 64))
    assert deltas[-1].cached_tokens == shared
    assert "".join(d.text for d in deltas) == cold.generate([prompt], GREEDY)[0].text


def test_rows_with_one_prompt_are_computed_once_and_sample_apart(
    engine: Engine, cold: Engine, tokenizer: MixtralTokenizer, passes: list[tuple[int, int, int]]
) -> None:
    a, b = chat(tokenizer, "Name three tools."), chat(tokenizer, "Name a glue.")
    params = [SamplingParams(temperature=0.8, seed=seed, max_tokens=8) for seed in (1, 2, 3, 4)]
    prompts = [a, b, a, a]  # the n choices of one request, and another request taken with them
    got = engine.generate(prompts, params)
    shared = common_prefix(a, b)
    assert passes[:2] == [(1, len(a), 0), (1, len(b) - shared, shared)]  # one row per distinct prompt
    expected = [cold.generate([p], q)[0].token_ids for p, q in zip(prompts, params, strict=True)]
    assert [c.token_ids for c in got] == expected
    assert len({tuple(c.token_ids) for c in got if c.prompt_tokens == len(a)}) > 1  # the choices differ
    passes.clear()
    again = engine.generate([a, a, a], [params[0], *params[2:]])  # all reuse a's cached prefix: one pass
    assert passes[0] == (1, 1, len(a) - 1)
    assert [c.token_ids for c in again] == expected[0:1] + expected[2:4]


# sharing within the running batch (no store needed: the cold engine keeps nothing)


def test_short_prompts_taken_together_compute_their_shared_start_once(
    cold: Engine, tokenizer: MixtralTokenizer, passes: list[tuple[int, int, int]]
) -> None:
    a, b, c = (chat(tokenizer, q) for q in ("Name three tools.", "Name a glue.", "Do you sell rope?"))
    start = min(common_prefix(a, b), common_prefix(a, c))
    assert start >= MIN_REUSE and common_prefix(a, b) != common_prefix(a, c)  # "Name" is shared by a and b
    expected = [cold.generate([p], GREEDY)[0].token_ids for p in (a, b, c)]
    passes.clear()

    tickets = cold.submit_all([a, b, c], GREEDY)
    got = [list(t) for t in tickets]

    prefills = [p for p in passes if p[1] > 1]
    assert prefills == [(1, len(a), 0), (2, max(len(b), len(c)) - start, start)]
    assert [d[-1].cached_tokens for d in got] == [0, start, start]
    assert [list(t.row.tokens) for t in tickets] == expected
    passes.clear()
    assert [c.token_ids for c in cold.generate([a, b, c], GREEDY)] == expected  # the fixed batch shares too
    assert [p for p in passes if p[1] > 1] == prefills


def test_prefill_groups_keep_rows_that_reuse_prefixes_apart_from_the_others(
    cold: Engine, tokenizer: MixtralTokenizer
) -> None:
    from mixtral_local.engine.engine import prefill_groups, shared_start_waves

    a, b = chat(tokenizer, "Name three tools."), chat(tokenizer, "Do you sell rope?")
    other = tokenizer.encode_chat([{"role": "user", "content": "Hello there."}])
    rows = cold._rows([a, b, b, a, other], GREEDY)
    first, later = shared_start_waves(rows)
    assert [r.index for r in first] == [0, 3, 4] and [r.index for r in later] == [1, 2]  # copies stay together

    rows = cold._rows([a] * 5, GREEDY)
    for row, cached in zip(rows, (40, 40 + MIN_REUSE, 41 + MIN_REUSE, 0, 0), strict=True):
        row.cached = cached
    assert [[r.index for r in g] for g in prefill_groups(rows)] == [[0, 1], [2], [3, 4]]


def test_the_choices_of_a_long_prompt_are_prefilled_once(
    cold: Engine, tokenizer: MixtralTokenizer, passes: list[tuple[int, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mixtral_local.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 64)
    prompt = chat(tokenizer, " ".join(f"bin {i} holds nails of size {i};" for i in range(12)))
    assert len(prompt) > 2 * 64
    params = [SamplingParams(temperature=0.8, seed=seed, max_tokens=6) for seed in (1, 2, 3)]
    expected = [cold.generate([prompt], q)[0].token_ids for q in params]
    passes.clear()
    tickets = cold.submit_all([prompt] * 3, params)
    got = [list(t) for t in tickets]
    prefills = [start for rows, n, start in passes if n > 1]
    assert prefills == list(range(0, len(prompt), 64))  # the first choice's chunks, and nothing more
    assert (1, 1, len(prompt) - 1) in passes  # each other choice computes its last prompt token only
    assert [d[-1].cached_tokens for d in got] == [0, len(prompt) - 1, len(prompt) - 1]
    assert [list(t.row.tokens) for t in tickets] == expected
    assert len({tuple(e) for e in expected}) > 1  # the choices still sample apart


def test_a_request_starts_from_the_system_prompt_of_one_still_answering(
    cold: Engine, tokenizer: MixtralTokenizer, passes: list[tuple[int, int, int]]
) -> None:
    first, second = chat(tokenizer, "List every aisle, please."), chat(tokenizer, "Do you sell rope?")
    shared = common_prefix(first, second)
    assert shared >= MIN_REUSE
    expected = cold.generate([second], GREEDY)[0].text
    running = cold.submit(first, SamplingParams(temperature=0, max_tokens=60))
    deltas = iter(running)
    next(deltas)  # it is decoding now
    passes.clear()
    answer = list(cold.submit(second, GREEDY))
    assert (1, len(second) - shared, shared) in passes  # its prefill starts where the prompts part
    assert answer[-1].cached_tokens == shared
    assert "".join(d.text for d in answer) == expected
    assert [d for d in deltas][-1].finish_reason == "length"  # the first was still answering throughout


def test_a_long_prompt_that_waited_looks_again_when_its_turn_comes(
    engine: Engine, tokenizer: MixtralTokenizer, cold: Engine
) -> None:
    from mixtral_local.engine.engine import _Batch, _LiveRow

    first = chat(tokenizer, "Hello.")
    waiting = chat(tokenizer, " ".join(f"bin {i} holds nails of size {i};" for i in range(12)))
    batch = _Batch(engine, slots=4)
    a, b = engine._rows([first, waiting], SamplingParams(temperature=0, max_tokens=4))
    batch.admit([a])
    batch.share(b)  # taken while the first is decoding: it would copy from that row
    assert isinstance(b.prefix, _LiveRow) and b.cached == common_prefix(first, waiting)
    batch.drop(a)  # the first ends before the long prompt's turn to fill: its positions go to the store
    batch.start_filling(b)
    assert b.prefix is engine.prefix_cache.match(waiting)[0] and b.cached == common_prefix(first, waiting)
    delta = None
    while delta is None:
        delta = batch.fill()
    while b.finish is None:
        batch.step()
    assert b.tokens == cold.generate([waiting], SamplingParams(temperature=0, max_tokens=4))[0].token_ids


def test_choices_are_checked_before_any_is_queued(cold: Engine, tokenizer: MixtralTokenizer) -> None:
    good = chat(tokenizer, "Hi.")
    with pytest.raises(ValueError, match="prompt 1 has token ids outside the vocabulary"):
        cold.submit_all([good, [1, 10**9]], GREEDY)
    assert not cold.scheduler._waiting and cold.scheduler._thread is None


def test_the_engine_keeps_no_more_than_its_budget(model: Any, tokenizer: MixtralTokenizer) -> None:
    engine = Engine(model, tokenizer, prefix_cache=150)
    for i in range(6):
        engine.generate([chat(tokenizer, f"Question number {i}: what is in aisle {i}?")], GREEDY)
        assert 0 < engine.prefix_cache.tokens <= 150
    off = Engine(model, tokenizer, prefix_cache=0)
    off.generate([chat(tokenizer, "Hi.")], GREEDY)
    again = off.generate([chat(tokenizer, "Hi.")], GREEDY)
    assert len(off.prefix_cache) == 0 and off.prefix_cache.hits == 0 and again[0].token_ids


# through the client


def test_usage_reports_the_cached_prompt_tokens_of_a_follow_up(tiny_dir: Path) -> None:
    clear_engine_cache()
    client = MixtralClient(
        provider="local", model_path=str(tiny_dir), local_options={"dtype": "float32", "device": "cpu"}
    )
    messages: list[Any] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Any drills?"}]
    first = client.chat.completions.create(messages=messages, max_tokens=8, temperature=0)
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Cordless ones?"},
    ]
    stream = client.chat.completions.create(messages=messages, max_tokens=8, temperature=0, stream=True)
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details is not None
    assert first.usage.prompt_tokens <= usage[0].prompt_tokens_details.cached_tokens < usage[0].prompt_tokens
    client.close()
    clear_engine_cache()


def test_prefix_cache_zero_turns_reuse_off_and_bad_values_are_configuration_errors(tiny_dir: Path) -> None:
    clear_engine_cache()
    config = resolve_config(
        {},
        provider="local",
        model_path=str(tiny_dir),
        local_options={"dtype": "float32", "device": "cpu", "prefix_cache": 0},
    )
    backend = LocalBackend(config)
    assert backend._core.engine.prefix_cache.max_tokens == 0
    clear_engine_cache()
    for bad in (-1, 2.5, "1024", True):
        with pytest.raises(ConfigurationError, match="prefix_cache must be an integer >= 0"):
            LocalBackend(
                resolve_config(
                    {},
                    provider="local",
                    model_path=str(tiny_dir),
                    local_options={"device": "cpu", "prefix_cache": bad},
                )
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reuse_on_cuda_gives_the_tokens_of_a_cold_engine(tiny_dir: Path, tokenizer: MixtralTokenizer) -> None:
    model = load_model(tiny_dir, dtype="float32", device="cuda")  # fp32: no near-tie flips between the two
    warm, cold = Engine(model, tokenizer), Engine(model, tokenizer, prefix_cache=0)
    first = chat(tokenizer, "Where are the hammers?")
    done = warm.generate([first], GREEDY)[0]
    second = chat(tokenizer, "Where are the hammers?", tokenizer.decode(done.token_ids).strip(), "And nails?")
    deltas = list(warm.stream([second], GREEDY))
    assert deltas[-1].cached_tokens >= len(first)
    assert "".join(d.text for d in deltas) == cold.generate([second], GREEDY)[0].text
