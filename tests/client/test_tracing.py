"""OpenTelemetry spans (GenAI semantic conventions) for requests over the loopback server: whole answers,
streams read to the end or left early, failures after retries, sync and async."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mixtral_client import BadRequestError
from tests.client.conftest import Driver, chunk, completion, replying, streaming
from tests.loopback import in_turn, sse

trace_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

import mixtral_client._tracing as tracing  # noqa: E402


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A tracer of our own (no global provider is touched) that keeps finished spans in memory."""
    exporter = InMemorySpanExporter()
    provider = trace_sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def only(exporter: InMemorySpanExporter) -> Any:
    (span,) = exporter.get_finished_spans()
    return span


def test_a_whole_answer_is_one_client_span_with_the_request_and_the_answer(driver: Driver, serve, spans) -> None:
    server = serve(in_turn(replying(503, "busy", {"retry-after-ms": "10"}), replying(200, completion("Hi"))))

    driver.complete(server, temperature=0.3, max_tokens=50, top_p=0.9, seed=7, stop=["\n"],
                    extra_body={"top_k": 40})

    span = only(spans)
    assert span.name == "chat mistralai/Mixtral-8x7B-Instruct-v0.1" and span.kind == SpanKind.CLIENT
    attributes = dict(span.attributes)
    assert attributes == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "server.address": "127.0.0.1", "server.port": server.port,
        "gen_ai.request.max_tokens": 50, "gen_ai.request.temperature": 0.3, "gen_ai.request.top_p": 0.9,
        "gen_ai.request.seed": 7, "gen_ai.request.top_k": 40, "gen_ai.request.stop_sequences": ("\n",),
        "gen_ai.output.type": "text",
        "gen_ai.response.id": "chatcmpl-1", "gen_ai.response.model": "m", "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 2,
    }
    assert span.status.status_code == StatusCode.UNSET
    assert len(server.requests) == 2  # the retry happened inside the one span


def test_a_stream_span_ends_with_the_stream(driver: Driver, serve, spans) -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    body = sse(chunk("He", role="assistant"), chunk("llo"), chunk(finish="length"),
               {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                "usage": usage})
    server = serve(streaming(body))

    driver.text(server, stream_options={"include_usage": True})

    span = only(spans)
    assert span.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert (span.attributes["gen_ai.usage.input_tokens"], span.attributes["gen_ai.usage.output_tokens"]) == (4, 2)


def test_a_stream_left_early_ends_its_span_too(serve, spans) -> None:
    from mixtral_client import MixtralClient

    server = serve(streaming(sse(*(chunk(str(i)) for i in range(20)), chunk(finish="stop"))))
    with MixtralClient(base_url=server.url, api_key="k") as client:
        with client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True) as stream:
            chunks = iter(stream)
            next(chunks)
            assert spans.get_finished_spans() == ()  # still open while the stream is
    span = only(spans)
    assert span.status.status_code == StatusCode.UNSET and "gen_ai.response.finish_reasons" not in span.attributes


def test_a_failure_sets_the_error_status_and_type(driver: Driver, serve, spans) -> None:
    server = serve(replying(400, {"error": {"message": "bad stop"}}))

    with pytest.raises(BadRequestError):
        driver.complete(server)

    span = only(spans)
    assert span.status.status_code == StatusCode.ERROR and "bad stop" in span.status.description
    assert span.attributes["error.type"] == "BadRequestError"


def test_prompted_tools_report_the_callers_finish_reason(serve, spans) -> None:
    """The span sees the answer as the caller does: a prompted call ends in tool_calls."""
    server = serve(replying(200, completion('[TOOL_CALLS] [{"name": "f", "arguments": {}}]')))

    Driver("sync").complete(server, client={"provider": "nvidia"}, tools=[{"type": "function", "function": {"name": "f"}}],
                            response_format={"type": "json_object"})

    span = only(spans)
    assert span.attributes["gen_ai.provider.name"] == "nvidia"
    assert span.attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert span.attributes["gen_ai.output.type"] == "json"


