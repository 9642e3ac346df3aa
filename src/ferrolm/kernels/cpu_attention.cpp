// ferrolm's compiled CPU attention: paged attention that reads every KV format in place,
// and quantize-on-write in one pass. Built on first use with -O3 -march=native (so the
// vector code below becomes AVX-512 or AVX2 on the machine that runs it) and cached.
//
// Layout (kv/pool.py): data [kv_heads, slots, data_dim], per-token or per-group fp16
// scales [kv_heads, slots, groups]; per-channel (int4pc) halves: scales and minima
// [kv_heads, blocks, 2, D], fp16 staging rows [kv_heads, rows, block_size, D], row_of.
// A work item is (sequence, kv head, tile of queries, context split): it walks the
// sequence's block table 16 keys at a time, converts those keys to fp32 in an L1 buffer,
// folds per-token scales into the scores (K) and the probabilities (V), and keeps an
// online softmax; query heads sharing the kv head share every conversion.
#include <atomic>

#include "simd.h"
#include "ops.h"

namespace {

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

template <int NC>
void load_row(const Half& h, const uint8_t* row, const c10::Half* gscale, v16* x);

// n <= 16 tokens of one head starting at `slot` (consecutive slots of one block) -> fp32
// rows buf[n][D]; per-token multipliers (folded scales; 1 when the values are scaled
// already) into mul[0..n). Rows n..15 are zero and their multipliers 0.
void convert(const Half& h, int64_t head, int64_t slot, int n, int D, int bs, float* buf, float* mul) {
  const int64_t dd = h.fmt == LUT4 || h.fmt == PC4 ? D / 2 : D;
  const uint8_t* base = h.data + (head * h.slots + slot) * dd * h.elem;
  for (int j = 0; j < n; ++j) {
    const uint8_t* src = base + j * dd * h.elem;
    float* dst = buf + j * D;
    switch (h.fmt) {
      case F32:
      case F16:
      case BF16:
      case I8:
      case E4M3:
      case E5M2:  // the decode path's row conversion (no group scales for these)
        with_nc(D, [&](auto NC) {
          v16 x[NC()];
          load_row<NC()>(h, src, nullptr, x);
          for (int c = 0; c < NC(); ++c) store16(dst + 16 * c, x[c]);
        });
        break;
      case LUT4: {
        const c10::Half* s = h.scale + (head * h.slots + slot + j) * h.groups;
        const int gsize = D / h.groups;  // a multiple of 16 (format_code)
        for (int g = 0; g < h.groups; ++g) {
          const v16 sg = splat(half_to_float(s[g]));
          for (int c = g * gsize; c < (g + 1) * gsize; c += 16) store16(dst + c, lookup16(h.lut, nibbles(src + c / 2)) * sg);
        }
        break;
      }
      case PC4: {
        const int64_t blk = (slot + j) / bs;
        const c10::Half* s = h.scale + (head * h.blocks + blk) * 2 * D;
        for (int c = 0; c < D; c += 16) {
          v16 q = i32_to_v16(nibbles(src + c / 2));
          store16(dst + c, q * from_f16(s + c) + from_f16(s + D + c));
        }
        break;
      }
    }
    if (h.per_token_scale())
      mul[j] = half_to_float(h.scale[head * h.slots + slot + j]) * h.factor;
    else
      mul[j] = 1.0f;
  }
  for (int j = n; j < TILE; ++j) {
    std::memset(buf + j * D, 0, D * sizeof(float));
    mul[j] = 0.0f;
  }
}

// Ask for a tile's bytes ahead of use (the general path, several queries per tile):
// consecutive tiles sit in scattered blocks, which the hardware prefetcher cannot guess.
// The requests go PREFETCH_TILES ahead, into L2, where more misses can be outstanding.
constexpr int64_t PREFETCH_TILES = 4;
template <_mm_hint HINT = _MM_HINT_T0>
inline void prefetch_bytes(const char* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, HINT);
}
// The decode path asks for one key's K and V rows PF_KEYS keys (whole blocks) ahead as it
// uses this key's value row: a line or two per key, spread over the loop. Its loops do ~16+
// vector ops per 64-byte line, and at that density this VM's hardware prefetcher falls
// behind (bench/stream_prefetch.cpp, 16 FMAs per line: 8.1 ns per line alone, 3.5 with such
// prefetches, 3.3 in L2); a tile's lines asked for at once, 4 or 16 tiles ahead
// (prefetch_tile), changed nothing. int8 at 16 x 2,048 from memory: 1,090 -> 800 us.
constexpr int64_t PF_KEYS = 128;
inline void prefetch_key(const char* k, const char* v, int64_t row, int64_t krow, int64_t vrow) {
  prefetch_bytes(k + row * krow, krow);
  prefetch_bytes(v + row * vrow, vrow);
}
inline void prefetch_tile(const Half& h, int64_t head, int64_t slot, int n, int D) {
  const int64_t dd = h.fmt == LUT4 || h.fmt == PC4 ? D / 2 : D;
  const char* p = reinterpret_cast<const char*>(h.data + (head * h.slots + slot) * dd * h.elem);
  prefetch_bytes<_MM_HINT_T1>(p, n * dd * h.elem);
  if (h.scale && h.fmt != PC4) _mm_prefetch(reinterpret_cast<const char*>(h.scale + (head * h.slots + slot) * h.groups), _MM_HINT_T1);
}

// Per-channel halves: a block's fp16 staging row (the query's own block) -> fp32 rows.
void convert_stage(const Half& h, int64_t head, int64_t block, int off, int n, int D, int bs, float* buf,
                   float* mul) {
  const int64_t row = h.row_of[block];
  for (int j = 0; j < TILE; ++j) {
    mul[j] = j < n ? 1.0f : 0.0f;
    float* dst = buf + j * D;
    if (j >= n || row < 0) {
      std::memset(dst, 0, D * sizeof(float));
      continue;
    }
    const c10::Half* src = h.stage + ((head * h.rows + row) * bs + off + j) * D;
    for (int c = 0; c < D; c += 16) store16(dst + c, from_f16(src + c));
  }
}

