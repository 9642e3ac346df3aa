"""Model runner: turns a scheduled batch into tensors and runs the model once."""

from __future__ import annotations

import torch

from ferrolm.attention import AttentionBackend, AttentionMetadata, StepContext
from ferrolm.engine.cuda_graphs import DecodeGraphs
from ferrolm.engine.scheduler import ScheduledSeq
from ferrolm.kv.pool import KvPool
from ferrolm.models.decoder_plan import build_plan
from ferrolm.models.llama import LlamaModel


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        pool: KvPool,
        backend: AttentionBackend,
        graphs: tuple[int, int] | None = None,
    ) -> None:
        """graphs: (max sequences, max blocks per sequence) to replay decode steps from
        CUDA graphs (engine/cuda_graphs.py; Triton backend only), or None: eager steps."""
        self.model = model
        self.pool = pool
        self.backend = backend
        # The decoder layers as one compiled loop over this pool (None: the Python layers;
        # set it to None to force them). Built here, not on the model: engines share models.
        self.plan = build_plan(model, pool, backend)
        self.graphs = None
        if graphs is not None and getattr(backend, "name", "") == "triton":
            self.graphs = DecodeGraphs(model, pool, backend, *graphs)

    @torch.inference_mode()
    def execute(
        self, batch: list[ScheduledSeq], rows: list[list[int]] | None = None, all_logits: bool = False
    ) -> torch.Tensor:
        """Run one step. Returns fp32 logits of each sequence's last new token ([B, V]);
        with `rows`, of the listed new tokens of each sequence (offsets into its new tokens,
        concatenated in batch order); with all_logits, of every new token ([T, V])."""
        if self.graphs is not None and self.graphs.applies(batch, rows, all_logits):
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        ids, positions, starts, news = [], [], [], []
        for item in batch:
            s, n = item.seq.num_computed, item.num_new_tokens
            ids.extend(item.seq.token_ids[s : s + n])
            positions.extend(range(s, s + n))
            starts.append(s)
            news.append(n)
        device = self.model.device
        meta = AttentionMetadata.build(
            [item.seq.block_tables[0] for item in batch], starts, news, self.pool.block_size, device
        )
        group_metas = None
        if self.pool.groups.num_groups > 1:  # one metadata per KV group's block tables
            group_metas = [meta] + [
                meta.with_tables([item.seq.block_tables[g] for item in batch])
                for g in range(1, self.pool.groups.num_groups)
            ]
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            StepContext(self.pool, self.backend, meta, self.plan, group_metas),
        )
        if rows is not None:
            flat, offset = [], 0
            for n, item_rows in zip(news, rows):
                flat.extend(offset + r for r in item_rows)
                offset += n
            hidden = hidden[torch.tensor(flat, dtype=torch.long, device=device)]
        elif not all_logits:
            last = torch.tensor(news, device=device).cumsum(0) - 1
            hidden = hidden[last]
        return self.model.compute_logits(hidden)
