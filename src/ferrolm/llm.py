"""LLM: the offline API, vLLM's keyword names, a thin loop over LLMEngine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from ferrolm.config import ENGINE_FLAGS, EngineConfig
from ferrolm.engine.engine import LLMEngine
from ferrolm.engine.outputs import RequestOutput
from ferrolm.engine.sampling_params import SamplingParams


class LLM:
    """LLM(model="smollm2-135m", kv_cache_dtype="int8", ...) or LLM(config=EngineConfig(...)).

    Keywords are those of ENGINE_FLAGS in ferrolm.config (vLLM's names); given ones
    override `config`.
    """

    def __init__(
        self, model: str | None = None, *, config: EngineConfig | None = None, **kwargs: Any
    ) -> None:
        config = config or EngineConfig()
        self.config = config.with_flags({"model": model, **kwargs}, ENGINE_FLAGS)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; all prompts run as one batch."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        # Validate every prompt before any is queued, so a bad one leaves nothing behind.
        for prompt, p in zip(prompts, params):
            self.engine.check_request(len(self.engine.encode_prompt(prompt)), p)
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            self.engine.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def stats(self) -> dict[str, object]:
        return self.engine.stats()
