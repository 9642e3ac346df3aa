"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS): dividing logits
# by a denormal temperature overflows them to inf and the softmax to NaN.
MIN_TEMPERATURE = 1e-5
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1  # -1 or 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]
    # Logprobs of the prompt's tokens (vLLM's name): top-N per position, the prompt token
    # included; -1 = each step's full log-distributions as a tensor (for quality reports).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self.validate()

    def validate(self) -> None:
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n}"),
            (
                isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                f"max_tokens must be an integer >= 1, got {self.max_tokens}",
            ),
            (
                isinstance(self.temperature, int | float) and 0 <= self.temperature < float("inf"),
                f"temperature must be a finite number >= 0, got {self.temperature}",
            ),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 0, f"top_k must be -1 (off) or >= 0, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                0 < self.repetition_penalty < float("inf"),
                f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}",
            ),
            (
                self.seed is None or (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX),
                f"seed must be an integer that fits in 64 bits, got {self.seed}",
            ),
            (
                self.prompt_logprobs is None
                or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= -1),
                f"prompt_logprobs must be -1 (full) or an integer >= 0, got {self.prompt_logprobs}",
            ),
            (
                all(-100 <= b <= 100 for b in self.logit_bias.values()),
                "logit_bias values must be in [-100, 100]",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
                f"logprobs must be an integer >= 0, got {self.logprobs}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator_seed(self, index: int) -> int:
        """The seed of the request's index-th completion, wrapped into torch's range."""
        return (self.seed + index) % 2**64
