"""OpenAI API request bodies and their SamplingParams.

Nothing is silently ignored: a field the server does not implement is rejected
with a 400 that names it (IGNORED lists the few that change nothing about the
answer), and text must be valid Unicode (a lone surrogate such as "\\ud800" in
JSON cannot be tokenized).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ferrolm.engine.sampling_params import SamplingParams
from ferrolm.server.errors import ApiError

# Accepted and without effect on the answer: bookkeeping fields of the OpenAI API.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in `value` a string that is not valid Unicode sits, if anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = _surrogate_path(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Extensions vLLM users know:
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _surrogate_path(data)
        if where:
            raise ValueError(f"{where}: text is not valid Unicode (a lone surrogate?)")
        return data

    def check_supported(self) -> None:
        """400 naming the first field this server does not implement."""
        for name in self.model_extra or {}:
            if name not in IGNORED:
                raise ApiError(400, f"unsupported field {name!r}: ferrolm does not implement it", param=name)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ApiError 400 with the reason when a value is out of range."""
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError as e:
            raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from e
        try:
            return SamplingParams(
                n=self.n,
                max_tokens=max_tokens if max_tokens is not None else 16,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                logit_bias=bias,
            )
        except ValueError as e:
            raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from e

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo together with logprobs is not supported", param="echo")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # one prompt as token ids
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            kinds = {part.get("type") for part in self.content} - {"text"}
            if kinds:
                raise ApiError(
                    400, f"unsupported content part type(s): {sorted(map(str, kinds))}", "messages"
                )
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools are not supported", param="tool_choice")

    def max_new_tokens(self) -> int | None:
        """max_completion_tokens if given (0 included: it is rejected), else max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]
