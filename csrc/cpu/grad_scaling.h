// CPU kernels of per-resblock gradient scaling, on tensors the torch glue (grad_scaling_glue.cpp) has
// checked; each does what the op of the same name in csrc/registration.cpp says:
//   grad_scale             gradient entering a resblock branch: g * scale[block]
//   grad_unscale_filter    gradient leaving the branch: g / scale, Inf/NaN -> 0, flags found_inf[block]
//   multi_unscale_check    every parameter gradient unscaled by its block's scale, one flag per block
//   scale_update           the paper's scale rules (resblock_scale_update_)
//   adamw_step             AdamW that skips exactly the blocks whose flag is set
// They take tensors, not raw buffers like the attention kernels, because they dispatch on each tensor's
// dtype (AT_DISPATCH) and parallelise with at::parallel_for.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace dalle_fast::cpu {

at::Tensor grad_scale(const at::Tensor& grad, const at::Tensor& scales, int64_t block);
at::Tensor grad_unscale_filter(const at::Tensor& grad, const at::Tensor& scales, int64_t block,
                               at::Tensor& found_inf);
void multi_unscale_check(at::TensorList grads, c10::IntArrayRef blocks, const at::Tensor& scales,
                         at::Tensor& found_inf);
void scale_update(at::Tensor& scales, at::Tensor& cooldown, const at::Tensor& found_inf, double growth,
                  double backoff, int64_t window, double min_scale, double max_scale);
void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                c10::IntArrayRef blocks, const at::Tensor& found_inf, const at::Tensor& step_size,
                const at::Tensor& bias_correction2_sqrt, const at::Tensor& decay, double beta1, double beta2,
                double eps);

}  // namespace dalle_fast::cpu
