// CUDA torch glue of per-resblock gradient scaling: checks (shared with the CPU glue), the upload of the
// multi-tensor launches' tables (built by host_setup.h, staged in pinned host memory and copied without
// blocking the host), launch checks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <initializer_list>
#include <vector>

#include "../checks.h"
#include "glue.h"
#include "grad_scaling.h"
#include "host_setup.h"

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

// Device copy of a multi-tensor launch's tables. Returned to keep it alive until the launch is queued;
// the caching allocator only reuses it in stream order.
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
  const cuda::MultiTensorTables tables = cuda::pack_tables(entries);
  const auto n = static_cast<int64_t>(tables.bytes.size());
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), tables.bytes.data(), tables.bytes.size());
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  return {dev, tables.entries(dev.data_ptr()), tables.chunks(dev.data_ptr()), tables.num_chunks};
}

// One tensor's entry: the buffers of ts in order, numel from the first. An empty tensor gets none (as in
// add_tensor_entry), and its dtype is not looked at.
void add_entry(std::vector<cuda::TensorEntry>& entries, std::initializer_list<const at::Tensor*> ts, int64_t block) {
  if ((*ts.begin())->numel() == 0) return;
  void* ptrs[4];
  cuda::FloatKind kinds[4];
  int i = 0;
  for (const at::Tensor* t : ts) {
    ptrs[i] = t->data_ptr();
    kinds[i] = kind_of(*t);
    ++i;
  }
  cuda::add_tensor_entry(entries, i, ptrs, kinds, (*ts.begin())->numel(), static_cast<int32_t>(block));
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
  for (size_t t = 0; t < grads.size(); ++t) add_entry(entries, {&grads[t]}, blocks[t]);
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
  for (size_t t = 0; t < params.size(); ++t)
    add_entry(entries, {&params[t], &grads[t], &exp_avg[t], &exp_avg_sq[t]}, blocks[t]);
  if (entries.empty()) return;
  const Tables tables = upload_tables(entries, step_size.device());
  const cuda::AdamWConstants c = cuda::adamw_constants(beta1, beta2, eps);
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
