"""The `mixtral` command: streams answers, and fails with one clear line naming the fix."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from mixtral_client._cli import main
from tests.loopback import Conn, LoopbackServer, Received, sse


def _chunk(content: str | None, finish: str | None = None) -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _host(req: Received, conn: Conn) -> None:
    body = req.json()
    if body.get("stream"):
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(_chunk("Bon"), _chunk("jour"), _chunk(None, "stop")))
        conn.finish()
    else:
        conn.respond(200, {"id": "x", "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": "Salut"}}]})


def test_chat_streams_the_answer_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    with LoopbackServer(_host) as server:
        code = main(["chat", "Say hi", "--system", "Be French", "--temperature", "0.2", "--max-tokens", "9"],
                    env={"MIXTRAL_BASE_URL": server.url, "MIXTRAL_API_KEY": "k"})
    assert code == 0
    assert capsys.readouterr().out == "Bonjour\n"
    sent = server.requests[0].json()
    assert sent["messages"] == [{"role": "system", "content": "Be French"}, {"role": "user", "content": "Say hi"}]
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 9 and sent["stream"] is True


def test_chat_no_stream_prints_the_whole_answer(capsys: pytest.CaptureFixture[str]) -> None:
    with LoopbackServer(_host) as server:
        code = main(["chat", "hi", "--no-stream", "--base-url", server.url], env={"MIXTRAL_API_KEY": "k"})
    assert code == 0
    assert capsys.readouterr().out == "Salut\n"
    assert "stream" not in server.requests[0].json()


def test_missing_key_exits_nonzero_with_one_line_naming_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["chat", "hi", "--provider", "nvidia"], env={})
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "NVIDIA_API_KEY" in err


def test_bad_option_exits_nonzero_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chat", "hi", "--temperature", "warm"], env={})
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and "--temperature" in err and "--help" in err


def test_out_of_range_value_is_refused_before_sending(capsys: pytest.CaptureFixture[str]) -> None:
    with LoopbackServer(_host) as server:
        code = main(["chat", "hi", "--provider", "nvidia", "--base-url", server.url, "--temperature", "5"],
                    env={"NVIDIA_API_KEY": "k"})
    assert code == 2
    assert "temperature" in capsys.readouterr().err
    assert server.requests == []


def test_host_error_exits_one_with_the_status(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(req: Received, conn: Conn) -> None:
        conn.respond(401, {"error": {"message": "bad key"}})

    with LoopbackServer(refuse) as server:
        code = main(["chat", "hi", "--base-url", server.url], env={"MIXTRAL_API_KEY": "k"})
    err = capsys.readouterr().err
    assert code == 1
    assert "AuthenticationError" in err and "bad key" in err
    assert json.loads(server.requests[0].body)["messages"][0]["content"] == "hi"


def test_local_init_tiny_writes_a_checkpoint_and_says_its_weights_are_random(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["local", "init-tiny", str(tmp_path / "tiny"), "--seed", "3"], env={})

    assert code == 0
    assert (tmp_path / "tiny" / "config.json").exists() and (tmp_path / "tiny" / "tokenizer.model").exists()
    assert "RANDOM weights (seed 3)" in capsys.readouterr().out


def _streaming_answers(*answers: str) -> Any:
    def handle(req: Received, conn: Conn) -> None:
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(_chunk(answers[min(len(seen), len(answers) - 1)]), _chunk(None, "stop")))
        conn.finish()
        seen.append(req)

    seen: list[Received] = []
    return handle


def test_a_conversation_sends_the_history_with_every_turn(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n\nHow are you?\n/reset\nAgain\n/exit\nnever sent\n"))
    with LoopbackServer(_streaming_answers("Bonjour", "Bien", "Re")) as server:
        code = main(["chat", "-i", "--system", "Be French", "--base-url", server.url], env={"MIXTRAL_API_KEY": "k"})
    assert code == 0
    assert capsys.readouterr().out == "Bonjour\nBien\nRe\n"
    sent = [r.json()["messages"] for r in server.requests]
    system = {"role": "system", "content": "Be French"}
    assert sent == [
        [system, {"role": "user", "content": "Hi"}],
        [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bonjour"},
         {"role": "user", "content": "How are you?"}],
        [system, {"role": "user", "content": "Again"}],  # after /reset
    ]


def test_a_failed_turn_is_reported_and_the_conversation_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    answered = _streaming_answers("Salut")

    def handle(req: Received, conn: Conn) -> None:
        if "fail" in req.json()["messages"][-1]["content"]:
            conn.respond(400, {"error": {"message": "no such thing"}})
        else:
            answered(req, conn)

    monkeypatch.setattr("sys.stdin", io.StringIO("please fail\nHi\n"))
    with LoopbackServer(handle) as server:
        code = main(["chat", "-i", "--base-url", server.url], env={"MIXTRAL_API_KEY": "k"})
    out, err = capsys.readouterr()
    assert code == 0 and out == "Salut\n"
    assert "BadRequestError" in err and "no such thing" in err
    assert server.requests[-1].json()["messages"] == [{"role": "user", "content": "Hi"}]  # the failed turn left out


def test_the_prompt_may_come_on_standard_input(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Summarise this:\nline two\n"))
    with LoopbackServer(_host) as server:
        code = main(["chat", "--base-url", server.url, "--no-stream"], env={"MIXTRAL_API_KEY": "k"})
    assert code == 0 and capsys.readouterr().out == "Salut\n"
    assert server.requests[0].json()["messages"] == [{"role": "user", "content": "Summarise this:\nline two\n"}]


def test_no_prompt_anywhere_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    code = main(["chat", "--base-url", "http://127.0.0.1:9/v1"], env={"MIXTRAL_API_KEY": "k"})
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "-i" in err


def test_local_options_come_from_the_command_line_typed_as_their_variables(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--local kv_cache_memory=...`` reaches the engine: a bound of 64 positions refuses a longer answer."""
    main(["local", "init-tiny", str(tmp_path / "tiny")], env={})
    capsys.readouterr()
    args = ["chat", "Hello there", "--model-path", str(tmp_path / "tiny"), "--local", "dtype=float32",
            "--local", "device=cpu", "--max-tokens", "200"]
    code = main([*args, "--local", "kv_cache_memory=32KiB"], env={})  # 512 bytes a position here: 64 positions
    assert code == 2
    assert "the KV cache (local_options kv_cache_memory) holds 64 positions" in capsys.readouterr().err
    assert main([*args, "--local", "max_batch=4", "--no-stream"], env={}) == 0


