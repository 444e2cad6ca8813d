"""Continuous batching: requests submitted to one engine decode together, each as if it were alone."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import torch

from mixtral_client._config import resolve_config
from mixtral_client._exceptions import ConfigurationError
from mixtral_client._request import ChatRequest
from mixtral_local.backend import AsyncLocalBackend, LocalBackend, clear_engine_cache
from mixtral_local.engine import Engine, KVCache, SamplingParams, Ticket
from mixtral_local.engine import scheduler as scheduler_module
from mixtral_local.engine.engine import _MIN_LENGTH, _Batch, prefill_groups
from mixtral_local.loader import load_model
from mixtral_local.tokenizer import MixtralTokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12)
LONG = 400  # tokens: a request that is surely still running a moment later
HELLO_N = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture
def engine(tiny_dir: Path, tokenizer: MixtralTokenizer) -> Engine:
    """A fresh engine per test (its scheduler's step counter starts at 0)."""
    return Engine(load_model(tiny_dir, dtype="float32", device="cpu"), tokenizer, max_batch=8)


@pytest.fixture(scope="module")
def prompts(tokenizer: MixtralTokenizer) -> list[list[int]]:
    texts = ("Hello!", "Write a long poem about the sea and its moods, please.", "Why?", "Count to ten.",
             "Name three rivers in Europe and say which is longest.")
    return [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in texts]


@contextmanager
def held(engine: Engine) -> Iterator[None]:
    """Hold the scheduler while submitting, so every request is waiting when its thread first looks."""
    with engine.scheduler._cond:
        yield


@contextmanager
def batch_sizes(engine: Engine) -> Iterator[list[int]]:
    """The batch size of every forward pass of the model."""
    sizes: list[int] = []
    handle = engine.model.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    try:
        yield sizes
    finally:
        handle.remove()


def tokens(ticket: Ticket) -> list[int]:
    deltas = list(ticket)
    assert deltas[-1].finish_reason is not None
    return list(ticket.row.tokens)


def alone(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return engine.generate([prompt], params)[0].token_ids


def no_batch_thread(engine: Engine, timeout: float = 5.0) -> bool:
    """The engine's batch thread has ended (or never started) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        thread = engine.scheduler._last
        if thread is None or not thread.is_alive():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(autouse=True)
def threads_end_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests watch the batch thread end when its work does: no waiting for more (``IDLE_S``), except
    in the tests of that wait, which set it themselves."""
    monkeypatch.setattr(scheduler_module, "IDLE_S", 0.0)


def test_concurrent_requests_decode_together_and_give_the_tokens_they_give_alone(
        engine: Engine, prompts: list[list[int]]) -> None:
    params = [GREEDY, SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=12), GREEDY,
              SamplingParams(temperature=0.7, top_k=40, seed=6, max_tokens=9), GREEDY]
    expected = [alone(engine, p, q) for p, q in zip(prompts, params, strict=True)]
    with batch_sizes(engine) as sizes:
        with held(engine):
            tickets = [engine.submit(p, q) for p, q in zip(prompts, params, strict=True)]
        got = [tokens(t) for t in tickets]
    assert got == expected
    decode_tokens = sum(len(t) - 1 for t in got)  # one forward pass each if every request ran alone
    assert engine.scheduler.steps < decode_tokens
    assert max(sizes) == len(prompts)  # all five rows in one decode step


def test_a_request_joins_a_batch_that_is_already_decoding(engine: Engine, prompts: list[list[int]]) -> None:
    long = SamplingParams(temperature=0, max_tokens=LONG)  # long enough to be running when the second comes
    expected = [alone(engine, prompts[1], long), alone(engine, prompts[0])]
    first = engine.submit(prompts[1], long)
    early = [first.get(timeout=10) for _ in range(5)]  # it is decoding, alone
    assert all(d.finish_reason is None for d in early)
    with batch_sizes(engine) as sizes:
        second = engine.submit(prompts[0], GREEDY)
        rest = list(first)
        got_second = tokens(second)
    assert list(first.row.tokens) == expected[0] and got_second == expected[1]
    assert rest[-1].finish_reason == "length"
    assert 2 in sizes  # the newcomer decoded beside the running request


def test_a_finished_row_leaves_its_slot_to_the_last_row(engine: Engine, prompts: list[list[int]]) -> None:
    params = [SamplingParams(temperature=0, max_tokens=2), SamplingParams(temperature=0, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=0, max_tokens=25)]
    expected = [alone(engine, p, q) for p, q in zip(prompts[:4], params, strict=True)]
    with batch_sizes(engine) as sizes:
        with held(engine):
            tickets = [engine.submit(p, q) for p, q in zip(prompts[:4], params, strict=True)]
        got = [tokens(t) for t in tickets]
    assert got == expected
    assert sizes[0] == 4  # one prefill pass for the four prompts
    decode = sizes[1:]
    assert decode[0] == 4 and 2 in decode and decode[-1] == 1  # the batch shrinks as rows finish


def test_cancelling_one_request_leaves_the_others_untouched(engine: Engine, prompts: list[list[int]]) -> None:
    params = [SamplingParams(temperature=0, max_tokens=60), SamplingParams(temperature=0, max_tokens=LONG),
              SamplingParams(temperature=0, max_tokens=60)]
    expected = [alone(engine, p, q) for p, q in zip(prompts[:3], params, strict=True)]
    with held(engine):
        tickets = [engine.submit(p, q) for p, q in zip(prompts[:3], params, strict=True)]
    for _ in range(4):
        tickets[1].get(timeout=10)
    tickets[1].cancel()
    assert tokens(tickets[0]) == expected[0] and tokens(tickets[2]) == expected[2]
    assert len(tickets[1].row.tokens) < LONG  # it stopped early


def test_breaking_out_of_a_ticket_cancels_it(engine: Engine, prompts: list[list[int]]) -> None:
    ticket = engine.submit(prompts[0], SamplingParams(temperature=0, max_tokens=LONG))
    for i, _ in enumerate(ticket):
        if i == 2:
            break
    assert ticket.cancelled
    assert no_batch_thread(engine)
    assert len(ticket.row.tokens) < LONG


def test_max_batch_bounds_the_rows_of_a_step_and_the_rest_wait(tiny_dir: Path, tokenizer: MixtralTokenizer,
                                                               prompts: list[list[int]]) -> None:
    engine = Engine(load_model(tiny_dir, dtype="float32", device="cpu"), tokenizer, max_batch=2)
    expected = [alone(engine, p) for p in prompts]
    with batch_sizes(engine) as sizes:
        with held(engine):
            tickets = [engine.submit(p, GREEDY) for p in prompts]
        got = [tokens(t) for t in tickets]
    assert got == expected
    assert max(sizes) == 2


def test_the_thread_ends_when_the_work_does_and_a_new_request_starts_it_again(
        engine: Engine, prompts: list[list[int]]) -> None:
    assert tokens(engine.submit(prompts[0], GREEDY)) == alone(engine, prompts[0])
    assert no_batch_thread(engine)
    assert tokens(engine.submit(prompts[2], GREEDY)) == alone(engine, prompts[2])
    assert no_batch_thread(engine)


def test_a_failed_step_fails_every_request_in_it_and_the_next_ones_are_served(
        engine: Engine, prompts: list[list[int]]) -> None:
    def fail_on_a_batch(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")

    handle = engine.model.register_forward_pre_hook(fail_on_a_batch)
    try:
        with held(engine):
            tickets = [engine.submit(p, GREEDY) for p in prompts[:3]]
        for ticket in tickets:
            with pytest.raises(RuntimeError, match="simulated"):
                list(ticket)
    finally:
        handle.remove()
    assert tokens(engine.submit(prompts[0], GREEDY)) == alone(engine, prompts[0])


def test_if_the_scheduler_itself_breaks_every_request_gets_the_error_and_the_next_one_a_new_thread(
        engine: Engine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    long = SamplingParams(temperature=0, max_tokens=LONG)
    with held(engine):
        tickets = [engine.submit(p, long) for p in prompts[:2]]
    tickets[0].get(timeout=10)
    monkeypatch.setattr(_Batch, "drop", lambda *_: (_ for _ in ()).throw(RuntimeError("broken (simulated)")))
    tickets[0].cancel()  # the scheduler drops it between two steps, outside any step: the drop breaks
    with pytest.raises(RuntimeError, match="simulated"):
        list(tickets[1])
    assert no_batch_thread(engine)
    assert "the batch scheduler stopped" in caplog.text
    monkeypatch.undo()
    assert tokens(engine.submit(prompts[2], GREEDY)) == alone(engine, prompts[2])


def test_a_failed_prefill_fails_only_its_own_request(engine: Engine, prompts: list[list[int]]) -> None:
    bad_length = len(prompts[1])

    def fail_on_that_prompt(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].shape[1] == bad_length:
            raise RuntimeError("prefill failed (simulated)")

    handle = engine.model.register_forward_pre_hook(fail_on_that_prompt)
    try:
        with held(engine):
            tickets = [engine.submit(p, GREEDY) for p in prompts[:3]]
        with pytest.raises(RuntimeError, match="simulated"):
            list(tickets[1])
        assert tokens(tickets[0]) == alone(engine, prompts[0])
        assert tokens(tickets[2]) == alone(engine, prompts[2])
    finally:
        handle.remove()


def test_requests_arriving_together_are_prefilled_in_one_pass(engine: Engine, prompts: list[list[int]]) -> None:
    with batch_sizes(engine) as sizes:
        with held(engine):
            tickets = [engine.submit(p, GREEDY) for p in prompts]
        firsts = [t.get(timeout=10) for t in tickets]
        assert sizes[0] == len(prompts) and len(sizes) <= 2  # one prefill, at most one step since
        for t in tickets:
            list(t)
    assert all(d.completion_tokens == 1 for d in firsts)


def test_padded_prompts_prefilled_together_give_each_rows_own_logits(engine: Engine) -> None:
    model = engine.model
    a, b = torch.randint(0, 32000, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ids = torch.stack([a, torch.cat([b[:5], torch.zeros(4, dtype=torch.long)])])  # b is 5 long, padded
        cache = [(torch.zeros(2, 2, 16, 16), torch.zeros(2, 2, 16, 16)) for _ in model.layers]
        both = model(ids, torch.arange(9).expand(2, 9), cache, 9, last=torch.tensor([8, 4]))
        assert torch.allclose(both[0, 0], model(a[None])[0, -1], atol=1e-5)
        assert torch.allclose(both[1, 0], model(b[None, :5])[0, -1], atol=1e-5)
        # the next step of the shorter row attends over its own 5 positions, not the pads beyond them
        step = model(torch.stack([a[:1], b[5:6]]), torch.tensor([[9], [5]]), cache)
        assert torch.allclose(step[1, 0], model(b[None, :6])[0, -1], atol=1e-5)


def test_prefill_groups_keep_the_order_and_the_padded_token_budget() -> None:
    lengths = [100, 300, 50, 2000, 2000, 5000, 10]
    rows: Any = [SimpleNamespace(prompt=[1] * n, cached=0) for n in lengths]  # only the prompts (and no cached prefix) matter here
    groups = prefill_groups(rows, budget=4096)
    assert [r for g in groups for r in g] == rows
    assert [[len(r.prompt) for r in g] for g in groups] == [[100, 300, 50], [2000, 2000], [5000], [10]]
    assert all(len(g) * max(len(r.prompt) for r in g) <= 4096 for g in groups if len(g) > 1)


def test_a_refused_prompt_raises_in_the_callers_thread(engine: Engine) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, 10**6], GREEDY)
    assert no_batch_thread(engine, timeout=0.5)


def test_the_cache_holds_the_positions_reached_not_the_whole_budget(engine: Engine,
                                                                    prompts: list[list[int]]) -> None:
    context = engine.context
    assert context >= 4 * _MIN_LENGTH  # the tiny model's context is large enough to tell the two apart
    batch = _Batch(engine, slots=4)
    for prompt in prompts[:2]:
        row = engine._rows([prompt], SamplingParams(temperature=0))[0]  # may generate to the end of the context
        assert row.max_new == context - len(prompt)
        batch.admit([row])
    assert batch.cache is not None
    assert batch.cache.length == _MIN_LENGTH and batch.cache.batch == 2
    while batch.rows and len(batch.rows[0].tokens) < _MIN_LENGTH + 5:
        batch.step()
    assert batch.cache.length == 2 * _MIN_LENGTH


def test_kv_cache_reserve_keeps_what_is_cached_and_move_copies_a_slot(engine: Engine) -> None:
    config = engine.model.config
    cache = KVCache(config, 2, 8, dtype=torch.float32, device=torch.device("cpu"))
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    cache.reserve(3, 20)
    assert (cache.batch, cache.length) == (3, 20)
    for (k, v), (k0, v0) in zip(cache.layers, before, strict=True):
        assert k.shape == (3, config.num_key_value_heads, 20, config.head_dim)
        assert torch.equal(k[:2, :, :8], k0) and torch.equal(v[:2, :, :8], v0)
        assert not k[2].any() and not k[:, :, 8:].any()  # new room is zeroed
    cache.reserve(1, 4)  # never shrinks
    assert (cache.batch, cache.length) == (3, 20)
    cache.move(1, 0, 5)
    for (k, _), (k0, _) in zip(cache.layers, before, strict=True):
        assert torch.equal(k[0, :, :5], k0[1, :, :5]) and torch.equal(k[0, :, 5:8], k0[0, :, 5:8])


# the backends: many callers, one batch


def _requests(make_request: Any, n: int, *, stream: bool) -> list[ChatRequest]:
    return [make_request([{"role": "user", "content": f"Question number {i}?"}], stream=stream, temperature=0,
                         max_tokens=10) for i in range(n)]


def test_sync_callers_in_threads_share_one_batch(tiny_dir: Path, make_request: Any) -> None:
    clear_engine_cache()
    config = resolve_config({}, provider="local", model_path=str(tiny_dir),
                            local_options={"dtype": "float32", "device": "cpu", "max_batch": 8})
    backend = LocalBackend(config)
    requests = _requests(make_request, 6, stream=False)
    expected = [backend.complete(r).choices[0].message.content for r in requests]
    results: list[str | None] = [None] * len(requests)
    with batch_sizes(backend._core.engine) as sizes:
        barrier = threading.Barrier(len(requests))

        def call(i: int) -> None:
            barrier.wait()
            results[i] = backend.complete(requests[i]).choices[0].message.content

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results == expected
    assert max(sizes) > 1


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_many_async_streams_share_one_batch_and_hold_no_thread(tiny_dir: Path, make_request: Any) -> None:
    clear_engine_cache()
    config = resolve_config({}, provider="local", model_path=str(tiny_dir),
                            local_options={"dtype": "float32", "device": "cpu", "max_batch": 64})
    backend = AsyncLocalBackend(config)
    requests = _requests(make_request, 48, stream=True)  # more than anyio's 40 worker threads
    expected = ["".join(c.choices[0].delta.content or "" for c in LocalBackend(config).stream(r))
                for r in requests[:4]]
    texts: list[str] = [""] * len(requests)
    peak_threads = 0

    async def consume(i: int) -> None:
        nonlocal peak_threads
        async for chunk in backend.stream(requests[i]):
            texts[i] += chunk.choices[0].delta.content or ""
            peak_threads = max(peak_threads, threading.active_count())

    with batch_sizes(backend._core.engine) as sizes:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(len(requests)):
                    tg.start_soon(consume, i)
    assert texts[:4] == expected and all(texts)
    assert max(sizes) > 8  # streams decoded together
    assert peak_threads < len(requests)  # waiting streams hold no worker thread


@pytest.mark.parametrize("value", [0, -1, 2.5, "8", True])
def test_a_bad_max_batch_is_a_configuration_error(tiny_dir: Path, value: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_batch must be an integer >= 1"):
        LocalBackend(resolve_config({}, provider="local", model_path=str(tiny_dir),
                                    local_options={"device": "cpu", "max_batch": value}))


def test_clients_sharing_an_engine_get_the_largest_max_batch(tiny_dir: Path, make_request: Any) -> None:
    clear_engine_cache()

    def backend(max_batch: int) -> LocalBackend:
        return LocalBackend(resolve_config({}, provider="local", model_path=str(tiny_dir),
                                           local_options={"dtype": "float32", "device": "cpu",
                                                          "max_batch": max_batch}))

    small, large = backend(2), backend(12)
    assert small._core.engine is large._core.engine
    assert small._core.engine.scheduler.max_rows == 12
    assert backend(4)._core.engine.scheduler.max_rows == 12


def test_shutdown_fails_running_requests_and_refuses_new_ones(engine: Engine, prompts: list[list[int]]) -> None:
    ticket = engine.submit(prompts[0], SamplingParams(temperature=0, max_tokens=LONG))
    ticket.get(timeout=10)
    engine.scheduler.shutdown(timeout=10)
    assert no_batch_thread(engine, timeout=0.5)
    with pytest.raises(RuntimeError, match="shut down"):
        list(ticket)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(prompts[1], GREEDY)


def test_shutdown_waits_for_a_thread_that_is_over_but_still_unwinding(
        engine: Engine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_local.engine import Scheduler

    original = Scheduler._take_waiting

    def slow_to_end(self: Scheduler, *args: Any) -> list[Ticket] | None:
        taken = original(self, *args)
        if taken is None:
            time.sleep(0.3)  # over, but its thread has not ended yet (freeing a large KV cache, say)
        return taken

    monkeypatch.setattr(Scheduler, "_take_waiting", slow_to_end)
    tokens(engine.submit(prompts[0], GREEDY))
    time.sleep(0.05)  # the thread has given up its place and is unwinding
    engine.scheduler.shutdown(timeout=10)
    assert not engine.scheduler._last.is_alive()


EXIT_WITH_A_STREAM_OPEN = """
import sys
from mixtral_client import MixtralClient
client = MixtralClient(provider="local", model_path=sys.argv[1], local_options={"device": "cpu"})
stream = iter(client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True,
                                             max_tokens=1000))
next(stream), next(stream)
print("leaving with a stream open")
"""


EXIT_RIGHT_AFTER_THE_ANSWERS = """
import sys
from mixtral_client import MixtralClient
client = MixtralClient(provider="local", model_path=sys.argv[1], local_options={"device": "cpu"})
text = " ".join(f"item {i} is a small stone on a long road;" for i in range(60))
for _ in range(3):
    client.chat.completions.create(messages=[{"role": "user", "content": text}], max_tokens=3)
print("leaving right after the answers")
"""


@pytest.mark.parametrize(("script", "attempt"), [*((EXIT_WITH_A_STREAM_OPEN, i) for i in range(3)),
                                                 *((EXIT_RIGHT_AFTER_THE_ANSWERS, i) for i in range(2))])
def test_a_process_that_exits_while_the_scheduler_thread_runs_exits_cleanly(tiny_dir: Path, script: str,
                                                                          attempt: int) -> None:
    # a daemon thread still inside torch when the interpreter ends aborts the process ("terminate called without
    # an active exception", exit status 134): with a stream open (the thread is mid-step) and right after the
    # last answer (the thread is unwinding, freeing its KV cache). The atexit hook stops and joins it first.
    done = subprocess.run([sys.executable, "-c", script, str(tiny_dir)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "leaving" in done.stdout and "terminate" not in done.stderr


def test_a_request_that_comes_while_the_thread_waits_is_served_by_that_thread(
        engine: Engine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "IDLE_S", 30.0)
    assert tokens(engine.submit(prompts[0], GREEDY)) == alone(engine, prompts[0])
    first = engine.scheduler._last
    time.sleep(0.2)  # nothing left to do: the thread waits
    assert first is not None and first.is_alive() and not engine.scheduler._waiting
    assert tokens(engine.submit(prompts[2], GREEDY)) == alone(engine, prompts[2])
    assert engine.scheduler._last is first  # no new thread
    started = time.monotonic()
    engine.scheduler.shutdown(timeout=10)
    assert not first.is_alive() and time.monotonic() - started < 5  # shutdown wakes it: no 30 s wait


def test_the_waiting_thread_ends_after_idle_s_and_the_next_request_starts_another(
        engine: Engine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "IDLE_S", 0.3)
    assert tokens(engine.submit(prompts[0], GREEDY)) == alone(engine, prompts[0])
    first = engine.scheduler._last
    assert no_batch_thread(engine, timeout=5) and engine.scheduler._thread is None
    assert tokens(engine.submit(prompts[2], GREEDY)) == alone(engine, prompts[2])
    assert engine.scheduler._last is not first


def test_the_waiting_thread_holds_neither_the_engine_nor_its_kv_cache(
        tiny_dir: Path, tokenizer: MixtralTokenizer, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import weakref

    monkeypatch.setattr(scheduler_module, "IDLE_S", 30.0)
    engine = Engine(load_model(tiny_dir, dtype="float32", device="cpu"), tokenizer)
    tokens(engine.submit(prompts[0], GREEDY))
    thread, gone = engine.scheduler._last, weakref.ref(engine)
    time.sleep(0.2)
    assert thread is not None and thread.is_alive()
    del engine
    gc.collect()
    assert gone() is None  # collected while its thread waited (a batch, with its KV cache, holds its engine)
    thread.join(5)
    assert not thread.is_alive()  # and the thread ended with it, long before IDLE_S


EXIT_WHILE_THE_THREAD_WAITS = """
import sys
from mixtral_client import MixtralClient
client = MixtralClient(provider="local", model_path=sys.argv[1], local_options={"device": "cpu"})
client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
print("leaving while the batch thread waits for work", flush=True)
"""


def test_a_process_whose_batch_thread_waits_for_work_exits_at_once(tiny_dir: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", EXIT_WHILE_THE_THREAD_WAITS, str(tiny_dir)], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and "leaving" in proc.stdout.readline()
        left = time.monotonic()
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    assert time.monotonic() - left < 2.5  # the atexit hook woke it: it did not wait out IDLE_S (30 s)


# n > 1: one row per choice, in the running batch


def test_n_choices_decode_together_and_choice_i_is_the_request_with_seed_plus_i(
        tiny_dir: Path, make_request: Any) -> None:
    clear_engine_cache()
    config = resolve_config({}, provider="local", model_path=str(tiny_dir),
                            local_options={"dtype": "float32", "device": "cpu"})
    backend = LocalBackend(config)
    sampled = {"temperature": 0.9, "top_p": 0.95, "max_tokens": 10}
    with batch_sizes(backend._core.engine) as sizes:
        done = backend.complete(make_request(HELLO_N, n=3, seed=40, **sampled))
    assert [c.index for c in done.choices] == [0, 1, 2]
    alone = [backend.complete(make_request(HELLO_N, seed=40 + i, **sampled)).choices[0].message.content
             for i in range(3)]
    assert [c.message.content for c in done.choices] == alone
    assert len(set(alone)) > 1  # different seeds, different samples
    assert max(sizes) == 3  # the three choices shared their steps
    assert done.usage is not None
    singles = [backend.complete(make_request(HELLO_N, seed=40 + i, **sampled)).usage for i in range(3)]
    assert done.usage.prompt_tokens == singles[0].prompt_tokens  # the prompt counts once
    assert done.usage.completion_tokens == sum(u.completion_tokens for u in singles)


def test_a_stream_of_n_choices_adds_up_to_the_completion_and_ends_with_usage(
        tiny_dir: Path, make_request: Any) -> None:
    config = resolve_config({}, provider="local", model_path=str(tiny_dir),
                            local_options={"dtype": "float32", "device": "cpu"})
    backend = LocalBackend(config)
    request = make_request(HELLO_N, stream=True, n=2, temperature=0.8, seed=3,
                           max_tokens=8)
    chunks = list(backend.stream(request))
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # OpenAI's shape for n > 1
    assert all(c.usage is None for c in chunks[:-1])
    assert set(finishes) == {0, 1}
    done = backend.complete(make_request(HELLO_N, n=2, temperature=0.8, seed=3, max_tokens=8))
    assert [c.message.content for c in done.choices] == [texts[0], texts[1]]


@pytest.mark.anyio
async def test_async_n_choices_equal_sync(tiny_dir: Path, make_request: Any) -> None:
    config = resolve_config({}, provider="local", model_path=str(tiny_dir),
                            local_options={"dtype": "float32", "device": "cpu"})
    request = make_request(HELLO_N, n=3, temperature=0.7, seed=11, max_tokens=9)
    async_done = await AsyncLocalBackend(config).complete(request)
    sync_done = LocalBackend(config).complete(request)
    assert [c.message for c in async_done.choices] == [c.message for c in sync_done.choices]
    assert async_done.usage == sync_done.usage


def test_n_beyond_the_local_limit_is_refused_before_anything_runs(make_request: Any) -> None:
    from mixtral_client._exceptions import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="n"):
        make_request(HELLO_N, n=65)


# long prompts: prefilled a chunk at a time between decode steps


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    from mixtral_local.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 64)
    return 64


@pytest.fixture(scope="module")
def long_prompt(tokenizer: MixtralTokenizer) -> list[int]:
    text = " ".join(f"item {i} is a small stone on a long road;" for i in range(30))
    prompt = tokenizer.encode_chat([{"role": "user", "content": text}])
    assert 4 * 64 < len(prompt) < 600
    return prompt


def forwards(engine: Engine) -> Any:
    """Records (rows, tokens, first position) of every forward pass."""
    calls: list[tuple[int, int, int]] = []

    def record(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        ids, positions = args[0], args[1] if len(args) > 1 else None
        calls.append((int(ids.shape[0]), int(ids.shape[1]), int(positions[0, 0]) if positions is not None else 0))

    return calls, engine.model.register_forward_pre_hook(record)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(
        engine: Engine, prompts: list[list[int]], long_prompt: list[int], small_chunks: int) -> None:
    short = SamplingParams(temperature=0, max_tokens=40)
    expected = [alone(engine, prompts[0], short), alone(engine, long_prompt)]
    engine.prefix_cache.clear()  # else the long prompt's own keys and values are reused, and nothing is chunked
    calls, hook = forwards(engine)
    try:
        with held(engine):
            tickets = [engine.submit(prompts[0], short), engine.submit(long_prompt, GREEDY)]
        got = [tokens(t) for t in tickets]
    finally:
        hook.remove()
    assert got == expected  # a prompt prefilled in chunks gives the tokens of one prefilled whole
    chunks = [i for i, (_, n, start) in enumerate(calls) if n > 1 and (n == small_chunks or start > 0)]
    starts = [calls[i][2] for i in chunks]
    assert starts == list(range(0, len(long_prompt), small_chunks))  # 64 tokens a pass, in order
    assert sum(calls[i][1] for i in chunks) == len(long_prompt)
    between = calls[chunks[0]:chunks[-1]]
    assert sum(1 for rows, n, _ in between if (rows, n) == (1, 1)) >= len(chunks) - 1  # a step after each


def test_rows_come_and_go_while_a_long_prompt_is_filling(
        engine: Engine, prompts: list[list[int]], long_prompt: list[int], small_chunks: int) -> None:
    """A short request finishing (the filling row moves down a slot) and one arriving (it moves up) while the
    long prompt is half prefilled: everyone still gets the tokens they get alone."""
    quick, later = SamplingParams(temperature=0, max_tokens=2), SamplingParams(temperature=0, max_tokens=15)
    expected = [alone(engine, prompts[0], quick), alone(engine, long_prompt), alone(engine, prompts[2], later)]
    engine.prefix_cache.clear()
    submitted: list[Ticket] = []

    def submit_during_the_second_chunk(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        if not submitted[2:] and args[0].shape[1] > 1 and int(args[1][0, 0]) == small_chunks:
            submitted.append(engine.submit(prompts[2], later))  # from the scheduler's own thread: queued

    hook = engine.model.register_forward_pre_hook(submit_during_the_second_chunk)
    try:
        with held(engine):
            submitted.extend([engine.submit(prompts[0], quick), engine.submit(long_prompt, GREEDY)])
        got = [tokens(t) for t in submitted[:2]]
        while len(submitted) < 3:
            time.sleep(0.01)
        got.append(tokens(submitted[2]))
    finally:
        hook.remove()
    assert got == expected


def test_cancelling_a_filling_prompt_frees_its_slot(engine: Engine, prompts: list[list[int]],
                                                   long_prompt: list[int], small_chunks: int) -> None:
    with held(engine):
        running = engine.submit(prompts[0], SamplingParams(temperature=0, max_tokens=60))
        filling = engine.submit(long_prompt, GREEDY)
    filling.cancel()
    assert tokens(running) == alone(engine, prompts[0], SamplingParams(temperature=0, max_tokens=60))
    assert no_batch_thread(engine)
    assert filling.row.tokens == [] or len(filling.row.tokens) < GREEDY.max_tokens


def test_stats_show_what_the_batch_is_doing(engine: Engine, prompts: list[list[int]]) -> None:
    assert engine.stats() | {"prefix_cache_tokens": 0} == {
        "decoding": 0, "prefilling": 0, "set_aside": 0, "waiting": 0, "kv_cache_bytes": 0, "max_batch": 8,
        "kv_cache_bound_bytes": None, "prefix_cache_tokens": 0, "decode_steps": 0}
    tickets = [engine.submit(p, SamplingParams(temperature=0, max_tokens=LONG)) for p in prompts[:3]]
    for ticket in tickets:
        ticket.get(timeout=10)
    deadline = time.monotonic() + 5
    while engine.stats()["decoding"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    busy = engine.stats()
    assert busy["decoding"] == 3 and busy["kv_cache_bytes"] > 0 and busy["decode_steps"] > 0
    for ticket in tickets:
        ticket.cancel()
    deadline = time.monotonic() + 5
    while engine.stats()["decoding"] and time.monotonic() < deadline:
        time.sleep(0.01)
    idle = engine.stats()
    assert (idle["decoding"], idle["kv_cache_bytes"]) == (0, 0)
