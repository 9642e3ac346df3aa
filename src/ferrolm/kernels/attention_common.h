// The compiled CPU attention's shared part (one header, included by cpu_attention.cpp and
// the attention_decode_*.cpp files): the KV formats as the kernels see them (Half), the work
// items, the row loads of every format, the prefetches and the fixed-point query helpers.
// Named namespace: the decode path's instantiations live in their own translation units,
// so that the build compiles them in parallel (one file held all 84 and took 50 s with
// -march=native, 4 minutes with -march=haswell, on one core of a 2-core machine).
#pragma once

#include "simd.h"

namespace ferrolm_attention {


enum Fmt : int64_t { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, E4M3 = 4, E5M2 = 5, LUT4 = 6, PC4 = 7 };
// Flag on a format code (attention/cpu_backend.py): queries dotted with these keys are rounded
// to 15-bit fixed point first (kv/fixed_point.py), so integer codes can be dotted in integers.
constexpr int64_t FIXED_QUERY = 16;
constexpr float MIN_SCALE = 1.0f / 16384.0f;
constexpr float FP16_MAX = 65504.0f;

// One half (K or V) of one layer, as the kernels see it.
struct Half {
  const uint8_t* data;
  const c10::Half* scale;  // per token: [H, S, groups]; per channel: [H, blocks, 2, D]
  const c10::Half* stage;  // per channel: [H, rows, bs, D]
  const int64_t* row_of;   // per channel: staging row of each block
  int64_t fmt, groups, elem, slots, blocks, rows;
  v16 lut;                 // LUT4: value of each nibble before the group scale
  int gsize;               // LUT4: values per group scale
  float factor;            // folded into per-token scales (256 for E4M3)
  bool fixed_query;        // keys: queries rounded to fixed point first (FIXED_QUERY)

  bool per_token_scale() const { return fmt == I8 || fmt == E4M3 || fmt == E5M2; }
};

// Calls f(std::integral_constant<int, NC>) for NC = head_dim / 16 in {1, 2, 4, 8, 16}: the
// compile-time vector count of the register-blocked code.
// with_nc's head dims: 16, 32, 64, 128, 256 (rows of other lengths take the scalar code).
inline bool register_dim(int64_t D) { return D % 16 == 0 && D <= 256 && !(D & (D - 1)); }
template <class F>
inline decltype(auto) with_nc(int D, F&& f) {
  switch (D) {
    case 16: return f(std::integral_constant<int, 1>{});
    case 32: return f(std::integral_constant<int, 2>{});
    case 64: return f(std::integral_constant<int, 4>{});
    case 128: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 16>{});
  }
}


