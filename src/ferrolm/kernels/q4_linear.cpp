// GGUF Q4_0 / Q4_1 linear layers as shipped: the fp32 GEMV, bf16 x by AVX512-BF16 dot
// products (few rows) or tiles (more), and AMX tiles; the dense fallback above 64 rows.
#include "quant_rows.h"

namespace {

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Q4 x bf16 activations with AVX512-BF16 dot products, for bf16 compute (x is bf16 already,
// so nothing is rounded that the fp32 path keeps). A quad of blocks (128 weights, 64 code
// bytes) is one step, with no shuffles on the codes: read as 32 words, word t of a block
// holds elements 2t, 2t+16, 2t+1, 2t+17 in its four nibbles, so four shift-and-mask ops give
// four vectors of 32 words (8 per block), and x is laid out once per call in that order.
// A nibble q becomes the bf16 number 128 + q by OR-ing 0x4300 into its word (exact: bf16
// has 8 significant bits), so w . x = d sum((128 + q) x) + (m - 128 d) sum(x) per block.
// vdpbf16ps multiplies pairs exactly and accumulates in fp32: fp32 lanes 4b..4b+3 hold block
// b's partial dot; d reaches those lanes by one permute, and the second term, a row's
// (m - 128 d) . sum(x) over its blocks, is 16 blocks per FMA after its quads. The offset makes
// the partial sums ~18x larger than the fp32 path's, i.e. ~1e-6 relative error: far below
// the bf16 rounding of the output.
struct Bf16X {  // x rearranged for one call
  std::vector<uint16_t> xs;  // [M][quads][4][32]
  std::vector<float> sx;     // [M][groups of 16 blocks][16]: each block's sum(x)
};

inline void prepare_bf16_x(const uint16_t* x, int64_t M, int64_t K, Bf16X& px) {
  const int64_t nb = K / 32, quads = (nb + 3) / 4, groups = (nb + 15) / 16;
  px.xs.assign(M * quads * 128, 0);
  px.sx.assign(M * groups * 16, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const uint16_t* src = x + m * K + blk * 32;
      uint16_t* dst = px.xs.data() + (m * quads + blk / 4) * 128 + (blk % 4) * 8;
      for (int t = 0; t < 8; ++t) {
        dst[t] = src[2 * t];
        dst[32 + t] = src[2 * t + 16];
        dst[64 + t] = src[2 * t + 1];
        dst[96 + t] = src[2 * t + 17];
      }
      float sum = 0;
      for (int j = 0; j < 32; ++j) sum += bits<float>(uint32_t(src[j]) << 16);
      px.sx[(m * groups + blk / 16) * 16 + blk % 16] = sum;
    }
}

// Up to GEMV_MAX_ROWS rows of x share one pass over the codes. Per row and quad: four chained dot
// products and one FMA by the blocks' d; the m-terms, (m - 128 d) . sum(x) over a row's
// blocks, come after its quads, 16 blocks per FMA (they were one FMA per quad and row).
template <int MB>
void gemv_q4_bf16_rows(const Q4Rows& w, const uint16_t* xs, const float* sx, int64_t n0, int64_t n1,
                       c10::BFloat16* out, int64_t N) {
  const int64_t K = w.K, nb = K / 32, quads = (nb + 3) / 4, full = nb / 4, groups = (nb + 15) / 16;
  const __m512i lane_blk = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i low4 = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  const __mmask64 tail_mask = (1ull << ((nb % 4) * 16)) - 1;  // the last, partial quad
  v16 sums[MB][TILE];  // rows are short (K / 32 blocks): their sums are reduced 16 at once
  for (int64_t g0 = n0; g0 < n1; g0 += TILE) {
    const int rows = int(std::min<int64_t>(TILE, n1 - g0));
    for (int r = 0; r < rows; ++r) {
      const int64_t n = g0 + r;
      if (n + PREFETCH_ROWS < n1) w.prefetch(n + PREFETCH_ROWS);
      const uint8_t* codes = w.qw + n * (K / 2);
      const uint16_t* sc = reinterpret_cast<const uint16_t*>(w.sc) + n * nb;
      const uint16_t* mn = reinterpret_cast<const uint16_t*>(w.mn) + n * nb;
      __m512 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
      __m512 d16 = _mm512_setzero_ps();
      for (int64_t qd = 0; qd < quads; ++qd) {
        const int g = int(qd % 4);  // 4 quads = the 16 blocks of one scale load
        if (g == 0) {
          const int64_t left = nb - 4 * qd;
          d16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(left >= 16 ? 0xFFFF : __mmask16((1u << left) - 1), sc + 4 * qd));
        }
        const __m512 dv = _mm512_permutexvar_ps(_mm512_add_epi32(lane_blk, _mm512_set1_epi32(4 * g)), d16);
        const __m512i c = qd < full ? _mm512_loadu_si512(codes + qd * 64) : _mm512_maskz_loadu_epi8(tail_mask, codes + qd * 64);
        // (c & 15) | 0x4300 and friends: 0xEA = (A & B) | C
        const __m512bh v0 = (__m512bh)_mm512_ternarylogic_epi32(c, low4, bias, 0xEA);
        const __m512bh v1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(c, 4), low4, bias, 0xEA);
        const __m512bh v2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(c, 8), low4, bias, 0xEA);
        const __m512bh v3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(c, 12), bias);
        for (int m = 0; m < MB; ++m) {
          const uint16_t* xp = xs + (m * quads + qd) * 128;
          __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), v0, (__m512bh)_mm512_loadu_si512(xp));
          if constexpr (MB <= 2) {  // few rows: two chains (one chain 1.01-1.025x the time at 1-2 rows)
            __m512 b = _mm512_dpbf16_ps(_mm512_setzero_ps(), v1, (__m512bh)_mm512_loadu_si512(xp + 32));
            a = _mm512_dpbf16_ps(a, v2, (__m512bh)_mm512_loadu_si512(xp + 64));
            b = _mm512_dpbf16_ps(b, v3, (__m512bh)_mm512_loadu_si512(xp + 96));
            a = _mm512_add_ps(a, b);
          } else {
            a = _mm512_dpbf16_ps(a, v1, (__m512bh)_mm512_loadu_si512(xp + 32));
            a = _mm512_dpbf16_ps(a, v2, (__m512bh)_mm512_loadu_si512(xp + 64));
            a = _mm512_dpbf16_ps(a, v3, (__m512bh)_mm512_loadu_si512(xp + 96));
          }
          acc[m] = _mm512_fmadd_ps(a, dv, acc[m]);
        }
      }
      for (int64_t gg = 0; gg < groups; ++gg) {
        const int64_t left = nb - 16 * gg;
        const __mmask16 k = left >= 16 ? 0xFFFF : __mmask16((1u << left) - 1);
        const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc + 16 * gg));
        const __m512 mv = _mm512_fnmadd_ps(d, _mm512_set1_ps(128.0f), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + 16 * gg)));
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(sx + (m * groups + gg) * 16), acc[m]);
      }
      for (int m = 0; m < MB; ++m) sums[m][r] = bits<v16>(acc[m]);
    }
    for (int m = 0; m < MB; ++m) {
      for (int r = rows; r < TILE; ++r) sums[m][r] = v16{};
      const v16 y = reduce16(sums[m]);
      const __m256i yb = (__m256i)_mm512_cvtneps_pbh(bits<__m512>(y));  // round to nearest even
      uint16_t tmp[TILE];
      std::memcpy(tmp, &yb, sizeof tmp);
      std::memcpy(out + m * N + g0, tmp, rows * sizeof(uint16_t));
    }
  }
}

