// GGUF weights as shipped: Q4_0 / Q4_1 and Q8_0 linear layers (see models/quant_linear.py).
#include "simd.h"
#include "claim.h"
#include "ops.h"

#include <sys/syscall.h>
#include <type_traits>
#include <unistd.h>

namespace {


// --- Weights as shipped: GGUF Q4_0 / Q4_1 and Q8_0 ---------------------------------------
// Q4: codes [N, K/2] uint8 in GGUF's own layout (per block of 32, byte j holds element j in
// the low nibble and element j + 16 in the high one), scales and mins [N, K/32] fp16
// (Q4_0: min = -8 d); w = q d + min. Q8_0: codes [N, K] int8, scales [N, K/32]; w = q d.
// Exactly GGUF's dequantization, in fp32. Up to 8 input rows share one pass over the
// codes (a fused GEMV); larger Q4 batches dequantize into a reused matrix of x's dtype
// and call the dense GEMM.
struct Q4Rows {
  const uint8_t* qw;
  const c10::Half *sc, *mn;
  int64_t K;
  // Block b of row n -> its 32 weights, q d + lo.
  void block(int64_t n, int64_t b, v16& w0, v16& w1) const {
    const int64_t i = n * (K / 32) + b;
    const float d = half_to_float(sc[i]), lo = half_to_float(mn[i]);
    const uint8_t* p = qw + n * (K / 2) + b * 16;
#if defined(__AVX512F__)
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w0 = bits<v16>(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15))));
    w1 = bits<v16>(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)));
#else
    u8x16 q;
    std::memcpy(&q, p, sizeof q);
    w0 = i32_to_v16(__builtin_convertvector((u8x16)(q & 15), i32x16));
    w1 = i32_to_v16(__builtin_convertvector((u8x16)(q >> 4), i32x16));
#endif
    w0 = w0 * d + lo;
    w1 = w1 * d + lo;
  }
  void prefetch(int64_t n) const {
    const char* p = reinterpret_cast<const char*>(qw + n * (K / 2));
    for (int64_t off = 0; off < K / 2; off += 64) __builtin_prefetch(p + off);
    __builtin_prefetch(sc + n * (K / 32));
    __builtin_prefetch(mn + n * (K / 32));
  }
};

struct Q8Rows {
  const int8_t* qw;
  const c10::Half* sc;
  int64_t K;
  void block(int64_t n, int64_t b, v16& w0, v16& w1) const {
    const float d = half_to_float(sc[n * (K / 32) + b]);
    const int8_t* p = qw + n * K + b * 32;
    w0 = from_i8(p) * d;
    w1 = from_i8(p + 16) * d;
  }
  // Row n's codes and scales asked for, into L1 (LOCALITY 3) or L2 (2: more misses in flight).
  template <int LOCALITY = 3>
  void prefetch(int64_t n) const {
    const char* p = reinterpret_cast<const char*>(qw + n * K);
    for (int64_t off = 0; off < K; off += 64) __builtin_prefetch(p + off, 0, LOCALITY);
    __builtin_prefetch(sc + n * (K / 32), 0, LOCALITY);
  }
  // Row n's block scales as fp32 into d [K / 32], 16 per conversion (zeros for a row past
  // the matrix: here false).
  void row_scales(int64_t n, bool here, float* d) const {
    const int64_t nb = K / 32;
    const c10::Half* sp = sc + n * nb;
    int64_t kb = 0;
    for (; here && kb + 16 <= nb; kb += 16) store16(d + kb, from_f16(sp + kb));
    for (; kb < nb; ++kb) d[kb] = here ? half_to_float(sp[kb]) : 0.0f;
  }
};

// Rows stream from memory once per step (the weights are far larger than the caches), in
// short scattered-looking runs per thread: the hardware prefetcher alone left the Q4 GEMV
// at ~4 GB/s, so each row asks for the row PREFETCH_ROWS ahead. Two accumulators per input
// row halve the FMA dependency chains.
constexpr int PREFETCH_ROWS = 4;
// Up to here the GEMVs over exact weights (bound by memory at so few rows); above, for bf16
// x, tiles of weights rounded to bf16: AMX where built, else AVX512-BF16 dot products.
constexpr int64_t GEMV_MAX_ROWS = 4;

// Calls f(std::integral_constant<int, R>) for R = rows in 1..MAX (a compile-time row count
// for the register-blocked kernels; above MAX, MAX).
template <int MAX, class F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (MAX > 1) {
    if (rows < MAX) return with_rows<MAX - 1>(rows, f);
  }
  f(std::integral_constant<int, MAX>{});
}

