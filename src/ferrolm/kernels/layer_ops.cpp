// The small per-layer ops of a decoder step, fused: each replaces 8-12 eager torch ops whose
// dispatch cost (a few us each, ~1500 per step at one sequence) outweighed their arithmetic.
// Same arithmetic as the torch versions in models/layer_ops.py, in fp32.
#include "simd.h"
#include "ops.h"

namespace {

// row[c] += delta[c] (delta fp32 or bf16).
template <class S>
inline void add_row(float* row, const S* delta, int64_t H) {
  int64_t c = 0;
  for (; c + 16 <= H; c += 16) store16(row + c, load16(row + c) + load_f32(delta + c));
  for (; c < H; ++c) row[c] += float(delta[c]);
}

inline float sum_squares(const float* row, int64_t H) {
  v16 acc{};
  int64_t c = 0;
  for (; c + 16 <= H; c += 16) {
    const v16 v = load16(row + c);
    acc += v * v;
  }
  float ss = hsum(acc);
  for (; c < H; ++c) ss += row[c] * row[c];
  return ss;
}

// out[c] = w[c] * (row[c] * r) in S (bf16 rounded to nearest even, as torch's conversion).
template <class S>
inline void scale_row(const float* row, const float* w, float r, S* out, int64_t H) {
  int64_t c = 0;
  for (; c + 16 <= H; c += 16) store_f32(out + c, load16(w + c) * (load16(row + c) * r));
  for (; c < H; ++c) out[c] = S(w[c] * (row[c] * r));
}

// x (fp32 residual [T, H]) += delta (any float dtype) in place, then
// weight * x * rsqrt(mean(x^2) + eps) in out's dtype (bf16 or fp32).
at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps,
                        bool bf16_out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [T, H]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(), "weight: contiguous fp32");
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor d;
  if (delta) {
    d = delta->reshape({T, H}).contiguous();
    TORCH_CHECK(d.scalar_type() == at::kFloat || d.scalar_type() == at::kBFloat16, "delta: fp32 or bf16");
  }
  at::Tensor out = at::empty({T, H}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  // 16 lanes at a time (the sum of squares in 16 partial sums; the reference's own order
  // differs from both, all within fp32 rounding); rows split over threads above 16.
  at::parallel_for(0, T, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      float* row = xp + t * H;
      if (d.defined()) {
        if (d.scalar_type() == at::kFloat)
          add_row(row, d.data_ptr<float>() + t * H, H);
        else
          add_row(row, d.data_ptr<c10::BFloat16>() + t * H, H);
      }
      const float r = 1.0f / std::sqrt(sum_squares(row, H) / float(H) + float(eps));
      if (bf16_out)
        scale_row(row, w, r, out.data_ptr<c10::BFloat16>() + t * H, H);
      else
        scale_row(row, w, r, out.data_ptr<float>() + t * H, H);
    }
  });
  return out;
}

// Rotary embedding in place, rotate-half layout: x [T, heads, D] (fp32 or bf16),
// cos/sin fp32 [T, D] (both halves of a row equal, as the model builds them).
// 16 lanes at a time where the half is a multiple of 16 (the scalar loop, with a bf16
// rounding per value, took ~25 us for one decode step's 48 key rows and 35 us for its 144
// query rows: ~1.5 ms of a 30-layer 16-sequence step); rows split over threads above 512.
// x [T, heads, D] from src (token t's heads at src + t * src_stride; src may be x itself).
template <class S>
void rope_rows(const S* src, int64_t src_stride, S* x, const float* cs, const float* sn, int64_t T, int64_t heads,
               int64_t D) {
  const int64_t half = D / 2, half16 = half % 16 == 0 ? half : 0;
  at::parallel_for(0, T * heads, 512, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i / heads;
      const S* u = src + t * src_stride + (i % heads) * D;
      S* v = x + i * D;
      const float* c = cs + t * D;
      const float* s = sn + t * D;
      for (int64_t j = 0; j < half16; j += 16) {
        const v16 a = load_f32(u + j), b = load_f32(u + j + half);
        store_f32(v + j, a * load16(c + j) - b * load16(s + j));
        store_f32(v + j + half, b * load16(c + j + half) + a * load16(s + j + half));
      }
      for (int64_t j = half16; j < half; ++j) {
        const float a = float(u[j]), b = float(u[j + half]);
        v[j] = S(a * c[j] - b * s[j]);
        v[j + half] = S(b * c[j + half] + a * s[j + half]);
      }
    }
  });
}

void check_rope_tables(const at::Tensor& cos, const at::Tensor& sin, int64_t T, int64_t D) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.numel() == T * D, "cos: fp32 [T, D]");
  TORCH_CHECK(sin.scalar_type() == at::kFloat && sin.is_contiguous() && sin.numel() == T * D, "sin: fp32 [T, D]");
}

void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x: contiguous [T, heads, D]");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2);
  check_rope_tables(cos, sin, T, D);
  if (x.scalar_type() == at::kFloat)
    rope_rows(x.data_ptr<float>(), heads * D, x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), T,
              heads, D);
  else if (x.scalar_type() == at::kBFloat16)
    rope_rows(x.data_ptr<c10::BFloat16>(), heads * D, x.data_ptr<c10::BFloat16>(), cos.data_ptr<float>(),
              sin.data_ptr<float>(), T, heads, D);
  else
    TORCH_CHECK(false, "rope_: x must be fp32 or bf16");
}

