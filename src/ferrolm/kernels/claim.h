// Work claimed from a shared counter (the attention's items, the AMX linears' tiles and the
// head's strips) instead of a fixed share per thread: equal shares still take unequal time
// (memory, and the VM's two vCPUs do not run equally fast), and a fixed half left one thread
// idle at the barrier while the other finished.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace {

// [0, n) in contiguous chunks over at most `threads` workers: with_thread(run) once per
// worker (its setup around the loop), run(body) calls body(lo, hi, then) for each chunk the
// worker claims, `then` the first index of its next chunk, claimed before this one runs so
// that this chunk's last piece can ask for its rows (-1: none). Chunks shrink as the work
// runs out (guided): each is the rest / (2 workers), at most max_chunk and at least
// min_chunk, so the last ones are small and the workers finish together: with fixed chunks
// of an eighth, a worker idled while the other ran its last chunk (perf: 4-5% of an int4
// 16 x 2048 step's worker samples in the barrier while the main thread ran Q4 tiles); guided,
// in-process A/B alternating steps: int4 16 x 2048 0.967-0.973x the step, fp16 16 x 128
// 0.958x. Chunks write disjoint outputs, so results do not depend on which worker ran which.
template <class F>
void claim_chunks(int64_t n, int64_t max_chunk, int64_t threads, F&& with_thread, int64_t min_chunk = 1) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(1, threads), (n + max_chunk - 1) / max_chunk);
  min_chunk = std::min(min_chunk, max_chunk);
  const auto size_at = [&](int64_t lo) { return std::clamp((n - lo) / (2 * workers), min_chunk, max_chunk); };
  const auto claim = [&]() {
    int64_t lo = next.load(std::memory_order_relaxed);
    while (lo < n && !next.compare_exchange_weak(lo, lo + size_at(lo), std::memory_order_relaxed)) {
    }
    return lo;
  };
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    with_thread([&](auto&& body) {
      for (int64_t lo = claim(); lo < n;) {
        const int64_t then = claim();
        body(lo, std::min(n, lo + size_at(lo)), then < n ? then : -1);
        lo = then;
      }
    });
  });
}

}  // namespace
