// CPU torch glue of per-resblock gradient scaling: the argument checks (shared with the CUDA glue, in
// checks.h) and the registration; the kernels are in grad_scaling.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "grad_scaling.h"

namespace dalle_fast {
namespace {

at::Tensor grad_scale_cpu(const at::Tensor& grad, const at::Tensor& scales, int64_t block) {
  check_grad(grad, "grad");
  check_scales(scales, grad.device());
  check_block(block, scales, "block");
  return cpu::grad_scale(grad, scales, block);
}

at::Tensor grad_unscale_filter_cpu(const at::Tensor& grad, const at::Tensor& scales, int64_t block,
                                   at::Tensor& found_inf) {
  check_grad(grad, "grad");
  check_flags(scales, found_inf, grad.device());
  check_block(block, scales, "block");
  return cpu::grad_unscale_filter(grad, scales, block, found_inf);
}

void multi_unscale_check_cpu(at::TensorList grads, c10::IntArrayRef blocks, const at::Tensor& scales,
                             at::Tensor& found_inf) {
  check_flags(scales, found_inf, scales.device());
  check_tensor_list(grads, blocks, scales, "grads");
  cpu::multi_unscale_check(grads, blocks, scales, found_inf);
}

void resblock_scale_update_cpu(at::Tensor& scales, at::Tensor& cooldown, const at::Tensor& found_inf, double growth,
                               double backoff, int64_t window, double min_scale, double max_scale) {
  check_flags(scales, found_inf, scales.device());
  check_cooldown(cooldown, scales);
  cpu::scale_update(scales, cooldown, found_inf, growth, backoff, window, min_scale, max_scale);
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    c10::IntArrayRef blocks, const at::Tensor& found_inf, const at::Tensor& step_size,
                    const at::Tensor& bias_correction2_sqrt, const at::Tensor& decay, double beta1, double beta2,
                    double eps) {
  check_adamw_args(params, grads, exp_avg, exp_avg_sq, blocks, found_inf, step_size, bias_correction2_sqrt, decay);
  cpu::adamw_step(params, grads, exp_avg, exp_avg_sq, blocks, found_inf, step_size, bias_correction2_sqrt, decay,
                  beta1, beta2, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("grad_scale", &grad_scale_cpu);
  m.impl("grad_unscale_filter", &grad_unscale_filter_cpu);
  m.impl("multi_unscale_check_", &multi_unscale_check_cpu);
  m.impl("resblock_scale_update_", &resblock_scale_update_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
}

}  // namespace dalle_fast
