"""A raw prompt written by hand (a few-shot transcript in Mixtral's format), sent with no chat template:
``client.completions`` streamed, its token count first, and the same prompt through LangChain's ``MixtralLLM``.

    MIXTRAL_PROVIDER=bedrock AWS_REGION=us-west-2 python examples/few_shot.py     # Bedrock's InvokeModel
"""

from __future__ import annotations

from langchain_core.prompts import PromptTemplate

from langchain_mixtral import MixtralLLM
from mixtral_client import MixtralClient

SHOTS = [("The film was a delight.", "positive"), ("I want my money back.", "negative")]
PROMPT = "<s>" + "".join(f"[INST] Sentiment of: {text} [/INST] {label}</s>" for text, label in SHOTS) + \
    "[INST] Sentiment of: {review} [/INST]"


def main() -> None:
    prompt = PROMPT.format(review="The soup was cold and the waiter rude.")
    with MixtralClient() as client:
        print("prompt tokens:", client.completions.count_tokens(prompt=prompt))
        with client.completions.create(prompt=prompt, max_tokens=8, temperature=0, stream=True) as stream:
            for piece in stream.text():
                print(piece, end="", flush=True)
            print()

    chain = PromptTemplate.from_template(PROMPT) | MixtralLLM(max_tokens=8, temperature=0)
    print("via LangChain:", chain.invoke({"review": "Best pizza in town."}).strip())


if __name__ == "__main__":
    main()
