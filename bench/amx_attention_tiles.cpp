// Would AMX tiles pay for decode attention on this CPU? The tile unit's share alone of an
// attention chunk of 64 keys at head dim 64 with 3 query heads per kv head (SmolLM2-135M), as
// the fp8 decode kernel tried on 2026-12-03 (docs/cpu_performance_log.md, "eighth session")
// would run it: scores = 4 key tiles (16 keys x 32 dims, two products each against the
// query's two 32-dim halves, one store), values = 2 groups of 32 keys x 4 sets of 16 dims
// (probability rows as A, two output tiles per pass, two passes). Also one tile product's
// throughput with four independent accumulators: on a shared VM it moves over minutes.
// Prints ns per chunk (divide by 64 for a key). Not part of the package or the tests:
//
//     g++ -O2 -march=native -std=c++17 bench/amx_attention_tiles.cpp -o /tmp/amx_tiles && /tmp/amx_tiles
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

alignas(64) static uint16_t pb[2][6][32], vb[2][4][16][32], ks[64][64], full[2][16][32];
alignas(64) static uint32_t bq[2][16][8];
alignas(64) static float ob[4][6][16], sb[4][128], cb[4][16][16];

template <class F>
double ns_per(long n, F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) f();
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / n;
}

int main() {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return std::puts("no AMX permission"), 1;
  for (auto* buf : {&pb[0][0][0], &vb[0][0][0][0], &ks[0][0], &full[0][0][0]})
    for (int i = 0; i < 512; ++i) buf[i] = 0x3f80;  // bf16 1.0 in the first rows
  static TileConfig cfg;
  for (int t : {1, 5}) cfg.rows[t] = 16, cfg.colsb[t] = 64;                 // key tile / value tile
  for (int t : {0, 2, 3}) cfg.rows[t] = 16, cfg.colsb[t] = 32;              // scores, query halves
  for (int t : {4, 6, 7}) cfg.rows[t] = 6, cfg.colsb[t] = 64;               // probabilities, outputs
  _tile_loadconfig(&cfg);
  const long N = 100000;
  _tile_loadd(2, bq[0], 32);
  _tile_loadd(3, bq[1], 32);
  const double scores = ns_per(N, [] {
    for (int u = 0; u < 4; ++u) {
      _tile_zero(0);
      _tile_loadd(1, ks[16 * u], 128);
      _tile_dpbf16ps(0, 1, 2);
      _tile_loadd(1, ks[16 * u] + 32, 128);
      _tile_dpbf16ps(0, 1, 3);
      _tile_stored(0, sb[u], 32);
    }
  });
  const double values = ns_per(N, [] {
    for (int half = 0; half < 2; ++half) {
      _tile_zero(6);
      _tile_zero(7);
      for (int g = 0; g < 2; ++g) {
        _tile_loadd(4, pb[g], 64);
        _tile_loadd(5, vb[g][2 * half], 64);
        _tile_dpbf16ps(6, 4, 5);
        _tile_loadd(5, vb[g][2 * half + 1], 64);
        _tile_dpbf16ps(7, 4, 5);
      }
      _tile_stored(6, ob[2 * half], 64);
      _tile_stored(7, ob[2 * half + 1], 64);
    }
  });
  _tile_release();
  static TileConfig fullcfg;
  for (int t = 0; t < 8; ++t) fullcfg.rows[t] = 16, fullcfg.colsb[t] = 64;
  _tile_loadconfig(&fullcfg);
  _tile_loadd(4, full[0], 64);
  _tile_loadd(5, full[1], 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const double product = ns_per(N, [] {
                           _tile_dpbf16ps(0, 4, 5);
                           _tile_dpbf16ps(1, 4, 5);
                           _tile_dpbf16ps(2, 4, 5);
                           _tile_dpbf16ps(3, 4, 5);
                         }) / 4;
  _tile_stored(0, cb[0], 64);
  _tile_release();
  std::printf("one tile product (16x16x32 bf16, 4 accumulators): %.1f ns\n", product);
  std::printf("per 64-key chunk: scores' tiles %.0f ns, values' tiles %.0f ns (%.1f ns a key)\n", scores, values,
              (scores + values) / 64);
  return 0;
}