// --- Hadamard rotation (formats stored rotated) ---
// x @ H (orthonormal Sylvester Hadamard) in place: the butterflies of hadamard.fwht in the
// same order, then one multiply, so both backends produce identical values. The stages over
// n elements of x (floats, or whole vectors of 16 once the stages inside them are done).
template <class T>
inline void butterflies(T* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const T a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

inline void fwht_scalar(float* x, int64_t n) {
  butterflies(x, n);
  const float s = (float)(1.0 / std::sqrt((double)n));
  for (int64_t j = 0; j < n; ++j) x[j] *= s;
}

// One butterfly stage of distance H < 16 inside a vector: lane i pairs with lane i ^ H; the
// lower lane gets a + b, the upper a - b, the very operations of the scalar stage.
template <int H>
inline v16 butterfly_in_vector(v16 x) {
  v16 partner;
  if constexpr (H == 1) partner = __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  if constexpr (H == 2) partner = __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  if constexpr (H == 4) partner = __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  if constexpr (H == 8) partner = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  i32x16 upper;
  for (int i = 0; i < 16; ++i) upper[i] = (i & H) ? -1 : 0;
  return upper ? partner - x : x + partner;
}

// The rotation of one row held in NC registers (16 NC values).
template <int NC>
inline void fwht_regs(v16* v) {
  for (int c = 0; c < NC; ++c) {
    v16 t = butterfly_in_vector<1>(v[c]);
    t = butterfly_in_vector<2>(t);
    t = butterfly_in_vector<4>(t);
    v[c] = butterfly_in_vector<8>(t);
  }
  butterflies(v, NC);
  const float s = (float)(1.0 / std::sqrt((double)(16 * NC)));
  for (int c = 0; c < NC; ++c) v[c] *= s;
}

inline void fwht(float* x, int64_t n) {
  if (!register_dim(n)) return fwht_scalar(x, n);
  with_nc((int)n, [&](auto NC) {
    v16 v[NC()];
    for (int c = 0; c < NC(); ++c) v[c] = load16(x + 16 * c);
    fwht_regs<NC()>(v);
    for (int c = 0; c < NC(); ++c) store16(x + 16 * c, v[c]);
  });
}

// Ask for a tile's bytes ahead of use (the general path, several queries per tile):
// consecutive tiles sit in scattered blocks, which the hardware prefetcher cannot guess.
// The requests go PREFETCH_TILES ahead, into L2, where more misses can be outstanding.
constexpr int64_t PREFETCH_TILES = 4;
template <_mm_hint HINT = _MM_HINT_T0>
inline void prefetch_bytes(const char* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, HINT);
}
// The decode path asks for each key's rows PF_KEYS keys (whole blocks) ahead: its K row as
// the scores use this key's K row, its V row as the values use this key's V row, a line or
// two per key spread over both loops. Its loops do ~16+ vector ops per 64-byte line, and at
// that density this VM's hardware prefetcher falls behind (bench/stream_prefetch.cpp, 16
// FMAs per line: 8.1 ns per line alone, 3.5 with such prefetches, 3.3 in L2); a tile's lines
// asked for at once, 4 or 16 tiles ahead (prefetch_tile), changed nothing. int8 at 16 x 2,048
// from memory: 1,090 -> 800 us. Asking for both rows in the values loop alone left the
// scores loop with no misses in flight and the values loop blocked on full fill buffers
// (perf: a quarter of the kernel's samples on its prefetches): spread over both loops, fp8
// at 16 x 2,048 0.89x the time, fp16 0.97x, int8 0.98x (in-process A/B, alternating calls).
constexpr int64_t PF_KEYS = 128;
inline void prefetch_row(const char* base, int64_t row, int64_t bytes) { prefetch_bytes(base + row * bytes, bytes); }
// Bytes of a D-dim row of format F where F is known at compile time (0: known at run time).
// The decode path's rows of its own format pairs: with a constant byte count a row's one or
// two prefetches are unrolled instead of a loop per key, and its addresses are shifts (fp8
// at 16 x 2,048 0.970x the kernel's time, int4 0.993x, fp16 0.995x from memory; 0.96-0.98x
// cache-resident).
constexpr int64_t row_bytes(int F, int D) {
  return F == F32                              ? 4 * D
         : F == F16 || F == BF16               ? 2 * D
         : F == I8 || F == E4M3 || F == E5M2 ? D
         : F == LUT4                           ? D / 2
                                               : 0;
}
inline void prefetch_tile(const Half& h, int64_t head, int64_t slot, int n, int D) {
  const int64_t dd = h.fmt == LUT4 || h.fmt == PC4 ? D / 2 : D;
  const char* p = reinterpret_cast<const char*>(h.data + (head * h.slots + slot) * dd * h.elem);
  prefetch_bytes<_MM_HINT_T1>(p, n * dd * h.elem);
  if (h.scale && h.fmt != PC4) _mm_prefetch(reinterpret_cast<const char*>(h.scale + (head * h.slots + slot) * h.groups), _MM_HINT_T1);
}


struct Item {
  int32_t seq, head, q0, nq, split;
  int64_t window;  // > 0: a query at p sees keys p - window + 1 .. p (sliding window)
  // The item its thread runs next (none: not known): the decode path's last blocks ask for
  // that item's first rows, as its earlier blocks ask for their own later ones.
  const Item* next = nullptr;
};

