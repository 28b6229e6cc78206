// CPU kernels of per-resblock gradient scaling (the paper's Section 2.4 / Appendix D):
//   grad_scale             gradient entering a resblock branch: g * scale[block]
//   grad_unscale_filter    gradient leaving the branch: g / scale, Inf/NaN -> 0, flags found_inf[block]
//   multi_unscale_check_   every parameter gradient unscaled by its block's scale, one flag per block
//   resblock_scale_update_ the paper's scale rules, on the scales' device
//   adamw_step_            AdamW that skips exactly the blocks whose flag is set
// All arithmetic is fp32 in the same operation order as the references in dalle_fast/amp.py, with no
// fused multiply-adds (the build passes -ffp-contract=off), so results agree with them bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <atomic>
#include <cmath>

namespace dalle_fast {
namespace {

constexpr int64_t kGrain = 32768;

at::Tensor grad_scale_cpu(const at::Tensor& grad, const at::Tensor& scales, int64_t block) {
  check_grad(grad, "grad");
  check_scales(scales, grad.device());
  check_block(block, scales, "block");
  const float s = scales.contiguous().data_ptr<float>()[block];
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grad_scale", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dst[i] = static_cast<scalar_t>(static_cast<float>(src[i]) * s);
    });
  });
  return out;
}

at::Tensor grad_unscale_filter_cpu(const at::Tensor& grad, const at::Tensor& scales, int64_t block,
                                   at::Tensor& found_inf) {
  check_grad(grad, "grad");
  check_flags(scales, found_inf, grad.device());
  check_block(block, scales, "block");
  const float inv = 1.0f / scales.data_ptr<float>()[block];
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty_like(g);
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grad_unscale_filter", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t b, int64_t e) {
      bool local = false;
      for (int64_t i = b; i < e; ++i) {
        const float v = static_cast<float>(src[i]);
        const bool finite = std::isfinite(v);
        local |= !finite;
        dst[i] = static_cast<scalar_t>(finite ? v * inv : 0.0f);
      }
      if (local) bad.store(true, std::memory_order_relaxed);
    });
  });
  if (bad.load()) found_inf.data_ptr<bool>()[block] = true;
  return out;
}

void multi_unscale_check_cpu(at::TensorList grads, c10::IntArrayRef blocks, const at::Tensor& scales,
                             at::Tensor& found_inf) {
  check_flags(scales, found_inf, scales.device());
  check_tensor_list(grads, blocks, scales, "grads");
  const float* s = scales.data_ptr<float>();
  bool* flags = found_inf.data_ptr<bool>();
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor& g = grads[t];
    const float inv = 1.0f / s[blocks[t]];
    std::atomic<bool> bad{false};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "multi_unscale_check", [&] {
      scalar_t* p = g.data_ptr<scalar_t>();
      at::parallel_for(0, g.numel(), kGrain, [&](int64_t b, int64_t e) {
        bool local = false;
        for (int64_t i = b; i < e; ++i) {
          const float v = static_cast<float>(p[i]);
          local |= !std::isfinite(v);
          p[i] = static_cast<scalar_t>(v * inv);
        }
        if (local) bad.store(true, std::memory_order_relaxed);
      });
    });
    if (bad.load()) flags[blocks[t]] = true;
  }
}

void resblock_scale_update_cpu(at::Tensor& scales, at::Tensor& cooldown, const at::Tensor& found_inf, double growth,
                               double backoff, int64_t window, double min_scale, double max_scale) {
  check_flags(scales, found_inf, scales.device());
  check_cooldown(cooldown, scales);
  float* s = scales.data_ptr<float>();
  int32_t* c = cooldown.data_ptr<int32_t>();
  const bool* f = found_inf.data_ptr<bool>();
  const float grow = static_cast<float>(growth), back = static_cast<float>(backoff);
  const float lo = static_cast<float>(min_scale), hi = static_cast<float>(max_scale);
  for (int64_t b = 0; b < scales.size(0); ++b) {
    const bool blocked = c[b] > 0;
    if (blocked) --c[b];
    float v = s[b];
    if (f[b] && !blocked) {
      v = v / back;
      c[b] = static_cast<int32_t>(window);
    } else if (!f[b]) {
      v = v * grow;
    }
    s[b] = std::min(std::max(v, lo), hi);
  }
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    c10::IntArrayRef blocks, const at::Tensor& found_inf, const at::Tensor& step_size,
                    const at::Tensor& bias_correction2_sqrt, const at::Tensor& decay, double beta1, double beta2,
                    double eps) {
  check_adamw_args(params, grads, exp_avg, exp_avg_sq, blocks, found_inf, step_size, bias_correction2_sqrt, decay);
  const bool* f = found_inf.data_ptr<bool>();
  const float* ss = step_size.data_ptr<float>();
  const float* bc2 = bias_correction2_sqrt.data_ptr<float>();
  const float* dec = decay.data_ptr<float>();
  const float b1 = static_cast<float>(beta1), omb1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), omb2 = static_cast<float>(1.0 - beta2);
  const float e = static_cast<float>(eps);
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t blk = blocks[t];
    if (f[blk]) continue;  // this block overflowed: its parameters and moments stay as they are
    const float step = ss[blk], bc = bc2[blk], d = dec[blk];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[t].scalar_type(), "adamw_p", [&] {
      using p_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[t].scalar_type(), "adamw_g", [&] {
        using g_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, exp_avg[t].scalar_type(), "adamw_m", [&] {
          using m_t = scalar_t;
          p_t* p = params[t].data_ptr<p_t>();
          const g_t* g = grads[t].data_ptr<g_t>();
          m_t* m = exp_avg[t].data_ptr<m_t>();
          m_t* v = exp_avg_sq[t].data_ptr<m_t>();
          at::parallel_for(0, params[t].numel(), kGrain, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; ++i) {
              const float gi = static_cast<float>(g[i]);
              float pi = static_cast<float>(p[i]) * d;
              const float mi = static_cast<float>(m[i]) * b1 + gi * omb1;
              const float vi = static_cast<float>(v[i]) * b2 + (gi * gi) * omb2;
              const float denom = std::sqrt(vi) / bc + e;
              pi = pi - step * (mi / denom);
              p[i] = static_cast<p_t>(pi);
              m[i] = static_cast<m_t>(mi);
              v[i] = static_cast<m_t>(vi);
            }
          });
        });
      });
    });
  }
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
