// Argument checks shared by every backend's host glue: each error names the argument and what was
// expected, so a bad call from Python reads as a RuntimeError rather than garbage or a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cfloat>
#include <cmath>
#include <string>

#include "layout.h"

namespace dalle_fast {

inline MaskSpec check_mask_spec(const std::string& kind, int64_t text_len, int64_t image_size,
                                int64_t kernel_size) {
  MaskSpec m{MaskKind::kCausal, text_len, image_size, kernel_size};
  TORCH_CHECK(parse_mask_kind(kind, &m.kind), "dalle_fast: kind must be one of 'causal', 'row', 'column', 'conv'; got '",
              kind, "'");
  const std::string err = validate_mask_spec(m);
  TORCH_CHECK(err.empty(), "dalle_fast: ", err);
  return normalize_mask_spec(m);
}

// The softmax scale, which the kernels take as float32: finite (NaN or Inf has no softmax), and at most
// FLT_MAX / 2, so that the CUDA kernels' |scale| log2(e) is finite too. (Scores times such a scale can
// still overflow; that is the caller's choice of numbers, not a bad argument.)
inline void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale) && std::fabs(scale) <= FLT_MAX / 2,
              "dalle_fast: scale must be finite with |scale| <= 1.70141e+38, got ", scale);
}

// k and v share q's dtype and device.
inline void check_dtype_device(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "dalle_fast: q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "dalle_fast: q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
}

// t.shape[2] (seq_len) == text_len + image_size^2.
inline void check_seq_len(const at::Tensor& t, const char* name, const MaskSpec& m) {
  TORCH_CHECK(t.size(2) == m.seq_len(), "dalle_fast: ", name,
              ".shape[2] (seq_len) must equal text_len + image_size**2 = ", m.text_len, " + ", m.image_size,
              "**2 = ", m.seq_len(), ", got ", t.size(2));
}

// q, k, v: [batch, heads, seq_len, head_dim], same dtype and device, seq_len == text_len + image_size^2.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskSpec& m) {
  TORCH_CHECK(q.dim() == 4, "dalle_fast: q must be 4-D [batch, heads, seq_len, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "dalle_fast: k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "dalle_fast: v must have the shape of q ", q.sizes(), ", got ", v.sizes());
  check_dtype_device(q, k, v);
  check_seq_len(q, "q", m);
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "dalle_fast: ", name, " must have the shape of ", like_name, " ",
              like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dalle_fast: ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "dalle_fast: ", name, " must be on ", like.device(), ", got ",
              t.device());
}

inline void check_lse(const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "dalle_fast: lse must have shape [batch, heads, seq_len] = ", q.sizes().slice(0, 3), ", got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "dalle_fast: lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "dalle_fast: lse must be on ", q.device(), ", got ", lse.device());
}

// Decode (one query per row against a cache): q [batch, heads, head_dim]; k, v [batch, heads, seq_len,
// head_dim] with seq_len == text_len + image_size^2; position (the query's kernel-order index) in [0, seq_len).
inline void check_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskSpec& m,
                         int64_t position) {
  TORCH_CHECK(q.dim() == 3, "dalle_fast: q must be 3-D [batch, heads, head_dim] (one query per row), got shape ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(2),
              "dalle_fast: k must be 4-D [batch, heads, seq_len, head_dim] = [", q.size(0), ", ", q.size(1),
              ", seq_len, ", q.size(2), "], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "dalle_fast: v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  check_dtype_device(q, k, v);
  check_seq_len(k, "k", m);
  TORCH_CHECK(position >= 0 && position < m.seq_len(), "dalle_fast: position must be in [0, ", m.seq_len(),
              "), got ", position);
}

// ---- per-resblock gradient scaling ----

inline void check_scales(const at::Tensor& scales, const at::Device& device) {
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat,
              "dalle_fast: scales must be a 1-D float32 tensor, got ", scales.scalar_type(), " of shape ",
              scales.sizes());
  TORCH_CHECK(scales.device() == device, "dalle_fast: scales must be on ", device, ", got ", scales.device());
}