// The tiles an item walks: from the tile holding the first key its first query (at
// first_pos) sees, so a sliding window skips every tile before it, to the last of `keys`;
// this split's share of those. first_key: that first key (0 without a window).
struct TileRange {
  int64_t begin, end, first_key;
};
inline TileRange tile_range(const Item& it, int nsplit, int64_t first_pos, int64_t keys, int bs) {
  const int64_t tiles_per_block = (bs + TILE - 1) / TILE;
  const int64_t ntiles = (keys + bs - 1) / bs * tiles_per_block;
  const int64_t first_key = it.window > 0 ? std::max<int64_t>(0, first_pos - it.window + 1) : 0;
  const int64_t t_first = first_key / bs * tiles_per_block + first_key % bs / TILE;
  const int64_t per = (ntiles - t_first + nsplit - 1) / nsplit;
  const int64_t begin = t_first + it.split * per;
  return {begin, std::min(ntiles, begin + per), first_key};
}

struct Partial {  // a split's running softmax state, merged afterwards
  float* m;
  float* l;
  float* acc;
};

// --- The decode path: one query (G <= 4 heads of one kv head), every value in registers ---
// Each key row is converted straight into NC registers and used at once by the G query
// heads (scores) and, for values, by the G accumulators: no fp32 copy of the tile, no
// reloads. LUT4 rows use "nibble order": a span of 32 values (16 bytes) becomes one vector
// of its even elements (low nibbles) and one of its odd ones (high nibbles), so a nibble
// needs one mask or shift; the queries are permuted alike for keys (q . k is a sum over
// dimensions: the order does not matter) and the value accumulators are put back in order.
inline i32x16 bytes_to_i32(const uint8_t* p) {
#if defined(__AVX512F__)
  return bits<i32x16>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
  u8x16 b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, i32x16);
}

// A 4-bit row's table values in nibble order, before any scale (scales folded elsewhere).
template <int NC>
__attribute__((always_inline)) inline void lut_codes(const Half& h, const uint8_t* row, v16* x) {
  for (int s = 0; s < NC / 2; ++s) {
    const i32x16 idx = bytes_to_i32(row + 16 * s);
    x[2 * s] = lookup16(h.lut, idx);  // the low nibble: lookup16 reads an index's low 4 bits
    x[2 * s + 1] = lookup16(h.lut, idx >> 4);
  }
}

// fp8 E4M3 rows for the decode path by bit placement alone: a byte's sign goes to bit 15 and
// its 7 magnitude bits to bits 10..4 of a bf16 word, whose exponent field is then the E4M3
// exponent e: a normal value becomes 2^(e - 127) (1 + m/8), the E4M3 value times 2^-120
// exactly, and a subnormal one the fp32 denormal m 2^-129, exact too; fp32 is then a shift
// (even words) or a mask (odd words), so a row comes out in pair order (the even elements of
// each 32, then the odd ones: the order of 4-bit rows). 5 vector ops per 32 values where the
// fp16 route (load_fmt) takes 8 with two conversions. Callers scale by 2^120: the queries
// (max |q| < 256, so they stay finite) or the probabilities (value scales < 256). A
// denormal input costs an FMA ~25 cycles here; ~0.4% of the default model's fp8 K and V
// rows hold one (SOTU prompts), i.e. ~0.3 cycles per key.
#if defined(__AVX512BW__)
constexpr bool E4M3_PAIRS = true;
inline void e4m3_pairs(const uint8_t* p, v16& ev, v16& od) {
  const __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i w = _mm512_and_si512(_mm512_slli_epi16(x, 4), _mm512_set1_epi16((short)0x87F0));
  ev = bits<v16>(_mm512_slli_epi32(w, 16));
  od = bits<v16>(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)));
}
#else
constexpr bool E4M3_PAIRS = false;
inline void e4m3_pairs(const uint8_t* p, v16& ev, v16& od) {
  for (int i = 0; i < 32; ++i) {
    const uint32_t b = ((uint32_t)(p[i] & 0x80) << 24) | ((uint32_t)(p[i] & 0x7F) << 20);
    float f;
    std::memcpy(&f, &b, sizeof f);
    (i % 2 ? od : ev)[i / 2] = f;
  }
}
#endif
constexpr float TWO_POW_120 = 0x1p120f;

template <int NC>
__attribute__((always_inline)) inline void e4m3_row_pairs(const uint8_t* row, v16* x) {
  for (int s = 0; s < NC / 2; ++s) e4m3_pairs(row + 32 * s, x[2 * s], x[2 * s + 1]);
}
// The same row as load_fmt converts it (times 2^-8), in pair order: values of a chunk whose
// scales are too large for 2^120 (not seen with fp16-range inputs).
template <int NC>
inline void e4m3_row_pairs_256(const uint8_t* row, v16* x) {
  for (int s = 0; s < NC / 2; ++s) {
    from_e4m3_x2(row + 32 * s, x[2 * s], x[2 * s + 1]);
    to_pairs(x[2 * s], x[2 * s + 1]);
  }
}