template <int MB, class W>
void gemv_rows(const W& w, const float* x, int64_t n0, int64_t n1, float* out, int64_t N) {
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    if (n + PREFETCH_ROWS < n1) w.prefetch(n + PREFETCH_ROWS);
    v16 acc[MB], acc2[MB];
    for (int m = 0; m < MB; ++m) acc[m] = acc2[m] = v16{};
    for (int64_t b = 0; b < K / 32; ++b) {
      v16 w0, w1;
      w.block(n, b, w0, w1);
      for (int m = 0; m < MB; ++m) {
        acc[m] += w0 * load16(x + m * K + b * 32);
        acc2[m] += w1 * load16(x + m * K + b * 32 + 16);
      }
    }
    for (int m = 0; m < MB; ++m) out[m * N + n] = hsum(acc[m] + acc2[m]);
  }
}

// fp32 x [M, K] -> fp32 [M, N], 8 rows per pass over the weight.
template <class W>
at::Tensor gemv(const at::Tensor& xf, const W& w, int64_t N) {
  const int64_t M = xf.size(0), K = w.K;
  at::Tensor out = at::empty({M, N}, xf.options());
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t mb = std::min<int64_t>(8, M - m0);
    const float* xp = xf.data_ptr<float>() + m0 * K;
    float* o = out.data_ptr<float>() + m0 * N;
    at::parallel_for(0, N, 32, [&](int64_t lo, int64_t hi) {
      with_rows<8>(mb, [&](auto R) { gemv_rows<R()>(w, xp, lo, hi, o, N); });
    });
  }
  return out;
}

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
constexpr int64_t Q8_BF16_MIN_ROWS = 16;  // q8_linear: x rounded to bf16 from here on (see there)
constexpr int64_t Q8_BF16_MAX_K = 4096;  // (the error bound's 2^-13 covers this many terms)
constexpr float Q8_BF16_ERR = 128.0f * (1.0f / 256 + 1.0f / 8192);  // per |d| and block sum|x| (q8_linear_bf16)
constexpr int PASS = 8;  // rows of x per pass over a tile (16 spilled registers: 1.05-1.33x the time)
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

// The Q8_0 head over x rounded to bf16 with AVX512-BF16 dot products (fp32 out; see
// q8_linear for when, and for the logits that are then recomputed from x in fp32). Int8
// codes are exact in bf16 and the pair products exact in fp32. Per tile of 16 output rows, the codes
// are widened to bf16 once into a buffer that stays in L1, and every row of x runs against it
// (the weights leave memory once per call, not once per pass of rows). Two blocks (64 codes)
// are one step: packed so that lanes 0-7 of each dot product hold the first block's partial
// sums and lanes 8-15 the second's, with the pair's two scales one vector beside them; x is
// laid out once per call in that order ([M][pairs][2][32]: elements 0-15 of both blocks,
// then 16-31), and one FMA per row and pair applies the scales.
inline void prepare_q8_x(const uint16_t* x, int64_t M, int64_t K, std::vector<uint16_t>& xs) {
  const int64_t nb = K / 32, pairs = (nb + 1) / 2;
  xs.assign(M * pairs * 64, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const uint16_t* src = x + m * K + blk * 32;
      uint16_t* dst = xs.data() + (m * pairs + blk / 2) * 64 + (blk % 2) * 16;
      std::memcpy(dst, src, 16 * sizeof(uint16_t));
      std::memcpy(dst + 32, src + 16, 16 * sizeof(uint16_t));
    }
}

struct Q8Pair {  // one row's pair of blocks, widened to two bf16 vectors
  __m512bh a, b;
};

// Per worker thread, for each row of x: the running floor under its maximum (the largest
// y_n - e_n so far) and the logits that may be it, y_n + e_n >= the floor then. Shared by the
// heads whose products are approximate (q8_linear_bf16, q8_linear_amx_folded): each logit y_n
// lies within e_n = sum over its blocks of |d_b| S_b err + 1e-6 of x's exact product (S_b the
// block's sum|x|, err the path's factor), so the row's maximum is at least max(y_n - e_n), and
// every logit with y_n + e_n >= that floor is recomputed from x in fp32 (rescore).
struct HeadTop {
  const float* sb;           // [M][nb]: each block's sum|x|
  const float* smax;         // [M]: the largest of them
  std::vector<float> floor;  // [M]
  struct Cand {
    int64_t m, n;
    float e;
  };
  std::vector<Cand> cand;

