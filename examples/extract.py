"""Structured extraction: an answer as a pydantic model, streamed as it grows, repaired when it is wrong.

    MIXTRAL_PROVIDER=openrouter OPENROUTER_API_KEY=... python examples/extract.py
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from mixtral_client import MixtralClient

TEXT = ("Ada Lovelace (1815-1852) wrote the first published algorithm, for Charles Babbage's Analytical Engine, "
        "in her notes of 1843.")


class Person(BaseModel):
    name: str = Field(max_length=40)
    born: int = Field(ge=0, le=2100)
    known_for: str = Field(max_length=80)


def main() -> None:
    messages = [{"role": "user", "content": f"Who is this text about?\n\n{TEXT}"}]
    with MixtralClient() as client:
        with client.chat.completions.stream(messages=messages, response_format=Person, max_tokens=300) as stream:
            for event in stream:
                if event.type == "content.delta" and event.parsed:
                    print("so far:", event.parsed)
        print("streamed:", stream.get_final_completion().choices[0].message.parsed)

        answer = client.chat.completions.parse(messages=messages, response_format=Person, max_tokens=300,
                                               max_repairs=2)
        print("parsed:", answer.choices[0].message.parsed, "tokens:", answer.usage)


if __name__ == "__main__":
    main()
