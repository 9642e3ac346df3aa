// One core's cost per key of the decode kernel (kernels/attention_decode.h), per KV format,
// with its cache held in the core's caches (one sequence, called again and again: in L2 up
// to ~2,048 keys of fp16 on a 2 MiB L2) and streamed from memory, in one process: what a format's conversions
// and dot products cost apart from the memory they save. SmolLM2-135M's shapes (head dim 64,
// three query heads per kv head), one sequence of `context` keys in blocks of 128, one
// thread, no Python and no parallel region; "memory" walks `copies` such sequences (far
// past L3) in a scattered order. Built and run by bench/decode_kernel.sh, which can also
// compile a second kernel tree into the same binary (namespace renamed) to time the two in
// alternation: the A/B a kernel change needs on a machine whose speed drifts.
//
// Compiled twice or three times: with BENCH_FN (one kernel tree's benchmark, exported under
// that name) and once without (the driver).
#ifdef BENCH_FN
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

#include <sys/mman.h>

#include "attention_decode.h"

using namespace ferrolm_attention;

namespace {
constexpr int D = 64, BS = 128, KVH = 3, R = 3, H = KVH * R;

// Memory in 2 MiB huge pages where the kernel gives them, as the engine's pool
// (kv/host_memory.py): with 4 KiB pages every scattered block is a TLB miss.
template <class T>
struct HugeAlloc {
  using value_type = T;
  HugeAlloc() = default;
  template <class U>
  HugeAlloc(const HugeAlloc<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = (n * sizeof(T) + (2u << 20) - 1) / (2u << 20) * (2u << 20);
    void* p = std::aligned_alloc(2u << 20, bytes);
    if (!p) throw std::bad_alloc();
    madvise(p, bytes, MADV_HUGEPAGE);
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const HugeAlloc&) const { return true; }
  bool operator!=(const HugeAlloc&) const { return false; }
};
template <class T>
using HugeVec = std::vector<T, HugeAlloc<T>>;

// One half's storage for `slots` tokens of every kv head, filled the way the format's
// values look (int4/int8 codes at random, E4M3 normal numbers, fp16 values in [-1, 1]): one
// sequence's worth drawn, then repeated (`copies` times: the same values at other addresses).
Half make_half(int F, int64_t slots, int copies, HugeVec<uint8_t>& data, HugeVec<c10::Half>& scales) {
  Half h{};
  h.fmt = F;
  h.slots = slots;
  h.elem = F == F16 ? 2 : 1;
  h.groups = F == LUT4 ? D / 32 : F == F16 ? 0 : 1;
  h.gsize = 32;
  h.factor = F == E4M3 ? 256.0f : 1.0f;
  h.fixed_query = F == LUT4 || F == I8;
  for (int i = 0; i < 16; ++i) h.lut[i] = (float)(i - 8);
  data.resize(KVH * slots * row_bytes(F, D));
  const size_t one = data.size() / copies;
  if (F == F16) {
    auto* p = reinterpret_cast<c10::Half*>(data.data());
    for (size_t i = 0; i < one / 2; ++i) p[i] = c10::Half((float)(rand() % 2001) / 1000.0f - 1.0f);
  } else {
    for (size_t i = 0; i < one; ++i)
      data[i] = F == E4M3 ? (uint8_t)((rand() & 0x80) | ((1 + rand() % 14) << 3) | (rand() & 7)) : (uint8_t)rand();
  }
  for (int c = 1; c < copies; ++c) std::copy(data.begin(), data.begin() + one, data.begin() + c * one);
  scales.resize(KVH * slots * std::max<int64_t>(h.groups, 1));
  for (auto& s : scales) s = c10::Half(0.01f + (float)(rand() % 100) * 1e-3f);
  h.data = data.data();
  h.scale = F == F16 ? nullptr : scales.data();
  return h;
}

// Median ns per key (over 5 timings of `reps` calls, each one sequence's three kv heads).
template <int F>
double ns_per_key(int context, int copies, int reps) {
  srand(1);
  const int nblk = (context + BS - 1) / BS;
  const int64_t slots = (int64_t)nblk * BS * copies;
  HugeVec<uint8_t> kd, vd;
  HugeVec<c10::Half> ks, vs;
  const Half K = make_half(F, slots, copies, kd, ks), V = make_half(F, slots, copies, vd, vs);
  // Copy c's block table at row c; a row past the last repeats the first (the next sequence
  // of the last), so each call's last item can ask for the next call's first rows, as the
  // engine's items do for the item their thread runs next (Item::next).
  std::vector<int32_t> tables((size_t)nblk * (copies + 1));
  const size_t blocks = (size_t)nblk * copies;
  for (size_t i = 0; i < tables.size(); ++i) tables[i] = (int32_t)(((i % blocks) * 7919) % blocks);  // scattered
  const int32_t q_start[3] = {0, 1, 2}, ctx_len[2] = {context, context};
  std::vector<float> q(2 * H * D), out(2 * H * D);
  for (auto& x : q) x = (float)(rand() % 2001) / 1000.0f - 1.0f;
  const int qx = K.fixed_query ? QX_ROUND_Q : 0;
  Item items[KVH + 1];
  for (int head = 0; head <= KVH; ++head) items[head] = Item{head < KVH ? 0 : 1, head % KVH, 0, 1, 0, 0, nullptr};
  for (int head = 0; head < KVH; ++head) items[head].next = &items[head + 1];
  int cur = 0;
  auto call = [&] {
    const int32_t* tb = tables.data() + (size_t)cur * nblk;
    cur = (cur + 1) % copies;
    for (int head = 0; head < KVH; ++head)
      run_decode<D / 16, R, F, F>(items[head], 1, q.data(), out.data(), K, V, tb, nblk, q_start, ctx_len, H, BS,
                                   0.125f, nullptr, qx);
  };
  for (int i = 0; i < std::min(copies, 64) + 2; ++i) call();
  std::vector<double> ts;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) call();
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    ts.push_back(dt.count() * 1e9 / reps / (KVH * (double)context));
  }
  std::sort(ts.begin(), ts.end());
  return ts[2];
}
}  // namespace