constexpr int64_t Q4_TILE_MAX_ROWS = 64;  // q4_linear_tiles up to here (see there)
// bf16 x of up to GEMV_MAX_ROWS rows.
at::Tensor q4_linear_bf16(const at::Tensor& x, const Q4Rows& w, int64_t N) {
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= GEMV_MAX_ROWS, "the bf16 GEMV takes a few rows");
  thread_local Bf16X px;
  prepare_bf16_x(static_cast<const uint16_t*>(x.data_ptr()), M, w.K, px);
  at::Tensor out = at::empty({M, N}, x.options());
  const uint16_t* xs = px.xs.data();
  const float* sx = px.sx.data();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 32, [&](int64_t lo, int64_t hi) {
    with_rows<GEMV_MAX_ROWS>(M, [&](auto R) { gemv_q4_bf16_rows<R()>(w, xs, sx, lo, hi, o, N); });
  });
  return out;
}

// The tile's scales and minima are converted to fp32 once per tile (ds, ms: [16][nb]), so a
// block's dequantization (block_bf16_pair) takes its d and m as plain floats: per row and block the
// index arithmetic and scalar fp16 conversions of Q4Rows::block (16 of its ~25 ops, half of
// them on the vector ports) go. A tile's rows are consecutive, so their scales are one run of
// rows * nb values, converted 16 at a time (row by row, with a masked tail per row, the
// 16-row linears took 1.04x the time).
inline void tile_scales(const Q4Rows& w, int64_t n0, int64_t N, float* ds, float* ms) {
  const int64_t nb = w.K / 32, total = std::min<int64_t>(16, N - n0) * nb;  // rows past N: not read
  const c10::Half *sc = w.sc + n0 * nb, *mn = w.mn + n0 * nb;
  for (int64_t i = 0; i < total; i += 16) {
    const __mmask16 k = (__mmask16)((1u << std::min<int64_t>(16, total - i)) - 1);  // no read past the run
    _mm512_mask_storeu_ps(ds + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc + i)));
    _mm512_mask_storeu_ps(ms + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + i)));
  }
}

