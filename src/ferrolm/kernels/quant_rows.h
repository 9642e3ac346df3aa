// GGUF weights as shipped (see models/quant_linear.py): the rows of Q4_0 / Q4_1 and Q8_0
// weights, their fp32 GEMV, and what the AMX paths of q4_linear.cpp and q8_head.cpp share.
#pragma once

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

constexpr int PASS = 8;  // rows of x per pass over a tile (16 spilled registers: 1.05-1.33x the time)

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
// Whether this process may use AMX's tile data (asked once of the kernel).
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
#endif

}  // namespace
