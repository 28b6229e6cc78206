// C entry points of the emulated CUDA kernels, for tests/test_cuda_emulated.py (ctypes). Each one prepares
// its launch with the torch glue's own host setup (csrc/cuda/host_setup.h: the packed block layout,
// decode's key intervals, the multi-tensor tables, AdamW's constants, shared-memory sizes), with host
// memory standing in for device memory, then calls the same launcher. Returns the cudaError_t;
// emu_last_error() has the message of a failure. Each one also records the launches host_setup.h describes
// for the call (forward_launches, ...: what the NVRTC backend launches by name), and
// emu_launches_as_described() compares them with the launches the launcher made.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../cuda/attention_cuda.h"
#include "../../cuda/grad_scaling.h"
#include "../../cuda/host_setup.h"
#include "../../layout.h"

using namespace dalle_fast;

namespace {

MaskSpec spec(int32_t kind, int64_t text_len, int64_t image_size, int64_t kernel_size) {
  return normalize_mask_spec(MaskSpec{static_cast<MaskKind>(kind), text_len, image_size, kernel_size});
}

// packed: the layout as the glue uploads it (pack_layout), whose host image the emulated kernels read in
// place; it must outlive the launch.
cuda::AttentionParams params(const MaskSpec& m, const cuda::PackedLayout& packed, int32_t dtype, int64_t batch_heads,
                             int32_t head_dim, float scale, const void* q, const void* k, const void* v) {
  return cuda::AttentionParams{q, k, v, batch_heads, static_cast<int32_t>(m.seq_len()), head_dim, scale,
                               static_cast<cuda::DType>(dtype), m, packed.device_layout(packed.bytes.data())};
}

// n tensors with `buffers` buffers each: ptrs and kinds are [n][buffers].
std::vector<cuda::TensorEntry> entries_of(int n, int buffers, void* const* ptrs, const int32_t* kinds,
                                          const int64_t* numels, const int32_t* blocks) {
  std::vector<cuda::TensorEntry> entries;
  for (int t = 0; t < n; ++t) {
    cuda::FloatKind k[4];
    for (int i = 0; i < buffers; ++i) k[i] = static_cast<cuda::FloatKind>(kinds[t * buffers + i]);
    cuda::add_tensor_entry(entries, buffers, ptrs + t * buffers, k, numels[t], blocks[t]);
  }
  return entries;
}

// The last op call's described launch shapes (host_setup.h), and a fresh launch log to compare them with.
std::vector<cuda::LaunchShape> g_described;

void describe(const std::vector<cuda::KernelLaunch>& launches) {
  cuda_emu::launch_log().clear();
  g_described.clear();
  for (const auto& l : launches) g_described.push_back(l.shape);
}

}  // namespace