// x @ H (orthonormal Sylvester Hadamard) in place: the butterflies of hadamard.fwht in the
// same order, then one multiply, so both backends produce identical values.
inline void fwht_scalar(float* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
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

inline void fwht(float* x, int64_t n) {
  if (n % 16 || n > 256) return fwht_scalar(x, n);
  v16 v[16];
  const int64_t nv = n / 16;
  for (int64_t c = 0; c < nv; ++c) {
    v16 t = load16(x + 16 * c);
    t = butterfly_in_vector<1>(t);
    t = butterfly_in_vector<2>(t);
    t = butterfly_in_vector<4>(t);
    v[c] = butterfly_in_vector<8>(t);
  }
  for (int64_t h = 1; h < nv; h *= 2)
    for (int64_t i = 0; i < nv; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const v16 a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  const float s = (float)(1.0 / std::sqrt((double)n));
  for (int64_t c = 0; c < nv; ++c) store16(x + 16 * c, v[c] * s);
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
    x[2 * s] = lookup16(h.lut, idx & 15);
    x[2 * s + 1] = lookup16(h.lut, idx >> 4);
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
// gs) as one vector per group, lanes past n zero: for a whole tile one or two loads and a word
// permute per group instead of 16 scalar conversions per group.
inline void group_scales(const c10::Half* gs, int n, int groups, v16* out) {
#if defined(__AVX512BW__)
  if (n == TILE && (groups == 1 || groups == 2 || groups == 4)) {
    const __m512i a = groups == 4 ? _mm512_loadu_si512(gs)  // masked: no read past the tile's scales
                                  : _mm512_maskz_loadu_epi16((__mmask32)((1ull << (16 * groups)) - 1), gs);
    const __m512i b = groups == 4 ? _mm512_loadu_si512(gs + 32) : a;
    const __m512i key = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 14, 13, 12, 11, 10, 9,
                                         8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i first = _mm512_mullo_epi16(key, _mm512_set1_epi16((short)groups));
    for (int g = 0; g < groups; ++g) {
      const __m512i h = _mm512_permutex2var_epi16(a, _mm512_add_epi16(first, _mm512_set1_epi16((short)g)), b);
      out[g] = bits<v16>(_mm512_cvtph_ps(_mm512_castsi512_si256(h)));
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

// Rows of q (fp32, after the rotation) -> round(q / 2^e) * 2^e in place, row by row.
void round_query_rows(float* q, int64_t rows, int64_t D) {
  at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {  // a decode step's rows: inline
    for (int64_t i = lo; i < hi; ++i) {
      float* x = q + i * D;
      float amax = 0.0f;
      for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
      const int e = query_exponent(amax);
      const float down = pow2(-e), up = pow2(e);
      for (int64_t d = 0; d < D; ++d) x[d] = std::nearbyint(x[d] * down) * up;
    }
  });
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

// A rounded query row (16 NC values) -> q' = 128 hi + lo per dim; returns 2^e.
template <int NC>
float split_query(const v16* q, int8_t* hi, int8_t* lo) {
  float amax = 0.0f;
  for (int c = 0; c < NC; ++c)
    for (int i = 0; i < 16; ++i) amax = std::max(amax, std::fabs(q[c][i]));
  const int e = query_exponent(amax);
  const float down = pow2(-e);
  for (int c = 0; c < NC; ++c)
    for (int i = 0; i < 16; ++i) {
      const int32_t qi = (int32_t)std::nearbyint(q[c][i] * down);  // exact: q is rounded already
      const int32_t h = (int32_t)std::nearbyint((float)qi * (1.0f / 128.0f));
      hi[16 * c + i] = (int8_t)h;
      lo[16 * c + i] = (int8_t)(qi - 128 * h);
    }
  return pow2(e);
}

template <int NC>
FixedQuery<NC> fixed_query(const v16* q) {
  FixedQuery<NC> f;
  int8_t hi[16 * NC], lo[16 * NC];
  f.step = split_query<NC>(q, hi, lo);
  int32_t sum = 0;
  for (int d = 0; d < 16 * NC; ++d) sum += 128 * hi[d] + lo[d];
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
FixedQuery4<NC> fixed_query4(const float* q, int gsize) {
  v16 x[NC];
  for (int c = 0; c < NC; ++c) x[c] = load16(q + 16 * c);
  int8_t hi[16 * NC], lo[16 * NC];
  FixedQuery4<NC> g;
  g.step = split_query<NC>(x, hi, lo);
  int8_t a[2][2 * NC][4], b[2][2 * NC][4];
  for (int m = 0; m < 2 * NC; ++m)
    for (int nib = 0; nib < 2; ++nib)
      for (int k = 0; k < 4; ++k) {
        a[nib][m][k] = hi[8 * m + 2 * k + nib];
        b[nib][m][k] = lo[8 * m + 2 * k + nib];
      }
  std::memcpy(g.p1, a, sizeof a);
  std::memcpy(g.p2, b, sizeof b);
  for (int grp = 0; grp < 16 * NC / gsize; ++grp) {
    int32_t sum = 0;
    for (int d = grp * gsize; d < (grp + 1) * gsize; ++d) sum += 128 * hi[d] + lo[d];
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
// and head. Lanes past n hold garbage (the caller masks them).
template <int NC, int R>
__attribute__((always_inline)) inline void int8_scores(const uint8_t* kbase, int n, const FixedQuery<NC>* fq,
                                                       v16* out) {
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
      const __m512i km = bits<__m512i>(t[m]);
      for (int r = 0; r < R; ++r) {
        a1[r] = _mm512_dpbusd_epi32(a1[r], km, _mm512_set1_epi32(fq[r].hi[16 * c + m]));
        a2[r] = _mm512_dpbusd_epi32(a2[r], km, _mm512_set1_epi32(fq[r].lo[16 * c + m]));
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = combine_parts(a1[r], a2[r], fq[r].bias) * fq[r].step;
}

// Scores q . k of n <= 16 int4 keys (rows of 8 NC bytes from `kbase`, group scales `gs` per
// key) for R heads: the packed tile transposed so that vector m holds packed dword m of every
// key, each nibble half one vpdpbusd per part and head, per group of dims an exact int32 sum
// scaled by the keys' group scales in fp32.
template <int NC, int R>
__attribute__((always_inline)) inline void int4_scores(const uint8_t* kbase, int n, const c10::Half* gs,
                                                       int groups, int gsize, const FixedQuery4<NC>* fq,
                                                       v16* out) {
  static_assert(NC == 4 || NC == 8, "64 or 128 dims: one key's packed row in half or all of a vector");
  constexpr int PD = 2 * NC;  // packed dwords per key
  v16 t[16];
  for (int j = 0; j < 16; ++j) {
    if (j >= n) {
      t[j] = v16{};
    } else if constexpr (PD == 16) {
      t[j] = bits<v16>(_mm512_loadu_si512(kbase + j * 64));
    } else {
      t[j] = bits<v16>(_mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kbase + j * 32))));
    }
  }
  transpose16(t);
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

// Tiles whose scores share one softmax update: a block of 128 keys at most. Per chunk, one
// maximum per row (not per tile), one rescaling of the accumulators, and the values' pass
// over all its keys with the accumulators in registers; the running sums stay vectors.
constexpr int CHUNK = 8;

template <int NC, int R, int KF, int VF>
void run_decode(const Item& it, int nsplit, const float* q, float* out, const Half& K, const Half& V,
                const int32_t* tables, int64_t nblk, const int32_t* q_start, const int32_t* ctx_len, int H, int bs,
                float scale, Partial* part) {
  constexpr int D = 16 * NC;
  const bool k_lut = KF == ANY ? K.fmt == LUT4 : KF == LUT4;
  const bool v_lut = VF == ANY ? V.fmt == LUT4 : VF == LUT4;
  const int b = it.seq;
  const int64_t tok0 = q_start[b] + it.q0;
  const int64_t n_new = q_start[b + 1] - q_start[b];
  const int64_t pos = ctx_len[b] - n_new + it.q0;
  const int64_t keys = pos + 1;
  const int64_t tiles_per_block = (bs + TILE - 1) / TILE;
  const auto [t_begin, t_end, first_key] = tile_range(it, nsplit, pos, keys, bs);
  const int64_t head = it.head;
  const int64_t kdd = k_lut ? D / 2 : D, vdd = v_lut ? D / 2 : D;

  v16 qv[R][NC], acc[R][NC], lsum[R];
  float m[R];
  for (int r = 0; r < R; ++r) {
    const float* qr = q + tok0 * H * D + (head * R + r) * D;
    for (int c = 0; c < NC; ++c) qv[r][c] = load16(qr + 16 * c);
    if (k_lut)
      for (int s = 0; s < NC / 2; ++s) {
        const v16 a = qv[r][2 * s], b2 = qv[r][2 * s + 1];
        qv[r][2 * s] = __builtin_shufflevector(a, b2, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        qv[r][2 * s + 1] = __builtin_shufflevector(a, b2, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
      }
    for (int c = 0; c < NC; ++c) acc[r][c] = v16{};
    m[r] = -INFINITY;
    lsum[r] = v16{};
  }
  v16 lane;
  for (int j = 0; j < TILE; ++j) lane[j] = (float)j;
  // Integer dots where the CPU has VNNI and the keys' codes are integers (int8; int4 in
  // groups of at least 32), over the query in fixed point (rounded by attend already).
  constexpr bool i8_dots = INT8_DOTS && KF == I8 && NC % 4 == 0;
  constexpr bool i4_dots = INT8_DOTS && KF == LUT4 && (NC == 4 || NC == 8);
  const bool int_dots = (i8_dots || i4_dots) && K.fixed_query && (!i4_dots || K.gsize >= 32);
  // 4-bit values in groups of 32 or more: each group's scale is folded into the
  // probabilities (one vector per group and tile) instead of multiplied into every value.
  constexpr bool v_fold_code = VF == LUT4 && (NC == 4 || NC == 8);
  constexpr int VG = v_fold_code ? NC / 2 : 1;  // groups of >= 32 values
  const bool v_fold = v_fold_code && V.gsize >= 32;
  int span_group[VG];  // the group of each 32-value span
  for (int sp = 0; sp < VG; ++sp) span_group[sp] = v_fold ? 32 * sp / V.gsize : 0;
  FixedQuery<i8_dots ? NC : 1> fq[R];
  FixedQuery4<i4_dots ? NC : 4> fq4[R];
  if (int_dots)
    for (int r = 0; r < R; ++r) {
      if constexpr (i8_dots) fq[r] = fixed_query<NC>(qv[r]);
      if constexpr (i4_dots) fq4[r] = fixed_query4<NC>(q + tok0 * H * D + (head * R + r) * D, K.gsize);
    }

  // (block, tile within it) of the next chunk, advanced as tiles are consumed (no division
  // per tile); rows are prefetched from the block pf_ahead blocks on (>= PF_KEYS keys ahead)
  int64_t bi = t_begin / tiles_per_block, ti = t_begin % tiles_per_block;
  const int64_t pf_ahead = std::max<int64_t>(1, PF_KEYS / bs);
  // The first pf_ahead blocks have no key that far before them: their tiles are asked for
  // PREFETCH_TILES ahead, as the general path does (pbi, pti: that tile).
  const int64_t pf_cover = bi + pf_ahead;
  const int64_t blocks = (t_end + tiles_per_block - 1) / tiles_per_block;  // this item's last block + 1
  const int64_t krow = kdd * K.elem, vrow = vdd * V.elem;  // bytes per key row
  int64_t pbi = (t_begin + PREFETCH_TILES) / tiles_per_block, pti = (t_begin + PREFETCH_TILES) % tiles_per_block;
  for (int64_t t = t_begin; t < t_end;) {
    if (bi * bs + ti * TILE > pos) break;
    const int nt = (int)std::min<int64_t>({(int64_t)CHUNK, tiles_per_block - ti, t_end - t});
    const int64_t block_slot = (int64_t)tables[b * nblk + bi] * bs;
    int64_t pf_rows = std::clamp<int64_t>(pos + 1 - (bi + pf_ahead) * bs, 0, bs);  // its keys <= pos
    int64_t pf_slot = pf_rows > 0 ? (int64_t)tables[b * nblk + bi + pf_ahead] * bs : block_slot, pf_head = head;
    if (pf_rows == 0 && it.next && bi + pf_ahead >= blocks) {  // past the end: the next item's
      const int64_t nb2 = bi + pf_ahead - blocks, b2 = it.next->seq;
      const int64_t pos2 = ctx_len[b2] - (q_start[b2 + 1] - q_start[b2]) + it.next->q0;
      pf_rows = std::clamp<int64_t>(pos2 + 1 - nb2 * bs, 0, bs);
      if (pf_rows > 0) pf_slot = (int64_t)tables[b2 * nblk + nb2] * bs, pf_head = it.next->head;
    }
    const char* kpf = reinterpret_cast<const char*>(K.data) + (pf_head * K.slots + pf_slot) * krow;
    const char* vpf = reinterpret_cast<const char*>(V.data) + (pf_head * V.slots + pf_slot) * vrow;
    v16 sc[R][CHUNK], vm[CHUNK], vg[CHUNK][VG];
    int ns[CHUNK];
    int used = 0;  // tiles of the chunk holding keys at or before pos
    // Scores, tile by tile: per key, its row converted once, dotted with the R queries.
    for (int u = 0; u < nt; ++u) {
      const int off = (int)((ti + u) * TILE);
      const int64_t key0 = bi * bs + off;
      if (key0 > pos) break;
      if (pbi < pf_cover && t + u + PREFETCH_TILES < t_end && pbi * bs + pti * TILE <= pos) {
        const int64_t nslot = (int64_t)tables[b * nblk + pbi] * bs + pti * TILE;
        prefetch_tile(K, head, nslot, TILE, D);
        prefetch_tile(V, head, nslot, TILE, D);
      }
      if (++pti == tiles_per_block) pti = 0, ++pbi;
      const int n = (int)std::min<int64_t>({(int64_t)TILE, bs - off, keys - key0});
      const int64_t slot = block_slot + off;
      const uint8_t* kbase = K.data + (head * K.slots + slot) * krow;
      const c10::Half* kgs = k_lut ? K.scale + (head * K.slots + slot) * K.groups : nullptr;
      v16 raw[R];  // q . k of the tile's keys, per head, before the per-token scales
      if (int_dots) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        if constexpr (i8_dots) int8_scores<NC, R>(kbase, n, fq, raw);
        if constexpr (i4_dots) int4_scores<NC, R>(kbase, n, kgs, (int)K.groups, K.gsize, fq4, raw);
#endif
      } else {
        v16 part_dot[R][TILE];
        for (int j = 0; j < n; ++j) {
          v16 kc[NC];
          load_as<NC, KF>(K, kbase + j * krow, kgs ? kgs + j * K.groups : nullptr, kc);
          for (int r = 0; r < R; ++r) {
            v16 d = qv[r][0] * kc[0];
            for (int c = 1; c < NC; ++c) d += qv[r][c] * kc[c];
            part_dot[r][j] = d;
          }
        }
        for (int r = 0; r < R; ++r) {
          for (int j = n; j < TILE; ++j) part_dot[r][j] = v16{};
          raw[r] = reduce16(part_dot[r]);
        }
      }
      const v16 km = token_scales(K, head, slot, n) * scale;
      for (int r = 0; r < R; ++r) {
        v16 s = raw[r] * km;
        s = lane < (float)n ? s : splat(-INFINITY);
        if (first_key > key0) s = lane >= (float)(first_key - key0) ? s : splat(-INFINITY);  // window
        sc[r][u] = s;
      }
      vm[u] = token_scales(V, head, slot, n);
      if (off < pf_rows) {  // the tile's scales pf_ahead blocks on (a line or two)
        const int64_t ps = pf_slot + off;
        if (K.scale) prefetch_bytes(reinterpret_cast<const char*>(K.scale + (pf_head * K.slots + ps) * K.groups), 2 * TILE * K.groups);
        if (V.scale) prefetch_bytes(reinterpret_cast<const char*>(V.scale + (pf_head * V.slots + ps) * V.groups), 2 * TILE * V.groups);
      }
      if (v_fold) group_scales(V.scale + (head * V.slots + slot) * V.groups, n, (int)V.groups, vg[u]);
      ns[u] = n;
      ++used;
    }
    // One softmax update for the chunk: each row's new maximum, the rescaling of what came
    // before (exp(m_old - m_new) of every row at once; 0 where nothing was seen yet), and
    // the probabilities, with the values' per-token scales folded in.
    v16 m_old{}, m_new{};
    for (int r = 0; r < R; ++r) {
      v16 mx = sc[r][0];
      for (int u = 1; u < used; ++u) mx = mx > sc[r][u] ? mx : sc[r][u];
      m_old[r] = m[r];
      m_new[r] = m[r] = std::max(m[r], hmax(mx));
    }
    const v16 corr = m_old == splat(-INFINITY) ? v16{} : vexp(m_old - m_new);
    alignas(64) float p[R][VG][CHUNK * TILE];  // [.][g]: times value group g's scales (v_fold)
    for (int r = 0; r < R; ++r) {
      v16 sum = lsum[r] * corr[r];
      for (int u = 0; u < used; ++u) {
        const v16 e = vexp(sc[r][u] - m[r]);
        sum += e;
        if (v_fold)
          for (int g = 0; g < V.groups; ++g) store16(p[r][g] + u * TILE, e * vg[u][g]);
        else
          store16(p[r][0] + u * TILE, e * vm[u]);
      }
      lsum[r] = sum;
    }
    // Values: per key, its row converted once, added to the R accumulators, held in
    // registers for the chunk (a copy the compiler keeps out of memory inside the loop).
    v16 a[R][NC];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NC; ++c) a[r][c] = acc[r][c] * corr[r];
    for (int u = 0; u < used; ++u) {
      const int64_t slot = block_slot + (ti + u) * TILE;
      const uint8_t* vbase = V.data + (head * V.slots + slot) * vrow;
      const c10::Half* vgs = v_lut ? V.scale + (head * V.slots + slot) * V.groups : nullptr;
      if (v_fold) {
        if constexpr (v_fold_code)
          for (int j = 0; j < ns[u]; ++j) {
            if ((ti + u) * TILE + j < pf_rows) prefetch_key(kpf, vpf, (ti + u) * TILE + j, krow, vrow);
            v16 vc[NC];
            lut_codes<NC>(V, vbase + j * vdd, vc);
            for (int r = 0; r < R; ++r)
              for (int sp = 0; sp < NC / 2; ++sp) {
                const float pj = p[r][span_group[sp]][u * TILE + j];
                a[r][2 * sp] += pj * vc[2 * sp];
                a[r][2 * sp + 1] += pj * vc[2 * sp + 1];
              }
          }
        continue;
      }
      for (int j = 0; j < ns[u]; ++j) {
        if ((ti + u) * TILE + j < pf_rows) prefetch_key(kpf, vpf, (ti + u) * TILE + j, krow, vrow);
        v16 vc[NC];
        load_as<NC, VF>(V, vbase + j * vrow, vgs ? vgs + j * V.groups : nullptr, vc);
        for (int r = 0; r < R; ++r) {
          const float pj = p[r][0][u * TILE + j];
          for (int c = 0; c < NC; ++c) a[r][c] += pj * vc[c];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NC; ++c) acc[r][c] = a[r][c];
    t += nt;
    ti += nt;
    if (ti == tiles_per_block) ti = 0, ++bi;
  }
  for (int r = 0; r < R; ++r) {
    const float l = hsum(lsum[r]);
    if (v_lut)  // back from nibble order
      for (int s = 0; s < NC / 2; ++s) {
        const v16 ev = acc[r][2 * s], od = acc[r][2 * s + 1];
        acc[r][2 * s] = __builtin_shufflevector(ev, od, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        acc[r][2 * s + 1] = __builtin_shufflevector(ev, od, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      }
    if (part) {
      part->m[r] = m[r];
      part->l[r] = l;
      for (int c = 0; c < NC; ++c) store16(part->acc + r * D + 16 * c, acc[r][c]);
      continue;
    }
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    float* dst = out + tok0 * H * D + (head * R + r) * D;
    for (int c = 0; c < NC; ++c) store16(dst + 16 * c, acc[r][c] * inv);
  }
}

// The decode path applies: one query, at most 4 heads per kv head, no per-channel halves.
inline bool decode_path(const Item& it, int G, int D, const Half& K, const Half& V) {
  if (it.nq != 1 || G > 4 || K.fmt == PC4 || V.fmt == PC4) return false;
  return (K.fmt != LUT4 && V.fmt != LUT4) || D % 32 == 0;
}

template <int NC, int KF, int VF>
void run_decode_r(const Item& it, int nsplit, const float* q, float* out, const Half& K, const Half& V,
                  const int32_t* tables, int64_t nblk, const int32_t* q_start, const int32_t* ctx_len, int H, int G,
                  int bs, float scale, Partial* part) {
  switch (G) {
    case 1: return run_decode<NC, 1, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, bs, scale, part);
    case 2: return run_decode<NC, 2, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, bs, scale, part);
    case 3: return run_decode<NC, 3, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, bs, scale, part);
    default: return run_decode<NC, 4, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, bs, scale, part);
  }
}

// Head dims 64 and 128 with one format for both halves (or int8 keys over 4-bit values) get
// code of their own, every conversion inline; other shapes and pairs pick the format per row.
template <int NC>
void run_decode_g(const Item& it, int nsplit, const float* q, float* out, const Half& K, const Half& V,
                  const int32_t* tables, int64_t nblk, const int32_t* q_start, const int32_t* ctx_len, int H, int G,
                  int bs, float scale, Partial* part) {
#define FERROLM_DECODE(KF, VF) \
  return run_decode_r<NC, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, G, bs, scale, part)
  if constexpr (NC == 4 || NC == 8) {
    if (K.fmt == V.fmt) switch (K.fmt) {
        case F32: FERROLM_DECODE(F32, F32);
        case F16: FERROLM_DECODE(F16, F16);
        case BF16: FERROLM_DECODE(BF16, BF16);
        case I8: FERROLM_DECODE(I8, I8);
        case E4M3: FERROLM_DECODE(E4M3, E4M3);
        case E5M2: FERROLM_DECODE(E5M2, E5M2);
        case LUT4: FERROLM_DECODE(LUT4, LUT4);
      }
    if (K.fmt == I8 && V.fmt == LUT4) FERROLM_DECODE(I8, LUT4);
  }
  FERROLM_DECODE(ANY, ANY);
#undef FERROLM_DECODE
}

void run_item(const Item& it, int nsplit, const float* q, float* out, const Half& K, const Half& V,
              const int32_t* tables, int64_t nblk, const int32_t* q_start, const int32_t* ctx_len, int H, int G,
              int D, int bs, float scale, Partial* part) {
  if (decode_path(it, G, D, K, V)) {
    return with_nc(D, [&](auto NC) {
      run_decode_g<NC()>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, G, bs, scale, part);
    });
  }
  const int b = it.seq;
  const int rows = G * it.nq;
  const int64_t tok0 = q_start[b] + it.q0;
  const int64_t n_new = q_start[b + 1] - q_start[b];
  const int64_t first_pos = ctx_len[b] - n_new + it.q0;  // position of the tile's first query
  const int64_t last_pos = first_pos + it.nq - 1;
  const int64_t keys = last_pos + 1;
  const int64_t tiles_per_block = (bs + TILE - 1) / TILE;
  const TileRange tr = tile_range(it, nsplit, first_pos, keys, bs);
  const int64_t t_begin = tr.begin, t_end = tr.end;

  thread_local std::vector<float> scratch;
  const size_t need = (size_t)rows * D + 3 * rows + 4 * TILE * D + 4 * TILE + (size_t)rows * TILE;
  if (scratch.size() < need) scratch.resize(need);
  float* acc = scratch.data();
  float* m = acc + (size_t)rows * D;
  float* l = m + rows;
  float* kbuf = l + rows;
  float* vbuf = kbuf + TILE * D;
  float* kown = vbuf + TILE * D;
  float* vown = kown + TILE * D;
  float* kmul = vown + TILE * D;
  float* vmul = kmul + TILE;
  float* kmul_own = vmul + TILE;
  float* vmul_own = kmul_own + TILE;
  float* p = vmul_own + TILE;  // [rows][TILE]
  float* corr = p + (size_t)rows * TILE;
  v16 lane;
  for (int j = 0; j < TILE; ++j) lane[j] = (float)j;
  std::fill(acc, acc + (size_t)rows * D, 0.0f);
  std::fill(m, m + rows, -INFINITY);
  std::fill(l, l + rows, 0.0f);
  const int64_t kv_head = it.head;
  const bool k_pc = K.fmt == PC4, v_pc = V.fmt == PC4;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t bi = t / tiles_per_block;
    const int off = (int)((t % tiles_per_block) * TILE);
    const int64_t key0 = bi * bs + off;
    if (key0 > last_pos) break;
    const int n = (int)std::min<int64_t>({(int64_t)TILE, bs - off, keys - key0});
    const int64_t block = tables[b * nblk + bi];
    const int64_t slot = block * bs + off;
    if (t + PREFETCH_TILES < t_end) {
      const int64_t nt = t + PREFETCH_TILES;
      const int64_t nbi = nt / tiles_per_block, noff = (nt % tiles_per_block) * TILE;
      if (nbi * bs + noff <= last_pos) {
        const int64_t nslot = tables[b * nblk + nbi] * bs + noff;
        prefetch_tile(K, kv_head, nslot, TILE, D);
        prefetch_tile(V, kv_head, nslot, TILE, D);
      }
    }
    convert(K, kv_head, slot, n, D, bs, kbuf, kmul);
    convert(V, kv_head, slot, n, D, bs, vbuf, vmul);
    // Per-channel halves: queries inside this block read its staging row instead.
    const bool own_here = (k_pc || v_pc) && first_pos / bs <= bi && bi <= last_pos / bs;
    if (own_here) {
      if (k_pc) convert_stage(K, kv_head, block, off, n, D, bs, kown, kmul_own);
      if (v_pc) convert_stage(V, kv_head, block, off, n, D, bs, vown, vmul_own);
    }
    // Scores and the online softmax, row by row (row r = query qi, head g); rows whose
    // query sits in this block read per-channel halves from staging.
    bool any_own_v = false;
    for (int qi = 0; qi < it.nq; ++qi) {
      const int64_t pos = first_pos + qi;
      const bool own = own_here && pos / bs == bi;
      any_own_v |= own && v_pc;
      const float* kb = own && k_pc ? kown : kbuf;
      const v16 km = load16(own && k_pc ? kmul_own : kmul) * scale;
      const v16 vm = load16(own && v_pc ? vmul_own : vmul);
      const int64_t valid = std::min<int64_t>(n, pos - key0 + 1);  // causal
      const int64_t lo = it.window > 0 ? pos - it.window + 1 - key0 : 0;  // sliding window
      for (int g = 0; g < G; ++g) {
        const int r = qi * G + g;
        if (valid <= 0 || lo >= valid) {
          store16(p + r * TILE, v16{});
          corr[r] = 1.0f;
          continue;
        }
        const float* qr = q + (tok0 + qi) * H * D + (kv_head * G + g) * D;
        v16 s = with_nc(D, [&](auto C) { return tile_scores<C()>(qr, kb); });
        s = s * km;
        s = lane < (float)valid ? s : splat(-INFINITY);
        s = lane >= (float)lo ? s : splat(-INFINITY);
        const float mn = std::max(m[r], hmax(s));
        corr[r] = m[r] == -INFINITY ? 0.0f : std::exp(m[r] - mn);
        const v16 e = vexp(s - mn);
        l[r] = l[r] * corr[r] + hsum(e);
        m[r] = mn;
        store16(p + r * TILE, e * vm);
      }
    }
    if (!any_own_v) {
      with_nc(D, [&](auto C) { tile_pv_rows<C()>(acc, p, corr, vbuf, n, rows); });
    } else {
      for (int qi = 0; qi < it.nq; ++qi) {
        const bool own = own_here && (first_pos + qi) / bs == bi;
        const float* vb = own ? vown : vbuf;
        const int r0 = qi * G;
        with_nc(D, [&](auto C) { tile_pv_rows<C()>(acc + r0 * D, p + r0 * TILE, corr + r0, vb, n, G); });
      }
    }
  }
  if (part) {
    std::memcpy(part->m, m, rows * sizeof(float));
    std::memcpy(part->l, l, rows * sizeof(float));
    std::memcpy(part->acc, acc, (size_t)rows * D * sizeof(float));
    return;
  }
  for (int qi = 0; qi < it.nq; ++qi)
    for (int g = 0; g < G; ++g) {
      const int r = qi * G + g;
      const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
      float* dst = out + (tok0 + qi) * H * D + (kv_head * G + g) * D;
      for (int c = 0; c < D; ++c) dst[c] = acc[(size_t)r * D + c] * inv;
    }
}

// Values stored rotated: the output rows (per head) rotated back, in place.
at::Tensor rotate_rows(at::Tensor out, int64_t D, int64_t rotate) {
  if (!rotate) return out;
  float* p = out.data_ptr<float>();
  at::parallel_for(0, out.numel() / D, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) fwht(p + i * D, D);
  });
  return out;
}

Half make_half(const at::Tensor& data, const c10::optional<at::Tensor>& scale,
               const c10::optional<at::Tensor>& stage, const c10::optional<at::Tensor>& row_of, int64_t fmt,
               const at::Tensor& lut, int64_t bs) {
  Half h{};
  h.data = static_cast<const uint8_t*>(data.data_ptr());
  h.fixed_query = (fmt & FIXED_QUERY) != 0;
  fmt &= FIXED_QUERY - 1;
  h.fmt = fmt;
  h.elem = data.element_size();
  h.slots = data.size(1);
  h.blocks = h.slots / bs;
  h.factor = fmt == E4M3 ? 256.0f : 1.0f;
  if (scale && scale->defined()) {
    TORCH_CHECK(scale->scalar_type() == at::kHalf && scale->is_contiguous(), "scales must be contiguous fp16");
    h.scale = static_cast<const c10::Half*>(scale->data_ptr());
    h.groups = fmt == PC4 ? 0 : scale->size(-1);
  }
  if (fmt == PC4) {
    TORCH_CHECK(stage && row_of, "per-channel halves need their staging rows");
    h.stage = static_cast<const c10::Half*>(stage->data_ptr());
    h.rows = stage->size(1);
    h.row_of = row_of->data_ptr<int64_t>();
  }
  if (lut.numel() == 16) std::memcpy(&h.lut, lut.data_ptr<float>(), sizeof h.lut);
  if (fmt == LUT4) h.gsize = (int)(data.size(2) * 2 / h.groups);
  return h;
}

at::Tensor attend(const at::Tensor& q_in, const at::Tensor& k_data, const c10::optional<at::Tensor>& k_scale,
                  const c10::optional<at::Tensor>& k_stage, int64_t k_fmt, const at::Tensor& k_lut,
                  const at::Tensor& v_data, const c10::optional<at::Tensor>& v_scale,
                  const c10::optional<at::Tensor>& v_stage, int64_t v_fmt, const at::Tensor& v_lut,
                  const c10::optional<at::Tensor>& row_of, const at::Tensor& block_tables,
                  const at::Tensor& q_start, const at::Tensor& ctx_len, int64_t block_size, double scale,
                  int64_t max_rows, int64_t num_threads, int64_t rot_q, int64_t rot_out, int64_t window) {
  TORCH_CHECK(q_in.dim() == 3 && at::isFloatingType(q_in.scalar_type()), "q: [T, H, D], floating point");
  // fp32 inside; the output comes back in q's dtype (one op here, not two dispatches in Python)
  at::Tensor q = q_in.to(at::kFloat).contiguous();
  if (rot_q) {  // keys are stored rotated: rotate the queries alike
    if (q.is_same(q_in)) q = q_in.clone();
    float* p = q.data_ptr<float>();
    const int64_t D = q.size(2);
    at::parallel_for(0, q.size(0) * q.size(1), 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) fwht(p + i * D, D);
    });
  }
  if (k_fmt & FIXED_QUERY) {  // the query in fixed point (kv/fixed_point.py), every path
    if (q.is_same(q_in)) q = q_in.clone();
    round_query_rows(q.data_ptr<float>(), q.size(0) * q.size(1), q.size(2));
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && q_start.scalar_type() == at::kInt &&
                  ctx_len.scalar_type() == at::kInt,
              "block tables, query starts and context lengths are int32");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_data.size(0), G = H / KVH;
  TORCH_CHECK(D == 16 || D == 32 || D == 64 || D == 128 || D == 256, "head_dim must be 16, 32, 64, 128 or 256");
  const Half K = make_half(k_data, k_scale, k_stage, row_of, k_fmt, k_lut, block_size);
  const Half V = make_half(v_data, v_scale, v_stage, row_of, v_fmt, v_lut, block_size);
  const int64_t B = ctx_len.size(0), nblk = block_tables.size(1);
  const int32_t* qs = q_start.data_ptr<int32_t>();
  const int32_t* cl = ctx_len.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t qt = std::max<int64_t>(1, max_rows / G);  // queries per tile

  std::vector<Item> items;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t n = qs[b + 1] - qs[b];
    // Keys a query walks: its context, or at most the window and its chunk's own tokens.
    longest = std::max<int64_t>(longest, window > 0 ? std::min<int64_t>(cl[b], window + n) : cl[b]);
    for (int32_t q0 = 0; q0 < n; q0 += qt)
      for (int64_t h = 0; h < KVH; ++h)
        items.push_back({(int32_t)b, (int32_t)h, q0, (int32_t)std::min<int64_t>(qt, n - q0), 0, window});
  }
  // Too few items to keep every thread busy (one long sequence): split the context.
  int nsplit = 1;
  const int64_t threads = std::max<int64_t>(1, num_threads);
  if ((int64_t)items.size() < 2 * threads && longest >= 512)
    nsplit = (int)std::min<int64_t>((2 * threads + items.size() - 1) / items.size(), longest / 256);
  at::Tensor out = at::empty({T, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int bs = (int)block_size;
  const float sc = (float)scale;
  if (nsplit == 1) {
    // Items from a shared counter, not fixed halves: items of equal size still take unequal
    // time from memory (fp8 at 16 x 2048: one thread idled ~13% of the step at the barrier).
    // Each item writes its own rows, so the result does not depend on which thread ran it.
    // A worker claims its next item before it runs the current one, whose last blocks then
    // prefetch the next one's first rows (run_decode).
    std::atomic<int64_t> next{0};
    const int64_t n_items = (int64_t)items.size();
    at::parallel_for(0, std::min<int64_t>(threads, n_items), 1, [&](int64_t, int64_t) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_items;) {
        const int64_t j = next.fetch_add(1, std::memory_order_relaxed);
        Item it = items[i];
        if (j < n_items) it.next = &items[j];
        run_item(it, 1, qp, op, K, V, tables, nblk, qs, cl, H, G, D, bs, sc, nullptr);
        i = j;
      }
    });
    return rotate_rows(out, D, rot_out).to(q_in.scalar_type());
  }
  const int64_t rows = G * qt;
  std::vector<float> pm(items.size() * nsplit * rows), pl(pm.size()), pacc(pm.size() * D);
  at::parallel_for(0, items.size() * nsplit, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      Item it = items[i / nsplit];
      it.split = (int32_t)(i % nsplit);
      Partial part{pm.data() + i * rows, pl.data() + i * rows, pacc.data() + i * rows * D};
      run_item(it, nsplit, qp, op, K, V, tables, nblk, qs, cl, H, G, D, bs, sc, &part);
    }
  });
  at::parallel_for(0, items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Item& it = items[i];
      const int64_t tok0 = qs[it.seq] + it.q0;
      for (int qi = 0; qi < it.nq; ++qi)
        for (int g = 0; g < G; ++g) {
          const int r = qi * G + g;
          float mx = -INFINITY;
          for (int s = 0; s < nsplit; ++s) mx = std::max(mx, pm[(i * nsplit + s) * rows + r]);
          float l = 0.0f;
          float* dst = op + (tok0 + qi) * H * D + (it.head * G + g) * D;
          std::fill(dst, dst + D, 0.0f);
          for (int s = 0; s < nsplit; ++s) {
            const int64_t k = (i * nsplit + s) * rows + r;
            if (pm[k] == -INFINITY) continue;
            const float w = std::exp(pm[k] - mx);
            l += w * pl[k];
            for (int c = 0; c < D; ++c) dst[c] += w * pacc[k * D + c];
          }
          const float inv = l > 0 ? 1.0f / l : 0.0f;
          for (int c = 0; c < D; ++c) dst[c] *= inv;
        }
    }
  });
  return rotate_rows(out, D, rot_out).to(q_in.scalar_type());
}

