import pytest
import torch

from ferrolm.kv.dtypes import FORMATS, KvCacheDtype
from ferrolm.kv.pool import GIB, KvPool, kv_bytes_per_token, num_blocks_for_budget
from ferrolm.kv.spec import KvSpec

SMOLLM2 = dict(num_layers=30, num_kv_heads=3, head_dim=64)
LOSSY = [d for d in KvCacheDtype if d is not KvCacheDtype.FP32]
PER_TOKEN = [d for d in LOSSY if not FORMATS[d].per_channel_block]
PAIRS = [(k, v) for k in PER_TOKEN for v in PER_TOKEN]


def test_bytes_per_token_matches_design():
    got = {d.value: kv_bytes_per_token(FORMATS[d], **SMOLLM2) for d in KvCacheDtype}
    assert got == {
        "fp32": 46080,
        "fp16": 23040,
        "bf16": 23040,
        "int8": 11880,
        "fp8": 11880,
        "fp8_e5m2": 11880,
        "int4": 6480,
        "int4_g16": 7200,
        "nf4": 6480,
        "int4pc": 8640,
    }
    split = KvSpec.build(30, "int8/int4")
    assert kv_bytes_per_token(split, **SMOLLM2) == 9180
    ends = KvSpec.build(30, "int4", layer_dtypes={"0": "fp16", "-1": "fp16"})
    assert kv_bytes_per_token(ends, **SMOLLM2) == 28 * 216 + 2 * 768


@pytest.mark.parametrize(
    "dtype,ratio", [("int8", 1.9), ("fp8", 1.9), ("fp8_e5m2", 1.9), ("int4", 3.5), ("int8/int4", 2.5)]
)
def test_smaller_formats_hold_more_tokens(dtype, ratio):
    fp16 = num_blocks_for_budget(2.0, KvSpec.build(30, "fp16"), block_size=16, **SMOLLM2)
    other = num_blocks_for_budget(2.0, KvSpec.build(30, dtype), block_size=16, **SMOLLM2)
    assert other / fp16 >= ratio


SPECS = [d.value for d in KvCacheDtype] + ["int8/int4", "fp16/int8", "int4;0=fp16;-1=bf16/fp8", "int4pc/int4"]


@pytest.mark.parametrize("text", SPECS)
def test_real_tensor_bytes_match_accounting(text):
    spec = KvSpec.parse(text, 3)
    n = num_blocks_for_budget(
        0.01, spec, num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, staging_rows=9
    )
    pool = KvPool(spec, 3, 2, 64, n, 16, staging_rows=9)
    # Per-channel halves add their fp16 staging rows (9 rows x 16 tokens), inside the budget.
    staged = 9 * 16 * 2 * 64 * 2 * sum(f.per_channel_block for lk in spec.layers for f in (lk.key, lk.value))
    assert pool.staging_nbytes() == staged
    assert pool.nbytes() == pool.bytes_per_token * pool.capacity_tokens + staged
    assert pool.nbytes() <= 0.01 * GIB
    assert pool.nbytes() > 0.01 * GIB - pool.bytes_per_token * 16  # no block left unused


@pytest.mark.parametrize("k,v", PAIRS, ids=[f"{k.value}/{v.value}" for k, v in PAIRS])
def test_write_then_read_round_trips_every_pair(k, v):
    spec = KvSpec.build(2, k, value_dtype=v)
    pool = KvPool(spec, num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=4, block_size=4)
    keys, values = torch.randn(8, 2, 64), torch.randn(8, 2, 64)
    slots = torch.tensor([12, 13, 14, 15, 4, 5, 6, 7])  # blocks 3 then 1
    pool.write(1, slots, keys, values)
    rk, rv = pool.gather(1, torch.tensor([[3, 1], [1, 3]])).dequantized()
    assert rk.shape == (2, 2, 8, 64)  # [kv_heads, seqs, tokens, head_dim]
    fk, fv = FORMATS[k], FORMATS[v]
    assert torch.equal(rk[:, 0], fk.dequantize(*fk.quantize(keys)).transpose(0, 1))
    assert torch.equal(rv[:, 0], fv.dequantize(*fv.quantize(values)).transpose(0, 1))
    assert torch.equal(rk[:, 1], torch.cat([rk[:, 0, 4:], rk[:, 0, :4]], dim=1))


def test_per_channel_keys_stage_until_a_block_is_full():
    spec = KvSpec.build(1, "int4pc", value_dtype="fp16")
    pool = KvPool(spec, num_layers=1, num_kv_heads=2, head_dim=64, num_blocks=4, block_size=4, staging_rows=3)
    keys = torch.randn(6, 2, 64)
    keys[..., ::8] *= 20
    table = torch.tensor([[2, 0]])
    slots = torch.tensor([8, 9, 10, 11, 0, 1])  # block 2 full, block 0 half
    pool.write(0, slots[:3], keys[:3], keys[:3])  # block 2 partly written: staged in fp16
    view = pool.gather(0, table)
    assert torch.equal(view.k_stage[:, 0, :3], keys[:3].half().float().transpose(0, 1))
    assert view.v_stage is None  # fp16 values are stored per token, never staged
    pool.write(0, slots[3:], keys[3:], keys[3:])  # block 2 completes, block 0 starts
    view = pool.gather(0, table)
    fmt = spec.layers[0].key
    expected = fmt.dequantize_block(*fmt.quantize_block(keys[:4].half().transpose(0, 1)))
    assert torch.equal(view.k[:, 0, :4], expected)  # the codes of the full block
    assert torch.equal(view.k_stage[:, 0, 4:6], keys[4:].half().float().transpose(0, 1))
    pool.retain_staging({0})  # block 2 is full: its row is free again; block 0 keeps its own
    assert pool.row_of[2] == -1 and pool.row_of[0] >= 0 and len(pool._free_rows) == 2
    again = pool.gather(0, table)
    assert torch.equal(again.k, view.k) and torch.equal(again.k_stage[:, 0, 4:6], view.k_stage[:, 0, 4:6])
    assert not again.k_stage[:, 0, :4].any()  # a full block without a row reads as codes only
    pool.retain_staging(set())  # e.g. the sequence was preempted
    assert len(pool._free_rows) == 3


def test_empty_pool_is_rejected():
    with pytest.raises(ValueError, match="no block"):
        KvPool(FORMATS[KvCacheDtype.FP16], 1, 1, 64, 0, 16)


def test_head_dim_that_a_format_cannot_hold_is_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        KvPool(FORMATS[KvCacheDtype.INT4], 1, 1, 48, 4, 16)  # not a power of 2 for the rotation
