import pytest
import torch

from ferrolm.kv.dtypes import FORMATS, KvCacheDtype
from ferrolm.kv.pool import GIB, KvPool, kv_bytes_per_token, num_blocks_for_budget

SMOLLM2 = dict(num_layers=30, num_kv_heads=3, head_dim=64)


def test_bytes_per_token_matches_design():
    got = {d.value: kv_bytes_per_token(FORMATS[d], **SMOLLM2) for d in KvCacheDtype}
    assert got == {
        "fp32": 46080,
        "fp16": 23040,
        "bf16": 23040,
        "int8": 11880,
        "fp8": 11880,
        "fp8_e5m2": 11880,
    }


@pytest.mark.parametrize("dtype", ["int8", "fp8", "fp8_e5m2"])
def test_scaled_formats_hold_1_9x_the_tokens_of_fp16(dtype):
    fp16 = num_blocks_for_budget(2.0, FORMATS[KvCacheDtype.FP16], block_size=16, **SMOLLM2)
    other = num_blocks_for_budget(2.0, FORMATS[KvCacheDtype.parse(dtype)], block_size=16, **SMOLLM2)
    assert other / fp16 >= 1.9


@pytest.mark.parametrize("dtype", list(KvCacheDtype))
def test_real_tensor_bytes_match_accounting(dtype):
    fmt = FORMATS[dtype]
    n = num_blocks_for_budget(0.01, fmt, num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    pool = KvPool(fmt, 2, 2, 64, n, 16)
    assert pool.nbytes() == pool.bytes_per_token * pool.capacity_tokens
    assert pool.nbytes() <= 0.01 * GIB
    assert pool.nbytes() > 0.01 * GIB - pool.bytes_per_token * 16  # no block left unused


@pytest.mark.parametrize("dtype", list(KvCacheDtype))
def test_write_then_read_round_trips(dtype):
    fmt = FORMATS[dtype]
    pool = KvPool(fmt, num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=4, block_size=4)
    k, v = torch.randn(8, 2, 64), torch.randn(8, 2, 64)
    slots = torch.tensor([12, 13, 14, 15, 4, 5, 6, 7])  # blocks 3 then 1
    pool.write(1, slots, k, v)
    rk, rv = pool.gather(1, torch.tensor([[3, 1], [1, 3]])).dequantized()
    assert rk.shape == (2, 2, 8, 64)  # [kv_heads, seqs, tokens, head_dim]
    assert torch.equal(rk[:, 0], fmt.dequantize(*fmt.quantize(k)).transpose(0, 1))
    assert torch.equal(rv[:, 0], fmt.dequantize(*fmt.quantize(v)).transpose(0, 1))
    assert torch.equal(rk[:, 1], torch.cat([rk[:, 0, 4:], rk[:, 0, :4]], dim=1))


def test_empty_pool_is_rejected():
    with pytest.raises(ValueError, match="no block"):
        KvPool(FORMATS[KvCacheDtype.FP16], 1, 1, 64, 0, 16)