  // x's block sums |x| (sb [M][nb]) and each row's largest (smax).
  static void block_sums(const float* x, int64_t M, int64_t K, std::vector<float>& sb, std::vector<float>& smax) {
    const int64_t nb = K / 32;
    sb.assign(M * nb, 0.0f);
    smax.assign(M, 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        float sum = 0;
        for (int j = 0; j < 32; ++j) sum += std::fabs(x[m * K + b * 32 + j]);
        sb[m * nb + b] = sum;
        smax[m] = std::max(smax[m], sum);
      }
  }

  // Row m's logits y (lanes: output rows n0 + lane, `valid` of them) of one 16-row strip:
  // skipped whole when even the coarse bound err smax dtile (dtile: the strip's largest
  // sum_b |d_b|) cannot reach the floor; else each lane's bound from ecol (per block, the
  // lanes' |d_b| err; made() builds it on first use) raises the floor and notes candidates.
  template <class MakeEcol>
  void check(int64_t m, int64_t nb, int64_t n0, __m512 y, __mmask16 valid, float err, float dtile, const __m512* ecol,
             MakeEcol&& made) {
    if (_mm512_mask_reduce_max_ps(valid, y) + err * smax[m] * dtile + 1e-6f < floor[m]) return;
    made();
    const float* s = sb + m * nb;
    __m512 ev = _mm512_set1_ps(1e-6f);
    for (int64_t b = 0; b < nb; ++b) ev = _mm512_fmadd_ps(ecol[b], _mm512_set1_ps(s[b]), ev);
    floor[m] = std::max(floor[m], _mm512_mask_reduce_max_ps(valid, _mm512_sub_ps(y, ev)));
    __mmask16 k = _mm512_mask_cmp_ps_mask(valid, _mm512_add_ps(y, ev), _mm512_set1_ps(floor[m]), _CMP_GE_OQ);
    for (; k; k &= k - 1) {
      const int j = __builtin_ctz(k);
      cand.push_back({m, n0 + j, bits<v16>(ev)[j]});
    }
  }

  // The workers' floors merged, then each candidate still at or above its row's floor
  // recomputed from x in fp32 (the fp32 GEMV's row) into o [M, N].
  static void rescore(const std::vector<HeadTop>& tops, const Q8Rows& w, const float* x, int64_t M, int64_t N, float* o) {
    std::vector<float> floor(M, -INFINITY);
    for (const HeadTop& ht : tops)
      for (int64_t m = 0; m < M; ++m) floor[m] = std::max(floor[m], ht.floor[m]);
    for (const HeadTop& ht : tops)
      for (const Cand& c : ht.cand)
        if (o[c.m * N + c.n] + c.e >= floor[c.m]) gemv_rows<1>(w, x + c.m * w.K, c.n, c.n + 1, o + c.m * N, N);
  }
};

