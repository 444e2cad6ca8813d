"""LocalBackend / AsyncLocalBackend: requests in, ChatCompletion and chunks out."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from mixtral_client._backends.base import AsyncBackend, SyncBackend
from mixtral_client._config import ClientConfig, resolve_config
from mixtral_client._exceptions import ConfigurationError, InvalidRequestError
from mixtral_client._request import ChatRequest
from mixtral_client.types import ChatCompletion
from mixtral_local.backend import AsyncLocalBackend, LocalBackend
from mixtral_local.config import CheckpointError
from mixtral_local.tokenizer import MixtralTokenizer
from tests.slow_load import interrupted

HELLO = [{"role": "user", "content": "Hello, who are you?"}]
MakeRequest = Callable[..., ChatRequest]


@pytest.fixture(scope="module")
def backend(local_config: ClientConfig) -> LocalBackend:
    return LocalBackend(local_config)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_backends_implement_the_protocols(local_config: ClientConfig) -> None:
    assert isinstance(LocalBackend(local_config), SyncBackend)
    assert isinstance(AsyncLocalBackend(local_config), AsyncBackend)


def test_complete_returns_a_chat_completion_with_real_usage(backend: LocalBackend, make_request: MakeRequest,
                                                            tokenizer: MixtralTokenizer) -> None:
    done = backend.complete(make_request(HELLO, temperature=0, max_tokens=7))
    assert isinstance(done, ChatCompletion) and done.id.startswith("chatcmpl-local-")
    assert done.model == "mixtral-local" and done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(tokenizer.encode_chat(HELLO)), 7)
    assert done.usage.total_tokens == done.usage.prompt_tokens + 7


def test_stream_adds_up_to_the_completion(backend: LocalBackend, make_request: MakeRequest) -> None:
    params = {"temperature": 0.7, "seed": 3, "max_tokens": 12}
    chunks = list(backend.stream(make_request(HELLO, stream=True, **params)))
    done = backend.complete(make_request(HELLO, **params))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == done.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage == done.usage
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_stop_is_honoured(backend: LocalBackend, make_request: MakeRequest) -> None:
    free = backend.complete(make_request(HELLO, temperature=0, max_tokens=12)).choices[0].message.content
    assert free
    stop = free[3:5]
    done = backend.complete(make_request(HELLO, temperature=0, max_tokens=12, stop=[stop, "zzz"]))
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.content == free[:free.index(stop)]


def test_top_k_comes_through_extra_body(backend: LocalBackend, make_request: MakeRequest) -> None:
    greedy = backend.complete(make_request(HELLO, temperature=0, max_tokens=6)).choices[0].message.content
    top1 = backend.complete(make_request(HELLO, temperature=1.5, max_tokens=6, extra_body={"top_k": 1}))
    assert top1.choices[0].message.content == greedy


def test_min_p_of_one_keeps_only_the_most_likely_token(backend: LocalBackend, make_request: MakeRequest) -> None:
    greedy = backend.complete(make_request(HELLO, temperature=0, max_tokens=6)).choices[0].message.content
    sampled = backend.complete(make_request(HELLO, temperature=1.5, seed=3, max_tokens=6, extra_body={"min_p": 1}))
    loose = backend.complete(make_request(HELLO, temperature=1.5, seed=3, max_tokens=6, extra_body={"min_p": 0}))
    assert sampled.choices[0].message.content == greedy != loose.choices[0].message.content


def test_repetition_penalty_changes_a_greedy_answer(backend: LocalBackend, make_request: MakeRequest) -> None:
    greedy = backend.complete(make_request(HELLO, temperature=0, max_tokens=12)).choices[0].message.content
    penalized = backend.complete(make_request(HELLO, temperature=0, max_tokens=12,
                                              extra_body={"repetition_penalty": 0.5}))  # < 1: repeats favoured
    assert penalized.choices[0].message.content != greedy


@pytest.mark.parametrize(("extra", "param"), [
    ({"min_p": 1.5}, "min_p"), ({"min_p": "0.1"}, "min_p"), ({"min_p": True}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
])
def test_bad_min_p_and_repetition_penalty_are_refused(backend: LocalBackend, make_request: MakeRequest,
                                                      extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        backend.complete(make_request(HELLO, extra_body=extra))
    assert info.value.param == param


def test_unknown_extra_body_is_refused(backend: LocalBackend, make_request: MakeRequest) -> None:
    with pytest.raises(InvalidRequestError, match="top_a") as info:
        backend.complete(make_request(HELLO, extra_body={"top_a": 0.1}))
    assert "min_p, repetition_penalty, top_k" in str(info.value)


def test_too_long_a_prompt_is_refused_before_the_first_chunk(backend: LocalBackend,
                                                             make_request: MakeRequest) -> None:
    long = [{"role": "user", "content": "word " * 1100}]
    with pytest.raises(InvalidRequestError, match=r"the prompt is 11\d\d tokens; the model's context is 1024"):
        next(iter(backend.stream(make_request(long, stream=True))))


def test_unknown_local_option_is_a_configuration_error(tiny_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="dtipe"):
        resolve_config({}, provider="local", model_path=str(tiny_dir), local_options={"dtipe": "float32"})


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("MIXTRAL_LOCAL_QUANTIZE", "int4", "MIXTRAL_LOCAL_QUANTIZE: quantize must be None or 'int8', got 'int4'"),
    ("MIXTRAL_LOCAL_MAX_BATCH", "0", "MIXTRAL_LOCAL_MAX_BATCH: max_batch must be an integer >= 1, got 0"),
    ("MIXTRAL_LOCAL_DTYPE", "float8", "MIXTRAL_LOCAL_DTYPE: .*float8"),
    ("MIXTRAL_LOCAL_DEVICE", "tpu", "MIXTRAL_LOCAL_DEVICE: .*tpu"),
    ("MIXTRAL_LOCAL_MOE_BACKEND", "cutlass", "MIXTRAL_LOCAL_MOE_BACKEND: .*cutlass"),
])
def test_a_bad_local_variable_is_named_in_the_error(tiny_dir: Path, variable: str, value: str,
                                                    message: str) -> None:
    config = resolve_config({"MIXTRAL_MODEL_PATH": str(tiny_dir), variable: value})
    with pytest.raises(ConfigurationError, match=message):
        LocalBackend(config)


def test_broken_checkpoint_fails_at_construction(tmp_path: Path, tiny_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    config = resolve_config({}, provider="local", model_path=str(tmp_path))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LocalBackend(config)


def test_model_path_from_the_environment(tiny_dir: Path, make_request: MakeRequest) -> None:
    config = resolve_config({"MIXTRAL_MODEL_PATH": str(tiny_dir)}, local_options={"device": "cpu"})
    done = LocalBackend(config).complete(make_request(HELLO, temperature=0, max_tokens=2))
    assert done.usage is not None and done.usage.completion_tokens == 2


def test_backends_built_alike_share_one_engine(local_config: ClientConfig, make_request: MakeRequest) -> None:
    a, b = LocalBackend(local_config), LocalBackend(local_config)
    a.complete(make_request(HELLO, max_tokens=1))
    b.complete(make_request(HELLO, max_tokens=1))
    assert a._core.engine is b._core.engine


@pytest.mark.anyio
async def test_async_complete_equals_sync(local_config: ClientConfig, backend: LocalBackend,
                                          make_request: MakeRequest) -> None:
    request = make_request(HELLO, temperature=0.5, seed=9, max_tokens=8)
    done = await AsyncLocalBackend(local_config).complete(request)
    assert done.choices[0].message == backend.complete(request).choices[0].message


@pytest.mark.anyio
async def test_async_stream_equals_sync_stream(local_config: ClientConfig, backend: LocalBackend,
                                               make_request: MakeRequest) -> None:
    request = make_request(HELLO, stream=True, temperature=0, max_tokens=8)
    texts = [c.choices[0].delta.content async for c in AsyncLocalBackend(local_config).stream(request)]
    assert texts == [c.choices[0].delta.content for c in backend.stream(request)]


@pytest.mark.anyio
async def test_async_stream_does_not_block_the_event_loop(local_config: ClientConfig,
                                                          make_request: MakeRequest) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        stream = AsyncLocalBackend(local_config).stream(make_request(HELLO, stream=True, max_tokens=30))
        chunks = [c async for c in stream]
        tg.cancel_scope.cancel()
    assert len(chunks) > 2 and ticks >= len(chunks) // 2


def _counting(config: ClientConfig, make_request: MakeRequest) -> tuple[AsyncLocalBackend, list[float], Any]:
    """An async backend whose model records each forward pass (and the hook handle to remove)."""
    backend = AsyncLocalBackend(config)
    _ = backend._core.engine  # load now
    calls: list[float] = []
    handle = backend._core.engine.model.register_forward_hook(lambda *_: calls.append(time.monotonic()))
    return backend, calls, handle


async def _stops_running(calls: list[float]) -> bool:
    await anyio.sleep(0.3)  # the step in flight finishes
    before = len(calls)
    await anyio.sleep(0.3)
    return len(calls) == before


@pytest.mark.anyio
async def test_closing_an_async_stream_stops_generation(tiny_dir: Path, make_request: MakeRequest) -> None:
    config = resolve_config({}, provider="local", model_path=str(tiny_dir), local_options={"device": "cpu"})
    backend, calls, hook = _counting(config, make_request)
    try:
        stream = backend.stream(make_request(HELLO, stream=True, max_tokens=1000))
        async for _ in stream:
            if len(calls) >= 3:
                break
        await stream.aclose()
        assert await _stops_running(calls)
    finally:
        hook.remove()


@pytest.mark.anyio
async def test_cancelling_async_complete_stops_generation(tiny_dir: Path, make_request: MakeRequest) -> None:
    config = resolve_config({}, provider="local", model_path=str(tiny_dir), local_options={"device": "cpu"})
    backend, calls, hook = _counting(config, make_request)
    try:
        with anyio.move_on_after(0.3) as scope:
            await backend.complete(make_request(HELLO, max_tokens=1000))
        assert scope.cancelled_caught and calls  # it was generating
        assert await _stops_running(calls)
    finally:
        hook.remove()


def test_usage_counts_match_the_tokenizer(backend: LocalBackend, make_request: MakeRequest,
                                          tokenizer: MixtralTokenizer) -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be terse."}, *HELLO]
    done = backend.complete(make_request(messages, max_tokens=3))
    assert done.usage is not None and done.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    assert json.loads(done.model_dump_json())["object"] == "chat.completion"


def test_int8_experts_are_a_local_option(tiny_dir: Path, make_request: MakeRequest) -> None:
    config = resolve_config({}, provider="local", model_path=str(tiny_dir),
                            local_options={"device": "cpu", "quantize": "int8"})
    backend = LocalBackend(config)
    done = backend.complete(make_request(HELLO, temperature=0, max_tokens=3))
    assert done.usage is not None and done.usage.completion_tokens == 3
    moe = backend._core.engine.model.layers[0].moe
    assert moe.w13.dtype == torch.int8 and moe.w13_scale is not None
    # a float client of the same checkpoint gets its own weights and batch, not the int8 ones
    plain = LocalBackend(resolve_config({}, provider="local", model_path=str(tiny_dir),
                                        local_options={"device": "cpu"}))
    plain.complete(make_request(HELLO, temperature=0, max_tokens=1))
    assert plain._core.engine is not backend._core.engine
    assert plain._core.engine.model.layers[0].moe.w13.dtype == torch.float32


def test_int8_experts_from_the_environment_alone(tiny_dir: Path, make_request: MakeRequest) -> None:
    env = {"MIXTRAL_MODEL_PATH": str(tiny_dir), "MIXTRAL_LOCAL_QUANTIZE": "int8", "MIXTRAL_LOCAL_DEVICE": "cpu",
           "MIXTRAL_LOCAL_MAX_BATCH": "3"}
    backend = LocalBackend(resolve_config(env))
    done = backend.complete(make_request(HELLO, temperature=0, max_tokens=2))
    assert done.usage is not None and done.usage.completion_tokens >= 1
    engine = backend._core.engine
    assert engine.model.layers[0].moe.w13.dtype == torch.int8
    assert engine.scheduler.max_rows == 3


def test_unknown_quantize_is_a_configuration_error(tiny_dir: Path) -> None:
    config = resolve_config({}, provider="local", model_path=str(tiny_dir), local_options={"quantize": "int4"})
    with pytest.raises(ConfigurationError, match="quantize must be None or 'int8'"):
        LocalBackend(config)



def test_ctrl_c_during_the_load_stops_it_and_the_command_exits_130(tiny_dir: Path) -> None:
    code, seconds, out, err = interrupted("chat", "hi", "--model-path", str(tiny_dir), "--no-stream")
    assert code == 130, err[-2000:]
    assert seconds < 3  # the load stopped at its next tensor, not after all of them
    # the load stopped itself (and let go of its file) before the process went on to exit: no thread was left
    # inside torch, loading, at exit
    assert out.index("file closed by LoadCancelled") < out.index("exiting")
    assert out.count("reading") < 5


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_an_async_request_cancelled_during_the_load_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   anyio_backend: str) -> None:
    import threading

    from mixtral_client import AsyncMixtralClient
    from mixtral_local import loader as loader_module
    from mixtral_local.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "fresh", seed=3)  # a checkpoint no engine holds yet: it loads
    reads: list[str] = []
    closed_by: list[type | None] = []
    began = threading.Event()
    real_open = loader_module.safe_open

    class SlowOpen:  # 50 ms a tensor: the load takes seconds
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.file = real_open(*args, **kwargs)

        def __enter__(self) -> SlowOpen:
            self.file.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            closed_by.append(exc[0])
            return self.file.__exit__(*exc)

        def get_tensor(self, name: str) -> Any:
            reads.append(name)
            began.set()
            time.sleep(0.05)
            return self.file.get_tensor(name)

    monkeypatch.setattr(loader_module, "safe_open", SlowOpen)
    messages = [{"role": "user", "content": "Hi"}]
    async with AsyncMixtralClient(provider="local", model_path=str(path), env={},
                                  local_options={"dtype": "float32", "device": "cpu"}) as client:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: client.chat.completions.create(messages=messages, max_tokens=2))
            while not began.is_set():
                await anyio.sleep(0.01)
            tasks.cancel_scope.cancel()  # returns at once: the request does not wait for the load
        with anyio.fail_after(5):
            while not closed_by:
                await anyio.sleep(0.01)
        assert closed_by == [loader_module.LoadCancelled]  # the load stopped itself at its next tensor
        assert len(reads) < 5
        monkeypatch.setattr(loader_module, "safe_open", real_open)
        done = await client.chat.completions.create(messages=messages, max_tokens=2)  # the next one loads again
    assert done.usage is not None and done.usage.completion_tokens == 2
