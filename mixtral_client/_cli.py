"""The ``mixtral`` command.

    mixtral chat ["prompt"] [-i] [--provider P] [--model M] [--system S] [--temperature T] [--max-tokens N] [--no-stream]
                 [--fallback P ...] [--rate-limit RPM]
    mixtral serve [--provider P | --base-url URL | --model-path DIR] [--host H] [--port N] [--api-key K]
    mixtral models [--provider P | --base-url URL]
    mixtral doctor [--provider P | --base-url URL | --model-path DIR] [--local KEY=VALUE] [--no-request]
    mixtral local init-tiny DIR

With no provider configured (no ``--provider``, ``MIXTRAL_PROVIDER``, ``MIXTRAL_BASE_URL`` or
``MIXTRAL_MODEL_PATH``), ``chat`` runs a tiny local Mixtral with random weights, written on first use, and
says so: the command works offline, and its answers are noise until a real provider is configured.
``chat`` without a prompt reads it from standard input, or, at a terminal (or with ``-i``), holds a
conversation: a line a turn, the history kept, ``/reset`` to start again, ``/exit`` or end of input to stop;
a turn that fails says why on stderr and the conversation goes on.
``serve`` answers OpenAI chat-completions requests over HTTP with the configured backend (the ``server``
extra); it needs a backend configured, and refuses to serve random weights unasked.
Every failure is one line on stderr naming the fix, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from mixtral_client._client import AsyncMixtralClient, MixtralClient
from mixtral_client._config import LOCAL_OPTION_VARS, _local_option
from mixtral_client._exceptions import APIError, ConfigurationError, InvalidRequestError, MixtralError
from mixtral_client._providers import PROVIDERS

__all__ = ["main"]

#: the answer length when the random tiny model is used (its text is noise; keep it short)
_TINY_MAX_TOKENS = 48


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mixtral: {message} (see `{self.prog} --help`)\n")


_LOCAL_HELP = (f"a local_options key ({', '.join(LOCAL_OPTION_VARS)}), e.g. --local max_batch=32 "
               "--local kv_cache_memory=40GiB; repeatable; wins over its MIXTRAL_LOCAL_<KEY> variable")


def _local_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--local KEY=VALUE`` pairs as ``local_options``, each value typed as its variable's would be."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in LOCAL_OPTION_VARS:
            raise ConfigurationError(f"--local {pair}: expected KEY=VALUE with KEY one of {', '.join(LOCAL_OPTION_VARS)}")
        options[key] = _local_option(key, f"--local {key}", raw.strip())
    return options


def _backend_arguments(command: argparse.ArgumentParser, provider_default: str) -> None:
    """The options that choose and shape the backend, as ``chat``, ``serve`` and ``doctor`` take them."""
    command.add_argument("--provider", choices=sorted(PROVIDERS), help=f"default: {provider_default}")
    command.add_argument("--model", help="model id (default: the provider's Mixtral id)")
    command.add_argument("--base-url", help="an OpenAI-compatible base URL (provider openai)")
    command.add_argument("--model-path", help="a local checkpoint directory, or a model id in the Hugging Face cache "
                         "(provider local)")
    command.add_argument("--local", action="append", default=[], metavar="KEY=VALUE", help=_LOCAL_HELP)
    command.add_argument("--fallback", action="append", choices=sorted(PROVIDERS), metavar="PROVIDER",
                         help="a provider to try when the first fails (repeatable, in order; default: "
                              "MIXTRAL_FALLBACKS)")
    command.add_argument("--rate-limit", type=float, metavar="RPM",
                         help="pace requests to this many a minute (default: MIXTRAL_RATE_LIMIT)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixtral", description="Chat with Mixtral-8x7B-Instruct on any backend.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    chat = commands.add_parser("chat", help="answer a prompt, or hold a conversation")
    chat.add_argument("prompt", nargs="?", help="the user message (default: standard input; at a terminal, a "
                                                "conversation)")
    chat.add_argument("-i", "--interactive", action="store_true",
                      help="a conversation: a line a turn, /reset to start again, /exit or end of input to stop")
    _backend_arguments(chat, "MIXTRAL_PROVIDER, else local")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    chat.add_argument("--raw", action="store_true",
                      help="send the prompt as written, with no chat template (client.completions): write "
                           "Mixtral's [INST] ... [/INST] yourself, or text for the model to continue")

    serve = commands.add_parser("serve", help="serve the OpenAI chat-completions API over HTTP")
    _backend_arguments(serve, "MIXTRAL_PROVIDER")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require this bearer key from callers (default: MIXTRAL_SERVER_API_KEY)")
    serve.add_argument("--model-name", help="the model id /v1/models lists (default: the provider's)")

    models = commands.add_parser("models", help="list the model ids the configured host serves")
    models.add_argument("--provider", choices=sorted(PROVIDERS), help="default: MIXTRAL_PROVIDER")
    models.add_argument("--base-url", help="an OpenAI-compatible base URL (provider openai)")

    doctor = commands.add_parser("doctor", help="show how the backend is configured, and try one request")
    _backend_arguments(doctor, "MIXTRAL_PROVIDER")
    doctor.add_argument("--no-request", action="store_true",
                        help="only the configuration (on local weights: no load)")

    local = commands.add_parser("local", help="local checkpoints")
    local_commands = local.add_subparsers(dest="local_command", required=True, parser_class=_Parser)
    tiny = local_commands.add_parser("init-tiny", help="write a tiny random Mixtral checkpoint (for tests and demos)")
    tiny.add_argument("path", help="the directory to write")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _tiny_home(env: Mapping[str, str]) -> Path:
    base = env.get("MIXTRAL_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                  "mixtral-sdk")
    return Path(base) / "tiny-mixtral"


def _local_cli() -> Any:
    """``mixtral_local.cli``, or a ConfigurationError naming the extra to install."""
    try:
        import mixtral_local.cli
    except ImportError as exc:
        raise ConfigurationError(
            f"the local backend needs the local extra (missing {exc.name or exc}): pip install 'mixtral-sdk[local]'"
        ) from exc
    return mixtral_local.cli


def _configured(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The client arguments the command line gives, or None when neither it nor the environment names a backend."""
    kwargs: dict[str, Any] = {name: getattr(args, name) for name in ("provider", "base_url", "model_path", "model")
                              if getattr(args, name)}
    local = _local_options(args.local)
    if kwargs.keys() - {"model"} or any(env.get(k) for k in ("MIXTRAL_PROVIDER", "MIXTRAL_BASE_URL",
                                                              "MIXTRAL_MODEL_PATH")):
        return {**kwargs, **({"local_options": local} if local else {}), **_pacing(args)}
    return None