// Up to PASS rows of x (m0 on) against a tile of `rows` output rows (n0 on). WIDEN (the
// first pass): the codes widened from memory, in registers beside the dot products, and kept
// in `tile` (with each row's scales in dg, 16 blocks per vector) for the passes after it, which
// read them from there (L1). Each logit's bound e_n (see q8_linear_bf16) is 16 rows per FMA
// and block (ecol: the tile's |d| times the error factor, per block, made when first needed),
// for tiles not ruled out whole by the coarser bound smax * max(sum_b |d_b|) * the factor.
template <int MB, bool WIDEN>
void q8_tile_rows(const Q8Rows& w, int64_t m0, int64_t n0, int rows, Q8Pair* tile, __m512* dg, __m512* ecol,
                  bool& ecol_made, float& dtile, const uint16_t* xs, float* out, int64_t N, HeadTop& ht) {
  const int64_t K = w.K, nb = K / 32, pairs = (nb + 1) / 2, groups = (nb + 15) / 16;
  const __m512i lane_blk = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512 zero = _mm512_setzero_ps();
  v16 sums[MB][TILE];  // rows are short (K / 32 blocks): their sums are reduced 16 at once
  for (int r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const int8_t* codes = w.qw + n * K;
    if constexpr (WIDEN) {
      if (n + TILE < N) w.prefetch(n + TILE);
      const uint16_t* sc = reinterpret_cast<const uint16_t*>(w.sc) + n * nb;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t left = nb - 16 * g;
        dg[r * groups + g] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(left >= 16 ? 0xFFFF : __mmask16((1u << left) - 1), sc + 16 * g));
      }
      __m512 dsum = _mm512_abs_ps(dg[r * groups]);
      for (int64_t g = 1; g < groups; ++g) dsum = _mm512_add_ps(dsum, _mm512_abs_ps(dg[r * groups + g]));
      dtile = r == 0 ? _mm512_reduce_add_ps(dsum) : std::max(dtile, _mm512_reduce_add_ps(dsum));
      ecol_made = false;
    }
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = zero;
    for (int64_t p = 0; p < pairs; ++p) {
      Q8Pair q;
      if constexpr (WIDEN) {
        const int8_t* c = codes + p * 64;
        const bool two = 2 * p + 1 < nb;  // the last pair of an odd count holds one block
        auto widen = [&](int off) {
          return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + off))));
        };
        q.a = _mm512_cvtne2ps_pbh(two ? widen(32) : zero, widen(0));
        q.b = _mm512_cvtne2ps_pbh(two ? widen(48) : zero, widen(16));
        tile[r * pairs + p] = q;
      } else {
        q = tile[r * pairs + p];
      }
      const __m512 dv = _mm512_permutexvar_ps(_mm512_add_epi32(lane_blk, _mm512_set1_epi32(2 * int(p % 8))), dg[r * groups + p / 8]);
      for (int m = 0; m < MB; ++m) {
        const uint16_t* xp = xs + (m * pairs + p) * 64;
        __m512 a = _mm512_dpbf16_ps(zero, q.a, (__m512bh)_mm512_loadu_si512(xp));
        a = _mm512_dpbf16_ps(a, q.b, (__m512bh)_mm512_loadu_si512(xp + 32));
        acc[m] = _mm512_fmadd_ps(a, dv, acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) sums[m][r] = bits<v16>(acc[m]);
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = rows; r < TILE; ++r) sums[m][r] = v16{};
    const v16 y = reduce16(sums[m]);
    std::memcpy(out + m * N, &y, rows * sizeof(float));
    const __mmask16 valid = (__mmask16)((1u << rows) - 1);
    ht.check(m0 + m, nb, n0, bits<__m512>(y), valid, Q8_BF16_ERR, dtile, ecol, [&] {
      if (ecol_made) return;
      for (int64_t b = 0; b < nb; ++b) {
        alignas(64) float col[TILE] = {};  // rows past the tile's end: no bound
        for (int r = 0; r < rows; ++r) col[r] = std::fabs(reinterpret_cast<const float*>(dg + r * groups)[b]);
        ecol[b] = _mm512_mul_ps(_mm512_load_ps(col), _mm512_set1_ps(Q8_BF16_ERR));
      }
      ecol_made = true;
    });
  }
}

// fp32 x [M, K] -> fp32 [M, N] by products over x rounded to bf16. Each logit lies within
// e_n = sum over its blocks of 128 |d_b| S_b (2^-8 + 2^-13) + 1e-6 of x's exact product:
// |w| <= 128 |d| in a block, S_b its sum|x|, bf16 rounding x by 2^-8 relative at most,
// 2^-13 for both fp32 accumulations (a lane of either sums at most K / 16 + 6 terms in
// sequence: for K <= 4096 under 2^-15 of sum|w x| each), the absolute term for inputs
// flushed as denormals. The row's maximum is then at least floor = max(y_n - e_n), and every
// logit with y_n + e_n >= floor is recomputed from x in fp32 (the fp32 GEMV's row): the
// row's maximum, and any logit that could be it, is x's exact product (on the default
// model's hidden states: 2 such logits per row, 23 at most).
at::Tensor q8_linear_bf16(const at::Tensor& xf, const Q8Rows& w, int64_t N) {
  const int64_t M = xf.size(0), K = w.K, nb = K / 32, pairs = (nb + 1) / 2, tiles = (N + TILE - 1) / TILE;
  const float* x = xf.data_ptr<float>();
  std::vector<float> sb, smax;
  HeadTop::block_sums(x, M, K, sb, smax);
  const at::Tensor xb = xf.to(at::kBFloat16);
  thread_local std::vector<uint16_t> xs;
  prepare_q8_x(static_cast<const uint16_t*>(xb.data_ptr()), M, K, xs);
  at::Tensor out = at::empty({M, N}, xf.options());
  float* o = out.data_ptr<float>();
  const uint16_t* xp = xs.data();  // this thread's (the lambda runs on others too)
  std::vector<HeadTop> tops(at::get_num_threads(), HeadTop{sb.data(), smax.data(), std::vector<float>(M, -INFINITY), {}});
  at::parallel_for(0, tiles, 2, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<Q8Pair> tile;
    tile.resize(TILE * pairs);
    __m512 dg[TILE * Q8_BF16_MAX_K / 512], ecol[Q8_BF16_MAX_K / 32];
    HeadTop& ht = tops[at::get_thread_num()];
    bool ecol_made = false;
    float dtile = 0;
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n0 = t * TILE;
      const int rows = int(std::min<int64_t>(TILE, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += PASS)
        with_rows<PASS>(std::min<int64_t>(PASS, M - m0), [&](auto R) {
          const uint16_t* x0 = xp + m0 * pairs * 64;
          if (m0 == 0)
            q8_tile_rows<R(), true>(w, m0, n0, rows, tile.data(), dg, ecol, ecol_made, dtile, x0, o + n0, N, ht);
          else
            q8_tile_rows<R(), false>(w, m0, n0, rows, tile.data(), dg, ecol, ecol_made, dtile, x0, o + m0 * N + n0, N, ht);
        });
    }
  });
  HeadTop::rescore(tops, w, x, M, N, o);
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
bool amx_ready() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;  // the tile data state
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every kernel here uses eight full tiles (16 rows x 64 bytes); once per worker thread.
// The configuration is a static object: built on the stack, gcc may drop the stores of its
// rows and columns as dead (it does not see _tile_loadconfig read them): called out of line,
// the function loaded a half-zeroed configuration and ldtilecfg faulted.
inline void load_full_tiles() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  _tile_loadconfig(&cfg);
}

