"""A bound on the running batch's KV cache (``kv_cache_memory``): requests wait for room instead of growing the
cache past it, each answer is what it is alone, and a request that cannot fit is refused up front."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mixtral_client._config import resolve_config
from mixtral_client._exceptions import ConfigurationError, InvalidRequestError
from mixtral_local import backend as backend_module
from mixtral_local.backend import LocalOptions
from mixtral_local.engine import Engine, KVCache, SamplingParams, Ticket
from mixtral_local.loader import load_model
from mixtral_local.tokenizer import MixtralTokenizer

STEPS = 24


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Any:
    return load_model(tiny_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def prompts(tokenizer: MixtralTokenizer) -> list[list[int]]:
    texts = ("Hello!", "Write a poem about the sea.", "Why?", "Count to ten.", "Name three rivers.", "Go on.")
    return [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in texts]


def engine_with(model: Any, tokenizer: MixtralTokenizer, cells: int | None) -> Engine:
    per_position = KVCache.nbytes(model.config, 1, 1, torch.float32)
    return Engine(model, tokenizer, max_batch=8, prefix_cache=0,
                  kv_cache_bytes=None if cells is None else cells * per_position)


@contextmanager
def cache_peaks(engine: Engine) -> Iterator[dict[str, int]]:
    """The largest KV cache (slots x positions) allocated and the most rows decoding together."""
    peaks = {"cells": 0, "rows": 0}
    original_init, original_reserve, original_resize = KVCache.__init__, KVCache.reserve, KVCache.resize

    def note(cache: KVCache) -> None:
        peaks["cells"] = max(peaks["cells"], cache.batch * cache.length)

    def init(self: KVCache, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        note(self)

    def reserve(self: KVCache, batch: int, length: int) -> None:
        original_reserve(self, batch, length)
        note(self)

    def resize(self: KVCache, batch: int, length: int) -> None:
        original_resize(self, batch, length)
        note(self)

    hook = engine.model.register_forward_pre_hook(
        lambda _m, args: peaks.__setitem__("rows", max(peaks["rows"], int(args[0].shape[0]))))
    KVCache.__init__, KVCache.reserve, KVCache.resize = init, reserve, resize  # type: ignore[method-assign]
    try:
        yield peaks
    finally:
        KVCache.__init__, KVCache.reserve, KVCache.resize = (  # type: ignore[method-assign]
            original_init, original_reserve, original_resize)
        hook.remove()


def run_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    with engine.scheduler._cond:  # every request is waiting when the batch thread first looks
        tickets = [engine.submit(p, s) for p, s in zip(prompts, params, strict=True)]
    return [_tokens(t) for t in tickets]


def _tokens(ticket: Ticket) -> list[int]:
    deltas = list(ticket)
    assert deltas[-1].finish_reason is not None
    return list(ticket.row.tokens)


def test_requests_wait_for_room_and_the_cache_stays_within_the_bound(model: Any, tokenizer: MixtralTokenizer,
                                                                     prompts: list[list[int]]) -> None:
    params = [SamplingParams(temperature=0, max_tokens=STEPS)] * len(prompts)
    reach = max(len(p) for p in prompts) + STEPS
    cells = 2 * reach  # two requests at a time
    solo = [engine_with(model, tokenizer, None).generate([p], s)[0].token_ids for p, s in zip(prompts, params,
                                                                                                 strict=True)]
    bounded = engine_with(model, tokenizer, cells)
    with cache_peaks(bounded) as peaks:
        answers = run_all(bounded, prompts, params)
    assert answers == solo
    assert peaks["cells"] <= cells and peaks["rows"] <= 2

    free = engine_with(model, tokenizer, None)  # the same requests, unbounded, all decode together
    with cache_peaks(free) as unbounded:
        assert run_all(free, prompts, params) == solo
    assert unbounded["rows"] == len(prompts) and unbounded["cells"] > cells


@contextmanager
def set_aside_count(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many rows were set aside and restored."""
    from mixtral_local.engine.engine import _Batch

    counts = {"aside": 0, "restored": 0}
    aside, restore = _Batch.set_aside, _Batch.restore

    def counting_aside(self: Any) -> Any:
        out = aside(self)
        counts["aside"] += len(out)
        return out

    def counting_restore(self: Any, row: Any, saved: Any) -> None:
        counts["restored"] += 1
        restore(self, row, saved)

    monkeypatch.setattr(_Batch, "set_aside", counting_aside)
    monkeypatch.setattr(_Batch, "restore", counting_restore)
    yield counts


