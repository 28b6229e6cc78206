// CUDA kernels of per-resblock gradient scaling (plain CUDA/C++; torch glue in grad_scaling_glue.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dalle_fast::cuda {

enum class FloatKind : int32_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// One tensor of a multi-tensor launch: up to four buffers of `numel` elements (unscale: the gradient;
// AdamW: param, grad, exp_avg, exp_avg_sq) and its block index.
struct TensorEntry {
  void* ptr[4];
  int32_t kind[4];
  int64_t numel;
  int32_t block;
  int32_t pad;
};

// Each thread block of a multi-tensor launch handles one chunk of kChunk elements of one tensor.
struct ChunkRef {
  int32_t tensor;
  int32_t chunk;
};
constexpr int64_t kChunk = 65536;

cudaError_t grad_scale(const void* in, void* out, int64_t n, FloatKind kind, const float* scales, int64_t block,
                       cudaStream_t stream);
cudaError_t grad_unscale_filter(const void* in, void* out, int64_t n, FloatKind kind, const float* scales,
                                int64_t block, bool* found_inf, cudaStream_t stream);
// entries / chunks are device arrays. One launch over every chunk of every tensor.
cudaError_t multi_unscale_check(const TensorEntry* entries, const ChunkRef* chunks, int64_t num_chunks,
                                const float* scales, bool* found_inf, cudaStream_t stream);
cudaError_t scale_update(float* scales, int32_t* cooldown, const bool* found_inf, int64_t n, float growth,
                         float backoff, int32_t window, float min_scale, float max_scale, cudaStream_t stream);
struct AdamWConstants {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};
cudaError_t adamw_step(const TensorEntry* entries, const ChunkRef* chunks, int64_t num_chunks, const bool* found_inf,
                       const float* step_size, const float* bias_correction2_sqrt, const float* decay,
                       AdamWConstants c, cudaStream_t stream);

}  // namespace dalle_fast::cuda
