"""Decode steps replayed from CUDA graphs.

A decode step is hundreds of small kernel launches, and from Python each launch costs
more than its kernel: the first GPU check measured ~16 ms of host time per Llama-1B step
at one sequence, against ~1 ms of GPU work. As vLLM does, decode-only steps are captured
once per padded batch size (1, 2, 4, 8, 16, 32, ... up to max_num_seqs) and replayed:
the step's token ids, positions, KV slots, block tables and lengths are copied into
static buffers, and one replay runs every layer and the head. Padding rows store
nothing (slot -1) and attend to nothing (no new token); the Triton attention kernel
takes its launch shape from the buffers alone. A model with several KV groups
(sliding-window layers, kv/groups.py) has static slots and block tables per group.
Prefill chunks and mixed steps run eagerly. Without CUDA (tests under Triton's interpreter) the same static-buffer path
runs eagerly, without capture.
"""

from __future__ import annotations

import logging

import torch

from ferrolm.attention import AttentionMetadata, StepContext

log = logging.getLogger("ferrolm")


def batch_sizes(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, then powers of 2 up to the first >= max_seqs."""
    sizes = [1]
    while sizes[-1] < max_seqs:
        sizes.append(sizes[-1] * 2)
    return sizes


class DecodeGraphs:
    def __init__(self, model, pool, backend, max_seqs: int, max_blocks: int) -> None:
        self.model, self.pool, self.backend = model, pool, backend
        self.device = model.device
        self.capture = self.device.type == "cuda"
        self.sizes = batch_sizes(max_seqs)
        self.max_blocks = max_blocks
        n, dev = self.sizes[-1], self.device
        self.num_groups = pool.groups.num_groups  # KV groups: block tables and slots per group
        # Per batch size, one int32 buffer for the step's small inputs (one host->device
        # copy): token ids, positions, context lengths, query starts, each group's KV slots.
        # Block tables are one buffer per group for all sizes, copied as wide as this
        # step's longest table.
        G = self.num_groups
        self.small = {s: torch.zeros((4 + G) * s + 1, dtype=torch.int32, device=dev) for s in self.sizes}
        self.tables = torch.zeros((G, n, max_blocks), dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.failed: str | None = None

    def applies(self, batch, rows, all_logits: bool) -> bool:
        """Decode-only steps (one new token per sequence, its logits wanted) that fit."""
        if self.failed or all_logits or not batch or len(batch) > self.sizes[-1]:
            return False
        if any(item.num_new_tokens != 1 for item in batch):
            return False
        if rows is not None and any(r != [0] for r in rows):
            return False
        return max(len(item.seq.block_tables[0]) for item in batch) <= self.max_blocks

    def run(self, batch) -> torch.Tensor | None:
        """fp32 logits [B, V] of the batch's decode step (None: capture failed, run it
        eagerly; graphs stay off from then on)."""
        B, G = len(batch), self.num_groups
        size = next(s for s in self.sizes if s >= B)
        bs = self.pool.block_size
        ids, pos = [], []
        slots = [[-1] * size for _ in range(G)]  # padding rows store nothing
        nblk = max(len(item.seq.block_tables[0]) for item in batch)  # every group's length
        flat = [0] * (G * size * nblk)
        for i, item in enumerate(batch):
            seq = item.seq
            p = seq.num_computed
            ids.append(seq.token_ids[p])
            pos.append(p)
            for g, table in enumerate(seq.block_tables):
                slots[g][i] = table[p // bs] * bs + p % bs
                at = (g * size + i) * nblk
                flat[at : at + len(table)] = table
        pad = [0] * (size - B)
        small = ids + pad + pos + pad + [p + 1 for p in pos] + pad
        small += list(range(B + 1)) + [B] * (size - B)  # padding sequences: no new token
        for g in range(G):
            small += slots[g]
        self.small[size].copy_(torch.tensor(small, dtype=torch.int32))
        # Columns past nblk keep older block ids: each sequence reads ctx_len keys only.
        self.tables[:, :size, :nblk].copy_(torch.tensor(flat, dtype=torch.int32).view(G, size, nblk))
        if size not in self.graphs and not self._capture(size):
            return None
        graph, logits = self.graphs[size]
        if graph is None:  # no CUDA: the same buffers, run eagerly
            logits = self._forward(size)
        else:
            graph.replay()
        return logits[:B]

    def _forward(self, size: int) -> torch.Tensor:
        G = self.num_groups
        ids, positions, ctx_len, q_start, *slots = self.small[size].split(
            [size] * 3 + [size + 1] + [size] * G
        )
        metas = [
            AttentionMetadata.static_decode(
                slots[g],
                self.tables[g, :size],
                q_start,
                ctx_len,
                self.pool.block_size,
                self.max_blocks * self.pool.block_size,
            )
            for g in range(G)
        ]
        ctx = StepContext(self.pool, self.backend, metas[0], None, metas if G > 1 else None)
        hidden = self.model(ids, positions, ctx)
        return self.model.compute_logits(hidden)

    def _capture(self, size: int) -> bool:
        if not self.capture:
            self.graphs[size] = (None, torch.empty(0))
            return True
        try:
            self._capture_cuda(size)
            return True
        except Exception as e:  # eager steps still work; say why once
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed (%s); decode steps run eagerly", self.failed)
            return False

    def _capture_cuda(self, size: int) -> None:
        # Warm up eagerly on a side stream (Triton compiles, the backend fills its caches);
        # the buffers hold this step's inputs, so the K/V written are the step's own.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = self._forward(size)
        self.graphs[size] = (graph, logits)
        log.info("captured a CUDA graph for decode steps of %d sequences", size)
