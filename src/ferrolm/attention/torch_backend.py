"""The torch attention backend: the reference for every KV format.

Batched over (kv head, sequence) with contiguous operands and no Python loop over
sequences or blocks, in fp32 whatever the compute dtype (the softmax and the sums
over the context stay exact enough, and fp32 matmuls are the fast ones on AVX2
CPUs). Formats with one scale per token fold it in rather than dequantizing K and
V: q . (s_k k_q) = s_k (q . k_q) scales the scores, and sum_j p_j (s_v,j v_q,j) =
sum_j (p_j s_v,j) v_q,j scales the weights, so K and V are only cast, which on a
bandwidth-bound CPU saves a full pass over the context. Formats with several
scales per vector (int4 groups) are dequantized after the gather.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ferrolm.attention.metadata import AttentionGroup, AttentionMetadata
from ferrolm.kv.dtypes import KvFormat
from ferrolm.kv.fixed_point import round_query
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec


def _widen_e4m3(q: torch.Tensor) -> torch.Tensor:
    """E4M3 bits s.eeee.mmm placed as fp16 s.0eeee.mmm0000000 read 2^8 too small, subnormals
    included (the exponent biases differ by 15 - 7); the caller multiplies by 256. fp16
    keeps every code a normal or subnormal fp16 number of moderate size, so nothing is
    flushed or lost when it is widened to fp32. Shifts and masks run in place."""
    x = q.view(torch.int8).to(torch.int16)  # sign-extended: bits 7..15 copy the sign
    x <<= 7  # sign now in bit 15, with a stray copy in bit 14 for negative codes
    x &= -0x4001  # 0xBFFF: clear bit 14
    return x.view(torch.float16)


def _widen_e5m2(q: torch.Tensor) -> torch.Tensor:
    """E5M2 is the high byte of fp16."""
    x = q.view(torch.int8).to(torch.int16)
    x <<= 8
    return x.view(torch.float16)


# torch's own fp8 -> fp32 cast is scalar code on CPU, many times slower than these exact
# bit tricks: storage dtype -> (widen, factor) with widen(q) * factor == q.
WIDEN: dict[torch.dtype, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    torch.float8_e4m3fn: (_widen_e4m3, 256.0),
    torch.float8_e5m2: (_widen_e5m2, 1.0),
}


def read(fmt: KvFormat, data: torch.Tensor, scale: torch.Tensor | None):
    """Gathered [H, B, L, data_dim] -> (fp32 values [H, B, L, D], per-token scale [H, B, L]
    to fold in, or None when the values are already scaled)."""
    if fmt.pack > 1 or (scale is not None and scale.shape[-1] > 1):
        return fmt.dequantize(data, scale), None
    widen, factor = WIDEN.get(fmt.storage, (None, 1.0))
    values = (widen(data) if widen else data).float()
    if scale is None:
        return values * factor if factor != 1.0 else values, None
    s = scale[..., 0].float()
    return values, s * factor if factor != 1.0 else s


class TorchBackend:
    name = "torch"

    @classmethod
    def supports_device(cls, device: torch.device | str) -> bool:
        return True  # plain torch ops: any device

    def unsupported(self, spec: KvSpec) -> str | None:
        return None  # the reference reads every format

    def write(self, pool: KvPool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        pool.write(layer, slots, k, v)

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        pool: KvPool,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        T, H, D = q.shape
        if len(meta.groups) == 1 and meta.groups[0].token_index.numel() == T:
            return self._attend_group(q, layer, pool, meta.groups[0], scale, window)
        out = q.new_empty((T, H * D))
        for g in meta.groups:
            out[g.token_index] = self._attend_group(q[g.token_index], layer, pool, g, scale, window)
        return out

    def _attend_group(
        self, q: torch.Tensor, layer: int, pool: KvPool, g: AttentionGroup, scale: float, window=None
    ) -> torch.Tensor:
        """One group: q [Tg, H, D] in the group's token order -> [Tg, H * D]."""
        _, H, D = q.shape
        B, Q = g.num_seqs, g.max_q
        kv = pool.gather(layer, g.block_tables)
        k, k_scale = read(kv.k_fmt, kv.k, kv.k_scale)  # [KVH, B, L, D], [KVH, B, L]
        v, v_scale = read(kv.v_fmt, kv.v, kv.v_scale)
        KVH, L = k.shape[0], k.shape[2]
        G = H // KVH
        qp = q.new_zeros((B * Q, H, D), dtype=torch.float32)
        qp[g.q_dest] = q.float()
        # [B, Q, KVH, G, D] -> [KVH, B, G * Q, D]: query head h reads kv head h // G.
        qp = qp.view(B, Q, KVH, G, D).permute(2, 0, 3, 1, 4).reshape(KVH, B, G * Q, D)
        if kv.k_fmt.fixed_point_query:
            qp = round_query(qp)
        scores = torch.matmul(qp, k.transpose(-1, -2))  # [KVH, B, G * Q, L]
        factor = k_scale.unsqueeze(2) * scale if k_scale is not None else scale
        scores = (scores * factor).view(KVH, B, G, Q, L)
        if kv.k_stage is not None:  # per-channel keys: the query's own block from staging
            own = torch.matmul(qp, kv.k_stage.transpose(-1, -2)).view(KVH, B, G, Q, L) * scale
            scores = torch.where(g.same_block.unsqueeze(0), own, scores)
        mask = g.window_mask(window) if window else g.mask
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(KVH, B, G * Q, L)
        if v_scale is not None:
            probs = probs * v_scale.unsqueeze(2)
        if kv.v_stage is not None:  # per-channel values: the query's own block from staging
            own = g.same_block.unsqueeze(0).expand(KVH, B, G, Q, L).reshape(KVH, B, G * Q, L)
            out = torch.matmul(probs * ~own, v) + torch.matmul(probs * own, kv.v_stage)
        else:
            out = torch.matmul(probs, v)  # [KVH, B, G * Q, D]
        out = out.view(KVH, B, G, Q, D).permute(1, 3, 0, 2, 4).reshape(B * Q, H * D)
        return out[g.q_dest].to(q.dtype)