extern "C" {

// -1 when the launcher of the last op call launched exactly the described shapes (blocks, threads, shared
// memory), in order; else the index of the first launch that differs or is missing.
int64_t emu_launches_as_described() {
  const auto& log = cuda_emu::launch_log();
  const size_t n = std::max(log.size(), g_described.size());
  for (size_t i = 0; i < n; ++i) {
    if (i >= log.size() || i >= g_described.size()) return static_cast<int64_t>(i);
    const cuda::LaunchShape& d = g_described[i];
    if (log[i].blocks != d.blocks || log[i].threads != d.threads || log[i].smem != d.smem)
      return static_cast<int64_t>(i);
  }
  return -1;
}

size_t emu_forward_smem_bytes(int32_t head_dim) { return cuda::forward_smem_bytes(cuda::DType::kHalf, head_dim); }
size_t emu_backward_smem_bytes(int32_t head_dim, size_t smem_limit) {
  return cuda::backward_smem_bytes(cuda::DType::kHalf, head_dim, smem_limit);
}

int emu_attention_forward(int32_t kind, int64_t text_len, int64_t image_size, int64_t kernel_size, int32_t dtype,
                          int64_t batch_heads, int32_t head_dim, float scale, const void* q, const void* k,
                          const void* v, void* out, float* lse) {
  const MaskSpec m = spec(kind, text_len, image_size, kernel_size);
  const cuda::PackedLayout packed = cuda::pack_layout(*get_block_layout(m, cuda::kBlock));
  const cuda::AttentionParams p = params(m, packed, dtype, batch_heads, head_dim, scale, q, k, v);
  describe(cuda::forward_launches(p, out, lse));
  return cuda::attention_forward(p, out, lse, nullptr);
}

int emu_attention_backward(int32_t kind, int64_t text_len, int64_t image_size, int64_t kernel_size, int32_t dtype,
                           int64_t batch_heads, int32_t head_dim, float scale, const void* q, const void* k,
                           const void* v, const void* grad_out, const void* out, const float* lse, float* delta,
                           void* dq, void* dk, void* dv) {
  const MaskSpec m = spec(kind, text_len, image_size, kernel_size);
  const cuda::PackedLayout packed = cuda::pack_layout(*get_block_layout(m, cuda::kBlock));
  const cuda::AttentionParams p = params(m, packed, dtype, batch_heads, head_dim, scale, q, k, v);
  describe(cuda::backward_launches(p, grad_out, lse, delta, out, dq, dk, dv, cuda_emu::smem_optin()));
  return cuda::attention_backward(p, grad_out, out, lse, delta, dq, dk, dv, cuda_emu::smem_optin(), nullptr);
}

int emu_attention_decode(int32_t kind, int64_t text_len, int64_t image_size, int64_t kernel_size, int64_t position,
                         int32_t dtype, int64_t batch_heads, int32_t seq_len, int32_t head_dim, float scale,
                         const void* q, const void* k, const void* v, void* out, int32_t splits) {
  const MaskSpec m = spec(kind, text_len, image_size, kernel_size);
  cuda::DecodeParams p{};
  int64_t num_keys = 0;
  if (cuda::set_decode_intervals(p, m, position, &num_keys) > cuda::kMaxDecodeIntervals)
    return cuda_emu::host_error(cudaErrorInvalidValue, "decode: more key intervals than kMaxDecodeIntervals");
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.batch_heads = batch_heads;
  p.seq_len = seq_len;
  p.head_dim = head_dim;
  p.scale = scale;
  p.dtype = static_cast<cuda::DecodeDType>(dtype);
  p.splits = splits;
  // The splits' workspace as the GPU's would be: garbage (NaN) wherever the kernel does not write, with
  // guard words on both sides that must still hold their pattern afterwards.
  constexpr size_t kGuard = 64;
  constexpr uint32_t kGuardWord = 0x7fc0dead;  // a NaN
  const size_t n_ws = cuda::decode_workspace_floats(p);
  std::vector<uint32_t> workspace(n_ws + 2 * kGuard, kGuardWord);
  p.partial = n_ws == 0 ? nullptr : reinterpret_cast<float*>(workspace.data() + kGuard);
  describe(cuda::decode_launches(p));
  const int err = cuda::attention_decode(p, nullptr);
  for (size_t i = 0; i < kGuard; ++i)
    if (workspace[i] != kGuardWord || workspace[kGuard + n_ws + i] != kGuardWord)
      return cuda_emu::host_error(cudaErrorIllegalAddress, "decode: a write outside the splits' workspace");
  return err;
}

int emu_decode_splits(int64_t batch_heads, int64_t num_keys, int32_t sm_count) {
  return cuda::decode_splits(batch_heads, num_keys, sm_count);
}

int emu_grad_scale(const void* in, void* out, int64_t n, int32_t kind, const float* scales, int64_t block) {
  describe(cuda::grad_scale_launches(in, out, n, static_cast<cuda::FloatKind>(kind), scales, block));
  return cuda::grad_scale(in, out, n, static_cast<cuda::FloatKind>(kind), scales, block, nullptr);
}

int emu_grad_unscale_filter(const void* in, void* out, int64_t n, int32_t kind, const float* scales, int64_t block,
                            bool* found_inf) {
  describe(cuda::grad_unscale_filter_launches(in, out, n, static_cast<cuda::FloatKind>(kind), scales, block,
                                              found_inf));
  return cuda::grad_unscale_filter(in, out, n, static_cast<cuda::FloatKind>(kind), scales, block, found_inf,
                                   nullptr);
}

int emu_multi_unscale_check(int32_t n, void* const* ptrs, const int32_t* kinds, const int64_t* numels,
                            const int32_t* blocks, const float* scales, bool* found_inf) {
  const cuda::MultiTensorTables tables = cuda::pack_tables(entries_of(n, 1, ptrs, kinds, numels, blocks));
  const void* base = tables.bytes.data();
  describe(cuda::multi_unscale_check_launches(tables.entries(base), tables.chunks(base), tables.num_chunks, scales,
                                              found_inf));
  return cuda::multi_unscale_check(tables.entries(base), tables.chunks(base), tables.num_chunks, scales, found_inf,
                                   nullptr);
}

int emu_scale_update(float* scales, int32_t* cooldown, const bool* found_inf, int64_t n, float growth,
                     float backoff, int32_t window, float min_scale, float max_scale) {
  describe(cuda::scale_update_launches(scales, cooldown, found_inf, n, growth, backoff, window, min_scale, max_scale));
  return cuda::scale_update(scales, cooldown, found_inf, n, growth, backoff, window, min_scale, max_scale, nullptr);
}

// ptrs and kinds are [n][4]: param, grad, exp_avg, exp_avg_sq.
int emu_adamw_step(int32_t n, void* const* ptrs, const int32_t* kinds, const int64_t* numels, const int32_t* blocks,
                   const bool* found_inf, const float* step_size, const float* bias_correction2_sqrt,
                   const float* decay, double beta1, double beta2, double eps) {
  const cuda::MultiTensorTables tables = cuda::pack_tables(entries_of(n, 4, ptrs, kinds, numels, blocks));
  const void* base = tables.bytes.data();
  describe(cuda::adamw_launches(tables.entries(base), tables.chunks(base), tables.num_chunks, found_inf, step_size,
                                bias_correction2_sqrt, decay, cuda::adamw_constants(beta1, beta2, eps)));
  return cuda::adamw_step(tables.entries(base), tables.chunks(base), tables.num_chunks, found_inf, step_size,
                          bias_correction2_sqrt, decay, cuda::adamw_constants(beta1, beta2, eps), nullptr);
}

}  // extern "C"