@pytest.mark.parametrize(("pair", "message"), [
    ("max_batch", "--local max_batch: expected KEY=VALUE"),
    ("colour=red", "expected KEY=VALUE with KEY one of dtype"),
    ("max_batch=lots", "--local max_batch must be an integer, got 'lots'"),
    ("progress=maybe", "--local progress must be one of"),
])
def test_a_bad_local_option_exits_2_with_one_line(pair: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["chat", "hi", "--model-path", "/nonexistent", "--local", pair], env={})
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_doctor_shows_the_configuration_and_tries_one_request(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.client.conftest import completion, replying

    key = "sk-test-1234567890abcd"
    with LoopbackServer(replying(200, completion("OK"), {"x-request-id": "req-doc"})) as server:
        code = main(["doctor", "--base-url", server.url, "--rate-limit", "30"], env={"MIXTRAL_API_KEY": key})
        out = capsys.readouterr().out
        assert code == 0
        assert server.requests[0].json()["max_tokens"] == 1
    lines = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith(("base URL", "rate limit")))
    assert lines["provider"] == "openai" and lines["tools"] == "native"
    assert f"base URL    {server.url}" in out and "rate limit  30 requests a minute (burst 1)" in out
    assert lines["key"] == "MIXTRAL_API_KEY (sk-t...abcd)" and key not in out  # never the key itself
    assert lines["request"].startswith("ok: model m, ") and lines["request"].endswith("request id req-doc")


def test_doctor_says_why_a_request_fails(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.client.conftest import replying

    with LoopbackServer(replying(401, {"error": {"message": "bad key"}})) as server:
        code = main(["doctor", "--provider", "nvidia", "--base-url", server.url], env={"NVIDIA_API_KEY": "nvapi-x"})
    out = capsys.readouterr().out
    assert code == 1 and "request     failed: AuthenticationError: 401 from nvidia: bad key" in out
    assert "tools       in the prompt" in out and "key         NVIDIA_API_KEY (set)" in out
    assert main(["doctor"], env={}) == 2 and "no backend configured" in capsys.readouterr().err


def _text_host(req: Received, conn: Conn) -> None:
    def text(piece: str, finish: str | None = None) -> dict[str, object]:
        return {"id": "t", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "text": piece, "finish_reason": finish}]}

    if req.json().get("stream"):
        conn.start(200, {"Content-Type": "text/event-stream"})
        conn.write(sse(text(" upon"), text(" a time", "length")))
        conn.finish()
    else:
        conn.respond(200, text(" upon a time", "length"))


@pytest.mark.parametrize("stream", [True, False])
def test_raw_sends_the_prompt_as_written_to_completions(capsys: pytest.CaptureFixture[str], stream: bool) -> None:
    with LoopbackServer(_text_host) as server:
        code = main(["chat", "--raw", "Once", "--max-tokens", "3", *([] if stream else ["--no-stream"])],
                    env={"MIXTRAL_BASE_URL": server.url, "MIXTRAL_API_KEY": "k"})

    assert code == 0
    assert capsys.readouterr().out == " upon a time\n"
    (req,) = server.requests
    assert req.path.endswith("/completions") and not req.path.endswith("/chat/completions")
    assert req.json()["prompt"] == "Once" and req.json()["max_tokens"] == 3


def test_raw_takes_no_system_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    with LoopbackServer(_text_host) as server:
        code = main(["chat", "--raw", "Once", "--system", "x"], env={"MIXTRAL_BASE_URL": server.url,
                                                                     "MIXTRAL_API_KEY": "k"})

    assert code == 2
    assert "--raw" in capsys.readouterr().err
    assert server.requests == []
