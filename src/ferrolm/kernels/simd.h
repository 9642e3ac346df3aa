// Vector helpers shared by ferrolm's compiled CPU kernels (one header, included by each
// translation unit; everything is inline in an anonymous namespace). Built with
// -march=native: the intrinsics paths are AVX-512 or AVX2, the generic vector code
// whatever the machine has.
#pragma once

#include <c10/util/BFloat16.h>  // the scalar types only: the decode path's files parse no ATen
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int TILE = 16;  // one 16-float vector: keys per attention tile, rows per reduction

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef _Float16 h16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));


// Same-size reinterpretation between vector-extension and intrinsic types.
template <class To, class From>
inline To bits(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float x) { return v16{} + x; }

inline float hsum(v16 v) {
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline v8 vmax8(v8 a, v8 b) { return a > b ? a : b; }
// 32 consecutive values (a: 0..15, b: 16..31) <-> pair order (a: the even ones, b: the odd
// ones), the order in which 4-bit and fp8 decode rows come out of their conversions.
inline void to_pairs(v16& a, v16& b) {
  const v16 x = a, y = b;
  a = __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  b = __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
inline void from_pairs(v16& ev, v16& od) {
  const v16 x = ev, y = od;
  ev = __builtin_shufflevector(x, y, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  od = __builtin_shufflevector(x, y, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
}
// The lane-wise maximum of m and |x[c]| over a row of NC vectors.
template <int NC>
inline v16 abs_max(const v16* x, v16 m = v16{}) {
  for (int c = 0; c < NC; ++c) {
    const v16 a = x[c] < 0.0f ? -x[c] : x[c];
    m = m > a ? m : a;
  }
  return m;
}
// Every lane < x (false where a lane is NaN).
inline bool all_less(v16 v, float x) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(bits<__m512>(v), _mm512_set1_ps(x), _CMP_LT_OQ) == 0xFFFF;
#else
  for (int i = 0; i < 16; ++i)
    if (!(v[i] < x)) return false;
  return true;
#endif
}
inline float hmax(v16 v) {
  v8 a = vmax8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  a = vmax8(a, __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3));
  a = vmax8(a, __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5));
  return std::max(a[0], a[1]);
}

// Sixteen vectors of partial sums -> one vector of their sums (lane j = sum of a[j]):
// a transpose-and-add tree of 30 two-source shuffles and 15 adds.
inline v16 reduce16(const v16* a) {
  v16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Scores of one query row against a tile of 16 keys (rows of kb, zero past the tile's end).
template <int NC>
inline v16 tile_scores(const float* qr, const float* kb) {
  v16 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = load16(qr + 16 * c);
  v16 a[TILE];
  for (int j = 0; j < TILE; ++j) {
    a[j] = qv[0] * load16(kb + j * NC * 16);
    for (int c = 1; c < NC; ++c) a[j] += qv[c] * load16(kb + j * NC * 16 + 16 * c);
  }
  return reduce16(a);
}

// acc[r] = acc[r] * corr[r] + sum_j p[r][j] V[j] for R rows at once (R x NC independent chains).
template <int NC, int R>
inline void tile_pv(float* acc, const float* p, const float* corr, const float* vb, int n) {
  v16 a[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) a[r][c] = load16(acc + (r * NC + c) * 16) * corr[r];
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < R; ++r) {
      const float pj = p[r * TILE + j];
      for (int c = 0; c < NC; ++c) a[r][c] += pj * load16(vb + (j * NC + c) * 16);
    }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) store16(acc + (r * NC + c) * 16, a[r][c]);
}

template <int NC>
void tile_pv_rows(float* acc, const float* p, const float* corr, const float* vb, int n, int rows) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) tile_pv<NC, 4>(acc + r * NC * 16, p + r * TILE, corr + r, vb, n);
  switch (rows - r) {
    case 3: tile_pv<NC, 3>(acc + r * NC * 16, p + r * TILE, corr + r, vb, n); break;
    case 2: tile_pv<NC, 2>(acc + r * NC * 16, p + r * TILE, corr + r, vb, n); break;
    case 1: tile_pv<NC, 1>(acc + r * NC * 16, p + r * TILE, corr + r, vb, n); break;
    default: break;
  }
}