#if defined(__AVX512F__)
// 16 finite fp32 values within the format's range -> fp8 bytes, c10's conversion lane by lane
// (Float8_e4m3fn / Float8_e5m2 from fp32: round to nearest even, subnormals through one
// float add): M = 3 mantissa bits and bias 7 (E4M3) or M = 2 and bias 15 (E5M2).
template <int M, int BIAS>
inline __m128i fp8_from_f32(__m512 v) {
  constexpr uint32_t denorm = (uint32_t)(127 - BIAS + (23 - M) + 1) << 23;  // c10's denorm_mask
  constexpr uint32_t normal = (uint32_t)(127 - BIAS + 1) << 23;             // smallest normal
  const __m512i bitsv = _mm512_castps_si512(v);
  const __m512i sign = _mm512_and_si512(bitsv, _mm512_set1_epi32((int)0x80000000u));
  const __m512i f = _mm512_xor_si512(bitsv, sign);
  // subnormal: add denorm_mask as floats, keep the low bits
  const __m512i sub = _mm512_sub_epi32(
      _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(f), _mm512_castsi512_ps(_mm512_set1_epi32((int)denorm)))),
      _mm512_set1_epi32((int)denorm));
  // normal: rebias, round to nearest even, shift
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(f, 23 - M), _mm512_set1_epi32(1));
  __m512i nor = _mm512_add_epi32(f, _mm512_set1_epi32((int)(((uint32_t)(BIAS - 127) << 23) + ((1u << (22 - M)) - 1))));
  nor = _mm512_srli_epi32(_mm512_add_epi32(nor, odd), 23 - M);
  const __mmask16 is_sub = _mm512_cmplt_epu32_mask(f, _mm512_set1_epi32((int)normal));
  __m512i r = _mm512_and_si512(_mm512_mask_blend_epi32(is_sub, nor, sub), _mm512_set1_epi32(0xFF));
  r = _mm512_or_si512(r, _mm512_srli_epi32(sign, 24));
  return _mm512_cvtepi32_epi8(r);
}
#endif

