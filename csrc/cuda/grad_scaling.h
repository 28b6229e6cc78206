// CUDA kernels of per-resblock gradient scaling (plain CUDA/C++; torch glue in grad_scaling_glue.cpp).
#pragma once

#include "kernel_params.h"

// See attention_cuda.h.
#ifndef __CUDACC_RTC__
#include <cuda_runtime_api.h>

namespace dalle_fast::cuda {

cudaError_t grad_scale(const void* in, void* out, int64_t n, FloatKind kind, const float* scales, int64_t block,
                       cudaStream_t stream);
cudaError_t grad_unscale_filter(const void* in, void* out, int64_t n, FloatKind kind, const float* scales,
                                int64_t block, bool* found_inf, cudaStream_t stream);
// entries / chunks are device arrays. One launch over every chunk of every tensor.
cudaError_t multi_unscale_check(const TensorEntry* entries, const ChunkRef* chunks, int64_t num_chunks,
                                const float* scales, bool* found_inf, cudaStream_t stream);
cudaError_t scale_update(float* scales, int32_t* cooldown, const bool* found_inf, int64_t n, float growth,
                         float backoff, int32_t window, float min_scale, float max_scale, cudaStream_t stream);
cudaError_t adamw_step(const TensorEntry* entries, const ChunkRef* chunks, int64_t num_chunks, const bool* found_inf,
                       const float* step_size, const float* bias_correction2_sqrt, const float* decay,
                       AdamWConstants c, cudaStream_t stream);

}  // namespace dalle_fast::cuda

#endif  // __CUDACC_RTC__
