// The decoder layers of one model step as one compiled loop (models/decoder_plan.py builds
// it once per model and KV pool): per layer residual add + RMSNorm, the merged q/k/v
// projection, RoPE, the KV write, paged attention, the output projection, the second norm
// and the SwiGLU MLP, calling the kernels directly. The same ops in the same order as the
// Python layers (models/llama.py), so the results are identical; what goes is the Python
// and dispatcher work between them (~300 calls per step, a quarter of a one-sequence step).
#include "ops.h"

#include <ATen/ops/linear.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <vector>

namespace {

// A linear layer as the plan holds it: 4-bit as shipped [codes, scales, mins] or a dense
// weight [weight], either with an optional bias after it.
struct Linear {
  std::vector<at::Tensor> parts;
  c10::optional<at::Tensor> bias;
  at::Tensor operator()(const at::Tensor& x) const {
    if (parts.size() == 3) {
      at::Tensor y = ferrolm::q4_linear(x, parts[0], parts[1], parts[2]);
      return bias ? y.add_(*bias) : y;
    }
    return at::linear(x, parts[0], bias);
  }
};

Linear make_linear(std::vector<at::Tensor> parts, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(parts.size() == 3 || parts.size() == 1, "a linear layer is [codes, scales, mins] or [weight]");
  return Linear{std::move(parts), std::move(bias)};
}

// One layer's K or V cache half, as the compiled write and attention read it.
struct CacheHalf {
  at::Tensor data;
  c10::optional<at::Tensor> scale;
  int64_t fmt;
  double qmax;
  at::Tensor mids, lut;
  int64_t rotated;
};

struct Layer {
  at::Tensor in_norm, post_norm;
  Linear qkv, o, gate_up, down;
  CacheHalf k, v;
};

struct DecoderPlan : torch::CustomClassHolder {
  int64_t heads, kv_heads, head_dim, block_size, max_rows;
  double eps, scale;
  bool bf16;
  std::vector<Layer> layers;

  DecoderPlan(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_rows, double eps,
              double scale, bool bf16)
      : heads(heads), kv_heads(kv_heads), head_dim(head_dim), block_size(block_size), max_rows(max_rows), eps(eps),
        scale(scale), bf16(bf16) {}

  void add_layer(at::Tensor in_norm, at::Tensor post_norm, std::vector<at::Tensor> qkv,
                 c10::optional<at::Tensor> qkv_bias, std::vector<at::Tensor> o, std::vector<at::Tensor> gate_up,
                 std::vector<at::Tensor> down, at::Tensor k_data, c10::optional<at::Tensor> k_scale, int64_t k_fmt,
                 double k_qmax, at::Tensor k_mids, at::Tensor k_lut, int64_t k_rot, at::Tensor v_data,
                 c10::optional<at::Tensor> v_scale, int64_t v_fmt, double v_qmax, at::Tensor v_mids, at::Tensor v_lut,
                 int64_t v_rot) {
    layers.push_back(Layer{in_norm, post_norm, make_linear(std::move(qkv), std::move(qkv_bias)),
                           make_linear(std::move(o), c10::nullopt), make_linear(std::move(gate_up), c10::nullopt),
                           make_linear(std::move(down), c10::nullopt),
                           CacheHalf{k_data, k_scale, k_fmt, k_qmax, k_mids, k_lut, k_rot},
                           CacheHalf{v_data, v_scale, v_fmt, v_qmax, v_mids, v_lut, v_rot}});
  }

  // x: the fp32 residual stream [T, hidden], updated in place; returns the last layer's MLP
  // output (the final norm adds it), as the Python layer loop does.
  at::Tensor run(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor slots, at::Tensor block_tables,
                 at::Tensor q_start, at::Tensor ctx_len, int64_t num_threads) {
    const int64_t H = heads, KV = kv_heads;
    c10::optional<at::Tensor> delta;
    for (const Layer& L : layers) {
      const at::Tensor h = ferrolm::add_rms_norm(x, delta, L.in_norm, eps, bf16);
      const at::Tensor qkv = L.qkv(h);
      const auto [q, k, v] = ferrolm::split_qkv_rope(qkv, cos, sin, H, KV);
      ferrolm::kv_write(k, slots, L.k.data, L.k.scale, L.k.fmt, L.k.qmax, L.k.mids, L.k.rotated);
      ferrolm::kv_write(v, slots, L.v.data, L.v.scale, L.v.fmt, L.v.qmax, L.v.mids, L.v.rotated);
      const at::Tensor att = ferrolm::attend(q, L.k.data, L.k.scale, c10::nullopt, L.k.fmt, L.k.lut, L.v.data,
                                             L.v.scale, c10::nullopt, L.v.fmt, L.v.lut, c10::nullopt, block_tables,
                                             q_start, ctx_len, block_size, scale, max_rows, num_threads,
                                             L.k.rotated, L.v.rotated);
      const at::Tensor h2 = ferrolm::add_rms_norm(x, L.o(att), L.post_norm, eps, bf16);
      delta = L.down(ferrolm::silu_mul(L.gate_up(h2)));
    }
    TORCH_CHECK(delta.has_value(), "the plan has no layers");
    return *delta;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(ferrolm_cpu, m) {
  m.class_<DecoderPlan>("DecoderPlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool>())
      .def("add_layer", &DecoderPlan::add_layer)
      .def("run", &DecoderPlan::run);
}