// One row (D = 16 NC values) of a half in format F -> registers; LUT4 group-scaled (nibble
// order), other formats unscaled (their per-token scale is folded in by the caller).
template <int NC, int F>
__attribute__((always_inline)) inline void load_fmt(const Half& h, const uint8_t* row, const c10::Half* gscale,
                                                    v16* x) {
  if constexpr (F == F32) {
    for (int c = 0; c < NC; ++c) x[c] = load16(reinterpret_cast<const float*>(row) + 16 * c);
  } else if constexpr (F == F16) {
    for (int c = 0; c < NC; ++c) x[c] = from_f16(row + 32 * c);
  } else if constexpr (F == BF16) {
    for (int c = 0; c < NC; ++c) x[c] = from_bf16(row + 32 * c);
  } else if constexpr (F == I8) {
    for (int c = 0; c < NC; ++c) x[c] = from_i8(row + 16 * c);
  } else if constexpr (F == E4M3) {
    if constexpr (NC % 2 == 0)
      for (int c = 0; c < NC; c += 2) from_e4m3_x2(row + 16 * c, x[c], x[c + 1]);
    else
      for (int c = 0; c < NC; ++c) x[c] = from_e4m3(row + 16 * c);
  } else if constexpr (F == E5M2) {
    for (int c = 0; c < NC; ++c) x[c] = from_e5m2(row + 16 * c);
  } else {  // LUT4, NC even
    static_assert(F == LUT4, "no per-row load for this format");
    const int gs = h.gsize;  // 16, 32, 64 ...
    lut_codes<NC>(h, row, x);
    for (int s = 0; s < NC / 2; ++s) {
      v16 sc;
      if (gs >= 32) {
        sc = splat(half_to_float(gscale[gs == 32 ? s : 32 * s / gs]));
      } else {  // groups of 16: evens/odds 0-7 in group 2s, 8-15 in group 2s + 1
        const float a = half_to_float(gscale[2 * s]), b = half_to_float(gscale[2 * s + 1]);
        const v16 lane_hi = v16{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
        sc = splat(a) + (b - a) * lane_hi;
      }
      x[2 * s] *= sc;
      x[2 * s + 1] *= sc;
    }
  }
}

// The same with the format chosen at run time (pairs of formats without their own code).
template <int NC>
void load_row(const Half& h, const uint8_t* row, const c10::Half* gscale, v16* x) {
  switch (h.fmt) {
    case F32: return load_fmt<NC, F32>(h, row, gscale, x);
    case F16: return load_fmt<NC, F16>(h, row, gscale, x);
    case BF16: return load_fmt<NC, BF16>(h, row, gscale, x);
    case I8: return load_fmt<NC, I8>(h, row, gscale, x);
    case E4M3: return load_fmt<NC, E4M3>(h, row, gscale, x);
    case E5M2: return load_fmt<NC, E5M2>(h, row, gscale, x);
    default: return load_fmt<NC, LUT4>(h, row, gscale, x);
  }
}

constexpr int ANY = -1;  // a format known only at run time
template <int NC, int F>
__attribute__((always_inline)) inline void load_as(const Half& h, const uint8_t* row, const c10::Half* gscale,
                                                   v16* x) {
  if constexpr (F == ANY)
    load_row<NC>(h, row, gscale, x);
  else
    load_fmt<NC, F>(h, row, gscale, x);
}

// n <= 16 per-token scales of consecutive slots (times the format's factor); 1 for others.
inline v16 token_scales(const Half& h, int64_t head, int64_t slot, int n) {
  if (!h.per_token_scale()) return splat(1.0f);
  const c10::Half* s = h.scale + head * h.slots + slot;
  if (n == TILE) return from_f16(s) * h.factor;
  v16 out{};
  for (int j = 0; j < n; ++j) out[j] = half_to_float(s[j]) * h.factor;
  return out;
}

// The group scales of n <= 16 consecutive keys (`groups` fp16 per key, keys contiguous from
// gs) as one vector per group, lanes past n zero. A whole tile of one group is one load and a
// conversion; of 2 or 4 groups, one word permute per pair of groups (key j's scale of group g
// at groups j + g: group 2p to the low half, 2p + 1 to the high one) and two conversions, where
// 16 scalar conversions per group took far longer and a permute per group with its index
// arithmetic ~18 ops for two groups (int4 at head dim 64, keys and values alike, per tile:
// 16 x 2048 0.961-0.970x the kernel's time, in-process A/B, alternating, bit-equal outputs).
inline void group_scales(const c10::Half* gs, int n, int groups, v16* out) {
#if defined(__AVX512BW__)
  if (n == TILE && groups == 1) {
    out[0] = bits<v16>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gs))));
    return;
  }
  if (n == TILE && (groups == 2 || groups == 4)) {
    // lane l: key l % 16's scale of group l / 16 (of the first pair)
    const __m512i two = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24, 22,
                                         20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i four = _mm512_set_epi16(61, 57, 53, 49, 45, 41, 37, 33, 29, 25, 21, 17, 13, 9, 5, 1, 60, 56, 52, 48,
                                          44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i a = _mm512_loadu_si512(gs);
    for (int g = 0; g < groups; g += 2) {
      // two groups: one source (a one-uop permute; the two-source form is three)
      const __m512i h = groups == 2 ? _mm512_permutexvar_epi16(two, a)
                                    : _mm512_permutex2var_epi16(a, _mm512_add_epi16(four, _mm512_set1_epi16((short)g)),
                                                                _mm512_loadu_si512(gs + 32));
      out[g] = bits<v16>(_mm512_cvtph_ps(_mm512_castsi512_si256(h)));
      out[g + 1] = bits<v16>(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)));
    }
    return;
  }
