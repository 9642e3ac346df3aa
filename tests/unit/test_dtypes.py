import pytest
import torch

from ferrolm.kv.dtypes import FORMATS, MIN_SCALE, KvCacheDtype, get_format

PER_TOKEN = [d for d, f in FORMATS.items() if not f.per_channel_block]  # quantize() one vector at a time
SCALED = [d for d in PER_TOKEN if FORMATS[d].scaled]
FP8S = [KvCacheDtype.FP8, KvCacheDtype.FP8_E5M2]


def _vectors(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(256, 64, generator=g)
    outliers = torch.randn(256, 64, generator=g)
    outliers[:, ::16] *= 50.0  # a few huge channels, as real keys have
    tiny = torch.randn(64, 64, generator=g) * 1e-6
    return torch.cat([normal, outliers, tiny])


@pytest.mark.parametrize(
    "name,expected",
    [
        ("fp16", KvCacheDtype.FP16),
        ("F16", KvCacheDtype.FP16),
        ("float16", KvCacheDtype.FP16),
        ("bfloat16", KvCacheDtype.BF16),
        ("i8", KvCacheDtype.INT8),
        ("e4m3", KvCacheDtype.FP8),
        ("fp8_e4m3", KvCacheDtype.FP8),
        ("f8e4m3", KvCacheDtype.FP8),
        ("fp8-e5m2", KvCacheDtype.FP8_E5M2),
        ("float32", KvCacheDtype.FP32),
    ],
)
def test_parse_aliases(name, expected):
    assert KvCacheDtype.parse(name) is expected


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        KvCacheDtype.parse("int3")
    for d in KvCacheDtype:
        assert d.value in str(e.value)


def test_names_serialize_lowercase():
    assert [str(d) for d in KvCacheDtype] == [
        "fp32", "fp16", "bf16", "int8", "fp8", "fp8_e5m2", "int4", "int4_g16", "nf4", "int4pc"
    ]  # fmt: skip


def test_bytes_per_head_from_the_row_layout():
    got = {d.value: FORMATS[d].bytes_per_head(64) for d in KvCacheDtype}
    # int4: 64 values, two per byte, plus one fp16 scale per group of 32.
    assert got == {
        "fp32": 256, "fp16": 128, "bf16": 128, "int8": 66, "fp8": 66, "fp8_e5m2": 66,
        "int4": 36, "int4_g16": 40, "nf4": 36, "int4pc": 48,  # int4pc: 256 B of scales per 16-token block
    }  # fmt: skip
    assert (
        FORMATS[KvCacheDtype.INT4].bytes_per_head(64) / FORMATS[KvCacheDtype.FP16].bytes_per_head(64)
        == 0.28125
    )


def test_int8_error_at_most_half_a_step():
    fmt = get_format("int8")
    x = _vectors()
    q, s = fmt.quantize(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    err = (fmt.dequantize(q, s) - x).abs()
    assert s.shape == (x.shape[0], 1)  # one scale per token (per kv head)
    assert (err <= s.float() / 2 * (1 + 1e-6)).all()
    # The scale is the fp16 rounding of max|x| / 127, never below 2^-14.
    expected = (x.abs().amax(-1) / 127).clamp(min=MIN_SCALE).half()
    assert torch.equal(s[:, 0], expected)


@pytest.mark.parametrize("name,mantissa_bits,min_normal", [("fp8", 3, 2.0**-6), ("fp8_e5m2", 2, 2.0**-14)])
def test_fp8_error_within_mantissa_bound(name, mantissa_bits, min_normal):
    fmt = get_format(name)
    x = _vectors(1)
    q, s = fmt.quantize(x)
    err = (fmt.dequantize(q, s) - x).abs()
    sf = s.float()
    # Relative half-ulp for normal values; below min normal, half of the subnormal spacing.
    rel = 2.0 ** -(mantissa_bits + 1)
    sub = min_normal * 2.0**-mantissa_bits / 2
    bound = torch.maximum(rel * x.abs(), sub * sf) * (1 + 1e-6)
    assert (err <= bound).all()
    # The largest element of each vector lands on (or next to) qmax: the range is used.
    top = fmt.dequantize(q, s).abs().amax(-1)
    assert torch.allclose(top, x.abs().amax(-1), rtol=rel)


@pytest.mark.parametrize("dtype", PER_TOKEN)
def test_zeros_and_fp16_max_survive(dtype):
    fmt = FORMATS[dtype]
    zeros = torch.zeros(4, 64)
    q, s = fmt.quantize(zeros)
    assert torch.equal(fmt.dequantize(q, s), zeros)
    big = torch.full((4, 64), 65504.0)
    big[:, 1::2] = -65504.0
    big[0, 3] = 1.0
    out = fmt.dequantize(*fmt.quantize(big))
    assert torch.isfinite(out).all()
    assert torch.allclose(
        out[:, :3], big[:, :3], rtol=0.13 if fmt.bits > 4 else 0.0, atol=0 if fmt.bits > 4 else 65504 / 7
    )


@pytest.mark.parametrize("dtype", SCALED)
def test_scale_never_zero_or_subnormal(dtype):
    fmt = FORMATS[dtype]
    _, s = fmt.quantize(torch.zeros(3, 64))
    assert (s.float() >= MIN_SCALE).all()


@pytest.mark.parametrize("dtype", PER_TOKEN)
def test_quantize_is_vectorised_over_leading_dims(dtype):
    fmt = FORMATS[dtype]
    x = torch.randn(5, 3, 64)
    q, s = fmt.quantize(x)
    assert q.shape == (5, 3, fmt.data_dim(64)) and q.dtype == fmt.storage
    if s is not None:
        assert s.shape == (5, 3, fmt.num_groups(64))
    out = fmt.dequantize(q, s, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


@pytest.mark.parametrize("dtype", FP8S)
def test_fast_dequantize_is_exact_for_every_code(dtype):
    """The torch backend's fast read equals q * s with torch's own cast, for all 256 codes."""
    from ferrolm.attention.torch_backend import read

    fmt = FORMATS[dtype]
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(fmt.storage).view(4, 64)
    scale = torch.tensor([1.0, 0.5, 2.0**-14, 3.7], dtype=torch.float16)
    expected = codes.float() * scale.float().unsqueeze(-1)
    values, token_scale = read(fmt, codes, scale.unsqueeze(-1))
    got = values * token_scale.unsqueeze(-1)
    finite = torch.isfinite(expected)
    assert torch.equal(got[finite], expected[finite])
    if dtype is KvCacheDtype.FP8_E5M2:  # its inf/NaN codes stay non-finite
        assert not torch.isfinite(got[~finite]).any()
    else:  # E4M3's two NaN codes read as +-480 on the fast path; quantize never stores them
        assert (~finite).sum() == 2


def test_int4_packs_two_per_byte_and_errs_at_most_half_a_step():
    fmt = get_format("int4")
    x = _vectors(2)
    q, s = fmt.quantize(x)
    assert q.dtype == torch.uint8 and q.shape == (x.shape[0], 32) and s.shape == (x.shape[0], 2)
    deq = fmt.dequantize(q, s)
    step = s.float().repeat_interleave(32, dim=-1)
    assert ((deq - x).abs() <= step / 2 * (1 + 1e-6)).all()
    groups = x.view(-1, 2, 32).abs().amax(-1)
    assert torch.equal(s, (groups / 7).clamp(min=MIN_SCALE).half())
    codes = fmt.unpack(q)
    assert codes.min() >= -7 and codes.max() <= 7  # -8 never stored


def test_int4_after_rotation_errs_within_bound_and_unrotates_exactly():
    from ferrolm.attention.hadamard import hadamard

    fmt = get_format("int4")
    assert fmt.rotated
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6)
    x = _vectors(3)
    xr = x @ h
    q, s = fmt.quantize(xr)
    err_rot = fmt.dequantize(q, s) - xr
    assert (err_rot.abs() <= s.float().repeat_interleave(32, -1) / 2 * (1 + 1e-6)).all()
    err = fmt.dequantize(q, s) @ h - x  # un-rotated: the same error, turned by an orthonormal H
    assert torch.allclose(err.norm(dim=-1), err_rot.norm(dim=-1), rtol=1e-4, atol=1e-6)


def test_rotation_spreads_outlier_channels_and_lowers_int4_error():
    from ferrolm.attention.hadamard import hadamard

    fmt, h = get_format("int4"), hadamard(64)
    x = _vectors(4)[256:512]  # every 16th channel 50x larger, as real keys have
    plain = fmt.dequantize(*fmt.quantize(x)) - x
    rotated = fmt.dequantize(*fmt.quantize(x @ h)) @ h - x
    assert rotated.norm() < 0.8 * plain.norm()


def test_nf4_stores_the_nearest_gaussian_level():
    from ferrolm.kv.dtypes import NF4_LEVELS

    fmt = get_format("nf4")
    x = _vectors(5)
    q, s = fmt.quantize(x)
    deq = fmt.dequantize(q, s)
    levels = torch.tensor(NF4_LEVELS)
    sf = s.float().repeat_interleave(32, -1)
    ratio = deq / sf
    assert torch.isclose(ratio.unsqueeze(-1), levels, atol=1e-6).any(-1).all()  # always a level
    best = ((x / sf).unsqueeze(-1) - levels).abs().min(-1).values  # the nearest one
    assert torch.allclose((x / sf - ratio).abs(), best, atol=1e-5)


def test_per_channel_block_quantization():
    fmt = get_format("int4pc")
    assert not fmt.rotated and fmt.bytes_per_head(64, block_size=16) == 48
    x = _vectors(6)[:256].view(16, 16, 64)  # 16 blocks of 16 tokens
    x[..., ::16] *= 30  # outlier channels: per-channel scales absorb them
    q, sm = fmt.quantize_block(x)
    assert q.shape == (16, 16, 32) and sm.shape == (16, 2, 64)
    deq = fmt.dequantize_block(q, sm)
    s, m = sm[:, 0:1].float(), sm[:, 1:2].float()
    # Half a step, plus the fp16 rounding of the minimum the grid starts from.
    assert ((deq - x).abs() <= s / 2 * (1 + 1e-3) + (m - x.amin(1, keepdim=True)).abs() + 1e-6).all()
    z = fmt.dequantize_block(*fmt.quantize_block(torch.zeros(2, 16, 64)))
    assert torch.equal(z, torch.zeros(2, 16, 64))
    big = torch.full((1, 16, 64), 65504.0)
    big[0, ::2] = -65504.0
    assert torch.isfinite(fmt.dequantize_block(*fmt.quantize_block(big))).all()
