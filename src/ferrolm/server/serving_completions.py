"""POST /v1/completions."""

from __future__ import annotations

import functools

from fastapi import Request

from ferrolm.engine.outputs import CompletionOutput
from ferrolm.server.errors import ApiError
from ferrolm.server.limits import check_request_limits
from ferrolm.server.protocol import CompletionRequest
from ferrolm.server.serving import Job, Serving


def top_entries(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The n most likely (token, logprob) pairs of one position."""
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]


class CompletionServing(Serving):
    async def create(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        body.check_supported()
        prompts = body.prompts()
        if not prompts:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        check_request_limits(self.config, body.n, len(prompts), body.stop_list())
        params = body.sampling_params(body.max_tokens, body.logprobs)
        ids = []
        for p in prompts:  # every prompt is validated before any starts
            try:
                ids.append(await self.engine.encode(p))
            except ValueError as e:
                raise ApiError(400, str(e), param="prompt") from e
            self.check(ids[-1], params)
        echo = None
        if body.echo:
            echo = [self.engine.text_of(i) if isinstance(p, list) else p for p, i in zip(prompts, ids)]
        make = functools.partial(self._choice, n=params.n, top_n=body.logprobs or 0, echo=echo)
        job = Job("text_completion", ids, params, body.stream, body.include_usage, make, "cmpl")
        return await self.respond(request, job)

    def _choice(
        self,
        index: int,
        out: CompletionOutput,
        new_from: int,
        delta: str,
        finish,
        stream: bool,
        n: int = 1,
        top_n: int = 0,
        echo: list[str] | None = None,
    ) -> dict:
        if echo is not None and new_from == 0:  # the prompt leads the text (or the first chunk)
            delta = echo[index // n] + delta
        return {
            "index": index,
            "text": delta,
            "logprobs": self._logprobs(out, new_from, top_n),
            "finish_reason": finish,
        }

    def _logprobs(self, out: CompletionOutput, new_from: int, top_n: int):
        if out.logprobs is None:
            return None
        text = self.engine.token_text
        ids, lps = out.token_ids[new_from:], out.logprobs[new_from:]
        return {
            "tokens": [text(t) for t in ids],
            "token_logprobs": [lp[t] for t, lp in zip(ids, lps)],
            "top_logprobs": [{text(k): v for k, v in top_entries(lp, top_n)} for lp in lps],
            "text_offset": [],
        }
