// CUDA host glue of per-resblock gradient scaling: checks (shared with the CPU kernels), the tensor
// tables of multi-tensor launches (pinned host memory, copied without blocking the host), launch checks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "glue.h"
#include "grad_scaling.h"

namespace dalle_fast {
namespace {

using cuda::check_launch;

cuda::FloatKind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::FloatKind::kHalf;
    case at::kBFloat16:
      return cuda::FloatKind::kBFloat16;
    case at::kFloat:
      return cuda::FloatKind::kFloat;
    default:
      TORCH_CHECK(false, "dalle_fast: CUDA gradient-scaling kernels take float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

// Device copy of a multi-tensor launch's tables: [entries | chunks]. Returned to keep it alive until the
// launch is queued; the caching allocator only reuses it in stream order.
struct Tables {
  at::Tensor buffer;
  const cuda::TensorEntry* entries;
  const cuda::ChunkRef* chunks;
  int64_t num_chunks;
};

Tables upload_tables(const std::vector<cuda::TensorEntry>& entries, const at::Device& device) {
  // A captured graph would replay the copy from a host buffer that is freed (and reused) after this call.
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "dalle_fast: multi-tensor gradient-scaling ops upload their tensor tables from host memory on every "
              "call and cannot be captured in a CUDA graph");
  std::vector<cuda::ChunkRef> chunks;
  for (size_t t = 0; t < entries.size(); ++t)
    for (int64_t c = 0; c * cuda::kChunk < entries[t].numel; ++c)
      chunks.push_back({static_cast<int32_t>(t), static_cast<int32_t>(c)});
  const size_t eb = (entries.size() * sizeof(cuda::TensorEntry) + 15) / 16 * 16;
  const size_t cb = chunks.size() * sizeof(cuda::ChunkRef);
  at::Tensor host = at::empty({static_cast<int64_t>(eb + cb)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), entries.size() * sizeof(cuda::TensorEntry));
  std::memcpy(static_cast<uint8_t*>(host.data_ptr()) + eb, chunks.data(), cb);
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  auto* base = static_cast<uint8_t*>(dev.data_ptr());
  return {dev, reinterpret_cast<const cuda::TensorEntry*>(base), reinterpret_cast<const cuda::ChunkRef*>(base + eb),
          static_cast<int64_t>(chunks.size())};
}

at::Tensor grad_scale_cuda(const at::Tensor& grad, const at::Tensor& scales, int64_t block) {
  check_grad(grad, "grad");
  check_scales(scales, grad.device());
  check_block(block, scales, "block");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous(), s = scales.contiguous();
  at::Tensor out = at::empty_like(g);
  check_launch(cuda::grad_scale(g.data_ptr(), out.data_ptr(), g.numel(), kind_of(g), s.data_ptr<float>(), block,
                                c10::cuda::getCurrentCUDAStream()),
               "grad_scale");
  return out;
}

at::Tensor grad_unscale_filter_cuda(const at::Tensor& grad, const at::Tensor& scales, int64_t block,
                                    at::Tensor& found_inf) {
  check_grad(grad, "grad");
  check_flags(scales, found_inf, grad.device());
  check_block(block, scales, "block");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty_like(g);
  check_launch(cuda::grad_unscale_filter(g.data_ptr(), out.data_ptr(), g.numel(), kind_of(g), scales.data_ptr<float>(),
                                         block, found_inf.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream()),
               "grad_unscale_filter");
  return out;
}

void multi_unscale_check_cuda(at::TensorList grads, c10::IntArrayRef blocks, const at::Tensor& scales,
                              at::Tensor& found_inf) {
  check_flags(scales, found_inf, scales.device());
  check_tensor_list(grads, blocks, scales, "grads");
  const c10::cuda::CUDAGuard guard(scales.device());
  std::vector<cuda::TensorEntry> entries;
  for (size_t t = 0; t < grads.size(); ++t) {
    if (grads[t].numel() == 0) continue;
    cuda::TensorEntry e{};
    e.ptr[0] = grads[t].data_ptr();
    e.kind[0] = static_cast<int32_t>(kind_of(grads[t]));
    e.numel = grads[t].numel();
    e.block = static_cast<int32_t>(blocks[t]);
    entries.push_back(e);
  }
  if (entries.empty()) return;
  const Tables tables = upload_tables(entries, scales.device());
  check_launch(cuda::multi_unscale_check(tables.entries, tables.chunks, tables.num_chunks, scales.data_ptr<float>(),
                                         found_inf.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream()),
               "multi_unscale_check_");
}

void resblock_scale_update_cuda(at::Tensor& scales, at::Tensor& cooldown, const at::Tensor& found_inf, double growth,
                                double backoff, int64_t window, double min_scale, double max_scale) {
  check_flags(scales, found_inf, scales.device());
  check_cooldown(cooldown, scales);
  const c10::cuda::CUDAGuard guard(scales.device());
  check_launch(cuda::scale_update(scales.data_ptr<float>(), cooldown.data_ptr<int32_t>(), found_inf.data_ptr<bool>(),
                                  scales.numel(), static_cast<float>(growth), static_cast<float>(backoff),
                                  static_cast<int32_t>(window), static_cast<float>(min_scale),
                                  static_cast<float>(max_scale), c10::cuda::getCurrentCUDAStream()),
               "resblock_scale_update_");
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                     c10::IntArrayRef blocks, const at::Tensor& found_inf, const at::Tensor& step_size,
                     const at::Tensor& bias_correction2_sqrt, const at::Tensor& decay, double beta1, double beta2,
                     double eps) {
  check_adamw_args(params, grads, exp_avg, exp_avg_sq, blocks, found_inf, step_size, bias_correction2_sqrt, decay);
  const c10::cuda::CUDAGuard guard(step_size.device());
  std::vector<cuda::TensorEntry> entries;
  for (size_t t = 0; t < params.size(); ++t) {
    if (params[t].numel() == 0) continue;
    cuda::TensorEntry e{};
    const at::Tensor* ts[4] = {&params[t], &grads[t], &exp_avg[t], &exp_avg_sq[t]};
    for (int i = 0; i < 4; ++i) {
      e.ptr[i] = ts[i]->data_ptr();
      e.kind[i] = static_cast<int32_t>(kind_of(*ts[i]));
    }
    e.numel = params[t].numel();
    e.block = static_cast<int32_t>(blocks[t]);
    entries.push_back(e);
  }
  if (entries.empty()) return;
  const Tables tables = upload_tables(entries, step_size.device());
  const cuda::AdamWConstants c{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                               static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
  check_launch(cuda::adamw_step(tables.entries, tables.chunks, tables.num_chunks, found_inf.data_ptr<bool>(),
                                step_size.data_ptr<float>(), bias_correction2_sqrt.data_ptr<float>(),
                                decay.data_ptr<float>(), c, c10::cuda::getCurrentCUDAStream()),
               "adamw_step_");
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("grad_scale", &grad_scale_cuda);
  m.impl("grad_unscale_filter", &grad_unscale_filter_cuda);
  m.impl("multi_unscale_check_", &multi_unscale_check_cuda);
  m.impl("resblock_scale_update_", &resblock_scale_update_cuda);
  m.impl("adamw_step_", &adamw_step_cuda);
}

}  // namespace dalle_fast