// A merged projection's rows [T, (H + 2 KV) D] -> q [T, H, D] and k [T, KV, D] rotated, v
// [T, KV, D] copied: one pass and three allocations where copying each part out of the rows
// and rotating q and k in place took five dispatched ops. The same arithmetic as rope_.
template <class S>
void split_rows(const S* qkv, const float* cs, const float* sn, int64_t T, int64_t H, int64_t KV, int64_t D, S* q,
                S* k, S* v) {
  const int64_t W = (H + 2 * KV) * D;
  rope_rows(qkv, W, q, cs, sn, T, H, D);
  rope_rows(qkv + H * D, W, k, cs, sn, T, KV, D);
  for (int64_t t = 0; t < T; ++t) std::memcpy(v + t * KV * D, qkv + t * W + (H + KV) * D, KV * D * sizeof(S));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                                              const at::Tensor& sin, int64_t H, int64_t KV) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && H > 0 && KV > 0 && qkv.size(1) % (H + 2 * KV) == 0,
              "qkv: contiguous [T, (H + 2 KV) D]");
  const int64_t T = qkv.size(0), D = qkv.size(1) / (H + 2 * KV);
  check_rope_tables(cos, sin, T, D);
  at::Tensor q = at::empty({T, H, D}, qkv.options()), k = at::empty({T, KV, D}, qkv.options()),
             v = at::empty({T, KV, D}, qkv.options());
  if (qkv.scalar_type() == at::kFloat)
    split_rows(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), T, H, KV, D, q.data_ptr<float>(),
               k.data_ptr<float>(), v.data_ptr<float>());
  else if (qkv.scalar_type() == at::kBFloat16)
    split_rows(qkv.data_ptr<c10::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(), T, H, KV, D,
               q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>());
  else
    TORCH_CHECK(false, "split_qkv_rope: qkv must be fp32 or bf16");
  return {q, k, v};
}

// SwiGLU's product: [T, 2I] (gate | up) -> silu(gate) * up [T, I], each rounded once to
// the input's dtype as torch's silu and mul do.
template <class S>
void silu_mul_rows(const S* gu, S* out, int64_t T, int64_t I) {
  const int64_t I16 = I / 16 * 16;
  at::parallel_for(0, T, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const S* g = gu + t * 2 * I;
      const S* u = g + I;
      S* o = out + t * I;
      for (int64_t j = 0; j < I16; j += 16) {
        const v16 gv = load_f32(g + j);
        const v16 silu = round_to(o, gv / (1.0f + vexp(-gv)));
        store_f32(o + j, silu * load_f32(u + j));
      }
      for (int64_t j = I16; j < I; ++j) {
        const float gj = float(g[j]);
        const S silu = S(gj / (1.0f + std::exp(-gj)));
        o[j] = S(float(silu) * float(u[j]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up: [T, 2I]");
  const at::Tensor gu = gate_up.contiguous();
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gu.options());
  if (gu.scalar_type() == at::kFloat)
    silu_mul_rows(gu.data_ptr<float>(), out.data_ptr<float>(), T, I);
  else if (gu.scalar_type() == at::kBFloat16)
    silu_mul_rows(gu.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), T, I);
  else
    TORCH_CHECK(false, "silu_mul: fp32 or bf16");
  return out;
}

// Index of each row's largest value, the first one on ties (torch.argmax's answer); a row
// with a NaN gets -1 (the caller asks torch, which ranks NaN highest). Two passes over a
// row of the logits: the max, then its first position (the row is in L2 by then).
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "logits: fp32 [B, V]");
  const at::Tensor x = logits.contiguous();
  const int64_t B = x.size(0), V = x.size(1), V16 = V / 16 * 16;
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float* row = xp + b * V;
      v16 mx = splat(-INFINITY);
      i32x16 nanm{};
      for (int64_t j = 0; j < V16; j += 16) {
        const v16 v = load16(row + j);
        nanm |= (v != v);
        mx = v > mx ? v : mx;
      }
      float m = hmax(mx);
      bool nan = false;
      for (int k = 0; k < 16; ++k) nan |= nanm[k] != 0;
      for (int64_t j = V16; j < V; ++j) {
        nan |= row[j] != row[j];
        m = std::max(m, row[j]);
      }
      int64_t at = -1;
      if (!nan) {
        int64_t j = 0;
        for (; j < V16; j += 16) {  // the first vector holding the max, then its lane
          const i32x16 eq = load16(row + j) == m;
          bool any = false;
          for (int k = 0; k < 16; ++k) any |= eq[k] != 0;
          if (any) break;
        }
        for (; j < V; ++j)
          if (row[j] == m) {
            at = j;
            break;
          }
      }
      op[b] = at;
    }
  });
  return out;
}

}  // namespace

namespace ferrolm {
at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps,
                        bool bf16_out) {
  return ::add_rms_norm(x, delta, weight, eps, bf16_out);
}
void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) { ::rope_(x, cos, sin); }
std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                                              const at::Tensor& sin, int64_t H, int64_t KV) {
  return ::split_qkv_rope(qkv, cos, sin, H, KV);
}
at::Tensor silu_mul(const at::Tensor& gate_up) { return ::silu_mul(gate_up); }
}  // namespace ferrolm

TORCH_LIBRARY_FRAGMENT(ferrolm_cpu, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? delta, Tensor weight, float eps, bool bf16_out) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("split_qkv_rope(Tensor qkv, Tensor cos, Tensor sin, int heads, int kv_heads) -> (Tensor, Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(ferrolm_cpu, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_", &rope_);
  m.impl("split_qkv_rope", &split_qkv_rope);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows);
}
