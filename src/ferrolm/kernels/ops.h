// The compiled ops callable from C++ (the decoder loop in decoder.cpp calls them directly,
// with no dispatcher and no Python between them). Each is registered under ferrolm_cpu::
// too; the definitions forward to the kernels in their own translation units.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sub.h>
#include <torch/library.h>

#include <tuple>

namespace ferrolm {

at::Tensor attend(const at::Tensor& q, const at::Tensor& k_data, const c10::optional<at::Tensor>& k_scale,
                  const c10::optional<at::Tensor>& k_stage, int64_t k_fmt, const at::Tensor& k_lut,
                  const at::Tensor& v_data, const c10::optional<at::Tensor>& v_scale,
                  const c10::optional<at::Tensor>& v_stage, int64_t v_fmt, const at::Tensor& v_lut,
                  const c10::optional<at::Tensor>& row_of, const at::Tensor& block_tables,
                  const at::Tensor& q_start, const at::Tensor& ctx_len, int64_t block_size, double scale,
                  int64_t max_rows, int64_t num_threads, int64_t rot_q, int64_t rot_out, int64_t window = 0);
void kv_write(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& data,
              const c10::optional<at::Tensor>& scale, int64_t fmt, double qmax, const at::Tensor& mids,
              int64_t rotate);
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins);
at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps,
                        bool bf16_out);
void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin);
std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                                              const at::Tensor& sin, int64_t H, int64_t KV);
at::Tensor silu_mul(const at::Tensor& gate_up);

}  // namespace ferrolm
