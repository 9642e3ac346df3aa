// Does compute overlap a memory stream on this CPU, and what does software prefetch add?
// One thread streams a 1 GiB buffer (2 MiB pages where THP allows) 64 bytes at a time and
// does W independent FMAs per line, with no prefetch or one PREFETCHT0 / T1 per line PF bytes
// ahead; the same loop over a 1 MiB buffer (in L2) gives the compute alone. Prints ns per
// line. The decode kernel's per-key prefetch (kernels/cpu_attention.cpp, PF_KEYS) rests on
// it: on the 2-core Xeon VM of the README (2026-12-01), W = 16 took 8.1 ns per line from
// memory without prefetch, 3.5 with one PREFETCHT0 per line 4 KB ahead and 3.3 in L2 (W = 24:
// 10.6, 4.4, 4.4); at W <= 8 the hardware prefetcher alone kept up (3.9 vs 2.2 in L2). Not part of the package or the tests:
//
//     g++ -O2 -march=native -std=c++17 bench/stream_prefetch.cpp -o /tmp/stream_prefetch && /tmp/stream_prefetch
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>

template <int W, int PF, _mm_hint HINT>
double run(const char* buf, size_t n, float* sink) {
  const auto t0 = std::chrono::steady_clock::now();
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(0.999f);
  for (size_t off = 0; off < n; off += 64) {
    if (PF) _mm_prefetch(buf + off + PF, HINT);
    const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(buf + off));
    acc[0] = _mm512_add_ps(acc[0], v);
#pragma GCC unroll 64
    for (int w = 0; w < W; ++w) acc[1 + w % 7] = _mm512_fmadd_ps(acc[1 + w % 7], m, v);
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m512 s = acc[0];
  for (int i = 1; i < 8; ++i) s = _mm512_add_ps(s, acc[i]);
  *sink += _mm512_reduce_add_ps(s);
  return std::chrono::duration<double>(t1 - t0).count();
}

template <int W, int PF, _mm_hint HINT = _MM_HINT_T0>
void row(const char* big, size_t n, const char* small, size_t ns, float* sink, const char* hint) {
  double mem = 1e9, l2 = 1e9;
  for (int r = 0; r < 3; ++r) {
    mem = std::min(mem, run<W, PF, HINT>(big, n, sink));
    double t = 0;
    for (int k = 0; k < 512; ++k) t += run<W, PF, HINT>(small, ns, sink);
    l2 = std::min(l2, t / 512);
  }
  std::printf("| %2d | %5d | %s | %6.2f | %6.2f |\n", W, PF, PF ? hint : "-", mem * 1e9 / (n / 64), l2 * 1e9 / (ns / 64));
}

int main() {
  const size_t n = size_t(1) << 30, ns = size_t(1) << 20;
  char* big = static_cast<char*>(mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (big == MAP_FAILED) return 1;
  madvise(big, n, MADV_HUGEPAGE);
  std::memset(big, 1, n);
  char* small = static_cast<char*>(aligned_alloc(64, ns));
  std::memset(small, 1, ns);
  float sink = 0;
  std::printf("| FMAs per line | prefetch bytes ahead | hint | ns per line from memory | ns per line in L2 |\n");
  std::printf("|---|---|---|---|---|\n");
  row<0, 0>(big, n, small, ns, &sink, "");
  row<8, 0>(big, n, small, ns, &sink, "");
  row<16, 0>(big, n, small, ns, &sink, "");
  row<24, 0>(big, n, small, ns, &sink, "");
  row<8, 4096>(big, n, small, ns, &sink, "T0");
  row<16, 4096>(big, n, small, ns, &sink, "T0");
  row<24, 4096>(big, n, small, ns, &sink, "T0");
  row<16, 4096, _MM_HINT_T1>(big, n, small, ns, &sink, "T1");
  row<16, 16384>(big, n, small, ns, &sink, "T0");
  std::printf("(checksum %g)\n", sink);
}
