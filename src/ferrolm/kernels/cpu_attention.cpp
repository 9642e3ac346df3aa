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
// online softmax; query heads sharing the kv head share every conversion. The shared types
// and row loads are in attention_common.h, the decode path's kernel in attention_decode.h.

#include "attention_common.h"
#include "claim.h"
#include "ops.h"

namespace {

using namespace ferrolm_attention;


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

// Rows of q (fp32, after the rotation) -> round(q / 2^e) * 2^e in place, row by row.
void round_query_rows(float* q, int64_t rows, int64_t D) {
  at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {  // a decode step's rows: inline
    for (int64_t i = lo; i < hi; ++i) {
      float* x = q + i * D;
      if (register_dim(D)) {
        with_nc((int)D, [&](auto NC) {
          v16 v[NC()];
          for (int c = 0; c < NC(); ++c) v[c] = load16(x + 16 * c);
          round_fixed<NC()>(v);
          for (int c = 0; c < NC(); ++c) store16(x + 16 * c, v[c]);
        });
        continue;
      }
      float amax = 0.0f;
      for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
      const int e = query_exponent(amax);
      const float down = pow2(-e), up = pow2(e);
      for (int64_t d = 0; d < D; ++d) x[d] = std::nearbyint(x[d] * down) * up;
    }
  });
}

// The decode path applies: one query, at most 4 heads per kv head, no per-channel halves.
inline bool decode_path(const Item& it, int G, int D, const Half& K, const Half& V) {
  if (it.nq != 1 || G > 4 || K.fmt == PC4 || V.fmt == PC4) return false;
  return (K.fmt != LUT4 && V.fmt != LUT4) || D % 32 == 0;
}

// Head dims 64 and 128 with one format for both halves (or int8 keys over 4-bit values) get
// code of their own, every conversion inline; other shapes and pairs pick the format per row.
template <int NC>
void run_decode_g(const Item& it, int nsplit, const float* q, float* out, const Half& K, const Half& V,
                  const int32_t* tables, int64_t nblk, const int32_t* q_start, const int32_t* ctx_len, int H, int G,
                  int bs, float scale, Partial* part, int qx) {
#define FERROLM_DECODE(KF, VF) \
  return run_decode_r<NC, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, G, bs, scale, part, qx)
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
              int D, int bs, float scale, Partial* part, int qx = 0) {
  if (decode_path(it, G, D, K, V)) {
    return with_nc(D, [&](auto NC) {
      run_decode_g<NC()>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, G, bs, scale, part, qx);
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
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && q_start.scalar_type() == at::kInt &&
                  ctx_len.scalar_type() == at::kInt,
              "block tables, query starts and context lengths are int32");
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
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

  // fp32 inside; the output comes back in q's dtype (one op here, not two dispatches in Python).
  // Keys stored rotated take queries rotated alike, fixed-point keys queries rounded
  // (kv/fixed_point.py), values stored rotated give outputs rotated back. In a decode call
  // (every item on the decode path) the items do that to their own rows in registers (qx);
  // otherwise passes over q and the output here do (~20 us and two parallel regions per
  // 16-sequence call, ~0.6 ms of a 30-layer step).
  const bool decode_only = std::all_of(items.begin(), items.end(),
                                       [&](const Item& it) { return decode_path(it, (int)G, (int)D, K, V); });
  // A one-pass decode call over bf16 q (the bf16 compute dtype) reads q and writes the output
  // in bf16 itself (QX_BF16): two casts of the whole q and output less per layer.
  const bool bf16_io =
      decode_only && nsplit == 1 && q_in.scalar_type() == at::kBFloat16 && q_in.is_contiguous();
  at::Tensor q = bf16_io ? q_in : q_in.to(at::kFloat).contiguous();
  int qx = 0;
  if (decode_only) {
    qx = (rot_q ? QX_ROTATE_Q : 0) | (K.fixed_query ? QX_ROUND_Q : 0) | (rot_out && nsplit == 1 ? QX_ROTATE_OUT : 0) |
         (bf16_io ? QX_BF16 : 0);
  } else {
    if (rot_q) {
      if (q.is_same(q_in)) q = q_in.clone();
      float* p = q.data_ptr<float>();
      at::parallel_for(0, T * H, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) fwht(p + i * D, D);
      });
    }
    if (K.fixed_query) {
      if (q.is_same(q_in)) q = q_in.clone();
      round_query_rows(q.data_ptr<float>(), T * H, D);
    }
  }
  const int64_t rot_after = (qx & QX_ROTATE_OUT) ? 0 : rot_out;
  at::Tensor out = at::empty({T, H * D}, q.options());
  const float* qp = static_cast<const float*>(q.data_ptr());  // bf16 rows under QX_BF16
  float* op = static_cast<float*>(out.data_ptr());
  const int bs = (int)block_size;
  const float sc = (float)scale;
  if (nsplit == 1) {
    // Items from a shared counter, not fixed halves: items of equal size still take unequal
    // time from memory (fp8 at 16 x 2048: one thread idled ~13% of the step at the barrier).
    // A worker claims its next item before it runs the current one, whose last blocks then
    // prefetch the next one's first rows (run_decode).
    claim_chunks((int64_t)items.size(), 1, threads, [&](auto&& run) {
      run([&](int64_t i, int64_t, int64_t then) {
        Item it = items[i];
        if (then >= 0) it.next = &items[then];
        run_item(it, 1, qp, op, K, V, tables, nblk, qs, cl, H, G, D, bs, sc, nullptr, qx);
      });
    });
    return rotate_rows(out, D, rot_after).to(q_in.scalar_type());
  }
  const int64_t rows = G * qt;
  std::vector<float> pm(items.size() * nsplit * rows), pl(pm.size()), pacc(pm.size() * D);
  at::parallel_for(0, items.size() * nsplit, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      Item it = items[i / nsplit];
      it.split = (int32_t)(i % nsplit);
      Partial part{pm.data() + i * rows, pl.data() + i * rows, pacc.data() + i * rows * D};
      run_item(it, nsplit, qp, op, K, V, tables, nblk, qs, cl, H, G, D, bs, sc, &part, qx);
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
  return rotate_rows(out, D, rot_after).to(q_in.scalar_type());
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
        case LUT4: {
          int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
          // 16 values at a time: the code of each (round: q + 8; codebook: how many midpoints
          // lie below it, one compare per midpoint for all 16 lanes), then pairs packed low
          // nibble first by a multiply-add of the byte pairs (lo + 16 hi): the scalar loop's bytes
          for (; c + 16 <= D; c += 16) {
            const __m512 v = _mm512_loadu_ps(qv.data() + c);
            __m512i code;
            if (codebook) {
              code = _mm512_setzero_si512();
              for (int64_t k = 0; k < nmid; ++k)
                code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(_mm512_set1_ps(mp[k]), v, _CMP_LT_OQ), code,
                                             _mm512_set1_epi32(1));
            } else {
              code = _mm512_add_epi32(_mm512_cvttps_epi32(v), _mm512_set1_epi32(8));
            }
            const __m128i bytes = _mm512_cvtepi32_epi8(code);
            const __m128i pairs = _mm_maddubs_epi16(bytes, _mm_set1_epi16(0x1001));  // lo * 1 + hi * 16
            _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + c / 2), _mm_packus_epi16(pairs, pairs));
          }
#endif
          for (; c < D; c += 2) {
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
        }
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