// A 16x16 matrix of floats, one row per vector, transposed in place: four rounds that
// swap the off-diagonal blocks of side 8, 4, 2, 1 (16 two-source shuffles each).
inline void transpose_round(v16* a, int h, i32x16 lo, i32x16 hi) {
  for (int i = 0; i < 16; ++i)
    if (!(i & h)) {
      const v16 x = a[i], y = a[i + h];
      a[i] = __builtin_shuffle(x, y, lo);
      a[i + h] = __builtin_shuffle(x, y, hi);
    }
}
inline void transpose16(v16* a) {
  transpose_round(a, 8, i32x16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                  i32x16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  transpose_round(a, 4, i32x16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                  i32x16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  transpose_round(a, 2, i32x16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                  i32x16{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  transpose_round(a, 1, i32x16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                  i32x16{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}

// exp on 16 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial
// (relative error ~2e-7); below FLT_MIN (x <= -87.34) 0, x clamped at 88. With AVX-512 the
// rounding of n is one roundscale and 2^n one scalef (14 ops where the generic form takes
// ~22; the softmax's exps were ~10% of an int4 decode call: 0.976x its time in-process).
inline v16 vexp(v16 x) {
#if defined(__AVX512F__)
  const __m512 xv = bits<__m512>(x);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(xv, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  for (const float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __mmask16 normal = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.33654475f), _CMP_GT_OQ);
  return bits<v16>(_mm512_maskz_scalef_ps(normal, p, n));
#else
  const v16 lo = splat(-88.0f), hi = splat(88.0f);
  v16 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  v16 n = xc * 1.44269504088896341f;
  n = __builtin_convertvector(__builtin_convertvector(n + (v16)(n >= 0 ? splat(0.5f) : splat(-0.5f)), i32x16), v16);
  v16 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23;
  v16 out = p * (v16)e;
  return x <= lo ? v16{} : out;
#endif
}

// 16 fp16 bit patterns -> fp32 with the hardware conversion (gcc's generic vector
// conversion from _Float16 comes out as scalar code).
inline v16 f16_bits_to_f32(i16x16 h) {
#if defined(__AVX512F__)
  return bits<v16>(_mm512_cvtph_ps(bits<__m256i>(h)));
#elif defined(__F16C__)
  const __m256 a = _mm256_cvtph_ps(bits<__m128i>(__builtin_shufflevector(h, h, 0, 1, 2, 3, 4, 5, 6, 7)));
  const __m256 b = _mm256_cvtph_ps(bits<__m128i>(__builtin_shufflevector(h, h, 8, 9, 10, 11, 12, 13, 14, 15)));
  return __builtin_shufflevector(bits<v8>(a), bits<v8>(b), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return __builtin_convertvector(bits<h16>(h), v16);
#endif
}
inline v16 from_f16(const void* p) {
  i16x16 h;
  std::memcpy(&h, p, sizeof h);
  return f16_bits_to_f32(h);
}
inline v16 from_bf16(const void* p) {
#if defined(__AVX512F__)
  return bits<v16>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))), 16));
#else
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return (v16)(__builtin_convertvector(h, u32x16) << 16);
#endif
}
// 16 fp32 -> bf16 bit patterns, rounded to nearest even (finite inputs), as torch rounds.
inline u16x16 to_bf16(v16 v) {
#if defined(__AVX512BF16__)
  return bits<u16x16>(_mm512_cvtneps_pbh(bits<__m512>(v)));
#else
  const u32x16 u = bits<u32x16>(v);
  return __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, u16x16);
#endif
}
inline v16 load_f32(const float* p) { return load16(p); }
inline v16 load_f32(const c10::BFloat16* p) { return from_bf16(p); }
inline void store_f32(float* p, v16 v) { store16(p, v); }
inline void store_f32(c10::BFloat16* p, v16 v) {
  const u16x16 b = to_bf16(v);
  std::memcpy(p, &b, sizeof b);
}
// v rounded to S's precision and back (the rounding torch applies between two ops in S).
inline v16 round_to(float*, v16 v) { return v; }
inline v16 round_to(c10::BFloat16*, v16 v) { return (v16)(__builtin_convertvector(to_bf16(v), u32x16) << 16); }
inline v16 i32_to_v16(i32x16 x) {
#if defined(__AVX512F__)
  return bits<v16>(_mm512_cvtepi32_ps(bits<__m512i>(x)));
#else
  return __builtin_convertvector(x, v16);
#endif
}
inline v16 from_i8(const void* p) {
#if defined(__AVX512F__)
  return bits<v16>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const v8 a = bits<v8>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
  const v8 c = bits<v8>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
  return __builtin_shufflevector(a, c, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  i8x16 q;
  std::memcpy(&q, p, sizeof q);
  return __builtin_convertvector(q, v16);
#endif
}
inline float half_to_float(c10::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);
#else
  return (float)h;
#endif
}
// E4M3 s.eeee.mmm placed as fp16 s.0eeee.mmm0000000 is the value / 256, subnormals too.
inline v16 from_e4m3(const void* p) {
#if defined(__AVX2__)  // gcc's generic byte widening comes out as unpack sequences
  i16x16 x = bits<i16x16>(_mm256_cvtepi8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(p)))) << 7;
