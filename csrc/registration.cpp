// Every dalle_fast op schema, in one place. Backends add kernels with TORCH_LIBRARY_IMPL in their own
// files; Python adds fake (meta) kernels and autograd in dalle_fast/ops.py.
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
  // (q_ptr, q_kblock, q_full, k_ptr, k_qblock, k_full): query-major and key-major CSR block layouts.
  m.def("block_layout(str kind, int text_len, int image_size, int kernel_size, int block) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &block_layout_op);
}

}  // namespace dalle_fast