def test_the_http_spans_of_an_instrumented_client_nest_under_the_request(serve, spans) -> None:
    """The span is current while sending: what httpx's event hooks see runs inside it."""
    import httpx
    from opentelemetry import trace

    from mixtral_client import MixtralClient

    seen: list[Any] = []
    server = serve(replying(200, completion()))
    http = httpx.Client(event_hooks={"request": [lambda request: seen.append(trace.get_current_span())]})
    with http, MixtralClient(base_url=server.url, api_key="k", http_client=http) as client:
        client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])
    assert seen and seen[0].get_span_context().span_id == only(spans).context.span_id


def test_without_a_recording_tracer_nothing_is_made(monkeypatch: pytest.MonkeyPatch, serve) -> None:
    from opentelemetry.trace import NoOpTracer

    monkeypatch.setattr(tracing, "_tracer", NoOpTracer())
    server = serve(replying(200, completion("Hi")))
    assert Driver("sync").complete(server).choices[0].message.content == "Hi"
    monkeypatch.setattr(tracing, "_tracer", None)  # opentelemetry not installed
    assert Driver("sync").complete(server).choices[0].message.content == "Hi"


def test_the_duration_and_token_usage_metrics(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics_sdk = pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meter = metrics_sdk.MeterProvider(metric_readers=[reader]).get_meter("test")
    monkeypatch.setattr(tracing, "_instruments", (meter.create_histogram("gen_ai.client.operation.duration"),
                                                  meter.create_histogram("gen_ai.client.token.usage")))
    monkeypatch.setattr(tracing, "_metrics_wanted", lambda: True)  # as when the application set its provider
    monkeypatch.setattr(tracing, "_tracer", trace_sdk.TracerProvider().get_tracer("off"))  # no processor: records
    server = serve(in_turn(replying(200, completion("Hi")), replying(429, {"error": {"message": "slow"}})))

    Driver("sync").complete(server)
    with pytest.raises(Exception, match="slow"):
        Driver("sync").complete(server, client={"max_retries": 0})

    points = {m.name: m.data.data_points for rm in reader.get_metrics_data().resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics}
    durations = sorted(points["gen_ai.client.operation.duration"], key=lambda p: "error.type" in p.attributes)
    assert [p.count for p in durations] == [1, 1]
    ok, failed = (dict(p.attributes) for p in durations)
    assert ok == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                  "gen_ai.request.model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "server.address": "127.0.0.1",
                  "server.port": server.port, "gen_ai.response.model": "m"}
    assert failed["error.type"] == "RateLimitError" and "gen_ai.response.model" not in failed
    tokens = {p.attributes["gen_ai.token.type"]: p.sum for p in points["gen_ai.client.token.usage"]}
    assert tokens == {"input": 3, "output": 2}


def test_without_a_meter_provider_or_a_recording_tracer_a_stream_is_not_wrapped(serve,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing would record: the chunks pass through untouched (no observer per chunk)."""
    from opentelemetry.trace import NoOpTracer

    from mixtral_client import MixtralClient

    monkeypatch.setattr(tracing, "_tracer", NoOpTracer())
    assert not tracing._metrics_wanted()  # the API's proxy: no provider set in this process
    server = serve(streaming(sse(chunk("a"), chunk(finish="stop"))))
    with MixtralClient(base_url=server.url, api_key="k") as client:
        stream = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True)
        with stream:
            assert "chunks" not in getattr(stream._chunks, "__qualname__", "")
            assert list(stream)


def test_a_raw_prompt_is_a_text_completion_span(serve, spans) -> None:
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": " ok", "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}
    server = serve(replying(200, answer))

    Driver("sync").text_completion(server, max_tokens=3)

    span = only(spans)
    assert span.name == "text_completion mistralai/Mixtral-8x7B-Instruct-v0.1"
    attributes = dict(span.attributes)
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.response.finish_reasons"]) == (4, ("stop",))