// Two rows' Q4_1 blocks (16 code bytes, scale d, minimum m each) -> their 32 weights each as
// bf16, from one table of 32: bf16(d c + m) for c = 0..15, row r's in the low half and row
// r + 1's in the high half (one FMA per row and one two-source rounding: the same fp32 value
// and rounding as widening every code), looked up per weight by one word permute (the codes
// widened to words, the high nibbles shifted down, masked to 4 bits and OR-ed with the row's
// half bit: a permute reads an index's low five bits). Per row about 6 vector ops, 2.5 of them
// on the shuffle port, where a table per row (duplicated into both halves) took 7 with 4 there:
// the 30 layers' Q4 linears at 16 rows 0.948x the time, 0.956x at 8, 0.996x at 64 (in-process,
// alternating, bit-equal outputs). The first AMX version, converting each code, took 9.
inline void block_bf16_pair(const uint8_t* p0, const uint8_t* p1, float d0, float m0, float d1, float m1,
                            uint16_t* out0, uint16_t* out1) {
  const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(lane, _mm512_set1_ps(d1), _mm512_set1_ps(m1)),
                                                     _mm512_fmadd_ps(lane, _mm512_set1_ps(d0), _mm512_set1_ps(m0)));
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);  // high nibbles: weights 16-31
  const __m512i low4 = _mm512_set1_epi16(15);
  const __m512i c0 = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))));
  const __m512i c1 = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p1))));
  const __m512i i0 = _mm512_and_si512(_mm512_srlv_epi16(c0, shift), low4);
  // ((c >> s) & 15) | 16: 0xEA = (A & B) | C
  const __m512i i1 = _mm512_ternarylogic_epi32(_mm512_srlv_epi16(c1, shift), low4, _mm512_set1_epi16(16), 0xEA);
  _mm512_store_si512(out0, _mm512_permutexvar_epi16(i0, table));
  _mm512_store_si512(out1, _mm512_permutexvar_epi16(i1, table));
}

