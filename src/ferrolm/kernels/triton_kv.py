"""Triton kernels for the paged KV cache: quantize-on-write and paged attention.

Both read and write the pool's layout as it is (kernels/../kv/pool.py): per layer and
half, data [kv_heads, slots, data_dim] in the format's storage dtype and, for scaled
formats, fp16 scales [kv_heads, slots, groups]; slot = block * block_size + offset. So
the bytes on a GPU are the bytes on a CPU, for every format the kernels read:

  kind 0  plain casts (fp32, fp16, bf16): the stored value is the value
  kind 1  one scale per token and kv head (int8, fp8 e4m3, fp8 e5m2): code * scale
  kind 2  4-bit groups (int4, int4_g16): (nibble - 8) * group scale
  kind 3  4-bit codebook groups (nf4): levels[nibble] * group scale

The store kernel computes what KvFormat.quantize computes, in the same order with
correctly rounded division and round-half-to-even, so it stores the same bytes as the
torch reference (tests check them byte for byte). fp8 codes are converted by Triton's
own casts (the GPU's native conversion on Hopper).

The attention kernel is a FlashAttention-style loop over one sequence's keys for one
kv head and a tile of queries, the G query heads of that kv head stacked as rows
(GQA: every K/V tile is read once for all of them). Each K/V tile is gathered through
the block table and dequantized in registers; per-token key scales multiply the scores
(the dot runs on the exact codes); softmax is online in fp32 with exp2. Decodes with
few sequences split the context across programs (flash-decoding) and a second kernel
combines the partial softmaxes. Causal masking uses each query's position, so the same
kernel serves decode, prefill and chunked prefill over a cached prefix.

Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (the CPU test suite).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals a kernel reads must be constexpr objects.
MIN_SCALE = tl.constexpr(2.0**-14)
FP16_MAX = tl.constexpr(65504.0)
NEG = tl.constexpr(-1.0e30)  # masked score: finite, so a fully masked tile gives exp2(NEG - m) = 0


@triton.jit
def _round_even(x):
    # fp32 round-half-to-even for |x| < 2^22 (torch.round), by the 1.5 * 2^23 trick: the
    # addition rounds to an integer in the fp32 unit; no fast-math folds it away.
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _exact_cast(x, ty: tl.constexpr, SOFT: tl.constexpr):
    """x.to(ty), rounding to nearest even. With SOFT (the interpreter, whose bf16 casts
    truncate and whose fp8 casts drop the carry into the exponent), x is first rounded in
    fp32 to a value of `ty`, so the cast itself is exact. Compiled kernels use the GPU's
    own conversions."""
    if SOFT:
        if ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        elif ty == tl.float8e4nv or ty == tl.float8e5:
            MANT: tl.constexpr = 3 if ty == tl.float8e4nv else 2
            EMIN: tl.constexpr = -6 if ty == tl.float8e4nv else -14
            bits = x.to(tl.uint32, bitcast=True)
            e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
            e = tl.maximum(e, EMIN) - MANT  # the code's step: 2^e (subnormals: the smallest)
            step = ((e + 127) << 23).to(tl.float32, bitcast=True)
            inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
            r = _round_even(tl.abs(x) * inv) * step  # the sign put back: -tiny rounds to -0
            x = (r.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def _fwht(x, HP: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr, NORM: tl.constexpr):
    """x @ hadamard(D) for each row of an fp32 [HP, D] tile, by the butterflies of
    attention/hadamard.py's fwht: stages h = 1, 2, 4, ... of (a + b, a - b) on pairs h
    apart, then one multiply by fp32(1 / sqrt(D)). The same operations in the same order:
    the same fp32 values, so the stored bytes equal the reference's for rotated formats too."""
    for i in tl.static_range(LOG2D):  # h = 1 << i (a constexpr may not be reassigned)
        y = tl.permute(tl.reshape(x, (HP, D >> (i + 1), 2, 1 << i)), (0, 1, 3, 2))  # [.., h, 2]: pairs last
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (HP, D))
    return x * NORM