// Quantize-on-write, one pass per (token, kv head): absmax per group, fp16 scale, round or
// cast, store; the same arithmetic as KvFormat.quantize, so the bytes are identical.
void kv_write(const at::Tensor& x_in, const at::Tensor& slots, const at::Tensor& data, const c10::optional<at::Tensor>& scale,
           int64_t fmt, double qmax_d, const at::Tensor& mids, int64_t rotate) {
  TORCH_CHECK(x_in.dim() == 3 && at::isFloatingType(x_in.scalar_type()), "x: [T, H, D], floating point");
  fmt &= FIXED_QUERY - 1;  // the stored bytes do not depend on how queries are dotted
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  TORCH_CHECK(slots.scalar_type() == at::kLong, "slots are int64");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), S = data.size(1);
  const float* xp = x.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  uint8_t* dp = static_cast<uint8_t*>(data.data_ptr());
  const int64_t es = data.element_size();
  const int64_t dd = data.size(2);
  c10::Half* scp = scale && scale->defined() ? static_cast<c10::Half*>(scale->data_ptr()) : nullptr;
  const int64_t groups = scp ? scale->size(-1) : 1;
  const float qmax = (float)qmax_d;
  const bool codebook = mids.numel() > 0;
  const float* mp = codebook ? mids.data_ptr<float>() : nullptr;
  const int64_t nmid = mids.numel();
  at::parallel_for(0, T * H, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> qv(D), rot(D);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i / H, h = i % H;
      const float* src = xp + (t * H + h) * D;
      if (rotate) {  // the format stores vectors rotated
        std::memcpy(rot.data(), src, D * sizeof(float));
        fwht(rot.data(), D);
        src = rot.data();
      }
      const int64_t row = h * S + sp[t];
      uint8_t* dst = dp + row * dd * es;
      switch (fmt) {
        case F32:
          std::memcpy(dst, src, D * sizeof(float));
          continue;
        case F16: {
          int64_t c = 0;
#if defined(__AVX512F__)  // round to nearest even, as c10::Half: the same bytes, 16 at a time
          for (; c + 16 <= D; c += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * c),
                                _mm512_cvtps_ph(_mm512_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT));
#endif
          for (; c < D; ++c) reinterpret_cast<c10::Half*>(dst)[c] = c10::Half(src[c]);
          continue;
        }
        case BF16:
          for (int64_t c = 0; c < D; ++c) reinterpret_cast<c10::BFloat16*>(dst)[c] = c10::BFloat16(src[c]);
          continue;
        default:
          break;
      }
      const int64_t gsize = D / groups;
      const bool round = fmt == I8 || (fmt == LUT4 && !codebook);
      const auto group_scale = [&](int64_t g, float amax) {  // fp16 scale, stored and returned
        const float s = (float)c10::Half(std::min(std::max(amax / qmax, MIN_SCALE), FP16_MAX));
        scp[row * groups + g] = c10::Half(s);
        return s;
      };
      bool vectorised = false;
