// Every dalle_fast op schema, in one place. Each backend registers its kernels in its torch glue files,
// <backend>/<concern>_glue.cpp (cpu/attention_glue.cpp, cuda/grad_scaling_glue.cpp, ...): each holds the
// one TORCH_LIBRARY_IMPL of its concern and backend, and the kernels live in files without torch
// registration. Python adds fake (meta) kernels and autograd in dalle_fast/ops/.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace dalle_fast {
namespace {

at::Tensor to_tensor(const std::vector<int32_t>& x) {
  return at::tensor(at::ArrayRef<int32_t>(x), at::TensorOptions().dtype(at::kInt));
}

at::Tensor to_bool_tensor(const std::vector<uint8_t>& x) {
  return at::tensor(at::ArrayRef<uint8_t>(x), at::TensorOptions().dtype(at::kByte)).to(at::kBool);
}

// The cached C++ layout, exposed for inspection, plots and tests.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_layout_op(
    c10::string_view kind, int64_t text_len, int64_t image_size, int64_t kernel_size, int64_t block) {
  const MaskSpec m = check_mask_spec(std::string(kind), text_len, image_size, kernel_size);
  TORCH_CHECK(block >= 1, "dalle_fast: block must be >= 1, got ", block);
  const auto L = get_block_layout(m, block);
  return {to_tensor(L->q_ptr),   to_tensor(L->q_kblock), to_bool_tensor(L->q_full),
          to_tensor(L->k_ptr),   to_tensor(L->k_qblock), to_bool_tensor(L->k_full)};
}

}  // namespace

TORCH_LIBRARY(dalle_fast, m) {
  // Attention over [text ; image] tokens under a DALL-E mask. Inputs [batch, heads, seq_len, head_dim];
  // kind "column" expects TRANSPOSED image states. Returns (out, lse) with lse [batch, heads, seq_len] fp32.
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, str kind, int text_len, int image_size, "
      "int kernel_size, float scale) -> (Tensor, Tensor)");
  // Gradients of sparse_attention_fwd with respect to q, k and v, from its saved out and lse.
  m.def(
      "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, str kind, "
      "int text_len, int image_size, int kernel_size, float scale) -> (Tensor, Tensor, Tensor)");
  // One query row per (batch, head) against a key/value cache, for sampling: q [batch, heads, head_dim] is
  // the query at kernel-order index `position` (transposed image states for "column"); k, v [batch, heads,
  // seq_len, head_dim]. Reads only the keys the mask gives that row; equals row `position` of
  // sparse_attention_fwd. Returns out [batch, heads, head_dim] in q's dtype.
  m.def(
      "sparse_attention_decode(Tensor q, Tensor k, Tensor v, str kind, int text_len, int image_size, "
      "int kernel_size, float scale, int position) -> Tensor");
  // Per-resblock gradient scaling (dalle_fast/ops/grad_scaling.py, dalle_fast/training/amp.py). scales: fp32 [blocks]; found_inf: bool [blocks].
  // Gradient entering a resblock branch: grad * scales[block].
  m.def("grad_scale(Tensor grad, Tensor scales, int block) -> Tensor");
  // Gradient leaving the branch: grad / scales[block] with Inf/NaN set to 0; sets found_inf[block] if any.
  m.def("grad_unscale_filter(Tensor grad, Tensor scales, int block, Tensor(a!) found_inf) -> Tensor");
  // In place: grads[i] /= scales[blocks[i]]; found_inf[blocks[i]] set where grads[i] has Inf/NaN.
  m.def("multi_unscale_check_(Tensor(a!)[] grads, int[] blocks, Tensor scales, Tensor(b!) found_inf) -> ()");
  // The paper's scale rules for one update, on the scales' device (no host synchronisation).
  m.def(
      "resblock_scale_update_(Tensor(a!) scales, Tensor(b!) cooldown, Tensor found_inf, float growth, "
      "float backoff, int window, float min_scale, float max_scale) -> ()");
  // AdamW over parameters grouped by block, skipping every block whose found_inf is set. Per-block
  // step_size = lr / (1 - beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t), decay = 1 - lr * wd.
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
      "int[] blocks, Tensor found_inf, Tensor step_size, Tensor bias_correction2_sqrt, Tensor decay, "
      "float beta1, float beta2, float eps) -> ()");
  // (q_ptr, q_kblock, q_full, k_ptr, k_qblock, k_full): query-major and key-major CSR block layouts.
  m.def("block_layout(str kind, int text_len, int image_size, int kernel_size, int block) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &block_layout_op);
}

}  // namespace dalle_fast
