"""``chat.completions.count_tokens()`` and ChatMixtral's token counts: Mixtral's own tokenizer and chat format,
held to what the local engine actually prefills and to the prompt a prompting host is sent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from langchain_mixtral import ChatMixtral
from mixtral_client import AsyncMixtralClient, ConfigurationError, InvalidRequestError, MixtralClient, tool
from mixtral_client._request import ChatRequest
from mixtral_local.tokenizer import MixtralTokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers of Europe."},
            {"role": "assistant", "content": "Rhine, Danube, Seine."}, {"role": "user", "content": "And in Asia?"}]
LOCAL = {"dtype": "float32", "device": "cpu"}


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "rain"


def test_on_local_weights_the_count_is_what_the_engine_prefills(tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), local_options=LOCAL, env={}) as client:
        for kwargs in ({}, {"tools": [get_weather.param]}, {"response_format": {"type": "json_object"}}):
            counted = client.chat.completions.count_tokens(messages=MESSAGES, **kwargs)
            answer = client.chat.completions.create(messages=MESSAGES, max_tokens=1, **kwargs)
            assert counted == answer.usage.prompt_tokens, kwargs
        assert client.chat.completions.count_tokens(messages=MESSAGES, tools=[get_weather.param]) > \
            client.chat.completions.count_tokens(messages=MESSAGES)


def test_on_a_prompting_host_the_count_is_the_prompt_it_is_sent(tokenizer: MixtralTokenizer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[ChatRequest] = []
    with MixtralClient(provider="nvidia", api_key="nvapi-x", env={}) as client:
        monkeypatch.setattr(client._backend, "complete", lambda request: sent.append(request) or 1 / 0)
        counted = client.chat.completions.count_tokens(messages=MESSAGES, tools=[get_weather.param])
        with pytest.raises(ZeroDivisionError):
            client.chat.completions.create(messages=MESSAGES, tools=[get_weather.param])
    assert counted == len(tokenizer.encode_chat(sent[0].messages)) > len(tokenizer.encode_chat(MESSAGES))


def test_an_invalid_request_is_refused_and_the_async_client_counts_without_awaiting() -> None:
    async_client = AsyncMixtralClient(provider="openrouter", api_key="k", env={})
    assert async_client.chat.completions.count_tokens(messages=MESSAGES) > 20
    with MixtralClient(provider="nvidia", api_key="nvapi-x", env={}) as client, \
            pytest.raises(InvalidRequestError, match="temperature"):
        client.chat.completions.count_tokens(messages=MESSAGES, temperature=5)


RAW = "<s>[INST] Be brief.\n\nName three rivers of Europe. [/INST] Rhine, Danube, Seine.</s>[INST] And in Asia? [/INST]"


def test_a_raw_prompts_count_is_what_the_engine_prefills_and_the_chat_count(tiny_dir: Path) -> None:
    with MixtralClient(provider="local", model_path=str(tiny_dir), local_options=LOCAL, env={}) as client:
        counted = client.completions.count_tokens(prompt=RAW)
        answer = client.completions.create(prompt=RAW, max_tokens=1)

        assert counted == answer.usage.prompt_tokens == client.chat.completions.count_tokens(messages=MESSAGES)
        with pytest.raises(InvalidRequestError, match="prompt"):
            client.completions.count_tokens(prompt="")
    async_client = AsyncMixtralClient(provider="openrouter", api_key="k", env={})
    assert async_client.completions.count_tokens(prompt=RAW) == counted


def test_without_the_local_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mixtral_local.tokenizer", None)  # the import fails as if not installed
    with MixtralClient(provider="nvidia", api_key="nvapi-x", env={}) as client, \
            pytest.raises(ConfigurationError, match=r"pip install 'mixtral-sdk\[local\]'"):
        client.chat.completions.count_tokens(messages=MESSAGES)


def test_chat_mixtral_counts_with_mixtrals_tokenizer(tiny_dir: Path, tokenizer: MixtralTokenizer) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages

    llm = ChatMixtral(provider="local", model_path=str(tiny_dir), local_options=LOCAL)
    history = [SystemMessage("Be brief."), HumanMessage("Name three rivers of Europe."),
               AIMessage("Rhine, Danube, Seine."), HumanMessage("And in Asia?")]
    assert llm.get_num_tokens_from_messages(history) == len(tokenizer.encode_chat(MESSAGES))
    assert llm.get_num_tokens_from_messages(history, tools=[get_weather]) > llm.get_num_tokens_from_messages(history)
    assert llm.get_token_ids("Danube") == tokenizer.encode("Danube")
    # trim_messages counts the system message and the rest apart (each with its own [INST] wrapping): a
    # budget of the two apart keeps exactly them, one token less keeps only the system message
    budget = llm.get_num_tokens_from_messages(history[:1]) + llm.get_num_tokens_from_messages(history[3:])
    for tokens, kept in ((budget, ["Be brief.", "And in Asia?"]), (budget - 1, ["Be brief."])):
        trimmed = trim_messages(history, max_tokens=tokens, token_counter=llm, strategy="last", include_system=True)
        assert [m.content for m in trimmed] == kept