#if defined(__AVX512F__)
      if (gsize % 16 == 0) {  // the same operations, 16 lanes at a time (division, clamp and
        // round to nearest even are exact per lane, so the bytes match the scalar loop's)
        for (int64_t g = 0; g < groups; ++g) {
          __m512 m = _mm512_setzero_ps();
          for (int64_t c = g * gsize; c < (g + 1) * gsize; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(src + c)));
          const __m512 sv = _mm512_set1_ps(group_scale(g, _mm512_reduce_max_ps(m))), lo = _mm512_set1_ps(-qmax), hi = _mm512_set1_ps(qmax);
          for (int64_t c = g * gsize; c < (g + 1) * gsize; c += 16) {
            __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(_mm512_loadu_ps(src + c), sv), lo), hi);
            if (round) v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m128i* out = reinterpret_cast<__m128i*>(dst + c);
            if (fmt == I8)
              _mm_storeu_si128(out, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
            else if (fmt == E4M3)
              _mm_storeu_si128(out, fp8_from_f32<3, 7>(v));
            else if (fmt == E5M2)
              _mm_storeu_si128(out, fp8_from_f32<2, 15>(v));
            else
              _mm512_storeu_ps(qv.data() + c, v);
          }
        }
        if (fmt == I8 || fmt == E4M3 || fmt == E5M2) continue;  // bytes stored
        vectorised = true;
      }