def test_rows_that_outgrow_the_bound_are_set_aside_and_resume_exactly(
        model: Any, tokenizer: MixtralTokenizer, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests are admitted for what they need now (plus ``LOOKAHEAD``), not for all they may reach: more run
    together. As they grow past the bound the latest taken are set aside, their keys and values kept in host
    memory, and come back when rows finish: each answer, greedy or seeded, is what it is alone."""
    tokens = 300
    params = [SamplingParams(temperature=0, max_tokens=tokens) if i % 2 else
              SamplingParams(temperature=0.9, seed=i, max_tokens=tokens) for i in range(len(prompts))]
    reach = max(len(p) for p in prompts) + tokens
    cells = 2 * reach  # admitting for the whole reach, only two would run at a time
    solo = [engine_with(model, tokenizer, None).generate([p], s)[0].token_ids
            for p, s in zip(prompts, params, strict=True)]
    bounded = engine_with(model, tokenizer, cells)
    with cache_peaks(bounded) as peaks, set_aside_count(monkeypatch) as counts:
        answers = run_all(bounded, prompts, params)
    assert answers == solo
    assert peaks["cells"] <= cells and peaks["rows"] > 2
    assert counts["aside"] > 0 and counts["restored"] == counts["aside"]


def test_a_request_cancelled_while_set_aside_leaves_and_the_rest_finish(
        model: Any, tokenizer: MixtralTokenizer, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0, max_tokens=300)
    bounded = engine_with(model, tokenizer, 2 * (max(len(p) for p in prompts) + 300))
    with set_aside_count(monkeypatch) as counts:
        with bounded.scheduler._cond:
            tickets = [bounded.submit(p, params) for p in prompts]
        last = tickets[-1]  # the latest taken: the first set aside
        first = [tickets[0].get()]
        while counts["aside"] == 0:
            first.append(tickets[0].get(timeout=10))  # a step at a time, until rows are set aside
        last.cancel()
        while first[-1].finish_reason is None:
            first.append(tickets[0].get(timeout=10))
        done = [_tokens(t) for t in tickets[1:-1]]
    assert len(first) == 300 and all(len(d) == 300 for d in done)
    assert bounded.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=3))[0].finish_reason == "length"


def test_a_long_request_waits_until_the_short_ones_leave_and_gets_their_slots_back(
        model: Any, tokenizer: MixtralTokenizer, prompts: list[list[int]]) -> None:
    """Short rows grow the cache to many slots; the long row that follows fits only alone: the cache gives back
    the slots it no longer needs (``KVCache.resize``) rather than growing past the bound."""
    short = [SamplingParams(temperature=0, max_tokens=4)] * 5
    long = SamplingParams(temperature=0, max_tokens=200)
    cells = len(prompts[1]) + 200 + 20
    assert all(5 * (len(p) + 4) <= cells for p in prompts[:5])  # the short ones fit together
    bounded = engine_with(model, tokenizer, cells)
    expected = engine_with(model, tokenizer, None).generate([prompts[1]], long)[0].token_ids
    with cache_peaks(bounded) as peaks:
        answers = run_all(bounded, [*prompts[:5], prompts[1]], [*short, long])
    assert answers[-1] == expected and all(len(a) == 4 for a in answers[:5])
    assert peaks["cells"] <= cells


def test_a_request_is_refused_when_it_cannot_fit_alone(model: Any, tokenizer: MixtralTokenizer,
                                                       prompts: list[list[int]]) -> None:
    bounded = engine_with(model, tokenizer, 100)
    with pytest.raises(InvalidRequestError, match="holds 100 positions") as info:
        bounded.submit(prompts[0], SamplingParams(max_tokens=100))
    assert info.value.param == "max_tokens"
    # without max_tokens, an answer may go as far as the bound
    done = bounded.generate([prompts[0]], SamplingParams(temperature=0))[0]
    assert done.finish_reason == "length" and len(prompts[0]) + len(done.token_ids) == 100


def test_generate_refuses_prompts_that_do_not_fit_together(model: Any, tokenizer: MixtralTokenizer,
                                                           prompts: list[list[int]]) -> None:
    bounded = engine_with(model, tokenizer, 3 * (len(prompts[0]) + 8))
    assert len(bounded.generate([prompts[0]] * 3, SamplingParams(temperature=0, max_tokens=8))) == 3
    with pytest.raises(ValueError, match="do not fit the KV-cache bound"):
        bounded.generate([prompts[0]] * 4, SamplingParams(temperature=0, max_tokens=8))


# --------------------------------------------------------------------------- the option


def options(tiny_dir: Path, env: dict[str, str] | None = None, **local: Any) -> LocalOptions:
    config = resolve_config(env or {}, provider="local", model_path=str(tiny_dir), local_options=local)
    return LocalOptions.from_config(config)


@pytest.mark.parametrize(("value", "size"), [
    ("auto", None), ("AUTO", None), (4096, 4096), ("4096", 4096), ("2KiB", 2048), ("1.5 GiB", 3 * 2**29),
    ("512MB", 512 * 10**6), ("3gb", 3 * 10**9),
])
def test_kv_cache_memory_takes_bytes_or_sizes(tiny_dir: Path, value: Any, size: int | None) -> None:
    assert options(tiny_dir, kv_cache_memory=value).kv_cache_memory == size


@pytest.mark.parametrize("value", ["lots", "12 parsecs", 0, -5, True, "0GiB", 1.5, ""])
def test_a_bad_kv_cache_memory_is_a_configuration_error(tiny_dir: Path, value: Any) -> None:
    with pytest.raises(ConfigurationError, match="local_options: kv_cache_memory must be 'auto'"):
        options(tiny_dir, kv_cache_memory=value)


def test_kv_cache_memory_comes_from_the_environment(tiny_dir: Path) -> None:
    assert options(tiny_dir, {"MIXTRAL_LOCAL_KV_CACHE_MEMORY": "2GiB"}).kv_cache_memory == 2 * 2**30
    with pytest.raises(ConfigurationError, match="MIXTRAL_LOCAL_KV_CACHE_MEMORY: kv_cache_memory"):
        options(tiny_dir, {"MIXTRAL_LOCAL_KV_CACHE_MEMORY": "big"})


def test_a_bound_too_small_for_one_request_is_a_configuration_error(tiny_dir: Path) -> None:
    from mixtral_client import MixtralClient

    client = MixtralClient(provider="local", model_path=str(tiny_dir), env={},
                           local_options={"dtype": "float32", "device": "cpu", "kv_cache_memory": 100})
    with pytest.raises(ConfigurationError, match="kv_cache_memory: a KV cache of 100 bytes holds 0 positions"):
        client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])


def test_auto_sets_no_bound_on_cpu_and_leaves_headroom_on_a_gpu(tiny_dir: Path, model: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    opts = options(tiny_dir)
    assert backend_module._kv_cache_bytes(opts, model) is None
    on_gpu = SimpleNamespace(config=model.config, output=SimpleNamespace(
        weight=SimpleNamespace(device=torch.device("cuda:0"), dtype=torch.bfloat16)))
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * gib, 141 * gib))
    prefix = opts.prefix_cache * KVCache.nbytes(model.config, 1, 1, torch.bfloat16)
    assert backend_module._kv_cache_bytes(opts, on_gpu) == int(40 * gib * 0.9) - prefix - 3 * gib  # type: ignore[arg-type]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * gib, 141 * gib))
    with pytest.raises(ConfigurationError, match="leaves no room for the KV cache"):
        backend_module._kv_cache_bytes(opts, on_gpu)  # type: ignore[arg-type]


def test_rows_set_aside_and_restored_while_a_long_prompt_fills_in_chunks(
        model: Any, tokenizer: MixtralTokenizer, prompts: list[list[int]]) -> None:
    """The filling row sits in the slot after the decoding rows: setting rows aside moves it down, restoring
    them moves it up, and every answer (the long prompt's too) is still what it is alone."""
    from mixtral_local.engine.engine import PREFILL_CHUNK, _Batch

    engine = engine_with(model, tokenizer, None)
    long_prompt = tokenizer.encode_chat([{"role": "user", "content": "word " * 700}])
    assert PREFILL_CHUNK < len(long_prompt) < 2 * PREFILL_CHUNK
    short = SamplingParams(temperature=0, max_tokens=30)
    solo = [engine.generate([p], short)[0].token_ids for p in prompts[:4]]
    long_solo = engine.generate([long_prompt], SamplingParams(temperature=0, max_tokens=10))[0].token_ids

    rows = engine._rows(prompts[:4], short)
    for order, row in enumerate(rows, 1):
        row.order = order
    long_row = engine._rows([long_prompt], SamplingParams(temperature=0, max_tokens=10))[0]
    batch = _Batch(engine, slots=8)
    list(batch.admit_all(rows))
    for _ in range(5):
        batch.step()
    batch.start_filling(long_row)
    assert batch.fill(PREFILL_CHUNK) is None  # one chunk in, one to go
    slots, positions = batch.needs()
    engine.kv_cells = (slots - 2) * positions  # two rows too many: the two latest go
    aside = batch.set_aside()
    assert [row.order for row, _ in aside] == [4, 3] and batch.size == 3 and batch.filling is long_row
    engine.kv_cells = None
    assert batch.cache is not None
    with torch.inference_mode():  # a free slot may hold anything: what was moved out of it is not there
        for k, v in batch.cache.layers:
            k[batch.size:] = 3.0
            v[batch.size:] = -3.0
    batch.step()  # the two left decode while the others wait
    for row, saved in aside:
        batch.restore(row, saved)
    assert batch.fill(PREFILL_CHUNK) is not None  # the long prompt's first token: it joins the decoding rows
    while batch.rows:
        batch.step()
    assert [row.tokens for row in rows] == solo and long_row.tokens == long_solo
