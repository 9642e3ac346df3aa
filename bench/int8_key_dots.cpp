// The key side of int8 decode attention (head_dim 64, 3 query heads per kv head, tiles of
// 16 keys, in L1), two ways: the compiled kernel's float path (widen each key row to fp32,
// FMAs, a transpose-and-add reduction per tile) against integer dot products (VNNI
// vpdpbusd on the tile transposed in 4-byte groups, keys offset to unsigned, the query
// split into P int8 parts with their own scales: P = 1 is llama.cpp's q8_0 activations,
// more parts come closer to the fp32 query). Prints ns per key and the largest score error
// against the float path. Needs AVX512-VNNI; not part of the package or the tests:
//
//     g++ -O3 -march=native -std=c++17 -Isrc/ferrolm/kernels $(.venv/bin/python -c \
//       "from torch.utils.cpp_extension import include_paths as i; print(*('-I' + p for p in i()))") \
//       bench/int8_key_dots.cpp -o /tmp/int8_key_dots && /tmp/int8_key_dots
#include "simd.h"  // the kernels' v16 and reduce16

#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include <cmath>
#include <algorithm>
constexpr int R = 3, NK = 2048;
alignas(64) int8_t K[NK * 64];
alignas(64) float q[R][64];
alignas(64) float out[R][NK];

__attribute__((noinline)) void floatpath() {
  v16 qv[R][4];
  for (int r = 0; r < R; ++r) for (int c = 0; c < 4; ++c) memcpy(&qv[r][c], q[r] + 16 * c, 64);
  for (int t = 0; t < NK / 16; ++t) {
    v16 pd[R][16];
    for (int j = 0; j < 16; ++j) {
      const int8_t* row = K + (t * 16 + j) * 64;
      v16 kc[4];
      for (int c = 0; c < 4; ++c) kc[c] = (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + 16 * c))));
      for (int r = 0; r < R; ++r) { v16 d = qv[r][0] * kc[0]; for (int c = 1; c < 4; ++c) d += qv[r][c] * kc[c]; pd[r][j] = d; }
    }
    for (int r = 0; r < R; ++r) { v16 s = reduce16(pd[r]); memcpy(out[r] + t * 16, &s, 64); }
  }
}

// 16 rows of 16 dwords -> transposed (row i = dword i of every key)
static inline void transpose16(__m512i* a) {
  __m512i b[16], c[16];
  for (int i = 0; i < 8; ++i) { b[2*i] = _mm512_unpacklo_epi32(a[2*i], a[2*i+1]); b[2*i+1] = _mm512_unpackhi_epi32(a[2*i], a[2*i+1]); }
  for (int i = 0; i < 4; ++i) for (int k = 0; k < 2; ++k) {
    c[4*i+k] = _mm512_unpacklo_epi64(b[4*i+k], b[4*i+2+k]); c[4*i+2+k] = _mm512_unpackhi_epi64(b[4*i+k], b[4*i+2+k]); }
  // now c[4i + m] holds, per 128-bit lane L, dword m of rows 4i..4i+3 (lane L = dwords 4L..4L+3)
  for (int i = 0; i < 2; ++i) for (int m = 0; m < 4; ++m) {
    b[8*i+m] = _mm512_shuffle_i32x4(c[8*i+m], c[8*i+4+m], 0x88); b[8*i+4+m] = _mm512_shuffle_i32x4(c[8*i+m], c[8*i+4+m], 0xDD); }
  for (int m = 0; m < 8; ++m) {
    a[m] = _mm512_shuffle_i32x4(b[m], b[8+m], 0x88); a[8+m] = _mm512_shuffle_i32x4(b[m], b[8+m], 0xDD); }
}

template <int P>
__attribute__((noinline)) void vnnipath(const int32_t (*qd)[P][16], const float (*qs)[P], const int32_t (*corr)[P]) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int t = 0; t < NK / 16; ++t) {
    __m512i a[16];
    for (int j = 0; j < 16; ++j) a[j] = _mm512_xor_si512(_mm512_load_si512(K + (t * 16 + j) * 64), flip);  // k + 128 as u8
    transpose16(a);  // order of dword groups is permuted; dot product is order-free as long as q matches
    for (int r = 0; r < R; ++r) {
      v16 s{};
      for (int p = 0; p < P; ++p) {
        __m512i acc = _mm512_setzero_si512();
        for (int d = 0; d < 16; ++d) acc = _mm512_dpbusd_epi32(acc, a[d], _mm512_set1_epi32(qd[r][p][d]));
        acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(corr[r][p]));
        s += (v16)_mm512_cvtepi32_ps(acc) * qs[r][p];
      }
      memcpy(out[r] + t * 16, &s, 64);
    }
  }
}