def _pacing(args: argparse.Namespace) -> dict[str, Any]:
    """``--fallback`` and ``--rate-limit`` as client arguments (absent: the environment's, if any)."""
    given: dict[str, Any] = {}
    if args.fallback:
        given["fallbacks"] = args.fallback
    if args.rate_limit is not None:
        given["rate_limit"] = args.rate_limit
    return given


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    kwargs = _configured(args, env)
    if kwargs is None:
        raise ConfigurationError(
            "serve needs a backend: --provider, --base-url or --model-path (or MIXTRAL_PROVIDER, MIXTRAL_BASE_URL, "
            "MIXTRAL_MODEL_PATH); `mixtral local init-tiny DIR` writes a tiny random checkpoint to try it with")
    try:
        from mixtral_client import server
    except ImportError as exc:
        raise ConfigurationError(
            f"serve needs the server extra (missing {exc.name or exc}): pip install 'mixtral-sdk[server]'") from exc
    server.serve(AsyncMixtralClient(env=env, **kwargs), host=args.host, port=args.port,
                 api_key=args.api_key or env.get("MIXTRAL_SERVER_API_KEY") or None, model_name=args.model_name)
    return 0


def _models(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """One model id a line: a host's ``GET /models``; Bedrock's and local weights' own model."""
    kwargs = {name: getattr(args, name) for name in ("provider", "base_url") if getattr(args, name)}
    with MixtralClient(env=env, **kwargs) as client:
        for model in client.models.list():
            print(model.id)
    return 0


def _masked(key: str) -> str:
    return f"{key[:4]}...{key[-4:]}" if len(key) >= 16 else "set"


def _doctor(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Each setting and where it came from, then one 1-token request (unless ``--no-request``): exit 0 when it
    answered, 1 when it failed (the reason printed), 2 for a configuration that does not hold."""
    kwargs = _configured(args, env)
    if kwargs is None:
        raise ConfigurationError("no backend configured: --provider, --base-url or --model-path (or MIXTRAL_PROVIDER, "
                                 "MIXTRAL_BASE_URL, MIXTRAL_MODEL_PATH); see docs/providers.md")
    with MixtralClient(env=env, **kwargs) as client:
        config, preset = client.config, client.config.preset
        rows = [("provider", f"{config.provider}"
                 + (" (--provider)" if args.provider else " (MIXTRAL_PROVIDER)" if env.get("MIXTRAL_PROVIDER") else ""))]
        rows.append(("model", preset.resolve_model(config.model)))
        if preset.kind == "http":
            rows.append(("base URL", config.base_url or ""))
            variable = next((v for v in (preset.api_key_env, "MIXTRAL_API_KEY") if v and env.get(v) == config.api_key),
                            "the api_key argument")
            rows.append(("key", f"{variable} ({_masked(config.api_key or '')})"))
        elif preset.kind == "bedrock":
            rows.append(("region", config.region or "from the AWS profile"))
            rows.append(("auth", "API key (AWS_BEARER_TOKEN_BEDROCK)" if config.api_key else "SigV4 (AWS credential chain)"))
        else:
            rows += _local_cli().describe(config)
        rows.append(("tools", "in the prompt" if preset.prompts_tools else "native"))
        rows.append(("json", "native response_format" if preset.supports_response_format else "in the prompt"))
        if client.fallbacks:
            rows.append(("fallbacks", ", ".join(client.fallbacks)))
        limiter = client.chat.completions._limiter
        if limiter is not None:
            rows.append(("rate limit", f"{limiter.requests_per_minute:g} requests a minute (burst {limiter.burst})"))
        for label, value in rows:
            print(f"{label:<11} {value}")
        if args.no_request:
            return 0
        started = time.monotonic()
        try:
            answer = client.chat.completions.create(messages=[{"role": "user", "content": "Reply with OK."}],
                                                    max_tokens=1)
        except APIError as exc:
            print(f"{'request':<11} failed: {type(exc).__name__}: {exc}")
            return 1
        seen = f", request id {answer._request_id}" if answer._request_id else ""
        print(f"{'request':<11} ok: model {answer.model}, {time.monotonic() - started:.2f} s{seen}")
    return 0


def _chat(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    configured = _configured(args, env)
    kwargs: dict[str, Any] = {}
    max_tokens = args.max_tokens
    if configured is None:
        path = _tiny_home(env)
        if not (path / "config.json").exists():
            _local_cli().write_tiny_checkpoint(path)
        print(f"mixtral: no provider configured, so this is a tiny local Mixtral with RANDOM weights ({path}): "
              "its answer is noise. For real answers set MIXTRAL_PROVIDER and a key, e.g. "
              "MIXTRAL_PROVIDER=nvidia NVIDIA_API_KEY=nvapi-... (docs/providers.md).", file=sys.stderr)
        kwargs.update(provider="local", model_path=str(path), local_options=_local_options(args.local))
        max_tokens = max_tokens if max_tokens is not None else _TINY_MAX_TOKENS
        if args.model:
            kwargs["model"] = args.model
    else:
        kwargs = configured

    system = [{"role": "system", "content": args.system}] if args.system else []
    params: dict[str, Any] = {}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    interactive = args.interactive or (args.prompt is None and sys.stdin.isatty())
    prompt = args.prompt
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise ConfigurationError("no prompt: give one, pipe it on standard input, or use -i for a conversation")

    if args.raw and (interactive or args.system):
        raise ConfigurationError("--raw sends one prompt as written: it takes no --system and no -i")
    with MixtralClient(env=env, **kwargs) as client:
        if args.raw:
            _complete(client, prompt, params, stream=not args.no_stream)
            return 0
        if not interactive:
            _answer(client, [*system, {"role": "user", "content": prompt}], params, stream=not args.no_stream)
            return 0
        return _converse(client, system, params, stream=not args.no_stream, first=prompt)


def _answer(client: MixtralClient, messages: list[dict[str, Any]], params: dict[str, Any], *, stream: bool) -> str:
    """Print the answer to ``messages`` (streamed, or whole) and return its text."""
    if not stream:
        text = client.chat.completions.create(messages=messages, **params).choices[0].message.content or ""
        print(text)
        return text
    with client.chat.completions.create(messages=messages, stream=True, **params) as answer:
        return _echo(answer.text())


def _complete(client: MixtralClient, prompt: str, params: dict[str, Any], *, stream: bool) -> None:
    """Print the continuation of a raw ``prompt`` (``--raw``), streamed or whole."""
    if not stream:
        print(client.completions.create(prompt=prompt, **params).choices[0].text)
        return
    with client.completions.create(prompt=prompt, stream=True, **params) as answer:
        _echo(answer.text())


def _echo(pieces: Iterator[str]) -> str:
    """Write each piece of text as it comes, then a newline; the whole text."""
    seen = []
    for piece in pieces:
        seen.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(seen)


def _converse(client: MixtralClient, system: list[dict[str, Any]], params: dict[str, Any], *, stream: bool,
              first: str | None) -> int:
    """A conversation on standard input: a line a turn, answered with the whole history."""
    history = list(system)
    pending = [first] if first else []
    tty = sys.stdin.isatty()
    while True:
        if pending:
            line = pending.pop()
        else:
            try:
                line = input("> ") if tty else sys.stdin.readline()  # input() at a terminal: line editing
            except EOFError:  # Ctrl-D at the terminal
                return 0
            if not line:
                return 0  # end of input
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(system)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            history.append({"role": "assistant", "content": _answer(client, history, params, stream=stream)})
        except (APIError, InvalidRequestError) as exc:  # this turn is dropped; the conversation goes on
            history.pop()
            print(f"mixtral: {type(exc).__name__}: {exc}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops this answer (the stream is closed); another turn may follow
            history.pop()
            sys.stdout.write("\n")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = os.environ if env is None else env
    try:
        if args.command == "chat":
            return _chat(args, env)
        if args.command == "serve":
            return _serve(args, env)
        if args.command == "models":
            return _models(args, env)
        if args.command == "doctor":
            return _doctor(args, env)
        _local_cli().init_tiny_main(args.path, seed=args.seed)
        return 0
    except ConfigurationError as exc:
        print(f"mixtral: {exc}", file=sys.stderr)
        return 2
    except APIError as exc:
        print(f"mixtral: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except MixtralError as exc:
        print(f"mixtral: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
