"""Run by the LangChain client's own Python (``.venv-clients/langchain``), not by pytest: ``ChatOpenAI`` pointed at
the gateway's ``/v1`` uses ``with_structured_output`` (a JSON-schema ``response_format``) and ``bind_tools`` (a forced
tool call, answered whole and streamed), and prints one JSON object of what each step returned, or the error it
raised. tests/test_heldout_clients.py runs it and judges the result.

Usage: python tests/heldout_langchain.py BASE_URL MODEL"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

QUESTION = "What is the weather in Paris right now?"


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(description="the city's name")
    celsius: float = Field(description="the temperature")
    raining: bool


class GetWeather(BaseModel):
    """Look up the current weather in a city."""

    city: str = Field(description="the city's name")


def step(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return run()
    except Exception as error:  # the test shows which step failed and how
        return {"error": f"{type(error).__name__}: {error}"[:2000]}


def main(base_url: str, model: str) -> dict[str, Any]:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=base_url, api_key="unused", model=model, max_retries=0, timeout=30, use_responses_api=False
    )
    forced = llm.bind_tools([GetWeather], tool_choice="GetWeather")

    def structured() -> dict[str, Any]:
        answer = llm.with_structured_output(Weather).invoke(QUESTION)
        return {"type": type(answer).__name__, "value": answer.model_dump()}

    def tool_call() -> dict[str, Any]:
        message = forced.invoke(QUESTION)
        return {"tool_calls": message.tool_calls, "finish_reason": message.response_metadata.get("finish_reason")}

    def streamed_tool_call() -> dict[str, Any]:
        whole: Any = None
        chunks = 0
        for chunk in forced.stream(QUESTION):
            whole = chunk if whole is None else whole + chunk
            chunks += 1
        return {
            "chunks": chunks,
            "tool_calls": whole.tool_calls,
            "finish_reason": whole.response_metadata.get("finish_reason"),
        }

    return {
        "structured": step(structured),
        "tool_call": step(tool_call),
        "streamed_tool_call": step(streamed_tool_call),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2]), default=str))