// x [M, K] bf16 -> per 32-k block kb and 16-row group mt a tile of 16 rows x 16 pairs:
// row r, column c = (x[16 mt + c][32 kb + 2r], x[16 mt + c][32 kb + 2r + 1]); zeros past M.
void prepare_xt(const uint16_t* x, int64_t M, int64_t K, int64_t MT, std::vector<uint32_t>& xt) {
  const int64_t nb = K / 32;
  xt.resize(nb * MT * 256);
  // Per (block, group): the 16 x 16 matrix of pairs (row m, pair r) transposed as floats'
  // bit patterns (16 loads, 64 shuffles, 16 stores instead of 256 scalar moves).
  for (int64_t mt = 0; mt < MT; ++mt)
    for (int64_t kb = 0; kb < nb; ++kb) {
      v16 t[16];
      for (int c = 0; c < 16; ++c) {
        const int64_t m = 16 * mt + c;
        if (m < M)
          std::memcpy(&t[c], x + m * K + kb * 32, sizeof t[c]);
        else
          t[c] = v16{};
      }
      transpose16(t);  // t[r] lane c = pair r of row 16 mt + c
      uint32_t* dst = xt.data() + (kb * MT + mt) * 256;
      for (int r = 0; r < 16; ++r) std::memcpy(dst + r * 16, &t[r], sizeof t[r]);
    }
}

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
// The Q8_0 head for 5-64 rows with AMX, fp32 in and out: the codes are exact in bf16 and
// x = hi + lo (two bf16 parts, 16 significant bits), so each 32-k block's tile product
// Q (x_hi + x_lo)^T is exact-weight fp32, then scaled by the block's d per weight row into
// fp32 accumulators held in registers: each logit within ~2^-16 of sum |w x| of the exact
// one. A 16-row strip of codes is converted once into an L1 buffer and reused by every
// 16-row group of x; blocks alternate between two sets of tiles so one block's products
// overlap the previous one's store and scaling. (Folding the scales into hi/lo weights to
// accumulate whole rows in the tiles instead was slower: three products per block.) perf put
// 14% of its samples on a row's first scale load and 9% on its codes' loads: the next strip
// is asked for meanwhile (in-process A/B: 0.977x the time at 16 rows, 0.930x at 64). A row's
// block scales are widened 16 at a time into dsc [16][nb]: at 16 rows 0.874x the time of a
// scalar conversion per block (in-process A/B, alternating calls).
// xl null: x's two parts stacked in the tiles of xh (q8_linear_amx, up to 8 rows).
void amx_q8_strip(const Q8Rows& w, const uint32_t* xh, const uint32_t* xl, int64_t M, int64_t n0, int64_t N,
                  uint16_t* a, float* dsc, float* o) {
  const int64_t K = w.K, nb = K / 32, MT = (M + 15) / 16;
  for (int r = 0; r < 16; ++r) {
    float* d = dsc + r * nb;  // the row's block scales, 16 per conversion
    const bool here = n0 + r < N;
    w.row_scales(n0 + r, here, d);
    const int8_t* p = w.qw + (n0 + r) * K;
    for (int64_t kb = 0; kb < nb; ++kb) {
      __m512i row = _mm512_setzero_si512();
      if (here) {
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kb * 32))));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kb * 32 + 16))));
        row = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      }
      _mm512_storeu_si512(a + r * K + kb * 32, row);
    }
  }
  // The next strip (rows n0 + 16 .. n0 + 31): its scales now, its codes (16 K contiguous
  // bytes) a few lines per block pair of this strip's first row group.
  const char* next = reinterpret_cast<const char*>(w.qw + (n0 + 16) * K);
  const int64_t next_lines = n0 + 16 < N ? (std::min<int64_t>(N, n0 + 32) - n0 - 16) * K / 64 : 0;
  const int64_t per_block = (next_lines + (nb + 1) / 2 - 1) / ((nb + 1) / 2);
  if (next_lines) {
    const char* ns = reinterpret_cast<const char*>(w.sc + (n0 + 16) * nb);
    for (int64_t off = 0; off < 16 * nb * 2; off += 64) _mm_prefetch(ns + off, _MM_HINT_T0);
  }
  alignas(64) float c0[256], c1[256];
  const int64_t n_here = std::min<int64_t>(16, N - n0);
  for (int64_t mt = 0; mt < MT; ++mt) {
    v16 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = v16{};
    for (int64_t kb = 0; kb < nb; kb += 2) {
      if (mt == 0)
        for (int64_t l = kb / 2 * per_block; l < std::min(next_lines, (kb / 2 + 1) * per_block); ++l)
          _mm_prefetch(next + 64 * l, _MM_HINT_T0);
      const bool two = kb + 1 < nb;
      _tile_loadd(2, a + kb * 32, K * 2);
      _tile_zero(0);
      _tile_loadd(4, xh + (kb * MT + mt) * 256, 64);
      _tile_dpbf16ps(0, 2, 4);
      if (xl) {
        _tile_loadd(5, xl + (kb * MT + mt) * 256, 64);
        _tile_dpbf16ps(0, 2, 5);
      }
      if (two) {
        _tile_loadd(3, a + (kb + 1) * 32, K * 2);
        _tile_zero(1);
        _tile_loadd(6, xh + ((kb + 1) * MT + mt) * 256, 64);
        _tile_dpbf16ps(1, 3, 6);
        if (xl) {
          _tile_loadd(7, xl + ((kb + 1) * MT + mt) * 256, 64);
          _tile_dpbf16ps(1, 3, 7);
        }
      }
      _tile_stored(0, c0, 64);
      for (int r = 0; r < 16; ++r) acc[r] += dsc[r * nb + kb] * load16(c0 + r * 16);
      if (two) {
        _tile_stored(1, c1, 64);
        for (int r = 0; r < 16; ++r) acc[r] += dsc[r * nb + kb + 1] * load16(c1 + r * 16);
      }
    }
    transpose16(acc);  // acc[r] lane c = y[16 mt + c][n0 + r] -> acc[c] lane r
    const __mmask16 k = __mmask16((1u << n_here) - 1);
    for (int64_t c = 0; c < 16 && 16 * mt + c < M; ++c)
      _mm512_mask_storeu_ps(o + (16 * mt + c) * N + n0, k, bits<__m512>(xl ? acc[c] : acc[c] + acc[c + M]));
  }
}

