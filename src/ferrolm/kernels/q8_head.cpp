// The GGUF Q8_0 output head as shipped: the fp32 GEMV, bf16 products with each row's top
// rescored (AVX512-BF16 or AMX, under bf16 compute), exact-weight AMX tiles (fp32 compute).
#include "quant_rows.h"

namespace {

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr int64_t Q8_BF16_MIN_ROWS = 16;  // q8_linear: x rounded to bf16 from here on (see there)
constexpr int64_t Q8_BF16_MAX_K = 4096;  // (the error bound's 2^-13 covers this many terms)
constexpr float Q8_BF16_ERR = 128.0f * (1.0f / 256 + 1.0f / 8192);  // per |d| and block sum|x| (q8_linear_bf16)

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
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
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

TORCH_LIBRARY_FRAGMENT(ferrolm_cpu, m) {
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scales, bool bf16_products=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(ferrolm_cpu, CPU, m) {
  m.impl("q8_linear", &q8_linear);
}
