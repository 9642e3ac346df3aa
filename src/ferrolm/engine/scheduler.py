"""Continuous batching with chunked prefill and preemption by recompute.

Each step takes the running sequences first (decodes, or the next chunk of a
prefill in progress), then admits waiting ones, all under max_num_batched_tokens
and max_num_seqs. A waiting sequence is admitted when free KV blocks hold its whole
prompt (not its generation), though only the tokens about to be computed get blocks,
so a dtype with fewer bytes per token admits more sequences. When a running sequence
needs a block and none is free, the most recently admitted sequence is preempted: its
blocks are freed and it waits to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ferrolm.config import SchedulerConfig
from ferrolm.engine.sequence import SeqStatus, Sequence
from ferrolm.kv.blocks import BlockManager


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found cached (their prefill skipped)
        # Admission leaves this many blocks free for the running sequences' decode growth
        # (vLLM's 1% watermark), so a new arrival is not admitted only to be preempted.
        self.watermark = max(1, blocks.num_blocks // 100)

    @property
    def chunk_limit(self) -> int:
        """Most tokens one sequence computes in a step (vLLM's long_prefill_token_threshold)."""
        return self.config.long_prefill_token_threshold or self.config.max_num_batched_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed, budget, self.chunk_limit)
            if not self._make_room(seq, seq.num_computed + n):
                continue
            self.blocks.grow(seq, seq.num_computed + n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # A request for prompt logprobs needs every prompt position computed (as vLLM).
            cached = self.blocks.lookup(seq.token_ids if seq.params.prompt_logprobs is None else [])
            num_cached = cached.num_blocks * self.blocks.block_size
            n = min(seq.num_tokens - num_cached, budget, self.chunk_limit)
            reserve = self.watermark if self.running else 0
            # Room for the whole prompt, not only its first chunk (as vLLM v0's can_allocate):
            # a prompt admitted into too little room is preempted part way through its
            # prefill, and readmitted as soon as that frees its blocks, over and over.
            need = self.blocks.blocks_to_admit(cached, seq.num_tokens, self.chunk_limit)
            if need > self.blocks.num_free - reserve:
                break
            self.waiting.popleft()
            if self.blocks.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_cached
            self.blocks.take_cached(seq, cached)
            self.blocks.grow(seq, num_cached + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled

    def postprocess(self, batch: list[ScheduledSeq]) -> list[Sequence]:
        """After the model ran `batch`: count its tokens as computed and register newly
        full blocks for prefix caching. Returns the sequences whose tokens are now all
        computed, in batch order: those sample their next token from this step's logits."""
        ready = []
        for item in batch:
            item.seq.num_computed += item.num_new_tokens
            self.blocks.register_full_blocks(item.seq)
            self.blocks.release_out_of_window(item.seq)
            if item.seq.num_computed == item.seq.num_tokens:
                ready.append(item.seq)
        return ready

    def blocks_being_filled(self) -> set[int]:
        """The partly written last block of each running sequence (in every group)."""
        bs = self.blocks.block_size
        return {t[s.num_computed // bs] for s in self.running if s.num_computed % bs for t in s.block_tables}

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the newest running sequences until `seq` can grow; False if `seq` itself went."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