at::Tensor q8_linear_amx(const at::Tensor& xf, const Q8Rows& w, int64_t N) {
  const int64_t M = xf.size(0), K = w.K, MT = (M + 15) / 16;
  const at::Tensor hi = xf.to(at::kBFloat16);
  const at::Tensor lo = at::sub(xf, hi.to(at::kFloat)).to(at::kBFloat16);
  thread_local std::vector<uint32_t> xth, xtl;
  // Up to 8 rows: both parts in one tile of x (columns 0..M-1 the high parts, M..2M-1 the
  // low ones), one product per block where two half-empty tiles took two; each part's sums
  // are scaled on their own and added at the end (0.74-0.89x the head's time at 5-8 rows).
  const bool stacked = M <= 8;
  if (stacked) {
    const at::Tensor both = at::cat({hi, lo});
    prepare_xt(static_cast<const uint16_t*>(both.data_ptr()), 2 * M, K, 1, xth);
  } else {
    prepare_xt(static_cast<const uint16_t*>(hi.data_ptr()), M, K, MT, xth);
    prepare_xt(static_cast<const uint16_t*>(lo.data_ptr()), M, K, MT, xtl);
  }
  const uint32_t *xh = xth.data(), *xl = stacked ? nullptr : xtl.data();  // thread_local: captured by pointer
  at::Tensor out = at::empty({M, N}, xf.options());
  float* o = out.data_ptr<float>();
  const int64_t strips = (N + 15) / 16;  // chunks of at most an eighth of a thread's share, then shrinking
  const int64_t threads = at::get_num_threads();
  claim_chunks(strips, std::max<int64_t>(1, strips / (8 * threads)), threads, [&](auto&& run) {
    load_full_tiles();
    std::vector<uint16_t> a(16 * K);
    std::vector<float> dsc(K / 32 * 16);
    run([&](int64_t lo, int64_t hi, int64_t) {
      for (int64_t nt = lo; nt < hi; ++nt) amx_q8_strip(w, xh, xl, M, nt * 16, N, a.data(), dsc.data(), o);
    });
    _tile_release();
  });
  return out;
}

