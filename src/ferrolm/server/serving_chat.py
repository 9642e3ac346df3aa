"""POST /v1/chat/completions."""

from __future__ import annotations

import functools

from fastapi import Request

from ferrolm.engine.outputs import CompletionOutput
from ferrolm.server.errors import ApiError
from ferrolm.server.limits import check_request_limits
from ferrolm.server.protocol import ChatCompletionRequest
from ferrolm.server.serving import Job, Serving
from ferrolm.server.serving_completions import top_entries


class ChatServing(Serving):
    async def create(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model)
        body.check_supported()
        check_request_limits(self.config, body.n, 1, body.stop_list())
        if body.max_completion_tokens is not None and body.max_completion_tokens < 1:
            raise ApiError(
                400,
                f"max_completion_tokens must be >= 1, got {body.max_completion_tokens}",
                param="max_completion_tokens",
            )
        conversation = body.conversation()
        try:
            prompt_ids = await self.engine.encode_chat(conversation)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        max_tokens = body.max_new_tokens()
        if max_tokens is None:
            max_tokens = self.engine.default_max_tokens(len(prompt_ids))
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, top)
        self.check(prompt_ids, params)
        make = functools.partial(self._choice, top_n=top or 0)
        job = Job("chat.completion", [prompt_ids], params, body.stream, body.include_usage, make, "chatcmpl")
        return await self.respond(request, job)

    def _choice(
        self,
        index: int,
        out: CompletionOutput,
        new_from: int,
        delta: str,
        finish,
        stream: bool,
        top_n: int = 0,
    ) -> dict:
        logprobs = None
        if out.logprobs is not None:

            def entry(t: int, lp: float) -> dict:
                s = self.engine.token_text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}

            logprobs = {
                "content": [
                    {**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in top_entries(lp, top_n)]}
                    for t, lp in zip(out.token_ids[new_from:], out.logprobs[new_from:])
                ]
            }
        if stream:
            delta_msg = {"role": "assistant", "content": delta} if new_from == 0 else {"content": delta}
            return {"index": index, "delta": delta_msg, "logprobs": logprobs, "finish_reason": finish}
        message = {"role": "assistant", "content": delta}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
