"""A LangChain chain over ChatMixtral, history trimmed with Mixtral's own token counts.

    MIXTRAL_PROVIDER=bedrock AWS_REGION=us-west-2 python examples/chain.py
"""

from __future__ import annotations

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages
from langchain_core.output_parsers import StrOutputParser

from langchain_mixtral import ChatMixtral


def main() -> None:
    llm = ChatMixtral(temperature=0.3, max_tokens=120)
    history = [
        SystemMessage("You answer in one sentence."),
        HumanMessage("Name a river in France."),
        AIMessage("The Loire."),
        HumanMessage("And one in Spain?"),
    ]
    print("prompt tokens:", llm.get_num_tokens_from_messages(history))
    trimmer = trim_messages(max_tokens=60, token_counter=llm, strategy="last", include_system=True)
    chain = trimmer | llm | StrOutputParser()
    for piece in chain.stream(history):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
