"""The compiled CPU backend against the torch reference: same pool, same step, same numbers.

Each case writes a cached context in one step and then runs a step mixing prefill chunks
(some on top of a cached prefix) and decodes, through both backends on identical pools.
Skipped only where the kernels cannot be built (no compiler); the fallback itself is
tested below by forcing a missing compiler.
"""

import os
import subprocess
import sys

import pytest
import torch

from ferrolm.attention import AttentionMetadata, CpuBackend, TorchBackend, paged_attention
from ferrolm.attention.hadamard import fwht
from ferrolm.kernels import build
from ferrolm.kv.dtypes import KvCacheDtype
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec

pytestmark = pytest.mark.skipif(
    build.unavailable_reason() is not None, reason=f"no compiled kernels here: {build.unavailable_reason()}"
)

ALL = [d for d in KvCacheDtype]
PAIRS = [(k, v) for k in ALL for v in ALL]


def _run(spec, backend, *, heads, kv_heads, head_dim, bs, seqs, seed=0):
    """seqs: (cached tokens, new tokens) per sequence. Returns (out, pool)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // bs) for c, n in seqs]
    perm = torch.randperm(sum(need) + 3, generator=g).tolist()  # scattered block tables
    tables, i = [], 0
    for k in need:
        tables.append(perm[i : i + k])
        i += k
    pool = KvPool(
        spec, 1, kv_heads, head_dim, num_blocks=sum(need) + 3, block_size=bs, staging_rows=sum(need) + 3
    )
    ks = [torch.randn(c + n, kv_heads, head_dim, generator=g) for c, n in seqs]
    vs = [torch.randn(c + n, kv_heads, head_dim, generator=g) for c, n in seqs]
    scale = head_dim**-0.5
    cached = [b for b, (c, _) in enumerate(seqs) if c]
    if cached:
        meta = AttentionMetadata.build(
            [tables[b] for b in cached], [0] * len(cached), [seqs[b][0] for b in cached], bs
        )
        q = torch.randn(sum(seqs[b][0] for b in cached), heads, head_dim, generator=g)
        k = torch.cat([ks[b][: seqs[b][0]] for b in cached])
        v = torch.cat([vs[b][: seqs[b][0]] for b in cached])
        paged_attention(q, k, v, 0, pool, meta, scale, backend)
    meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [n for _, n in seqs], bs)
    q = torch.randn(sum(n for _, n in seqs), heads, head_dim, generator=g)
    k = torch.cat([kk[c:] for (c, _), kk in zip(seqs, ks)])
    v = torch.cat([vv[c:] for (c, _), vv in zip(seqs, vs)])
    return paged_attention(q, k, v, 0, pool, meta, scale, backend), pool


def _both(spec, **kw):
    ref, ref_pool = _run(spec, TorchBackend(), **kw)
    out, pool = _run(spec, CpuBackend(), **kw)
    return out, ref, pool, ref_pool


MIXED = [(0, 7), (9, 1), (3, 6), (12, 1), (0, 1), (17, 20)]


@pytest.mark.parametrize("k,v", PAIRS, ids=[f"{k.value}/{v.value}" for k, v in PAIRS])
def test_compiled_matches_reference_for_every_pair(k, v):
    spec = KvSpec.build(1, k, value_dtype=v)
    out, ref, pool, ref_pool = _both(spec, heads=6, kv_heads=2, head_dim=64, bs=4, seqs=MIXED)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    # The compiled quantize-on-write stores the very bytes the reference stores.
    for mine, theirs in zip(pool.tensors(), ref_pool.tensors()):
        assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))


@pytest.mark.parametrize("dtype", ["int8", "fp8", "fp8_e5m2", "int4", "nf4"])
def test_quantize_on_write_stores_the_reference_bytes_at_the_edges(dtype):
    """Rows spanning many magnitudes: fp8 subnormals, rounding ties at half steps, zeros,
    one huge value per group; the vectorised write must store the reference's bytes."""
    g = torch.Generator().manual_seed(3)
    T, H, D = 40, 2, 64
    mags = torch.logspace(-9, 1, T * H * D).view(T, H, D)
    x = mags * torch.randn(T, H, D, generator=g).sign()
    x[::4, :, ::5] = 0.0
    x[1::4] = torch.randint(-254, 255, (T // 4, H, D), generator=g).float() / 2  # ties after scaling
    x[1::4, :, 0] = 127.0
    x[2::4, :, 7] = 1e4
    spec = KvSpec.parse(dtype, 1)
    pools = [KvPool(spec, 1, H, D, num_blocks=T // 8 + 1, block_size=8, staging_rows=8) for _ in range(2)]
    slots = torch.randperm(T, generator=g)
    # Every quantized format stores rotated vectors (x H, H orthonormal and its own
    # inverse): give x H so that what gets quantized is x again, up to rounding.
    k, v = fwht(x), fwht(x.flip(-1).contiguous())
    lk = spec.layers[0]
    # The reference pool stores what it is given (rotated by the caller); the compiled
    # write rotates inside, with the same butterflies.
    pools[0].write(0, slots, fwht(k) if lk.key.rotated else k, fwht(v) if lk.value.rotated else v)
    CpuBackend().write(pools[1], 0, slots, k, v)
    for mine, theirs in zip(pools[1].tensors(), pools[0].tensors()):
        assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", ["int8+norot", "int4+norot", "int4_g16+norot"])
def test_integer_keys_round_the_query_as_the_reference(dtype, head_dim):
    """Queries at the fixed point's edges (kv/fixed_point.py): the largest element exactly
    at 16256 steps or just past it, the others at rounding ties; decodes (the integer dots)
    and a prefill chunk (the float path) must round them as the reference does."""
    g = torch.Generator().manual_seed(5)
    spec = KvSpec.parse(dtype, 1)
    heads, kv_heads, bs = 6, 2, 16
    seqs = [(40, 1), (23, 1), (0, 9), (70, 1)]
    need = [-(-(c + n) // bs) for c, n in seqs]
    tables = [list(range(sum(need[:i]), sum(need[: i + 1]))) for i in range(len(seqs))]
    pool = KvPool(spec, 1, kv_heads, head_dim, num_blocks=sum(need), block_size=bs)
    cached = [i for i, (c, _) in enumerate(seqs) if c]
    meta = AttentionMetadata.build(
        [tables[i] for i in cached], [0] * len(cached), [seqs[i][0] for i in cached], bs
    )
    n = sum(seqs[i][0] for i in cached)
    CpuBackend().write(
        pool,
        0,
        meta.slot_mapping,
        torch.randn(n, kv_heads, head_dim, generator=g),
        torch.randn(n, kv_heads, head_dim, generator=g),
    )
    T = sum(n for _, n in seqs)
    q = torch.randint(-60, 60, (T, heads, head_dim), generator=g).float() + 0.5  # ties
    q[:, :, 0] = 16256.0
    q[::2] = 2 * torch.randint(-30, 30, (len(q[::2]), heads, head_dim), generator=g).float() + 1
    q[::2, :, 0] = 16256.5  # past the limit: one exponent up, where odd integers become ties
    q *= 2.0**-12
    meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [n for _, n in seqs], bs)
    out = CpuBackend().attend(q, 0, pool, meta, head_dim**-0.5)
    ref = TorchBackend().attend(q, 0, pool, meta, head_dim**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bs", [1, 8, 16, 32])
@pytest.mark.parametrize("gqa", [(4, 4), (8, 2), (9, 3), (16, 1)])
@pytest.mark.parametrize("dtype", ["fp16", "int8", "fp8", "int4", "int4pc/int4"])
def test_block_sizes_and_gqa_ratios(bs, gqa, dtype):
    if bs == 1 and "int4pc" in dtype:
        pytest.skip("int4pc needs block_size to divide its per-block scale bytes")
    heads, kv_heads = gqa
    spec = KvSpec.parse(dtype, 1)
    out, ref, *_ = _both(spec, heads=heads, kv_heads=kv_heads, head_dim=64, bs=bs, seqs=MIXED)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


LONG = [(300, 1), (129, 1), (0, 5), (64, 1), (1000, 1), (191, 1), (70, 3)]


@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("gqa", [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("dtype", ["int8", "int4", "int8/int4", "int4/int8", "int4_g16", "nf4", "fp16/int8"])
def test_engine_block_sizes_decode_long_contexts(bs, gqa, dtype):
    """The engine's block sizes (a block's keys in chunks of up to 128 per softmax update)
    over contexts of several blocks with ragged ends; with SmolLM2's GQA, also one context
    long enough to be split over the threads."""
    heads, kv_heads = gqa
    for seqs in [LONG] + ([[(2999, 1)]] if gqa == (9, 3) else []):
        out, ref, *_ = _both(
            KvSpec.parse(dtype, 1), heads=heads, kv_heads=kv_heads, head_dim=64, bs=bs, seqs=seqs
        )
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", ["fp16", "int8", "fp8", "int4", "nf4"])
def test_bf16_queries_give_the_fp32_result_rounded(dtype):
    """A decode call over bf16 q (the bf16 compute dtype) reads q and writes the output in
    bf16 inside the items: the same numbers as widening q first and rounding the fp32 output."""
    seqs = [(40, 1), (7, 1), (129, 1), (0, 1)]
    spec = KvSpec.parse(dtype, 1)
    _, pool = _run(spec, CpuBackend(), heads=9, kv_heads=3, head_dim=64, bs=16, seqs=seqs)
    nb = pool.num_blocks  # any blocks of the pool: both calls read the same ones
    meta = AttentionMetadata.build(
        [[(5 * i + j) % nb for j in range(9)] for i in range(len(seqs))],
        [c for c, _ in seqs],
        [1] * len(seqs),
        16,
    )
    q = torch.randn(len(seqs), 9, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = CpuBackend().attend(q, 0, pool, meta, 0.125)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, CpuBackend().attend(q.float(), 0, pool, meta, 0.125).bfloat16())


@pytest.mark.parametrize("head_dim", [16, 32, 128, 256, 40, 48])
def test_head_dims(head_dim):
    """16, 32, 64, 128 and 256 run compiled; others (40, 48) fall back to the reference inside the backend."""
    spec = KvSpec.build(1, "int8" if head_dim in (16, 32, 128, 256) else "fp16")
    out, ref, *_ = _both(spec, heads=4, kv_heads=2, head_dim=head_dim, bs=16, seqs=MIXED)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4", "int4pc"])
def test_long_single_sequence_splits_the_context(dtype):
    """One decode over 3000 keys: too few (sequence, head) items for the threads, so the
    kernel splits the context and merges the partial softmaxes."""
    spec = KvSpec.build(1, dtype)
    for seqs in ([(3000, 1)], [(2999, 2)], [(1500, 1), (700, 1)]):
        out, ref, *_ = _both(spec, heads=9, kv_heads=3, head_dim=64, bs=16, seqs=seqs)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_chunked_prefill_equals_one_shot():
    """A 100-token prompt in chunks of 37 reads the same cache as in one step."""
    spec = KvSpec.build(1, "int8/int4")
    one, *_ = _run(spec, CpuBackend(), heads=6, kv_heads=2, head_dim=64, bs=16, seqs=[(0, 100)])
    g = torch.Generator().manual_seed(0)
    # Same tensors as _run drew for one sequence: rebuild them and feed in chunks.
    perm = torch.randperm(7 + 3, generator=g).tolist()
    table = perm[:7]
    pool = KvPool(spec, 1, 2, 64, num_blocks=10, block_size=16)
    k = torch.randn(100, 2, 64, generator=g)
    v = torch.randn(100, 2, 64, generator=g)
    q = torch.randn(100, 6, 64, generator=g)
    parts = []
    for s in range(0, 100, 37):
        e = min(100, s + 37)
        meta = AttentionMetadata.build([table], [s], [e - s], 16)
        parts.append(paged_attention(q[s:e], k[s:e], v[s:e], 0, pool, meta, 64**-0.5, CpuBackend()))
    torch.testing.assert_close(torch.cat(parts), one, atol=2e-5, rtol=2e-5)


def test_auto_picks_the_compiled_backend_and_torch_stays_selectable():
    from ferrolm.attention import select_backend

    assert select_backend("auto", KvSpec.build(2, "int8/int4")).name == "cpu"
    assert select_backend("torch", KvSpec.build(2, "int8/int4")).name == "torch"


def test_without_a_compiler_auto_falls_back_to_torch_with_one_line(tmp_path):
    """A machine without a C++ compiler: auto serves with the torch backend and says why."""
    code = (
        "from ferrolm.attention import select_backend; from ferrolm.kv.spec import KvSpec; "
        "print(select_backend('auto', KvSpec.build(2, 'int8')).name)"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "FERROLM_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch"
    lines = [ln for ln in r.stderr.splitlines() if "compiled CPU attention unavailable" in ln]
    assert len(lines) == 1 and "no C++ compiler" in lines[0]
    with pytest.raises(subprocess.CalledProcessError):  # asking for it by name is an error that says why
        subprocess.run(
            [sys.executable, "-c", code.replace("'auto'", "'cpu'")], env=env, capture_output=True, check=True
        )


def test_avx2_build_matches_the_reference():
    """Machines differ: the AVX2 code paths (built with -march=haswell) give the same numbers,
    attention and the 4-bit weights alike. Built with -O2: the same source paths, and a
    quarter of -O3's compile time (GCC 12 spent 4 minutes on the decode kernels' AVX2 code).
    The build is cached in FERROLM_HOME beside the native one, under its own name (a hash of
    the sources and flags): a machine builds it once per change to the kernels (~80 s)."""
    from ferrolm.paths import ferrolm_home
    from ferrolm.runtime import cpu_flags

    if "avx2" not in cpu_flags():
        pytest.skip("this CPU has no AVX2")
    code = (
        f"import torch, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_cpu_backend as t; "
        "from ferrolm.kv.spec import KvSpec\n"
        "for kv in ('fp16', 'bf16', 'int8', 'fp8', 'fp8_e5m2', 'int4', 'nf4', 'int4pc/int4'):\n"
        "    out, ref, *_ = t._both(KvSpec.parse(kv, 1), heads=6, kv_heads=2, head_dim=64, bs=16, seqs=t.MIXED)\n"
        "    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)\n"
        "import test_quant_linear as tq; from ferrolm.models.quant_linear import Q4Linear, q4_from_gguf\n"
        "for rows in (1, 9):\n"
        "    w = q4_from_gguf(tq._gguf_blocks('Q4_1', 80, 192), 'Q4_1', (80, 192)); x = torch.randn(rows, 192)\n"
        "    torch.testing.assert_close(Q4Linear(w)(x), x @ w.dequantize().t(), atol=1e-5, rtol=1e-5)\n"
        "from ferrolm.kernels import build; print(build.build_name())"
    )
    env = {**os.environ, "FERROLM_KERNEL_MARCH": "haswell", "FERROLM_KERNEL_OPT": "-O2"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    name = r.stdout.split()[-1]  # the AVX2 build's name: not the native build's
    assert name != build.build_name(), "the subprocess did not use the AVX2 flags"
    assert list((ferrolm_home() / "kernels" / name).glob("*.so")), "the AVX2 build did not happen"


def test_a_wrong_kernel_opt_level_lists_the_valid_ones(monkeypatch):
    from ferrolm.kernels.build import cflags

    monkeypatch.setenv("FERROLM_KERNEL_OPT", "-Ofast")
    with pytest.raises(ValueError, match="-O1, -O2, -O3"):
        cflags()
    monkeypatch.setenv("FERROLM_KERNEL_OPT", "-O2")
    assert cflags()[0] == "-O2"


def test_a_failed_build_names_the_compilers_first_error():
    from ferrolm.kernels.build import _first_error

    log = "[1/4] c++ ...\n/k/quant_linear.cpp:380:29: error: no match for 'operator-'\nninja: build stopped: subcommand failed."
    assert _first_error(log) == "/k/quant_linear.cpp:380:29: error: no match for 'operator-'"
    assert _first_error("ninja: build stopped") == "ninja: build stopped"


@pytest.mark.parametrize("case", ["subnormal codes", "large queries", "large value scales"])
def test_fp8_decode_reads_every_code_exactly(case):
    """The decode path reads fp8 E4M3 rows by bit placement (values times 2^-120): subnormal
    codes keep their exact values (here the scores and outputs come from them alone); an
    item whose queries reach 256, and a chunk whose value scales reach 256, are read the
    fp16 way instead. Each equals the torch reference."""
    g = torch.Generator().manual_seed(0)
    B, L, KVH, H, D, bs = 3, 40, 2, 6, 64, 16
    k = torch.randn(B, L + 1, KVH, D, generator=g)
    v = torch.randn(B, L + 1, KVH, D, generator=g)
    q = torch.randn(B, H, D, generator=g)
    rotation = "auto"
    if case == "subnormal codes":  # one large element per row, the others below 2^-6 of its scale
        rotation = "off"  # (a rotation would spread the large one)
        k[..., 1:] *= 0.01
        v[..., 1:] *= 0.01
        k[..., 0] = v[..., 0] = 1000.0
        q *= 50.0  # scores of a few units (max |q| < 256: the keys read by bit placement)
        q[..., 0] = 0.0  # the scores see the small elements only
    elif case == "large queries":
        q *= 400.0
    else:  # sequence 1's values (every chunk of it) and one token of sequence 2's
        v[1] *= 1e6
        v[2, 5] *= 1e6
    spec = KvSpec.build(1, KvCacheDtype.FP8, rotation=rotation)
    nblk = -(-(L + 1) // bs)
    tables = [list(range(b * nblk, (b + 1) * nblk)) for b in range(B)]
    outs = []
    for backend in (TorchBackend(), CpuBackend()):
        pool = KvPool(spec, 1, KVH, D, num_blocks=B * nblk, block_size=bs, staging_rows=1)
        meta = AttentionMetadata.build(tables, [0] * B, [L] * B, bs)
        kv = (k[:, :L].reshape(-1, KVH, D), v[:, :L].reshape(-1, KVH, D))
        paged_attention(torch.zeros(B * L, H, D), *kv, 0, pool, meta, D**-0.5, backend)
        meta = AttentionMetadata.build(tables, [L] * B, [1] * B, bs)
        outs.append(paged_attention(q, k[:, L], v[:, L], 0, pool, meta, D**-0.5, backend))
        if case == "subnormal codes":
            codes = pool.keys[0].data.view(torch.uint8)
            assert ((codes & 0x78 == 0) & (codes & 0x07 != 0)).sum() > 1000
    ref, out = (o.view(B, H, D) for o in outs)
    if case == "subnormal codes":  # the outputs' small elements, from subnormal values alone
        ref, out = ref[..., 1:], out[..., 1:]
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