@triton.jit
def _store_rows(
    x_ptr,
    x_stride_h,
    data_ptr,
    data_stride_h,
    scale_ptr,
    scale_stride_h,
    mids_ptr,
    slot,
    H: tl.constexpr,
    HP: tl.constexpr,
    KIND: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    QMAX: tl.constexpr,
    ROUNDS: tl.constexpr,
    ROT: tl.constexpr,
    LOG2D: tl.constexpr,
    NORM: tl.constexpr,
    SOFT: tl.constexpr,
):
    """One token's vectors of every kv head (rows h < H of an [HP, D] tile) quantized into
    their slot: each row by itself, as KvFormat.quantize does per head."""
    h = tl.arange(0, HP)
    ok = h < H
    hh = h.to(tl.int64)
    d = tl.arange(0, D)
    x = tl.load(x_ptr + hh[:, None] * x_stride_h + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if ROT:
        x = _fwht(x, HP, D, LOG2D, NORM)
    data = data_ptr + hh[:, None] * data_stride_h
    if KIND == 0:
        tl.store(
            data + slot * D + d[None, :], _exact_cast(x, data_ptr.dtype.element_ty, SOFT), mask=ok[:, None]
        )
    elif KIND == 1:
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.minimum(tl.maximum(tl.math.div_rn(amax, QMAX), MIN_SCALE), FP16_MAX).to(tl.float16)
        q = tl.math.div_rn(x, s.to(tl.float32)[:, None])
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        if ROUNDS:
            q = _round_even(q)
        tl.store(
            data + slot * D + d[None, :], _exact_cast(q, data_ptr.dtype.element_ty, SOFT), mask=ok[:, None]
        )
        tl.store(scale_ptr + hh * scale_stride_h + slot, s, mask=ok)
    else:
        NG: tl.constexpr = D // GS
        x3 = tl.reshape(x, (HP, NG, GS))
        amax = tl.max(tl.abs(x3), axis=2)
        s = tl.minimum(tl.maximum(tl.math.div_rn(amax, QMAX), MIN_SCALE), FP16_MAX).to(tl.float16)
        q = tl.math.div_rn(x3, s.to(tl.float32)[:, :, None])
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        if KIND == 2:
            u = (_round_even(q) + 8.0).to(tl.int32)
        else:  # the nearest level's index: how many midpoints lie below q (torch.bucketize)
            u = tl.zeros((HP, NG, GS), dtype=tl.int32)
            for i in tl.static_range(15):
                u += (q > tl.load(mids_ptr + i)).to(tl.int32)
        lo, hi = tl.split(tl.reshape(u, (HP, D // 2, 2)))
        byte = tl.arange(0, D // 2)
        tl.store(data + slot * (D // 2) + byte[None, :], (lo | (hi << 4)).to(tl.uint8), mask=ok[:, None])
        g = tl.arange(0, NG)
        tl.store(scale_ptr + hh[:, None] * scale_stride_h + slot * NG + g[None, :], s, mask=ok[:, None])


@triton.jit
def store_kv_kernel(
    k_ptr,
    v_ptr,
    slots_ptr,
    kd_ptr,
    ks_ptr,
    vd_ptr,
    vs_ptr,
    kmids_ptr,
    vmids_ptr,
    x_stride_t,
    x_stride_h,
    kd_stride_h,
    ks_stride_h,
    vd_stride_h,
    vs_stride_h,
    H: tl.constexpr,
    HP: tl.constexpr,
    D: tl.constexpr,
    K_KIND: tl.constexpr,
    K_GS: tl.constexpr,
    K_QMAX: tl.constexpr,
    K_ROUNDS: tl.constexpr,
    K_ROT: tl.constexpr,
    V_KIND: tl.constexpr,
    V_GS: tl.constexpr,
    V_QMAX: tl.constexpr,
    V_ROUNDS: tl.constexpr,
    V_ROT: tl.constexpr,
    LOG2D: tl.constexpr,
    NORM: tl.constexpr,
    SOFT: tl.constexpr,
):
    """One program per new token: its K and V vectors of all H kv heads (HP: H rounded up
    to a power of 2) quantized into its slot, as vLLM's reshape_and_cache does per token.
    (One program per token, head and half was 2H times the launches: on a GPU each program
    then moved a single 64-256-byte row, and the interpreter spent most of an engine
    test's time starting them.)"""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:  # a padding row (CUDA-graph batches): nothing to store
        return
    x_off = t.to(tl.int64) * x_stride_t
    _store_rows(
        k_ptr + x_off, x_stride_h, kd_ptr, kd_stride_h, ks_ptr, ks_stride_h, kmids_ptr, slot,
        H, HP, K_KIND, D, K_GS, K_QMAX, K_ROUNDS, K_ROT, LOG2D, NORM, SOFT,
    )  # fmt: skip
    _store_rows(
        v_ptr + x_off, x_stride_h, vd_ptr, vd_stride_h, vs_ptr, vs_stride_h, vmids_ptr, slot,
        H, HP, V_KIND, D, V_GS, V_QMAX, V_ROUNDS, V_ROT, LOG2D, NORM, SOFT,
    )  # fmt: skip


@triton.jit
def _load_tile(
    data_ptr,
    scale_ptr,
    levels_ptr,
    slot,
    valid,
    KIND: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    DT: tl.constexpr,
    SCALE: tl.constexpr,
):
    """[N] slots -> [N, D] in the dot's type DT (with SCALE, kind 1 codes times their
    per-token scale: the scale load then feeds the dot operand, which Triton's pipeliner
    prefetches). Kinds 0 and 1 give the stored values (for
    kind 1 the codes: fp16 holds every int8 and fp8 code, and the caller applies the
    per-token scale to the scores or the probabilities, [R, N] products instead of
    [N, D]); 4-bit kinds give code * group scale (in fp16 when DT is: the product rounded
    once either way)."""
    if KIND < 2:
        d = tl.arange(0, D)
        x = tl.load(data_ptr + slot[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        x = x.to(DT)
        if KIND == 1 and SCALE:
            x = x * tl.load(scale_ptr + slot, mask=valid, other=0.0).to(DT)[:, None]
    else:
        NG: tl.constexpr = D // GS
        half = tl.arange(0, D // 2)
        byte = tl.load(data_ptr + slot[:, None] * (D // 2) + half[None, :], mask=valid[:, None], other=0)
        byte = byte.to(tl.int32)
        codes = tl.interleave(byte & 15, byte >> 4)  # element 2j in the low nibble, 2j + 1 high
        CT: tl.constexpr = tl.float16 if tl.float16 == DT else tl.float32
        if KIND == 2:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
            x = (codes - 8).to(CT)
        else:  # the codebook from registers (16 levels), not one global load per element
            levels = tl.load(levels_ptr + tl.arange(0, 16))
            x = tl.gather(tl.broadcast_to(levels[None, :], (codes.shape[0], 16)), codes, 1).to(CT)
        g = tl.arange(0, NG)
        s = tl.load(scale_ptr + slot[:, None] * NG + g[None, :], mask=valid[:, None], other=0.0).to(CT)
        n: tl.constexpr = codes.shape[0]
        x = tl.reshape(tl.reshape(x, (n, NG, GS)) * s[:, :, None], (n, D)).to(DT)
    return x


@triton.jit
def _hadamard(had_ptr, D: tl.constexpr):
    """The orthonormal [D, D] Hadamard matrix (symmetric), fp32."""
    i = tl.arange(0, D)
    return tl.load(had_ptr + i[:, None] * D + i[None, :])


@triton.jit
def _round_query(q):
    """Rows of q -> round(q / 2^e) * 2^e, e the smallest integer >= -126 with max|q| <=
    16256 * 2^e, from the bits of max|q| (kv/fixed_point.py: the query int8 keys see)."""
    bits = tl.max(tl.abs(q), axis=1).to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.int32) - 140 + ((bits & 0x7FFFFF) > 0x7E0000).to(tl.int32)
    e = tl.maximum(e, -126)
    down = ((127 - e) << 23).to(tl.float32, bitcast=True)
    up = ((127 + e) << 23).to(tl.float32, bitcast=True)
    return _round_even(q * down[:, None]) * up[:, None]


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    if DT == tl.float32:  # noqa: SIM300
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def paged_attention_kernel(
    q_ptr,
    o_ptr,
    kd_ptr,
    ks_ptr,
    vd_ptr,
    vs_ptr,
    klev_ptr,
    vlev_ptr,
    had_ptr,
    tables_ptr,
    q_start_ptr,
    ctx_len_ptr,
    part_ptr,
    ml_ptr,
    q_stride_t,
    q_stride_h,
    o_stride_t,
    o_stride_h,
    kd_stride_h,
    ks_stride_h,
    vd_stride_h,
    vs_stride_h,
    tables_stride,
    m_tiles,
    qk_scale,
    window,
    G: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    K_KIND: tl.constexpr,
    K_GS: tl.constexpr,
    V_KIND: tl.constexpr,
    V_GS: tl.constexpr,
    SPLITS: tl.constexpr,
    DT: tl.constexpr,
    Q_ROT: tl.constexpr,
    O_ROT: tl.constexpr,
    SCALE_TILES: tl.constexpr,
    Q_FIX: tl.constexpr,
):
    """Program (sequence b and query tile, kv head, context split). Rows r = m * GP + g:
    query m of the tile, query head kvh * G + g (GP = G rounded up to a power of 2)."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid // m_tiles
    mt = pid % m_tiles
    q0 = tl.load(q_start_ptr + b)
    nq = tl.load(q_start_ptr + b + 1) - q0
    if mt * BLOCK_M >= nq:
        return
    ctx = tl.load(ctx_len_ptr + b)
    R: tl.constexpr = BLOCK_M * GP
    r = tl.arange(0, R)
    tok = mt * BLOCK_M + r // GP
    g = r % GP
    row_ok = (tok < nq) & (g < G)
    head = kvh * G + g
    qpos = ctx - nq + tok  # each query's position: it sees keys 0..qpos
    d = tl.arange(0, D)
    q_rows = (q0 + tok).to(tl.int64) * q_stride_t + head * q_stride_h
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if Q_ROT:  # keys stored rotated: q H . k H = q . k
        q = _dot(q, _hadamard(had_ptr, D), tl.float32)
    if Q_FIX:  # integer keys (int8, int4): the query in 15-bit fixed point, as in every backend
        q = _round_query(q)

    last = ctx - nq + tl.minimum(nq, (mt + 1) * BLOCK_M)  # keys this tile needs: first..last-1
    # With a sliding window, from the window of the tile's first query (a whole key tile).
    first = tl.where(window > 0, tl.maximum(ctx - nq + mt * BLOCK_M - window + 1, 0), 0)
    first = (first // BLOCK_N) * BLOCK_N
    # This program's share of them, whole key tiles (shapes alone fix the launch, so a
    # CUDA graph can replay it whatever the lengths).
    per_split = tl.cdiv(tl.cdiv(last - first, SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(last, lo + per_split)
    m_i = tl.full((R,), NEG, tl.float32)
    l_i = tl.zeros((R,), tl.float32)
    acc = tl.zeros((R, D), tl.float32)
    kd = kd_ptr + kvh.to(tl.int64) * kd_stride_h
    ks = ks_ptr + kvh.to(tl.int64) * ks_stride_h
    vd = vd_ptr + kvh.to(tl.int64) * vd_stride_h
    vs = vs_ptr + kvh.to(tl.int64) * vs_stride_h
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < hi
        if BS % BLOCK_N == 0:  # the tile lies in one block: one table read, contiguous slots
            blk = tl.load(tables_ptr + b * tables_stride + n0 // BS).to(tl.int64)
            slot = blk * BS + n0 % BS + tl.arange(0, BLOCK_N)
        else:  # blocks smaller than a tile: each key's own block
            blk = tl.load(tables_ptr + b * tables_stride + n // BS, mask=valid, other=0)
            slot = blk.to(tl.int64) * BS + n % BS
        k = _load_tile(kd, ks, klev_ptr, slot, valid, K_KIND, D, K_GS, DT, SCALE_TILES)
        s = _dot(q, tl.trans(k), DT)
        if K_KIND == 1 and not SCALE_TILES:  # q . (s_k k_q) = s_k (q . k_q)
            s = s * (tl.load(ks + slot, mask=valid, other=0.0).to(tl.float32) * qk_scale)[None, :]
        else:
            s = s * qk_scale
        mask = valid[None, :] & (n[None, :] <= qpos[:, None])
        mask = mask & ((window == 0) | (n[None, :] > qpos[:, None] - window))
        s = tl.where(mask, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(mask, tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(vd, vs, vlev_ptr, slot, valid, V_KIND, D, V_GS, DT, SCALE_TILES)
        if V_KIND == 1 and not SCALE_TILES:  # sum_j p_j (s_j v_j) = sum_j (p_j s_j) v_j
            p = p * tl.load(vs + slot, mask=valid, other=0.0).to(tl.float32)[None, :]
        acc = acc * alpha[:, None] + _dot(p, v, DT)
        m_i = m_new

    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padding rows saw no key
        if O_ROT:  # values stored rotated: sum_j p_j v_j H = (sum_j p_j v_j) H
            out = _dot(out, _hadamard(had_ptr, D), tl.float32)
        o_rows = (q0 + tok).to(tl.int64) * o_stride_t + head * o_stride_h
        tl.store(o_ptr + o_rows[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        base = ((pid * tl.num_programs(1) + kvh) * SPLITS + split).to(tl.int64) * R
        tl.store(part_ptr + (base + r)[:, None] * D + d[None, :], acc)
        tl.store(ml_ptr + (base + r) * 2, m_i)
        tl.store(ml_ptr + (base + r) * 2 + 1, l_i)


@triton.jit
def combine_kernel(
    o_ptr,
    part_ptr,
    ml_ptr,
    had_ptr,
    q_start_ptr,
    o_stride_t,
    o_stride_h,
    m_tiles,
    G: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    O_ROT: tl.constexpr,
):
    """Merge the context splits' partial softmaxes of one (sequence and tile, kv head)."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    b = pid // m_tiles
    mt = pid % m_tiles
    q0 = tl.load(q_start_ptr + b)
    nq = tl.load(q_start_ptr + b + 1) - q0
    if mt * BLOCK_M >= nq:
        return
    R: tl.constexpr = BLOCK_M * GP
    r = tl.arange(0, R)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    rows = ((pid * tl.num_programs(1) + kvh) * SPLITS + sp[:, None]).to(tl.int64) * R + r[None, :]  # [S, R]
    m = tl.load(ml_ptr + rows * 2)
    l_part = tl.load(ml_ptr + rows * 2 + 1)
    m_all = tl.max(m, axis=0)  # [R]
    w = tl.exp2(m - m_all[None, :])  # splits that saw no key of a row have l = 0 and acc = 0
    l_all = tl.sum(l_part * w, axis=0)
    out = tl.zeros((R, D), tl.float32)
    for i in tl.static_range(SPLITS):
        base = ((pid * tl.num_programs(1) + kvh) * SPLITS + i).to(tl.int64) * R
        part = tl.load(part_ptr + (base + r)[:, None] * D + d[None, :])
        wi = tl.sum(tl.where(sp[:, None] == i, w, 0.0), axis=0)
        out += part * wi[:, None]
    out = out / tl.where(l_all > 0, l_all, 1.0)[:, None]  # padding rows saw no key
    if O_ROT:
        out = _dot(out, _hadamard(had_ptr, D), tl.float32)
    tok = mt * BLOCK_M + r // GP
    g = r % GP
    row_ok = (tok < nq) & (g < G)
    o_rows = (q0 + tok).to(tl.int64) * o_stride_t + (kvh * G + g) * o_stride_h
    tl.store(o_ptr + o_rows[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