// Q4 x bf16 for 5-64 rows without AMX: per tile of 16 output rows the weights are rounded
// to bf16 once, as the dense path's scratch rounds them (block_bf16_pair) and as the AMX path
// does, into a buffer that stays in L1/L2, and every pass of 8 rows of x runs plain bf16 dot
// products against it, two output rows per load of x (x as it is: a pair of k's per lane on
// both sides). No scratch matrix, no packing, no second pass over the weights, no per-block
// scale FMA. On the Zen 5 VM (in-process A/B, alternating), the 30 layers' 4-bit linears:
// against the dequantize-and-GEMM path 0.55x the time at 17 rows, 0.65x at 32, 0.75-0.84x
// at 64, 0.97x at 96 (so up to Q4_TILE_MAX_ROWS); against the exact GEMV (which keeps 1-4
// rows, where the tiles took 1.2-1.7x its time) 0.91-1.0x at 5-6 rows, 0.73x at 8, 0.67x at
// 16. Engine decode steps, fp16 cache: 0.82x at 8 x 32, 0.71x at 16 x 32, 0.74x at 32 x 32,
// 0.79x at 64 x 32; int8 16 x 2048 0.86x. The weights' rounding (the precision every path
// above 4 rows had on AMX, and above 16 rows here): on 512 tokens of the SOTU excerpt in
// 16-token chunks, mean KL to fp32 compute 0.000253 against the exact GEMV's 0.000216.
template <int MB>
void q4_tile_gemm_rows(const uint16_t* tile, int rows, int64_t K, const uint16_t* x, c10::BFloat16* out, int64_t N) {
  v16 sums[MB][TILE];
  for (int r = 0; r < rows; r += 2) {  // two output rows share each load of x
    __m512 acc[MB], acc1[MB];
    for (int m = 0; m < MB; ++m) acc[m] = acc1[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 32) {
      const __m512bh w0 = (__m512bh)_mm512_load_si512(tile + r * K + c);
      const __m512bh w1 = (__m512bh)_mm512_load_si512(tile + (r + 1) * K + c);
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + c);
        acc[m] = _mm512_dpbf16_ps(acc[m], w0, xv);
        acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, xv);
      }
    }
    for (int m = 0; m < MB; ++m) {
      sums[m][r] = bits<v16>(acc[m]);
      sums[m][r + 1] = bits<v16>(acc1[m]);  // (row r + 1 past a partial tile: not stored)
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = rows; r < TILE; ++r) sums[m][r] = v16{};
    const __m256i yb = (__m256i)_mm512_cvtneps_pbh(bits<__m512>(reduce16(sums[m])));  // round to nearest even
    uint16_t tmp[TILE];
    std::memcpy(tmp, &yb, sizeof tmp);
    std::memcpy(out + m * N, tmp, rows * sizeof(uint16_t));
  }
}

at::Tensor q4_linear_tiles(const at::Tensor& x, const Q4Rows& w, int64_t N) {
  const int64_t M = x.size(0), K = w.K, nb = K / 32, tiles = (N + TILE - 1) / TILE;
  at::Tensor out = at::empty({M, N}, x.options());
  const uint16_t* xp = static_cast<const uint16_t*>(x.data_ptr());
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    struct alignas(64) Chunk {
      uint16_t v[32];
    };
    thread_local std::vector<Chunk> buf;
    thread_local std::vector<float> ds, ms;
    buf.resize(TILE * K / 32);
    ds.resize(TILE * nb);
    ms.resize(TILE * nb);
    uint16_t* tile = buf.data()->v;
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n0 = t * TILE;
      const int rows = int(std::min<int64_t>(TILE, N - n0));
      tile_scales(w, n0, N, ds.data(), ms.data());
      const uint8_t* codes = w.qw + n0 * (K / 2);
      // Row pairs outer, blocks inner: block-outer through tile_block_bf16 (the AMX tiles'
      // order, given a row stride) gave bit-equal outputs at 1.01-1.045x the time (8-64 rows).
      for (int r = 0; r < rows; r += 2) {
        const int r1 = std::min(r + 1, rows - 1);
        if (n0 + TILE + r < N) w.prefetch(n0 + TILE + r);
        if (n0 + TILE + r + 1 < N) w.prefetch(n0 + TILE + r + 1);
        for (int64_t kb = 0; kb < nb; ++kb)
          block_bf16_pair(codes + r * (K / 2) + kb * 16, codes + r1 * (K / 2) + kb * 16, ds[r * nb + kb], ms[r * nb + kb],
                          ds[r1 * nb + kb], ms[r1 * nb + kb], tile + r * K + kb * 32, tile + (r + 1) * K + kb * 32);
      }
      for (int64_t m0 = 0; m0 < M; m0 += PASS)
        with_rows<PASS>(std::min<int64_t>(PASS, M - m0), [&](auto R) {
          q4_tile_gemm_rows<R()>(tile, rows, K, xp + m0 * K, o + m0 * N + n0, N);
        });
    }
  });
  return out;
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
// Q4 x bf16 for batches of a few to 64 rows with AMX: C^T = W x^T, so the weights are the A
// operand (plain rows: a block of 32 weights of 16 output features, dequantized to bf16 on the
// fly into a 1 KB tile, as the dense path's scratch rounds them) and x^T, laid out once per
// call in AMX's pair-interleaved B layout, is reused by every weight tile; up to four 16-row
// groups of x share each dequantized tile. No scratch matrix, no second pass over the weights.

