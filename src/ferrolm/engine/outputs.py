"""What generate() and step() return, shaped like vLLM's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    logprobs: list[dict[int, float]] | None = None
    delta_text: str = ""  # text added by the step that produced this output


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # set when computing or sampling this request failed
    # prompt_logprobs >= 0: one entry per prompt token (None for the first), accumulated.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # prompt_logprobs == -1: this step's new rows only, [rows, vocab] fp32 log-softmax;
    # row r is the distribution after prompt position prompt_logprobs_start + r.
    prompt_logprob_rows: Any = None
    prompt_logprobs_start: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
