"""LLMEngine: requests in, one step at a time, outputs out."""

from __future__ import annotations

import itertools
import logging

import torch

from ferrolm.attention import select_backend
from ferrolm.config import EngineConfig
from ferrolm.engine.outputs import CompletionOutput, RequestOutput
from ferrolm.engine.runner import ModelRunner
from ferrolm.engine.sampler import sample
from ferrolm.engine.sampling_params import SamplingParams
from ferrolm.engine.scheduler import ScheduledSeq, Scheduler
from ferrolm.engine.sequence import Request, SeqStatus, Sequence
from ferrolm.kv.blocks import BlockManager
from ferrolm.kv.groups import KvGroups
from ferrolm.kv.pool import KvPool, num_blocks_for_budget, staging_bytes
from ferrolm.models.families import family_by_name
from ferrolm.models.loader import load_model
from ferrolm.models.registry import resolve_model
from ferrolm.runtime import resolve_compute_dtype, resolve_device, tune_allocator
from ferrolm.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("ferrolm")


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        tune_allocator()
        self.config = config
        path = resolve_model(config.model.name)
        wd = config.model.weight_dtype
        self.device = resolve_device(config.model.device)
        self.compute_dtype = resolve_compute_dtype(config.model.dtype if wd == "auto" else wd, self.device)
        # 4-bit weights as shipped run on the compiled CPU kernels; on CUDA they are dequantized.
        keep = wd == "auto" and self.device.type == "cpu"
        self.model = load_model(path, self.compute_dtype, "auto" if keep else "dense", self.device)
        self.weights = self.model.weights_description()
        mcfg = self.model.config
        self.tokenizer = Tokenizer.from_model_path(
            path,
            mcfg.eos_token_ids,
            chat_template=config.model.chat_template,
            family_template=family_by_name(mcfg.family).chat_template,
        )
        self.max_model_len = config.model.max_model_len or mcfg.max_position_embeddings
        kv = config.kv_cache
        self.kv_spec = kv.spec(mcfg.num_layers)
        self.backend = select_backend(kv.attention_backend, self.kv_spec, self.device)
        bs = kv.resolved_block_size(self.kv_spec)
        sched = config.scheduler
        # Per-channel formats stage the blocks written in a step, and the blocks still being
        # filled from the step before, in fp16 until they are full.
        staging_rows = sched.max_num_batched_tokens // bs + 2 * sched.max_num_seqs + 1
        # Sliding-window layers in their own groups of block tables, which drop the blocks
        # that left the window (kv/groups.py); a block is one group's layers.
        self.kv_groups = KvGroups.plan(self.model.layer_windows(), self.kv_spec)
        if self.kv_groups.note:
            log.info("KV groups: %s", self.kv_groups.note)
        groups = self.kv_groups
        # An explicit count is in blocks of every layer: the same memory in group blocks
        # (and the null block that out-of-window table entries point at).
        explicit = kv.num_blocks and kv.num_blocks * groups.num_groups + groups.frees_windows
        num_blocks = explicit or num_blocks_for_budget(
            kv.memory_gb,
            self.kv_spec,
            mcfg.num_layers,
            mcfg.num_kv_heads,
            mcfg.head_dim,
            bs,
            staging_rows,
            self.kv_groups.group_size,
        )
        if num_blocks < 1 and self.kv_spec.staged:
            staged = staging_bytes(self.kv_spec, mcfg.num_kv_heads, mcfg.head_dim, bs, staging_rows)
            raise ValueError(
                f"the KV budget ({kv.memory_gb} GiB) holds no block once the fp16 staging rows of the "
                f"per-channel format ({staged / 2**20:.0f} MiB for {staging_rows} blocks being filled) are "
                "taken; raise memory_gb, or lower max_num_seqs / max_num_batched_tokens"
            )
        self.pool = KvPool(
            self.kv_spec,
            mcfg.num_layers,
            mcfg.num_kv_heads,
            mcfg.head_dim,
            num_blocks,
            bs,
            self.model.device,
            # Every KV group fills its own blocks; a slot's staging tensor serves all groups,
            # so its rows are per group (the same bytes: group_size slots, not every layer).
            staging_rows=staging_rows * groups.num_groups,
            groups=self.kv_groups,
        )
        self.blocks = BlockManager(num_blocks, bs, kv.enable_prefix_caching, self.kv_groups.windows)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        # With sliding windows one sequence may outgrow what the cache holds for every layer.
        self.max_sequence_tokens = self.blocks.longest_sequence(
            self.scheduler.chunk_limit, self.max_model_len
        )
        graphs = None
        if not config.model.enforce_eager:
            graphs = (config.scheduler.max_num_seqs, -(-self.max_model_len // bs))
        self.runner = ModelRunner(self.model, self.pool, self.backend, graphs)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.num_prompt_tokens = 0  # counters for metrics: tokens of added prompts ...
        self.num_generation_tokens = 0  # ... and tokens sampled
        log.info(
            "model %s on %s | weights %s | compute %s (%s, CPU %s) | KV %s | %d bytes/token | attention %s | "
            "cache holds %d tokens (%d blocks of %d)",
            config.model.name,
            self.device,
            self.weights,
            str(self.compute_dtype).removeprefix("torch."),
            config.model.dtype,
            torch.backends.cpu.get_cpu_capability(),
            self.kv_spec.describe(),
            self.pool.bytes_per_token,
            self.backend.name,
            self.pool.capacity_tokens,
            num_blocks,
            bs,
        )
        if self.kv_groups.frees_windows:
            log.info(
                "KV groups: %d of %d layers (windows %s): blocks that leave a window are freed, "
                "so one sequence may reach %d tokens",
                self.kv_groups.num_groups,
                self.kv_groups.group_size,
                sorted({w for w in self.kv_groups.windows if w}),
                self.max_sequence_tokens,
            )
        log.info("chat template: %s", self.tokenizer.chat_template_source)

    # --- requests ------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Reject what can never run, before anything is allocated."""
        params.validate()
        top = self.config.model.max_logprobs
        if params.logprobs is not None and params.logprobs > top:
            raise ValueError(f"logprobs must be at most {top} (max_logprobs), got {params.logprobs}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > top:
            raise ValueError(
                f"prompt_logprobs must be at most {top} (max_logprobs), got {params.prompt_logprobs}"
            )
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in [*params.logit_bias, *params.stop_token_ids]):
            raise ValueError(f"logit_bias and stop_token_ids take token ids in [0, {vocab})")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens, but max_model_len is {self.max_model_len}: "
                "it must be shorter to leave room for at least one generated token"
            )
        longest = min(num_prompt_tokens + params.max_tokens, self.max_model_len)
        need = self.blocks.max_blocks(longest, self.scheduler.chunk_limit)
        if need > self.blocks.num_usable:
            raise ValueError(
                f"the request needs up to {longest} tokens of KV cache ({need} blocks), more than the "
                f"whole cache holds ({self.max_sequence_tokens} tokens); raise kv_cache memory_gb "
                "or lower max_tokens"
            )

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.encode_prompt(prompt)
        self.check_request(len(ids), params)
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator().manual_seed(params.generator_seed(i))
            seqs.append(
                Sequence(
                    seq_id=next(self._seq_ids),
                    request_id=request_id,
                    index=i,
                    token_ids=list(ids),
                    num_prompt_tokens=len(ids),
                    params=params,
                    detok=IncrementalDetokenizer(self.tokenizer),
                    generator=gen,
                )
            )
        self.requests[request_id] = Request(
            request_id, prompt if isinstance(prompt, str) else None, ids, params, seqs
        )
        for seq in seqs:
            self.scheduler.add(seq)
        self.num_prompt_tokens += len(ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        return self._output(req, {})

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample. A failure that belongs to one request (its
        logits, its sampling, its detokenization) finishes that request with finish_reason
        "error" and its message in RequestOutput.error; the others go on untouched."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        touched: dict[str, Request] = {}
        rows = [self._logit_rows(item) for item in batch]
        batch, per_item, all_logits = self._execute(batch, rows, touched)
        for item, (item_rows, logits) in zip(batch, per_item):
            self._record_prompt_logprobs(item, item_rows, logits, touched)
        ready = self.scheduler.postprocess(batch)
        if self.pool.staging_rows:
            self.pool.retain_staging(self.scheduler.blocks_being_filled())
        if not ready:
            return self._outputs(touched, {})
        ready_ids = {seq.seq_id for seq in ready}
        if all_logits is not None and len(all_logits) == len(ready) == len(batch):
            last = all_logits  # one row per item, each ready: the model's logits, no copy (decode steps)
        else:
            last = torch.stack(
                [lg[-1] for item, (_, lg) in zip(batch, per_item) if item.seq.seq_id in ready_ids]
            )
        tokens, logprobs = self._sample(last, ready, touched)
        deltas: dict[int, str] = {}
        for seq, token, lp in zip(ready, tokens, logprobs):
            if token is None or seq.finished:
                continue  # its request failed
            try:
                deltas[seq.seq_id] = self._append_token(seq, token, lp)
            except Exception as e:
                self._fail(self.requests[seq.request_id], e, touched)
                continue
            self.num_generation_tokens += 1
            touched[seq.request_id] = self.requests[seq.request_id]
        return self._outputs(touched, deltas)

    def _logit_rows(self, item: ScheduledSeq) -> list[int]:
        """Which of the item's new tokens need logits: the last (for sampling), and the
        prompt positions it computes when its request asked for prompt logprobs (position
        i predicts prompt token i + 1). The first of n sequences carries them."""
        seq, n = item.seq, item.num_new_tokens
        if seq.params.prompt_logprobs is None or seq.index != 0:
            return [n - 1]
        start, stop = seq.num_computed, min(seq.num_computed + n, seq.num_prompt_tokens - 1)
        return sorted({*range(0, max(0, stop - start)), n - 1})

    def _record_prompt_logprobs(self, item, rows: list[int], logits: torch.Tensor, touched) -> None:
        seq = item.seq
        k = seq.params.prompt_logprobs
        if k is None or seq.index != 0 or seq.finished:
            return
        req = self.requests[seq.request_id]
        start = seq.num_computed
        positions = [start + r for r in rows if start + r < seq.num_prompt_tokens - 1]
        # After a preemption the prompt is recomputed: hand out only positions not yet covered.
        new = [i for i, pos in enumerate(positions) if pos >= req.prompt_logprobs_done]
        if not new:
            return
        logp = logits[new[0] : new[-1] + 1].log_softmax(-1)
        first = positions[new[0]]
        req.prompt_logprobs_done = first + len(new)
        touched[req.request_id] = req
        if k == -1:
            req.prompt_logprob_rows, req.prompt_logprobs_start = logp, first
            return
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        targets = seq.token_ids[first + 1 : first + 1 + len(new)]
        top = torch.topk(logp, k) if k > 0 else None
        for r, t in enumerate(targets):
            entry = {t: float(logp[r, t])}
            if top is not None:
                entry.update({int(i): float(v) for i, v in zip(top.indices[r], top.values[r])})
            req.prompt_logprobs.append(entry)

    def _execute(self, batch: list[ScheduledSeq], rows: list[list[int]], touched: dict[str, Request]):
        """Logits of each item's `rows`. If the batched run fails, each sequence runs alone
        (its K/V are rewritten to the same slots, so this is safe) and only those that fail
        alone are finished with an error. Returns (the items that succeeded, their
        (rows, logits) pairs, the batched run's logits of all rows or None)."""
        try:
            logits = self.runner.execute(batch, rows)
            return batch, list(zip(rows, logits.split([len(r) for r in rows]))), logits
        except Exception:
            log.exception("batched model step failed; retrying its %d sequences one by one", len(batch))
        done: list[tuple[ScheduledSeq, tuple[list[int], torch.Tensor]]] = []
        for item, item_rows in zip(batch, rows):
            try:
                done.append((item, (item_rows, self.runner.execute([item], [item_rows]))))
            except Exception as e:
                self._fail(self.requests[item.seq.request_id], e, touched)
        done = [(item, r) for item, r in done if not item.seq.finished]  # siblings of failures
        return [item for item, _ in done], [r for _, r in done], None

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], touched: dict[str, Request]):
        """sample() over all rows; on failure row by row, failing only the bad rows' requests."""
        try:
            return sample(logits, seqs)
        except Exception:
            log.exception("sampling failed; sampling the %d rows one by one", len(seqs))
        tokens: list[int | None] = []
        logprobs: list[dict[int, float] | None] = []
        for i, seq in enumerate(seqs):
            try:
                t, lp = sample(logits[i : i + 1], [seq])
                tokens.append(t[0])
                logprobs.append(lp[0])
            except Exception as e:
                self._fail(self.requests[seq.request_id], e, touched)
                tokens.append(None)
                logprobs.append(None)
        return tokens, logprobs

    def _fail(self, req: Request, error: Exception, touched: dict[str, Request]) -> None:
        """Finish every sequence of `req` with "error", freeing its blocks."""
        log.warning("request %s failed: %s: %s", req.request_id, type(error).__name__, error)
        req.error = req.error or f"{type(error).__name__}: {error}"
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "error")
        touched[req.request_id] = req

    def _outputs(self, touched: dict[str, Request], deltas: dict[int, str]) -> list[RequestOutput]:
        outputs = [self._output(req, deltas) for req in touched.values()]
        for req in touched.values():
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: dict[int, float] | None) -> str:
        """Append a sampled token, update the text, finish the sequence if it is done.
        Returns the new text that is safe to stream: stop strings are cut off, and a tail
        that could be the start of a stop string is held back until it is decided."""
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        p = seq.params
        before = len(seq.text)
        reason: str | None = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.tokenizer.eos_token_ids):
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        seq.text += seq.detok.add(token)
        if reason is not None:
            seq.text += seq.detok.flush()  # the last token may end in an incomplete character
        for stop in p.stop:
            # Only the tail can hold a new match: look back len(stop) before the new text.
            at = seq.text.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                seq.text = seq.text[:at]
                reason = "stop"
                break
        if reason is not None:
            self.scheduler.finish(seq, reason)
            ready = len(seq.text)
        else:
            ready = len(seq.text) - _partial_stop_len(seq.text, p.stop)
        delta = seq.text[seq.num_streamed : ready]
        seq.num_streamed = max(seq.num_streamed, ready)
        return delta

    def _output(self, req: Request, deltas: dict[int, str]) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.output_ids),
                finish_reason=s.finish_reason,
                logprobs=list(s.logprobs) if s.params.logprobs is not None else None,
                delta_text=deltas.get(s.seq_id, ""),
            )
            for s in req.seqs
        ]
        out = RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            outs,
            req.finished,
            error=req.error,
            prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
            prompt_logprob_rows=req.prompt_logprob_rows,
            prompt_logprobs_start=req.prompt_logprobs_start,
        )
        req.prompt_logprob_rows = None  # handed out once: -1 mode delivers each step's rows
        return out

    # --- introspection -----------------------------------------------------------
    def stats(self) -> dict[str, object]:
        running = sum(1 for s in self.scheduler.running if s.status is SeqStatus.RUNNING)
        return {
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "kv_dtype": self.kv_spec.describe(),
            "attention_backend": self.backend.name,
            "kv_bytes_per_token": self.pool.bytes_per_token,
            "kv_blocks_total": self.blocks.num_usable,  # (not the null block of window groups)
            "kv_blocks_used": self.blocks.num_used,
            "kv_block_size": self.blocks.block_size,
            "kv_tokens_capacity": self.pool.capacity_tokens,
            "kv_pool_bytes": self.pool.nbytes(),
            "kv_block_bytes": self.pool.block_nbytes,
            "kv_used_bytes": self.blocks.num_used * self.pool.block_nbytes,
            "kv_groups": self.kv_groups.num_groups,
            "prefix_cache_hits": self.scheduler.prefix_cache_hits,
            "prefix_cache_queries": self.scheduler.prefix_cache_queries,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": running,
            "num_waiting": len(self.scheduler.waiting),
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.num_generation_tokens,
        }


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
