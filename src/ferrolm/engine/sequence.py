"""A request, its sequences (n of them) and their state in the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ferrolm.engine.sampling_params import SamplingParams
from ferrolm.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None = None
    num_computed: int = 0
    block_tables: list[list[int]] = field(default_factory=list)  # per KV group (kv/groups.py)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full, computed blocks
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""  # generated text, stop strings cut off
    num_streamed: int = 0  # characters of `text` already handed out as deltas

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    error: str | None = None  # why the request failed (its sequences finish with "error")
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_rows: torch.Tensor | None = None  # -1 mode: the latest step's rows
    prompt_logprobs_start: int = 0
    prompt_logprobs_done: int = 0  # prompt positions whose logprobs were handed out

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