#else
  i8x16 q;
  std::memcpy(&q, p, sizeof q);
  i16x16 x = __builtin_convertvector(q, i16x16) << 7;
#endif
  x &= (int16_t)-0x4001;
  return f16_bits_to_f32(x);
}
// 32 E4M3 bytes -> two vectors (one widening, shift and mask for both halves).
inline void from_e4m3_x2(const void* p, v16& lo, v16& hi) {
#if defined(__AVX512BW__)
  __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  x = _mm512_and_si512(_mm512_slli_epi16(x, 7), _mm512_set1_epi16(-0x4001));
  lo = bits<v16>(_mm512_cvtph_ps(_mm512_castsi512_si256(x)));
  hi = bits<v16>(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(x, 1)));
#else
  lo = from_e4m3(p);
  hi = from_e4m3(static_cast<const char*>(p) + 16);
#endif
}
// E5M2 is the high byte of fp16.
inline v16 from_e5m2(const void* p) {
#if defined(__AVX2__)
  u16x16 x = bits<u16x16>(_mm256_cvtepu8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(p)))) << 8;
#else
  u8x16 q;
  std::memcpy(&q, p, sizeof q);
  u16x16 x = __builtin_convertvector(q, u16x16) << 8;
#endif
  return f16_bits_to_f32((i16x16)x);
}
// Eight bytes of two nibbles each -> 16 table indices (low nibble first).
inline i32x16 nibbles(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m512i w = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));  // each byte twice
  const __m512i sh = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  return bits<i32x16>(_mm512_and_si512(_mm512_srlv_epi32(w, sh), _mm512_set1_epi32(15)));
#else
  u8x16 b;
  std::memcpy(&b, p, 8);
  u8x16 d = __builtin_shufflevector(b, b, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const u8x16 sh = {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};
  return __builtin_convertvector((u8x16)((d >> sh) & 15), i32x16);
#endif
}
// A 16-entry table looked up at 16 indices, each taken modulo 16: its low 4 bits (vpermps
// on AVX-512; __builtin_shuffle reduces its mask modulo the length too).
inline v16 lookup16(v16 table, i32x16 idx) {
#if defined(__AVX512F__)
  return bits<v16>(_mm512_permutexvar_ps(bits<__m512i>(idx), bits<__m512>(table)));
#else
  return __builtin_shuffle(table, idx);
#endif
}


}  // namespace
