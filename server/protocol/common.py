"""Types shared by the chat and completions endpoints."""
from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["Usage", "StreamOptions", "SamplingRequest", "Temperature", "TopP", "Penalty", "MaxTokens", "Stop", "LogitBias",
           "TopLogprobs"]

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)]
# token id (as a JSON object key) -> bias in [-100, 100]; ids are checked against the vocabulary later
LogitBias = dict[Annotated[str, msgspec.Meta(pattern=r"^[0-9]+$")], Annotated[float, msgspec.Meta(ge=-100, le=100)]]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class SamplingRequest(msgspec.Struct, kw_only=True):
    """The knobs chat and text completions share (each adds its own prompt fields)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: int | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    # Extensions many clients send (llama.cpp, vLLM, Ollama names).
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: TopP | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    ignore_eos: bool = False
    user: str | None = None
    keep_alive: str | float | None = None  # Ollama's: how long the model stays loaded after this request