// pf >= 0: the first row of the tile this thread runs next, whose rows are asked for over
// this tile's blocks: the 16 rows a tile reads lie K / 2 bytes apart, 16 streams at once that
// the hardware prefetcher did not keep up with (the code loads waited on memory; 16 x 2048
// int4 decode: the Q4 linears 30% of the step).
// Block kb of a tile's rows (from `codes`, scales ds/ms [16][nb]) as bf16 into a [16][32];
// rows past `rows` (a last, partial tile) repeat its last row: their products are not stored.
// A full tile walks its rows by running pointers, unrolled: the clamped indices cost ~12-25
// scalar ops per row pair (imuls, cmovs, K / 2 recomputed), competing with the vector work
// for the ALU ports; without them the 30 layers' 4-bit linears at 16 rows took 0.87-0.88x
// the time, one 3072 x 576 linear cache-resident 0.79-0.84x (in-process A/B, alternating,
// bit-equal outputs).
inline void tile_block_bf16(const Q4Rows& w, const uint8_t* codes, int rows, int64_t kb, const float* ds,
                            const float* ms, uint16_t* a) {
  const int64_t nb = w.K / 32;
  if (rows == 16) {
    const int64_t rb = w.K / 2;
    const uint8_t* p = codes + kb * 16;
    const float *d = ds + kb, *m = ms + kb;
#pragma GCC unroll 8
    for (int r = 0; r < 16; r += 2) {
      block_bf16_pair(p, p + rb, d[0], m[0], d[nb], m[nb], a + r * 32, a + (r + 1) * 32);
      p += 2 * rb;
      d += 2 * nb;
      m += 2 * nb;
    }
    return;
  }
  for (int r = 0; r < 16; r += 2) {
    const int r0 = std::min(r, rows - 1), r1 = std::min(r + 1, rows - 1);
    block_bf16_pair(codes + r0 * (w.K / 2) + kb * 16, codes + r1 * (w.K / 2) + kb * 16, ds[r0 * nb + kb],
                    ms[r0 * nb + kb], ds[r1 * nb + kb], ms[r1 * nb + kb], a + r * 32, a + (r + 1) * 32);
  }
}

