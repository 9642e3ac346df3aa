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

// [0, n) in contiguous chunks of `chunk` over at most `threads` workers: with_thread(run) once
// per worker (its setup around the loop), run(body) calls body(lo, hi, then) for each chunk
// the worker claims, `then` the first index of its next chunk, claimed before this one runs
// so that this chunk's last piece can ask for its rows (-1: none). Chunks write disjoint
// outputs, so results do not depend on which worker ran which chunk.
template <class F>
void claim_chunks(int64_t n, int64_t chunk, int64_t threads, F&& with_thread) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(1, threads), (n + chunk - 1) / chunk);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    with_thread([&](auto&& body) {
      for (int64_t lo = next.fetch_add(chunk, std::memory_order_relaxed); lo < n;) {
        const int64_t then = next.fetch_add(chunk, std::memory_order_relaxed);
        body(lo, std::min(n, lo + chunk), then < n ? then : -1);
        lo = then;
      }
    });
  });
}

}  // namespace
