// The decode path's kernel (one query, G <= 4 heads of one kv head, every value in
// registers), included only by the attention_decode_*.cpp files, each of which instantiates
// run_decode_r for some format pairs (FERROLM_DECODE_INSTANCE).
#pragma once

#include "attention_common.h"

namespace ferrolm_attention {

// Tiles whose scores share one softmax update: a block of 128 keys at most. Per chunk, one
// maximum per row (not per tile), one rescaling of the accumulators, and the values' pass
// over all its keys with the accumulators in registers; the running sums stay vectors.
constexpr int CHUNK = 8;

template <int NC, int R, int KF, int VF>
void run_decode(const Item& it, int nsplit, const float* q, float* out, const Half& K, const Half& V,
                const int32_t* tables, int64_t nblk, const int32_t* q_start, const int32_t* ctx_len, int H, int bs,
                float scale, Partial* part, int qx) {
  constexpr int D = 16 * NC;
  const bool k_lut = KF == ANY ? K.fmt == LUT4 : KF == LUT4;
  const bool v_lut = VF == ANY ? V.fmt == LUT4 : VF == LUT4;
  // fp8 E4M3 rows by bit placement, in pair order (e4m3_row_pairs): keys where the queries
  // times 2^120 stay finite (k_e4m3, decided per item), values always in pair order (a chunk
  // whose scales are too large for 2^120 converts them the fp16 way: v_e4m3_fast)
  constexpr bool k_e4 = E4M3_PAIRS && KF == E4M3 && NC % 2 == 0;
  constexpr bool v_e4 = E4M3_PAIRS && VF == E4M3 && NC % 2 == 0;
  const int b = it.seq;
  const int64_t tok0 = q_start[b] + it.q0;
  const int64_t n_new = q_start[b + 1] - q_start[b];
  const int64_t pos = ctx_len[b] - n_new + it.q0;
  const int64_t keys = pos + 1;
  const int64_t tiles_per_block = (bs + TILE - 1) / TILE;
  const auto [t_begin, t_end, first_key] = tile_range(it, nsplit, pos, keys, bs);
  const int64_t head = it.head;
  const int64_t kdd = k_lut ? D / 2 : D, vdd = v_lut ? D / 2 : D;

  // Integer dots where the CPU has VNNI and the keys' codes are integers (int8; int4 in
  // groups of at least 32), over the query in fixed point (rounded by attend or above).
  constexpr bool i8_dots = INT8_DOTS && KF == I8 && NC % 4 == 0;
  constexpr bool i4_dots = INT8_DOTS && KF == LUT4 && (NC == 4 || NC == 8);
  const bool int_dots = (i8_dots || i4_dots) && K.fixed_query && (!i4_dots || K.gsize >= 32);
  FixedQuery<i8_dots ? NC : 1> fq[R];
  FixedQuery4<i4_dots ? NC : 4> fq4[R];
  v16 qv[R][NC], acc[R][NC], lsum[R];
  float m[R];
  for (int r = 0; r < R; ++r) {
    const int64_t qrow = tok0 * H * D + (head * R + r) * D;
    for (int c = 0; c < NC; ++c)
      qv[r][c] = (qx & QX_BF16) ? from_bf16(reinterpret_cast<const c10::BFloat16*>(q) + qrow + 16 * c)
                                : load16(q + qrow + 16 * c);
    if (qx & QX_ROTATE_Q) fwht_regs<NC>(qv[r]);
    if (qx & QX_ROUND_Q) round_fixed<NC>(qv[r]);
  }
  bool k_e4m3 = false;  // this item's keys by bit placement: its queries times 2^120
  if constexpr (k_e4) {
    v16 mx{};
    for (int r = 0; r < R; ++r) mx = abs_max<NC>(qv[r], mx);
    k_e4m3 = hmax(mx) < 256.0f;  // false for a NaN
    if (k_e4m3)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < NC; ++c) qv[r][c] *= TWO_POW_120;
  }
  const float kscale = k_e4m3 ? scale / K.factor : scale;  // the keys' factor (256) not in their values
  for (int r = 0; r < R; ++r) {
    if constexpr (i4_dots)
      if (int_dots) fq4[r] = fixed_query4<NC>(qv[r], K.gsize);  // before nibble order
    if (k_lut || k_e4m3)
      for (int s = 0; s < NC / 2; ++s) to_pairs(qv[r][2 * s], qv[r][2 * s + 1]);
    for (int c = 0; c < NC; ++c) acc[r][c] = v16{};
    m[r] = -INFINITY;
    lsum[r] = v16{};
  }
  v16 lane;
  for (int j = 0; j < TILE; ++j) lane[j] = (float)j;
  // 4-bit values in groups of 32 or more: each group's scale is folded into the
  // probabilities (one vector per group and tile) instead of multiplied into every value.
  constexpr bool v_fold_code = VF == LUT4 && (NC == 4 || NC == 8);
  constexpr int VG = v_fold_code ? NC / 2 : 1;  // groups of >= 32 values
  const bool v_fold = v_fold_code && V.gsize >= 32;
  int span_group[VG];  // the group of each 32-value span
  for (int sp = 0; sp < VG; ++sp) span_group[sp] = v_fold ? 32 * sp / V.gsize : 0;
  if constexpr (i8_dots)
    if (int_dots)
      for (int r = 0; r < R; ++r) fq[r] = fixed_query<NC>(qv[r]);

