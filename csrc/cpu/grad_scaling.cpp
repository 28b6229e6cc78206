// CPU kernels of per-resblock gradient scaling (the paper's Section 2.4 / Appendix D), on tensors the
// glue (grad_scaling_glue.cpp) has checked. All arithmetic is fp32 in the same operation order as the
// references in dalle_fast/ops/grad_scaling.py, with no fused multiply-adds (the build passes
// -ffp-contract=off), so results agree with them bit for bit.
#include "grad_scaling.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace dalle_fast::cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per at::parallel_for task

}  // namespace

at::Tensor grad_scale(const at::Tensor& grad, const at::Tensor& scales, int64_t block) {
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

at::Tensor grad_unscale_filter(const at::Tensor& grad, const at::Tensor& scales, int64_t block,
                               at::Tensor& found_inf) {
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

void multi_unscale_check(at::TensorList grads, c10::IntArrayRef blocks, const at::Tensor& scales,
                         at::Tensor& found_inf) {
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

void scale_update(at::Tensor& scales, at::Tensor& cooldown, const at::Tensor& found_inf, double growth,
                  double backoff, int64_t window, double min_scale, double max_scale) {
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

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                c10::IntArrayRef blocks, const at::Tensor& found_inf, const at::Tensor& step_size,
                const at::Tensor& bias_correction2_sqrt, const at::Tensor& decay, double beta1, double beta2,
                double eps) {
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

}  // namespace dalle_fast::cpu