// Largest |score - reference| over every head and key.
static double max_err(const std::vector<float>& ref) {
  const float* o = &out[0][0];
  double e = 0;
  for (size_t i = 0; i < ref.size(); ++i) e = std::max(e, (double)std::fabs(o[i] - ref[i]));
  return e;
}

int main() {
  for (int i = 0; i < NK * 64; ++i) K[i] = (int8_t)((i * 7919) % 255 - 127);
  for (int r = 0; r < R; ++r) for (int d = 0; d < 64; ++d) q[r][d] = ((r * 64 + d) * 37 % 100) / 50.0f - 1.0f;
  auto time = [](auto f) { double best = 1e9; for (int k = 0; k < 200; ++k) { auto t0 = std::chrono::steady_clock::now(); f();
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); if (s < best) best = s; } return best; };
  double tf = time(floatpath);
  std::vector<float> ref(&out[0][0], &out[0][0] + R * NK);
  // q split into 3 int8 parts per head (each the rounding of what the earlier parts left)
  static int32_t qd3[R][3][16]; static float qs3[R][3]; static int32_t corr3[R][3];
  // transpose16 leaves the 4-byte groups in a permuted order: row m holds group perm[m] of
  // every key (found by transposing rows whose dword m is m); the query parts follow it.
  int perm[16];
  {
    __m512i a[16];
    alignas(64) int32_t v[16];
    for (int m = 0; m < 16; ++m) v[m] = m;
    for (int j = 0; j < 16; ++j) a[j] = _mm512_load_si512(v);
    transpose16(a);
    for (int m = 0; m < 16; ++m) { _mm512_store_si512(v, a[m]); perm[m] = v[0]; }
  }
  for (int r = 0; r < R; ++r) {
    float res[64]; memcpy(res, q[r], sizeof res);
    for (int p = 0; p < 3; ++p) {
      float amax = 0; for (int d = 0; d < 64; ++d) amax = std::max(amax, std::fabs(res[d]));
      float s = amax > 0 ? amax / 127 : 1; qs3[r][p] = s; int8_t qi[64]; int sum = 0;
      for (int d = 0; d < 64; ++d) { int v = (int)std::nearbyint(res[d] / s); v = std::max(-127, std::min(127, v)); qi[d] = (int8_t)v; res[d] -= v * s; sum += v; }
      corr3[r][p] = 128 * sum;
      for (int m = 0; m < 16; ++m) memcpy(&qd3[r][p][m], qi + 4 * perm[m], 4);
    }
  }
  static int32_t qd1[R][1][16]; static float qs1[R][1]; static int32_t c1[R][1];
  static int32_t qd2[R][2][16]; static float qs2[R][2]; static int32_t c2[R][2];
  for (int r = 0; r < R; ++r) { for (int p = 0; p < 2; ++p) { memcpy(qd2[r][p], qd3[r][p], 64); qs2[r][p] = qs3[r][p]; c2[r][p] = corr3[r][p]; }
    memcpy(qd1[r][0], qd3[r][0], 64); qs1[r][0] = qs3[r][0]; c1[r][0] = corr3[r][0]; }
  double t1 = time([&] { vnnipath<1>(qd1, qs1, c1); });
  const double e1 = max_err(ref);
  double t2 = time([&] { vnnipath<2>(qd2, qs2, c2); });
  const double e2 = max_err(ref);
  double t3 = time([&] { vnnipath<3>(qd3, qs3, corr3); });
  const double e3 = max_err(ref);
  double mag = 0; for (float v : ref) mag = std::max(mag, (double)std::fabs(v));
  printf("ns per key (3 heads): float %.2f  vnni P=1 %.2f (err %.2e)  P=2 %.2f (err %.2e)  P=3 %.2f (err %.2e)  |score| max %.1f\n",
         tf / NK * 1e9, t1 / NK * 1e9, e1, t2 / NK * 1e9, e2, t3 / NK * 1e9, e3, mag);
}