#endif
  for (int g = 0; g < groups; ++g) {
    out[g] = v16{};
    for (int j = 0; j < n; ++j) out[g][j] = half_to_float(gs[j * groups + g]);
  }
}

// --- Integer keys (int8, int4): the query in 15-bit fixed point (kv/fixed_point.py), dotted in integers ---
// e of a row: the smallest integer >= -126 with max|q| <= 16256 * 2^e, from amax's bits
// (16256 = 1.984375 * 2^13: mantissa field 0x7E0000), as torch.frexp gives it.
inline int query_exponent(float amax) {
  uint32_t b;
  std::memcpy(&b, &amax, sizeof b);
  const int E = (int)(b >> 23);
  return std::max(-126, E - 140 + ((b & 0x7FFFFFu) > 0x7E0000u ? 1 : 0));
}
inline float pow2(int e) {  // 2^e for -126 <= e <= 127
  const uint32_t b = (uint32_t)(e + 127) << 23;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// The fixed-point exponent e of a query row held in NC registers (query_exponent of its max |q|).
template <int NC>
inline int row_exponent(const v16* x) {
  return query_exponent(hmax(abs_max<NC>(x)));
}

// One query row in NC registers -> round(q / 2^e) * 2^e (kv/fixed_point.py), 16 lanes at a
// time (the scalar loop took ~10 us of a 16-sequence decode call).
template <int NC>
inline void round_fixed(v16* x) {
  const int e = row_exponent<NC>(x);
  const float down = pow2(-e), up = pow2(e);
  for (int c = 0; c < NC; ++c) {
#if defined(__AVX512F__)
    x[c] = bits<v16>(_mm512_roundscale_ps(bits<__m512>(x[c] * down), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) * up;
#else
    for (int i = 0; i < 16; ++i) x[c][i] = std::nearbyint(x[c][i] * down) * up;
#endif
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool INT8_DOTS = true;
#else
constexpr bool INT8_DOTS = false;
#endif

// One query head's rounded q (q' 2^e, |q'| <= 16256) for vpdpbusd: q' = 128 hi + lo with hi
// int8 and lo in [-64, 64], four dims per dword (dword m: dims 4m..4m+3). Keys enter as
// unsigned k + 128, so each dot carries 128 sum(part); `bias` removes both at once.
template <int NC>
struct FixedQuery {
  int32_t hi[4 * NC], lo[4 * NC];
  int32_t bias;
  float step;  // 2^e
};

// A rounded query row (16 NC values) -> q' = 128 hi + lo per dim; returns 2^e. `sums`
// (optional): each 16 dims' sum of q'. The scalar loop took ~0.1 us per head (~15 us of a
// 16-sequence decode call over int8 or int4 keys); AVX-512 does the same roundings 16 lanes
// at a time (cvtps2dq rounds to nearest even, as nearbyint in the default rounding mode).
template <int NC>
float split_query(const v16* q, int8_t* hi, int8_t* lo, int32_t* sums = nullptr) {
  const int e = row_exponent<NC>(q);
  const float down = pow2(-e);
#if defined(__AVX512F__)
  for (int c = 0; c < NC; ++c) {
    const __m512i qi = _mm512_cvtps_epi32(bits<__m512>(q[c] * down));  // exact: q is rounded already
    const __m512i h = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(qi), _mm512_set1_ps(1.0f / 128.0f)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16 * c), _mm512_cvtepi32_epi8(h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + 16 * c),
                     _mm512_cvtepi32_epi8(_mm512_sub_epi32(qi, _mm512_slli_epi32(h, 7))));
    if (sums) sums[c] = _mm512_reduce_add_epi32(qi);
  }
#else
  for (int c = 0; c < NC; ++c) {
    int32_t sum = 0;
    for (int i = 0; i < 16; ++i) {
      const int32_t qi = (int32_t)std::nearbyint(q[c][i] * down);  // exact: q is rounded already
      const int32_t h = (int32_t)std::nearbyint((float)qi * (1.0f / 128.0f));
      hi[16 * c + i] = (int8_t)h;
      lo[16 * c + i] = (int8_t)(qi - 128 * h);
      sum += qi;
    }
    if (sums) sums[c] = sum;
  }
#endif
  return pow2(e);
}

template <int NC>
FixedQuery<NC> fixed_query(const v16* q) {
  FixedQuery<NC> f;
  int8_t hi[16 * NC], lo[16 * NC];
  int32_t sums[NC];
  f.step = split_query<NC>(q, hi, lo, sums);
  int32_t sum = 0;
  for (int c = 0; c < NC; ++c) sum += sums[c];
  std::memcpy(f.hi, hi, sizeof hi);
  std::memcpy(f.lo, lo, sizeof lo);
  f.bias = 128 * sum;
  return f;
}

// One query head's rounded q for int4 keys (codes q + 8, element 2i in the low nibble of
// byte i): packed dword m of a key row holds dims 8m..8m+7, its low nibbles dims 8m + 2b,
// its high nibbles 8m + 2b + 1 (b = 0..3). p1/p2[nibble][m]: the four int8 of each part for
// those dims; bias[g] = 8 * sum of q' over group g (codes enter as q + 8).
template <int NC>
struct FixedQuery4 {
  int32_t p1[2][2 * NC], p2[2][2 * NC];
  int32_t bias[NC / 2];  // groups of at least 32 dims
  float step;
};

template <int NC>
FixedQuery4<NC> fixed_query4(const v16* x, int gsize) {
  int8_t hi[16 * NC], lo[16 * NC];
  int32_t sums[NC];
  FixedQuery4<NC> g;
  g.step = split_query<NC>(x, hi, lo, sums);
  int8_t a[2][2 * NC][4], b[2][2 * NC][4];
  for (int m = 0; m < 2 * NC; ++m)
    for (int nib = 0; nib < 2; ++nib)
      for (int k = 0; k < 4; ++k) {
        a[nib][m][k] = hi[8 * m + 2 * k + nib];
        b[nib][m][k] = lo[8 * m + 2 * k + nib];
      }
  std::memcpy(g.p1, a, sizeof a);
  std::memcpy(g.p2, b, sizeof b);
  for (int grp = 0; grp < 16 * NC / gsize; ++grp) {  // gsize: a multiple of 32 here
    int32_t sum = 0;
    for (int c = grp * gsize / 16; c < (grp + 1) * gsize / 16; ++c) sum += sums[c];
    g.bias[grp] = 8 * sum;
  }
  return g;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The exact dot of the two parts' sums (keys entered offset): 128 hi . k + lo . k - bias.
inline v16 combine_parts(__m512i a_hi, __m512i a_lo, int32_t bias) {
  return bits<v16>(_mm512_cvtepi32_ps(
      _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(a_hi, 7), a_lo), _mm512_set1_epi32(bias))));
}

// Scores q . k of n <= 16 int8 keys (rows of 16 NC bytes from `kbase`) for R heads, exact
// integers times 2^e (one rounding: int32 -> fp32): per 64 dims, the 16 x 64-byte tile
// transposed so that vector m holds dword m of every key, then one vpdpbusd per dword, part
// and head. Lanes past n hold garbage (the caller masks them). pf: rows to ask for, a line
// per dword m < pf_lines: asked for at once before the tile, the 16 lines of an int8 tile
// filled the fill buffers (perf: the prefetches among the kernel's top samples); spread
// over the dots, int8 at 16 x 2048 0.91-0.96x the kernel's time (in-process A/B,
// alternating calls, six runs; int4's 8 lines: 0.98-1.02x).
template <int NC, int R>
__attribute__((always_inline)) inline void int8_scores(const uint8_t* kbase, int n, const FixedQuery<NC>* fq,
                                                       v16* out, const char* pf, int pf_lines) {
  static_assert(NC % 4 == 0, "64-byte key rows at a time");
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  __m512i a1[R], a2[R];
  for (int r = 0; r < R; ++r) a1[r] = a2[r] = _mm512_setzero_si512();
  for (int c = 0; c < NC / 4; ++c) {
    v16 t[16];
    for (int j = 0; j < 16; ++j)
      t[j] = j < n ? bits<v16>(_mm512_xor_si512(_mm512_loadu_si512(kbase + j * 16 * NC + 64 * c), flip)) : v16{};
    transpose16(t);
    for (int m = 0; m < 16; ++m) {
      if (16 * c + m < pf_lines) _mm_prefetch(pf + 64 * (16 * c + m), _MM_HINT_T0);
      const __m512i km = bits<__m512i>(t[m]);
      for (int r = 0; r < R; ++r) {
        a1[r] = _mm512_dpbusd_epi32(a1[r], km, _mm512_set1_epi32(fq[r].hi[16 * c + m]));
        a2[r] = _mm512_dpbusd_epi32(a2[r], km, _mm512_set1_epi32(fq[r].lo[16 * c + m]));
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = combine_parts(a1[r], a2[r], fq[r].bias) * fq[r].step;
}

// 16 rows of 8 dwords (32 bytes each from p; rows past n zero) -> t[m], m < 8: dword m of
// every row (t[8..15] untouched): rows j and j + 8 share a vector, then an 8 x 8 transpose
// within each half (unpacks of dwords and qwords, then one two-source qword permute per
// output): 24 shuffles where the 16 x 16 transpose of zero-extended rows took 64 (int4 at
// 16 x 2048: 0.93-0.95x the kernel's time, in-process A/B).
inline void transpose_16x8(const uint8_t* p, int n, v16* t) {
  __m512i z[8];
  for (int j = 0; j < 8; ++j) {
    const __m256i lo = j < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * 32)) : _mm256_setzero_si256();
    const __m256i hi = j + 8 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (j + 8) * 32)) : _mm256_setzero_si256();
    z[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  __m512i a[8], b[8];
  for (int j = 0; j < 8; j += 2) {
    a[j] = _mm512_unpacklo_epi32(z[j], z[j + 1]);      // rows j, j+1: dwords 0, 1 | 4, 5 per lane pair
    a[j + 1] = _mm512_unpackhi_epi32(z[j], z[j + 1]);  // dwords 2, 3 | 6, 7
  }
  for (int h = 0; h < 2; ++h)  // rows 0-3 (a[0..3]) and 4-7 (a[4..7])
    for (int k = 0; k < 2; ++k) {
      b[4 * h + 2 * k] = _mm512_unpacklo_epi64(a[4 * h + k], a[4 * h + 2 + k]);      // dword 2k | 2k + 4
      b[4 * h + 2 * k + 1] = _mm512_unpackhi_epi64(a[4 * h + k], a[4 * h + 2 + k]);  // dword 2k + 1 | 2k + 5
    }
  // b[c] (rows 0-3) and b[4 + c] (rows 4-7), lanes: dword c of rows 0-3 | dword c + 4 | the
  // same for rows 8-11; dword c of 16 rows = lanes 0 of both, then lanes 2 of both
  const __m512i first = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  for (int c = 0; c < 4; ++c) {
    t[c] = bits<v16>(_mm512_permutex2var_epi64(b[c], first, b[4 + c]));
    t[c + 4] = bits<v16>(_mm512_permutex2var_epi64(b[c], second, b[4 + c]));
  }
}

// Scores q . k of n <= 16 int4 keys (rows of 8 NC bytes from `kbase`, group scales `gs` per
// key) for R heads: the packed tile transposed so that vector m holds packed dword m of every
// key, each nibble half one vpdpbusd per part and head, per group of dims an exact int32 sum
// scaled by the keys' group scales in fp32. pf, pf_lines: as int8_scores.
template <int NC, int R>
__attribute__((always_inline)) inline void int4_scores(const uint8_t* kbase, int n, const c10::Half* gs,
                                                       int groups, int gsize, const FixedQuery4<NC>* fq,
                                                       v16* out, const char* pf, int pf_lines) {
  static_assert(NC == 4 || NC == 8, "64 or 128 dims: one key's packed row in half or all of a vector");
  constexpr int PD = 2 * NC;  // packed dwords per key
  v16 t[16];  // t[m]: packed dword m of every key
  if constexpr (PD == 8) {
    transpose_16x8(kbase, n, t);
  } else {
    for (int j = 0; j < 16; ++j) t[j] = j < n ? bits<v16>(_mm512_loadu_si512(kbase + j * 64)) : v16{};
    transpose16(t);
  }
  const __m512i nib = _mm512_set1_epi8(0x0F);
  v16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = v16{};
  const int per = gsize / 8;  // packed dwords per group
  v16 sgs[NC / 2];  // groups of at least 32 dims
  group_scales(gs, n, groups, sgs);
  for (int g = 0; g < groups; ++g) {
    __m512i a1[R], a2[R];
    for (int r = 0; r < R; ++r) a1[r] = a2[r] = _mm512_setzero_si512();
    for (int m = g * per; m < (g + 1) * per; ++m) {
      if (m < pf_lines) _mm_prefetch(pf + 64 * m, _MM_HINT_T0);
      const __m512i w = bits<__m512i>(t[m]);
      const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
      for (int r = 0; r < R; ++r) {
        a1[r] = _mm512_dpbusd_epi32(a1[r], lo, _mm512_set1_epi32(fq[r].p1[0][m]));
        a1[r] = _mm512_dpbusd_epi32(a1[r], hi, _mm512_set1_epi32(fq[r].p1[1][m]));
        a2[r] = _mm512_dpbusd_epi32(a2[r], lo, _mm512_set1_epi32(fq[r].p2[0][m]));
        a2[r] = _mm512_dpbusd_epi32(a2[r], hi, _mm512_set1_epi32(fq[r].p2[1][m]));
      }
    }
    for (int r = 0; r < R; ++r) acc[r] += combine_parts(a1[r], a2[r], fq[r].bias[g]) * sgs[g];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r] * fq[r].step;
}
#endif


// The decode path for one item (defined in attention_decode.h, instantiated per format
// pair in attention_decode_*.cpp): G query heads per kv head, head dim 16 NC, formats KF/VF.
#define FERROLM_DECODE_PARAMS                                                                       \
  const Item &it, int nsplit, const float *q, float *out, const Half &K, const Half &V,           \
      const int32_t *tables, int64_t nblk, const int32_t *q_start, const int32_t *ctx_len, int H, int G, \
      int bs, float scale, Partial *part, int qx
// qx: what the decode path does to the query and output rows itself (a pure decode call:
// no pass over q or the output outside the items, no parallel region of their own).
// QX_BF16: q and the output are bf16 (q, out point at bf16 rows): each item widens its own
// query rows and rounds its own output rows, inside the parallel region.
constexpr int QX_ROTATE_Q = 1, QX_ROUND_Q = 2, QX_ROTATE_OUT = 4, QX_BF16 = 8;
template <int NC, int KF, int VF>
void run_decode_r(FERROLM_DECODE_PARAMS);

}  // namespace ferrolm_attention