inline void check_flags(const at::Tensor& scales, const at::Tensor& found_inf, const at::Device& device) {
  check_scales(scales, device);
  TORCH_CHECK(found_inf.dim() == 1 && found_inf.scalar_type() == at::kBool && found_inf.size(0) == scales.size(0),
              "dalle_fast: found_inf must be a bool tensor of shape [", scales.size(0), "], got ",
              found_inf.scalar_type(), " of shape ", found_inf.sizes());
  TORCH_CHECK(found_inf.device() == device, "dalle_fast: found_inf must be on ", device, ", got ",
              found_inf.device());
  TORCH_CHECK(scales.is_contiguous() && found_inf.is_contiguous(), "dalle_fast: scales and found_inf must be contiguous");
}

inline void check_cooldown(const at::Tensor& cooldown, const at::Tensor& scales) {
  TORCH_CHECK(cooldown.scalar_type() == at::kInt && cooldown.sizes() == scales.sizes() && cooldown.is_contiguous() &&
                  cooldown.device() == scales.device(),
              "dalle_fast: cooldown must be a contiguous int32 tensor shaped like scales");
}

inline void check_block(int64_t block, const at::Tensor& scales, const char* what) {
  TORCH_CHECK(block >= 0 && block < scales.size(0), "dalle_fast: ", what, " must be in [0, ", scales.size(0),
              "), got ", block);
}

inline void check_grad(const at::Tensor& g, const char* name) {
  TORCH_CHECK(at::isFloatingType(g.scalar_type()) && g.scalar_type() != at::kDouble,
              "dalle_fast: ", name, " must be float32, float16 or bfloat16, got ", g.scalar_type());
}

inline void check_tensor_list(at::TensorList ts, c10::IntArrayRef blocks, const at::Tensor& scales, const char* name) {
  TORCH_CHECK(ts.size() == blocks.size(), "dalle_fast: ", name, " has ", ts.size(), " tensors but blocks has ",
              blocks.size(), " entries");
  for (size_t i = 0; i < ts.size(); ++i) {
    check_grad(ts[i], name);
    TORCH_CHECK(ts[i].device() == scales.device(), "dalle_fast: ", name, "[", i, "] must be on ", scales.device(),
                ", got ", ts[i].device());
    TORCH_CHECK(ts[i].is_contiguous(), "dalle_fast: ", name, "[", i, "] must be contiguous");
    check_block(blocks[i], scales, "blocks[i]");
  }
}

inline void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                             at::TensorList exp_avg_sq, c10::IntArrayRef blocks, const at::Tensor& found_inf,
                             const at::Tensor& step_size, const at::Tensor& bias_correction2_sqrt,
                             const at::Tensor& decay) {
  check_flags(step_size, found_inf, step_size.device());
  for (const auto* t : {&bias_correction2_sqrt, &decay})
    TORCH_CHECK(t->sizes() == step_size.sizes() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->device() == step_size.device(),
                "dalle_fast: step_size, bias_correction2_sqrt and decay must be float32 tensors of shape ",
                step_size.sizes());
  check_tensor_list(params, blocks, step_size, "params");
  check_tensor_list(grads, blocks, step_size, "grads");
  check_tensor_list(exp_avg, blocks, step_size, "exp_avg");
  check_tensor_list(exp_avg_sq, blocks, step_size, "exp_avg_sq");
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(grads[t].numel() == params[t].numel() && exp_avg[t].numel() == params[t].numel() &&
                    exp_avg_sq[t].numel() == params[t].numel(),
                "dalle_fast: params[", t, "], grads, exp_avg and exp_avg_sq must have the same number of elements");
    TORCH_CHECK(exp_avg_sq[t].scalar_type() == exp_avg[t].scalar_type(),
                "dalle_fast: exp_avg[", t, "] and exp_avg_sq[", t, "] must share a dtype");
  }
}

}  // namespace dalle_fast