// The Q8_0 head for 5-64 rows with AMX under bf16 compute (bf16_products), approximate and
// then rescored as q8_linear_bf16 is: a 16-row strip's weights rounded once to bf16 (q d, the
// block scales inside the tiles) against x rounded to bf16, every block of a row accumulated
// in the tiles (even blocks in one, odd in another), one store per strip and 16 rows of x.
// The exact path (amx_q8_strip) pays per block two products (x's two parts), a store and 16
// FMAs for the block's scales, and waits on each tile's zero-product-store chain: its tile
// part took 66-131 ns a block on the AMX Xeon VM, this one's 30 (a standalone loop of each,
// alternating). Each logit lies within sum_b 128 |d_b| S_b (2^-9 for the weight's rounding,
// 2^-9 for x's, 2^-18 for both, 2^-13 for the fp32 accumulation: < 2^-8 + 2^-12) + 1e-6 of
// x's exact product, and every logit that could be its row's maximum is recomputed from x.
constexpr float Q8_AMX_FOLD_ERR = 128.0f * (1.0f / 256 + 1.0f / 4096);

void amx_q8_folded_strip(const Q8Rows& w, const uint32_t* xt, int64_t M, int64_t n0, int64_t N, uint16_t* a,
                         float* dsc, __m512* ecol, float* o, HeadTop& ht) {
  const int64_t K = w.K, nb = K / 32, MT = (M + 15) / 16, n_here = std::min<int64_t>(16, N - n0);
  float dtile = 0;  // the strip's largest sum_b |d_b|
  for (int r = 0; r < 16; ++r) {
    float* d = dsc + r * nb;
    const bool here = r < n_here;
    if (n0 + 16 + r < N) w.prefetch<2>(n0 + 16 + r);  // the next strip's row, into L2
    w.row_scales(n0 + r, here, d);
    const int8_t* p = w.qw + (n0 + r) * K;
    float dsum = 0;
    for (int64_t kb = 0; kb < nb; ++kb) {
      __m512i row = _mm512_setzero_si512();
      if (here) {
        const __m512 db = _mm512_set1_ps(d[kb]);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kb * 32))));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kb * 32 + 16))));
        row = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, db), _mm512_mul_ps(lo, db));
        dsum += std::fabs(d[kb]);
      }
      _mm512_storeu_si512(a + r * K + kb * 32, row);
    }
    dtile = std::max(dtile, dsum);
  }
  bool ecol_made = false;
  const auto make_ecol = [&] {
    if (ecol_made) return;
    for (int64_t b = 0; b < nb; ++b) {
      alignas(64) float col[16];
      for (int r = 0; r < 16; ++r) col[r] = std::fabs(dsc[r * nb + b]);  // rows past N: 0
      ecol[b] = _mm512_mul_ps(_mm512_load_ps(col), _mm512_set1_ps(Q8_AMX_FOLD_ERR));
    }
    ecol_made = true;
  };
  const __mmask16 valid = __mmask16((1u << n_here) - 1);
  alignas(64) float c0[256], c1[256];
  for (int64_t mt = 0; mt < MT; ++mt) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t kb = 0; kb < nb; kb += 2) {
      _tile_loadd(2, a + kb * 32, K * 2);
      _tile_loadd(4, xt + (kb * MT + mt) * 256, 64);
      _tile_dpbf16ps(0, 2, 4);
      if (kb + 1 < nb) {
        _tile_loadd(3, a + (kb + 1) * 32, K * 2);
        _tile_loadd(5, xt + ((kb + 1) * MT + mt) * 256, 64);
        _tile_dpbf16ps(1, 3, 5);
      }
    }
    _tile_stored(0, c0, 64);
    _tile_stored(1, c1, 64);
    v16 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = load16(c0 + r * 16) + load16(c1 + r * 16);
    transpose16(acc);  // acc[r] lane c = y[16 mt + c][n0 + r] -> acc[c] lane r
    for (int64_t c = 0; c < 16 && 16 * mt + c < M; ++c) {
      const __m512 y = bits<__m512>(acc[c]);
      _mm512_mask_storeu_ps(o + (16 * mt + c) * N + n0, valid, y);
      ht.check(16 * mt + c, nb, n0, y, valid, Q8_AMX_FOLD_ERR, dtile, ecol, make_ecol);
    }
  }
}