  // (block, tile within it) of the next chunk, advanced as tiles are consumed (no division
  // per tile); rows are prefetched from the block pf_ahead blocks on (>= PF_KEYS keys ahead)
  int64_t bi = t_begin / tiles_per_block, ti = t_begin % tiles_per_block;
  const int64_t pf_ahead = std::max<int64_t>(1, PF_KEYS / bs);
  // The first pf_ahead blocks have no key that far before them: their tiles are asked for
  // PREFETCH_TILES ahead, as the general path does (pbi, pti: that tile).
  const int64_t pf_cover = bi + pf_ahead;
  const int64_t blocks = (t_end + tiles_per_block - 1) / tiles_per_block;  // this item's last block + 1
  // Bytes per key row: compile-time constants where the format pair is compiled in (a row's
  // prefetches unrolled, addresses by shifts), the Halves' sizes for the ANY pairs.
  constexpr int64_t KROW = row_bytes(KF, D), VROW = row_bytes(VF, D);
  const int64_t krow = KROW > 0 ? KROW : kdd * K.elem, vrow = VROW > 0 ? VROW : vdd * V.elem;
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
    bool v_e4m3_fast = v_e4;  // this chunk's values by bit placement
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
        // The tile's key rows pf_ahead blocks on, a line per dword of the transposed tile
        // (the other paths ask per key below).
        const int pf_lines = off < pf_rows ? (int)((std::min<int64_t>(TILE, pf_rows - off) * krow + 63) / 64) : 0;
        const char* kpf_tile = kpf + off * krow;
        if constexpr (i8_dots) int8_scores<NC, R>(kbase, n, fq, raw, kpf_tile, pf_lines);
        if constexpr (i4_dots)
          int4_scores<NC, R>(kbase, n, kgs, (int)K.groups, K.gsize, fq4, raw, kpf_tile, pf_lines);
#endif
      } else {
        v16 part_dot[R][TILE];
        for (int j = 0; j < n; ++j) {
          if (off + j < pf_rows) prefetch_row(kpf, off + j, krow);
          v16 kc[NC];
          if (k_e4 && k_e4m3)
            e4m3_row_pairs<NC>(kbase + j * krow, kc);
          else
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
      const v16 km = token_scales(K, head, slot, n) * kscale;
      for (int r = 0; r < R; ++r) {
        v16 s = raw[r] * km;
        s = lane < (float)n ? s : splat(-INFINITY);
        if (first_key > key0) s = lane >= (float)(first_key - key0) ? s : splat(-INFINITY);  // window
        sc[r][u] = s;
      }
      vm[u] = token_scales(V, head, slot, n);
      if constexpr (v_e4) v_e4m3_fast &= all_less(vm[u], 256.0f * V.factor);  // the scales < 256
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
    if (v_e4m3_fast)  // the probabilities times 2^120 (the scales carry the format's 256 already)
      for (int u = 0; u < used; ++u) vm[u] *= TWO_POW_120 / V.factor;
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
            if ((ti + u) * TILE + j < pf_rows) prefetch_row(vpf, (ti + u) * TILE + j, vrow);
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
        if ((ti + u) * TILE + j < pf_rows) prefetch_row(vpf, (ti + u) * TILE + j, vrow);
        v16 vc[NC];
        if constexpr (v_e4) {
          if (v_e4m3_fast)
            e4m3_row_pairs<NC>(vbase + j * vrow, vc);
          else
            e4m3_row_pairs_256<NC>(vbase + j * vrow, vc);
        } else {
          load_as<NC, VF>(V, vbase + j * vrow, vgs ? vgs + j * V.groups : nullptr, vc);
        }
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
    if (v_lut || v_e4)  // back from nibble (pair) order
      for (int s = 0; s < NC / 2; ++s) from_pairs(acc[r][2 * s], acc[r][2 * s + 1]);
    if (part) {  // rotated back (QX_ROTATE_OUT) after the merge
      part->m[r] = m[r];
      part->l[r] = l;
      for (int c = 0; c < NC; ++c) store16(part->acc + r * D + 16 * c, acc[r][c]);
      continue;
    }
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    const int64_t orow = tok0 * H * D + (head * R + r) * D;
    for (int c = 0; c < NC; ++c) acc[r][c] *= inv;
    if (qx & QX_ROTATE_OUT) fwht_regs<NC>(acc[r]);
    for (int c = 0; c < NC; ++c) {
      if (qx & QX_BF16) {
        const u16x16 h = to_bf16(acc[r][c]);
        std::memcpy(reinterpret_cast<c10::BFloat16*>(out) + orow + 16 * c, &h, sizeof h);
      } else {
        store16(out + orow + 16 * c, acc[r][c]);
      }
    }
  }
}

template <int NC, int KF, int VF>
void run_decode_r(FERROLM_DECODE_PARAMS) {
  switch (G) {
    case 1: return run_decode<NC, 1, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, bs, scale, part, qx);
    case 2: return run_decode<NC, 2, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, bs, scale, part, qx);
    case 3: return run_decode<NC, 3, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, bs, scale, part, qx);
    default: return run_decode<NC, 4, KF, VF>(it, nsplit, q, out, K, V, tables, nblk, q_start, ctx_len, H, bs, scale, part, qx);
  }
}

#define FERROLM_DECODE_INSTANCE(NC, KF, VF) template void run_decode_r<NC, KF, VF>(FERROLM_DECODE_PARAMS);

}  // namespace ferrolm_attention
