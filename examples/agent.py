"""An agent over Python functions, on whatever backend the environment names.

    MIXTRAL_PROVIDER=nvidia NVIDIA_API_KEY=nvapi-... python examples/agent.py
    MIXTRAL_MODEL_PATH=/models/Mixtral-8x7B-Instruct-v0.1 python examples/agent.py   # local weights

The tools go natively or through the prompt, as the backend needs; run_tools runs the calls and sends the
results back until the model answers in words.
"""

from __future__ import annotations

from typing import Literal

from mixtral_client import MixtralClient, tool


@tool
def get_weather(city: str, unit: Literal["c", "f"] = "c") -> str:
    """The current weather in a city.

    Args:
        city: the city's name
        unit: degrees Celsius or Fahrenheit
    """
    return f"light rain, 12 degrees {unit.upper()} in {city}"


@tool
def convert(amount: float, rate: float) -> float:
    """Multiply an amount by an exchange rate."""
    return round(amount * rate, 2)


def main() -> None:
    with MixtralClient() as client:
        runner = client.chat.completions.run_tools(
            messages=[{"role": "user", "content": "What is the weather in Lyon, and what are 40 euros in dollars "
                                                  "at a rate of 1.08?"}],
            tools=[get_weather, convert], temperature=0, max_tokens=300, max_rounds=4,
        )
        for answer in runner:
            for call in answer.choices[0].message.tool_calls or []:
                print(f"-> {call.function.name}({call.function.arguments})")
        print(runner.until_done().choices[0].message.content)


if __name__ == "__main__":
    main()