extern "C" double BENCH_FN(int fmt, int context, int copies, int reps) {
  switch (fmt) {
    case F16: return ns_per_key<F16>(context, copies, reps);
    case I8: return ns_per_key<I8>(context, copies, reps);
    case E4M3: return ns_per_key<E4M3>(context, copies, reps);
    default: return ns_per_key<LUT4>(context, copies, reps);
  }
}

#else  // the driver
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <vector>

extern "C" double bench_a(int, int, int, int);
#ifdef BENCH_AB
extern "C" double bench_b(int, int, int, int);
#endif

namespace {
struct Format {
  const char* name;
  int code;        // attention_common.h's Fmt
  int key_bytes;   // one key's K and V rows with their scales, per kv head
};
constexpr Format FORMATS[] = {{"fp16", 1, 256}, {"int8", 3, 132}, {"int4", 6, 72}, {"fp8", 4, 132}};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  int context = 2048, rounds = 5;
  const char* only = nullptr;
  const char* usage = "options: --context N (>= 128), --rounds N (>= 1), --format fp16|int8|int4|fp8\n";
  if (argc % 2 == 0) return fputs(usage, stderr), 2;  // an option without its value
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--context")) context = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--rounds")) rounds = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--format")) only = argv[i + 1];
    else return fprintf(stderr, "unknown option %s; %s", argv[i], usage), 2;
  }
  const bool known = !only || std::any_of(std::begin(FORMATS), std::end(FORMATS), [&](const Format& f) { return !strcmp(f.name, only); });
  if (context < 128 || rounds < 1 || !known) return fputs(usage, stderr), 2;
  // From memory: 1 GB of fp16 cache, 290 MB of int4's (past this VM's 105 MB L3); the same
  // number of sequences for every format.
  const int copies = std::max(2, (int)(1e9 / (3.0 * context * 256)));
  const int reps_cache = std::max(1, (int)(60e6 / (3.0 * context * 20))), reps_mem = std::max(copies, reps_cache);
#ifndef BENCH_AB
  printf("one thread, context %d, head dim 64, 3 heads per kv head, blocks of 128; ns per key (K and V row),\n"
         "medians of %d rounds; memory: %d sequences' caches walked in turn\n\n",
         context, rounds, copies);
  printf("| KV | one sequence MB | cached ns | from memory ns | memory / cached | x fp16 (cached) | x fp16 (memory) |\n"
         "|---|---|---|---|---|---|---|\n");
  double fp16_cache = 0, fp16_mem = 0;
  for (const Format& f : FORMATS) {
    if (only && strcmp(only, f.name) && strcmp(f.name, "fp16")) continue;
    std::vector<double> c, m;
    for (int r = 0; r < rounds; ++r) {  // alternating, so both see the same drift
      c.push_back(bench_a(f.code, context, 1, reps_cache));
      m.push_back(bench_a(f.code, context, copies, reps_mem));
    }
    const double mc = median(c), mm = median(m);
    if (f.code == 1) fp16_cache = mc, fp16_mem = mm;
    printf("| %s | %.2f | %.1f | %.1f | %.2f | %.2f | %.2f |\n", f.name, 3e-6 * context * f.key_bytes, mc, mm, mm / mc,
           fp16_cache / mc, fp16_mem / mm);
  }
#else
  printf("one thread, context %d; B / A per round, A and B alternating (A: this tree's kernels, B: the other)\n\n",
         context);
  printf("| KV | where | A ns/key | B ns/key | B / A median | min | max |\n|---|---|---|---|---|---|---|\n");
  for (const Format& f : FORMATS) {
    if (only && strcmp(only, f.name)) continue;
    for (const int n : {1, copies}) {
      std::vector<double> a, b, ratio;
      for (int r = 0; r < rounds; ++r) {
        const int reps = n == 1 ? reps_cache : reps_mem;
        double x, y;
        if (r % 2) y = bench_b(f.code, context, n, reps), x = bench_a(f.code, context, n, reps);
        else x = bench_a(f.code, context, n, reps), y = bench_b(f.code, context, n, reps);
        a.push_back(x), b.push_back(y), ratio.push_back(y / x);
      }
      printf("| %s | %s | %.1f | %.1f | %.3f | %.3f | %.3f |\n", f.name, n == 1 ? "cached" : "memory", median(a),
             median(b), median(ratio), *std::min_element(ratio.begin(), ratio.end()),
             *std::max_element(ratio.begin(), ratio.end()));
    }
  }
#endif
}
#endif