template <int MT>
void amx_rows(const Q4Rows& w, const uint32_t* xt, int64_t n0, int64_t N, float* cbuf, int64_t pf, float* ds,
              float* ms) {
  const int64_t nb = w.K / 32;
  const int rows = (int)std::min<int64_t>(16, N - n0);
  tile_scales(w, n0, N, ds, ms);
  const uint8_t* codes = w.qw + n0 * (w.K / 2);
  alignas(64) uint16_t a[16 * 32];
  _tile_zero(0);
  if constexpr (MT > 1) _tile_zero(1);
  if constexpr (MT > 2) _tile_zero(2);
  if constexpr (MT > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < nb; ++kb) {
    if (pf >= 0)
      for (int64_t r = kb * 16 / nb; r < (kb + 1) * 16 / nb; ++r)
        if (pf + r < N) w.prefetch(pf + r);
    tile_block_bf16(w, codes, rows, kb, ds, ms, a);
    _tile_loadd(4, a, 64);
    const uint32_t* b = xt + kb * MT * 256;
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (MT > 1) {
      _tile_loadd(6, b + 256, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (MT > 2) {
      _tile_loadd(7, b + 512, 64);
      _tile_dpbf16ps(2, 4, 7);
    }
    if constexpr (MT > 3) {
      _tile_loadd(5, b + 768, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, cbuf, 64);
  if constexpr (MT > 1) _tile_stored(1, cbuf + 256, 64);
  if constexpr (MT > 2) _tile_stored(2, cbuf + 512, 64);
  if constexpr (MT > 3) _tile_stored(3, cbuf + 768, 64);
}

// Two consecutive tiles (rows n0 .. n0 + 31, n0 + 16 < N) for up to 32 rows of x: each x
// tile loaded once for both (a tile load takes ~16 cycles on this VM, as a product does):
// the 30 layers' Q4 linears 0.954x the time at 16 rows, 0.942x at 8, 0.956x at 32
// (in-process A/B, alternating; bit-equal outputs). cbuf: the first tile's groups, then the
// second's.
template <int MT>
void amx_rows2(const Q4Rows& w, const uint32_t* xt, int64_t n0, int64_t N, float* cbuf, int64_t pf, float* ds,
               float* ms) {
  static_assert(MT <= 2, "four accumulators at most");
  const int64_t nb = w.K / 32;
  const int rows1 = (int)std::min<int64_t>(16, N - n0 - 16);
  tile_scales(w, n0, N, ds, ms);
  tile_scales(w, n0 + 16, N, ds + 16 * nb, ms + 16 * nb);
  const uint8_t* codes = w.qw + n0 * (w.K / 2);
  alignas(64) uint16_t a0[16 * 32], a1[16 * 32];
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (MT > 1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < nb; ++kb) {
    if (pf >= 0)
      for (int64_t r = kb * 32 / nb; r < (kb + 1) * 32 / nb; ++r)
        if (pf + r < N) w.prefetch(pf + r);
    tile_block_bf16(w, codes, 16, kb, ds, ms, a0);
    tile_block_bf16(w, codes + 16 * (w.K / 2), rows1, kb, ds + 16 * nb, ms + 16 * nb, a1);
    _tile_loadd(4, a0, 64);
    _tile_loadd(5, a1, 64);
    const uint32_t* b = xt + kb * MT * 256;
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MT == 1)  // the tile numbers are literals (the intrinsics paste them into asm)
      _tile_dpbf16ps(1, 5, 6);
    else
      _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT > 1) {
      _tile_loadd(7, b + 256, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, cbuf, 64);
  _tile_stored(1, cbuf + 256, 64);
  if constexpr (MT > 1) {
    _tile_stored(2, cbuf + 512, 64);
    _tile_stored(3, cbuf + 768, 64);
  }
}

at::Tensor q4_linear_amx(const at::Tensor& x, const Q4Rows& w, int64_t N) {
  const int64_t M = x.size(0), K = w.K, MT = (M + 15) / 16;
  thread_local std::vector<uint32_t> xt;
  prepare_xt(static_cast<const uint16_t*>(x.data_ptr()), M, K, MT, xt);
  const uint32_t* xtp = xt.data();  // thread_local: the workers must read this thread's copy
  at::Tensor out = at::empty({M, N}, x.options());
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  const int64_t ntiles = (N + 15) / 16;  // chunks of at most a quarter of a thread's share, then shrinking, of 2+ tiles (pairs)
  const int64_t threads = at::get_num_threads();
  claim_chunks(ntiles, std::max<int64_t>(1, ntiles / (4 * threads)), threads, [&](auto&& run) {
    load_full_tiles();
    alignas(64) float cbuf[4 * 256];
    std::vector<float> ds(32 * (K / 32)), ms(ds.size());
    // cb[mt][r][c] = y[16 mt + c][16 nt + r]: transposed per group, rounded 16 at a time
    const auto emit = [&](int64_t nt, const float* cb) {
      const __mmask16 k = __mmask16((1u << std::min<int64_t>(16, N - nt * 16)) - 1);
      for (int64_t mt = 0; mt < MT; ++mt) {
        v16 t[16];
        for (int r = 0; r < 16; ++r) t[r] = load16(cb + mt * 256 + r * 16);
        transpose16(t);
        for (int64_t c = 0; c < 16 && 16 * mt + c < M; ++c)
          _mm256_mask_storeu_epi16(o + (16 * mt + c) * N + nt * 16, k, bits<__m256i>(to_bf16(t[c])));
      }
    };
    run([&](int64_t lo, int64_t hi, int64_t then) {
      for (int64_t nt = lo; nt < hi;) {
        const int step = MT <= 2 && nt + 1 < hi ? 2 : 1;  // two tiles per pass over x where they fit
        const int64_t pf = nt + step < hi ? (nt + step) * 16 : then >= 0 ? then * 16 : -1;
        if (step == 2)
          with_rows<2>(MT, [&](auto R) { amx_rows2<R()>(w, xtp, nt * 16, N, cbuf, pf, ds.data(), ms.data()); });
        else
          with_rows<4>(MT, [&](auto R) { amx_rows<R()>(w, xtp, nt * 16, N, cbuf, pf, ds.data(), ms.data()); });
        for (int u = 0; u < step; ++u) emit(nt + u, cbuf + u * MT * 256);
        nt += step;
      }
    });
    _tile_release();
  }, 2);
  return out;
}
#endif

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2, "x: [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % 32 == 0 && qweight.size(1) == K / 2, "K must be a multiple of 32 matching the weight");
  const Q4Rows w{qweight.data_ptr<uint8_t>(), static_cast<const c10::Half*>(scales.data_ptr()),
                 static_cast<const c10::Half*>(mins.data_ptr()), K};
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  if (M > GEMV_MAX_ROWS && M <= 64 && x.scalar_type() == at::kBFloat16 && amx_ready())
    return q4_linear_amx(x.contiguous(), w, N);
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (M <= GEMV_MAX_ROWS && x.scalar_type() == at::kBFloat16) return q4_linear_bf16(x.contiguous(), w, N);
  if (M <= Q4_TILE_MAX_ROWS && x.scalar_type() == at::kBFloat16) return q4_linear_tiles(x.contiguous(), w, N);
#endif
  if (M <= 8) return gemv(x.to(at::kFloat).contiguous(), w, N).to(x.scalar_type());
  // Dequantize into reused scratch (a fresh multi-MB allocation per call costs page
  // faults every step), in x's dtype, then the dense GEMM.
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
  static thread_local at::Tensor scratch;
  if (!scratch.defined() || scratch.numel() < N * K * 2) scratch = at::empty({N * K * 2}, x.options().dtype(at::kShort));
  at::Tensor dense = bf16 ? scratch.narrow(0, 0, N * K).view(at::kBFloat16).view({N, K})
                          : scratch.view(at::kFloat).narrow(0, 0, N * K).view({N, K});
  uint8_t* dp = static_cast<uint8_t*>(dense.data_ptr());
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n)
      for (int64_t b = 0; b < K / 32; ++b) {
        v16 w0, w1;
        w.block(n, b, w0, w1);
        const int64_t at = n * K + b * 32;
        if (!bf16) {
          store16(reinterpret_cast<float*>(dp) + at, w0);
          store16(reinterpret_cast<float*>(dp) + at + 16, w1);
          continue;
        }
        // fp32 -> bf16, round to nearest even (as torch's conversion; weights are finite).
#if defined(__AVX512BF16__)
        _mm512_storeu_si512(dp + at * 2, (__m512i)_mm512_cvtne2ps_pbh(bits<__m512>(w1), bits<__m512>(w0)));
        continue;
#endif
        for (int h = 0; h < 2; ++h) {
          const u32x16 u = (u32x16)(h ? w1 : w0);
          const u16x16 r = __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, u16x16);
          std::memcpy(dp + (at + 16 * h) * 2, &r, sizeof r);
        }
      }
  });
  return at::mm(x.contiguous(), dense.t());
}

}  // namespace

namespace ferrolm {
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins) {
  return ::q4_linear(x, qweight, scales, mins);
}
}  // namespace ferrolm

TORCH_LIBRARY_FRAGMENT(ferrolm_cpu, m) {
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
}

TORCH_LIBRARY_IMPL(ferrolm_cpu, CPU, m) {
  m.impl("q4_linear", &q4_linear);
}