#endif
      for (int64_t g = 0; g < groups && !vectorised; ++g) {
        float amax = 0.0f;
        for (int64_t c = g * gsize; c < (g + 1) * gsize; ++c) amax = std::max(amax, std::fabs(src[c]));
        const float s = group_scale(g, amax);
        for (int64_t c = g * gsize; c < (g + 1) * gsize; ++c) {
          float v = std::min(std::max(src[c] / s, -qmax), qmax);
          if (round) v = std::nearbyint(v);
          qv[c] = v;
        }
      }
      switch (fmt) {
        case I8:
          for (int64_t c = 0; c < D; ++c) reinterpret_cast<int8_t*>(dst)[c] = (int8_t)qv[c];
          break;
        case E4M3:
          for (int64_t c = 0; c < D; ++c) dst[c] = c10::Float8_e4m3fn(qv[c]).x;
          break;
        case E5M2:
          for (int64_t c = 0; c < D; ++c) dst[c] = c10::Float8_e5m2(qv[c]).x;
          break;
        case LUT4:
          for (int64_t c = 0; c < D; c += 2) {
            int lo4, hi4;
            if (codebook) {
              lo4 = hi4 = 0;
              for (int64_t k = 0; k < nmid; ++k) {
                lo4 += mp[k] < qv[c];
                hi4 += mp[k] < qv[c + 1];
              }
            } else {
              lo4 = (int)qv[c] + 8;
              hi4 = (int)qv[c + 1] + 8;
            }
            dst[c / 2] = (uint8_t)(lo4 | (hi4 << 4));
          }
          break;
        default:
          TORCH_CHECK(false, "unknown KV format code ", fmt);
      }
    }
  });
}

}  // namespace