at::Tensor q8_linear_amx_folded(const at::Tensor& xf, const Q8Rows& w, int64_t N) {
  const int64_t M = xf.size(0), K = w.K, MT = (M + 15) / 16;
  TORCH_CHECK(K <= Q8_BF16_MAX_K, "the folded head's bound covers K <= ", Q8_BF16_MAX_K);
  const float* x = xf.data_ptr<float>();
  std::vector<float> sb, smax;
  HeadTop::block_sums(x, M, K, sb, smax);
  const at::Tensor xb = xf.to(at::kBFloat16);
  thread_local std::vector<uint32_t> xt;
  prepare_xt(static_cast<const uint16_t*>(xb.data_ptr()), M, K, MT, xt);
  const uint32_t* xp = xt.data();  // thread_local: captured by pointer
  at::Tensor out = at::empty({M, N}, xf.options());
  float* o = out.data_ptr<float>();
  std::vector<HeadTop> tops(at::get_num_threads(), HeadTop{sb.data(), smax.data(), std::vector<float>(M, -INFINITY), {}});
  const int64_t strips = (N + 15) / 16, threads = at::get_num_threads();
  claim_chunks(strips, std::max<int64_t>(1, strips / (8 * threads)), threads, [&](auto&& run) {
    load_full_tiles();
    std::vector<uint16_t> a(16 * K);
    std::vector<float> dsc(16 * (K / 32));
    __m512 ecol[Q8_BF16_MAX_K / 32];
    HeadTop& ht = tops[at::get_thread_num()];
    run([&](int64_t lo, int64_t hi, int64_t) {
      for (int64_t nt = lo; nt < hi; ++nt) amx_q8_folded_strip(w, xp, M, nt * 16, N, a.data(), dsc.data(), ecol, o, ht);
    });
    _tile_release();
  });
  HeadTop::rescore(tops, w, x, M, N, o);
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

// The tied output head of the default model: a quarter of the bytes an fp32 head reads.
// bf16_products (bf16 compute): products over x rounded to bf16 with the logits that could
// be a row's maximum recomputed from x: with AMX above GEMV_MAX_ROWS rows, weights rounded
// to bf16 too (q8_linear_amx_folded); without it from Q8_BF16_MIN_ROWS rows on (0.69x the
// time at 64 rows, AVX512-BF16; q8_linear_bf16). Otherwise x in fp32 (the fp32 GEMV: 1.2-1.3x
// faster than bf16 products at 1-4 rows, where the head is bound by memory) or in two bf16
// parts (AMX, exact weights: fp32 compute).
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, bool bf16_products) {
  TORCH_CHECK(x.dim() == 2, "x: [M, K]");
  const int64_t K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K % 32 == 0 && codes.size(1) == K, "K must be a multiple of 32 matching the weight");
  const Q8Rows w{codes.data_ptr<int8_t>(), static_cast<const c10::Half*>(scales.data_ptr()), K};
  const at::Tensor xf = x.to(at::kFloat).contiguous();
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  if (xf.size(0) > GEMV_MAX_ROWS && amx_ready()) {
    const auto head = bf16_products && K <= Q8_BF16_MAX_K ? q8_linear_amx_folded : q8_linear_amx;
    if (xf.size(0) <= 64) return head(xf, w, N);
    std::vector<at::Tensor> parts;
    for (int64_t m0 = 0; m0 < xf.size(0); m0 += 64)
      parts.push_back(head(xf.narrow(0, m0, std::min<int64_t>(64, xf.size(0) - m0)), w, N));
    return at::cat(parts);
  }
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (bf16_products && xf.size(0) >= Q8_BF16_MIN_ROWS && K <= Q8_BF16_MAX_K) return q8_linear_bf16(xf, w, N);
#else
  (void)bf16_products;
#endif
  return gemv(xf, w, N);
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
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scales, bool bf16_products=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(ferrolm_cpu, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
}
