import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ferrolm.attention import AttentionMetadata, paged_attention
from ferrolm.attention.hadamard import fwht, hadamard
from ferrolm.kv.dtypes import FORMATS, KvCacheDtype, KvFormat
from ferrolm.kv.fixed_point import round_query
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec

H, KVH, D, BS = 4, 2, 64, 4
LOSSY = [d for d in KvCacheDtype if d is not KvCacheDtype.FP32]
PAIRS = [(KvCacheDtype.FP32, KvCacheDtype.FP32)] + [(k, v) for k in LOSSY for v in LOSSY]


def _dense(q, k, v, start):
    """Reference: causal attention of q (positions start..) over k, v (positions 0..)."""
    n, L = q.shape[0], k.shape[0]
    mask = torch.arange(L).unsqueeze(0) <= (start + torch.arange(n)).unsqueeze(1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(0, 1).reshape(n, H * D)


def _as_cached(fmt: KvFormat, x: torch.Tensor) -> torch.Tensor:
    """What attention sees of x once stored in fmt: quantized in the rotated basis if the
    format rotates, then turned back (H is symmetric and orthonormal)."""
    if not fmt.rotated:
        return fmt.dequantize(*fmt.quantize(x))
    h = hadamard(x.shape[-1])
    return fmt.dequantize(*fmt.quantize(fwht(x))) @ h  # stored as the layer rotates: fwht


def _as_dotted(fmt: KvFormat, q: torch.Tensor) -> torch.Tensor:
    """The query keys stored in fmt are dotted with: integer-coded keys see it rounded to
    fixed point (kv/fixed_point.py) in the basis they are stored in."""
    if not fmt.fixed_point_query:
        return q
    if not fmt.rotated:
        return round_query(q)
    return round_query(fwht(q)) @ hadamard(q.shape[-1])


def _step(spec: KvSpec, seed: int = 0):
    """Two sequences with cached context plus a fresh prefill and a decode, in one step,
    the cached part written by an earlier step through the same path."""
    torch.manual_seed(seed)
    pool = KvPool(spec, 1, KVH, D, num_blocks=16, block_size=BS, staging_rows=16)
    # (tokens already cached, new tokens, block table) per sequence; tables scattered on purpose.
    seqs = [(0, 7, [5, 2]), (9, 1, [0, 9, 3]), (3, 6, [11, 4, 7]), (12, 1, [1, 8, 6, 12])]
    full_k = [torch.randn(c + n, KVH, D) for c, n, _ in seqs]
    full_v = [torch.randn(c + n, KVH, D) for c, n, _ in seqs]
    cached = [(c, t) for c, _, t in seqs if c]
    earlier = AttentionMetadata.build([t for _, t in cached], [0] * len(cached), [c for c, _ in cached], BS)
    ck = torch.cat([k[:c] for (c, *_), k in zip(seqs, full_k) if c])
    cv = torch.cat([v[:c] for (c, *_), v in zip(seqs, full_v) if c])
    paged_attention(torch.randn(len(ck), H, D), ck, cv, 0, pool, earlier, scale=D**-0.5)
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
    return out, seqs, qs, full_k, full_v, pool


def _cached(fmt, x, query_pos):
    """x [L, KVH, D] as the query at query_pos reads it from the cache. Per-channel formats:
    the query's own block as fp16, every earlier (full) block through its block codes."""
    if not fmt.per_channel_block:
        return _as_cached(fmt, x)
    out = x.half().float()
    own = query_pos // BS
    for b in range(own):
        blk = x[b * BS : (b + 1) * BS].half().transpose(0, 1)  # [KVH, BS, D]
        out[b * BS : (b + 1) * BS] = fmt.dequantize_block(*fmt.quantize_block(blk)).transpose(0, 1)
    return out


def _reference(fk, fv, q, k, v, start):
    """Dense attention, one query at a time (each may read the cache differently)."""
    rows = []
    for i in range(q.shape[0]):
        p = start + i
        qi = _as_dotted(fk, q[i : i + 1])
        rows.append(_dense(qi, _cached(fk, k[: p + 1], p), _cached(fv, v[: p + 1], p), p))
    return torch.cat(rows)


@pytest.mark.parametrize("k,v", PAIRS, ids=[f"{k.value}/{v.value}" for k, v in PAIRS])
def test_batched_mixed_step_matches_dense_for_every_pair(k, v):
    spec = KvSpec.build(1, k, value_dtype=v)
    fk, fv = spec.layers[0].key, spec.layers[0].value
    out, seqs, qs, full_k, full_v, pool = _step(spec)
    # What the cache holds is what the reference must see: quantized and read back.
    expected = torch.cat(
        [_reference(fk, fv, q, kk, vv, c) for (c, *_), q, kk, vv in zip(seqs, qs, full_k, full_v)]
    )
    assert out.shape == (sum(n for _, n, _ in seqs), H * D)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_rotation_without_quantization_equals_the_plain_path():
    """A test-only fp32 format that rotates: the rotation alone changes nothing."""
    rot = dataclasses.replace(FORMATS[KvCacheDtype.FP32], dtype="fp32_rotated", rotated=True)
    plain, *_ = _step(KvSpec.uniform(FORMATS[KvCacheDtype.FP32], 1))
    rotated, *_ = _step(KvSpec.uniform(rot, 1))
    keys_only, *_ = _step(KvSpec.uniform(rot, 1, value=FORMATS[KvCacheDtype.FP32]))
    torch.testing.assert_close(rotated, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys_only, plain, atol=1e-5, rtol=1e-5)


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


def test_unknown_backend_is_rejected_with_the_choices():
    from ferrolm.attention import select_backend

    with pytest.raises(ValueError, match="valid: auto, cpu, triton, torch"):
        select_backend("cuda-magic", KvSpec.build(2, "fp16"))
    assert select_backend("torch", KvSpec.build(2, "int8/int4")).name == "torch"