namespace ferrolm {
at::Tensor attend(const at::Tensor& q, const at::Tensor& k_data, const c10::optional<at::Tensor>& k_scale,
                  const c10::optional<at::Tensor>& k_stage, int64_t k_fmt, const at::Tensor& k_lut,
                  const at::Tensor& v_data, const c10::optional<at::Tensor>& v_scale,
                  const c10::optional<at::Tensor>& v_stage, int64_t v_fmt, const at::Tensor& v_lut,
                  const c10::optional<at::Tensor>& row_of, const at::Tensor& block_tables,
                  const at::Tensor& q_start, const at::Tensor& ctx_len, int64_t block_size, double scale,
                  int64_t max_rows, int64_t num_threads, int64_t rot_q, int64_t rot_out, int64_t window) {
  return ::attend(q, k_data, k_scale, k_stage, k_fmt, k_lut, v_data, v_scale, v_stage, v_fmt, v_lut, row_of,
                  block_tables, q_start, ctx_len, block_size, scale, max_rows, num_threads, rot_q, rot_out, window);
}
void kv_write(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& data,
              const c10::optional<at::Tensor>& scale, int64_t fmt, double qmax, const at::Tensor& mids,
              int64_t rotate) {
  ::kv_write(x, slots, data, scale, fmt, qmax, mids, rotate);
}
}  // namespace ferrolm

TORCH_LIBRARY(ferrolm_cpu, m) {
  m.def(
      "attend(Tensor q, Tensor k_data, Tensor? k_scale, Tensor? k_stage, int k_fmt, Tensor k_lut, Tensor v_data, "
      "Tensor? v_scale, Tensor? v_stage, int v_fmt, Tensor v_lut, Tensor? row_of, Tensor block_tables, "
      "Tensor q_start, Tensor ctx_len, int block_size, float scale, int max_rows, int num_threads, int rot_q, "
      "int rot_out, int window=0) -> Tensor");
  m.def("write(Tensor x, Tensor slots, Tensor(a!) data, Tensor(b!)? scale, int fmt, float qmax, Tensor mids, int rotate) -> ()");
}

TORCH_LIBRARY_IMPL(ferrolm_cpu, CPU, m) {
  m.impl("attend", &attend);
  m.impl("write", &kv_write);
}
