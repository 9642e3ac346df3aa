import pytest
import torch
import torch.nn.functional as F

from ferrolm.attention import AttentionMetadata, paged_attention
from ferrolm.kv.dtypes import FORMATS, KvCacheDtype
from ferrolm.kv.pool import KvPool

H, KVH, D, BS = 4, 2, 64, 4


def _dense(q, k, v, start):
    """Reference: causal attention of q (positions start..) over k, v (positions 0..)."""
    n, L = q.shape[0], k.shape[0]
    mask = torch.arange(L).unsqueeze(0) <= (start + torch.arange(n)).unsqueeze(1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(0, 1).reshape(n, H * D)


@pytest.mark.parametrize("dtype", list(KvCacheDtype))
def test_batched_mixed_step_matches_dense(dtype):
    """Two sequences with cached context plus a fresh prefill and a decode, in one step."""
    fmt = FORMATS[dtype]
    torch.manual_seed(0)
    pool = KvPool(fmt, 1, KVH, D, num_blocks=16, block_size=BS)
    # (tokens already cached, new tokens, block table) per sequence; tables scattered on purpose.
    seqs = [(0, 7, [5, 2]), (9, 1, [0, 9, 3]), (3, 6, [11, 4, 7]), (12, 1, [1, 8, 6, 12])]
    full_k = [torch.randn(c + n, KVH, D) for c, n, _ in seqs]
    full_v = [torch.randn(c + n, KVH, D) for c, n, _ in seqs]
    # Cache the earlier tokens the way a previous step would have.
    for (c, _, table), k, v in zip(seqs, full_k, full_v):
        if c:
            pos = torch.arange(c)
            slots = torch.tensor(table)[pos // BS] * BS + pos % BS
            pool.write(0, slots, k[:c], v[:c])
    meta = AttentionMetadata.build([t for *_, t in seqs], [c for c, *_ in seqs], [n for _, n, _ in seqs], BS)
    qs = [torch.randn(n, H, D) for _, n, _ in seqs]
    out = paged_attention(
        torch.cat(qs),
        torch.cat([k[c:] for (c, *_), k in zip(seqs, full_k)]),
        torch.cat([v[c:] for (c, *_), v in zip(seqs, full_v)]),
        0,
        pool,
        meta,
        scale=D**-0.5,
    )
    # What the cache holds is what the reference must see: quantized and read back.
    expected = torch.cat(
        [
            _dense(q, fmt.dequantize(*fmt.quantize(k)), fmt.dequantize(*fmt.quantize(v)), c)
            for (c, *_), q, k, v in zip(seqs, qs, full_k, full_v)
        ]
    )
    assert out.shape == (sum(n for _, n, _ in seqs), H * D)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_metadata_slots_follow_block_tables():
    meta = AttentionMetadata.build([[3, 1], [0]], [2, 0], [3, 2], BS)
    # seq 0 computes positions 2,3,4 -> block 3 offsets 2,3 then block 1 offset 0.
    assert meta.slot_mapping.tolist() == [14, 15, 4, 0, 1]
    [prefill] = meta.groups  # both sequences compute several tokens: one group
    assert prefill.block_tables.tolist() == [[3, 1], [0, 0]]
    assert prefill.max_q == 3 and prefill.num_seqs == 2


def test_decodes_and_prefills_form_separate_groups():
    meta = AttentionMetadata.build([[0, 4], [1, 2], [3]], [5, 0, 2], [1, 7, 1], BS)
    decode, prefill = meta.groups
    assert decode.token_index.tolist() == [0, 8] and decode.max_q == 1 and decode.num_seqs == 2
    assert prefill.token_index.tolist() == list(range(1, 8)) and prefill.max_q == 7
