// CUDA kernels of per-resblock gradient scaling. Scales and flags are read and written on the device
// only: nothing here makes the host wait. Math is fp32 whatever the storage type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "grad_scaling.h"
#include "host_setup.h"
#include "launch.cuh"

namespace dalle_fast::cuda {
namespace {

__device__ __forceinline__ float load(const void* p, int32_t kind, int64_t i) {
  switch (kind) {
    case 1:
      return __half2float(static_cast<const __half*>(p)[i]);
    case 2:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store(void* p, int32_t kind, int64_t i, float v) {
  switch (kind) {
    case 1:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case 2:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

__global__ void grad_scale_kernel(const void* in, void* out, int64_t n, int32_t kind, const float* scales,
                                  int64_t block) {
  const float s = scales[block];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store(out, kind, i, load(in, kind, i) * s);
}

__global__ void grad_unscale_filter_kernel(const void* in, void* out, int64_t n, int32_t kind, const float* scales,
                                           int64_t block, bool* found_inf) {
  const float inv = __frcp_rn(scales[block]);  // exact reciprocal, also under --use_fast_math
  bool bad = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = load(in, kind, i);
    const bool finite = isfinite(v);
    bad |= !finite;
    store(out, kind, i, finite ? v * inv : 0.0f);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) found_inf[block] = true;
}

__global__ void multi_unscale_check_kernel(const TensorEntry* entries, const ChunkRef* chunks, const float* scales,
                                           bool* found_inf) {
  const ChunkRef c = chunks[blockIdx.x];
  const TensorEntry& t = entries[c.tensor];
  const int64_t begin = c.chunk * kChunk;
  const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
  const float inv = __frcp_rn(scales[t.block]);
  bool bad = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = load(t.ptr[0], t.kind[0], i);
    bad |= !isfinite(v);
    store(t.ptr[0], t.kind[0], i, v * inv);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) found_inf[t.block] = true;
}

__global__ void scale_update_kernel(float* scales, int32_t* cooldown, const bool* found, int64_t n, float growth,
                                    float backoff, int32_t window, float lo, float hi) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= n) return;
  int32_t c = cooldown[b];
  const bool blocked = c > 0;
  if (blocked) --c;
  float v = scales[b];
  if (found[b] && !blocked) {
    v = __fdiv_rn(v, backoff);
    c = window;
  } else if (!found[b]) {
    v = __fmul_rn(v, growth);
  }
  scales[b] = fminf(fmaxf(v, lo), hi);
  cooldown[b] = c;
}

__global__ void adamw_kernel(const TensorEntry* entries, const ChunkRef* chunks, const bool* found,
                             const float* step_size, const float* bc2, const float* decay, AdamWConstants k) {
  const ChunkRef c = chunks[blockIdx.x];
  const TensorEntry& t = entries[c.tensor];
  if (found[t.block]) return;  // this block overflowed: leave it exactly as it is
  const int64_t begin = c.chunk * kChunk;
  const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
  const float step = step_size[t.block], bc = bc2[t.block], d = decay[t.block];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float g = load(t.ptr[1], t.kind[1], i);
    const float p = __fmul_rn(load(t.ptr[0], t.kind[0], i), d);
    const float m = __fadd_rn(__fmul_rn(load(t.ptr[2], t.kind[2], i), k.beta1), __fmul_rn(g, k.one_minus_beta1));
    const float v = __fadd_rn(__fmul_rn(load(t.ptr[3], t.kind[3], i), k.beta2),
                              __fmul_rn(__fmul_rn(g, g), k.one_minus_beta2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc), k.eps);
    store(t.ptr[0], t.kind[0], i, __fsub_rn(p, __fmul_rn(step, __fdiv_rn(m, denom))));
    store(t.ptr[2], t.kind[2], i, m);
    store(t.ptr[3], t.kind[3], i, v);
  }
}

#ifndef __CUDACC_RTC__  // the launchers (host code): NVRTC compiles the kernels alone

// Launches a kernel with shape s (a 1-D grid of at most kMaxGridBlocks blocks, no shared memory).
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, const LaunchShape& s, cudaStream_t stream, Args... args) {
  if (s.blocks == 0) return cudaSuccess;
  if (s.blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  DALLE_FAST_LAUNCH(kernel, static_cast<unsigned>(s.blocks), s.threads, s.smem, stream)(args...);
  return cudaGetLastError();
}

#endif  // __CUDACC_RTC__

}  // namespace

#ifndef __CUDACC_RTC__

cudaError_t grad_scale(const void* in, void* out, int64_t n, FloatKind kind, const float* scales, int64_t block,
                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return launch(grad_scale_kernel, elementwise_launch(n), stream, in, out, n, static_cast<int32_t>(kind), scales,
                block);
}

cudaError_t grad_unscale_filter(const void* in, void* out, int64_t n, FloatKind kind, const float* scales,
                                int64_t block, bool* found_inf, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return launch(grad_unscale_filter_kernel, elementwise_launch(n), stream, in, out, n, static_cast<int32_t>(kind),
                scales, block, found_inf);
}

cudaError_t multi_unscale_check(const TensorEntry* entries, const ChunkRef* chunks, int64_t num_chunks,
                                const float* scales, bool* found_inf, cudaStream_t stream) {
  return launch(multi_unscale_check_kernel, chunk_launch(num_chunks), stream, entries, chunks, scales, found_inf);
}

cudaError_t scale_update(float* scales, int32_t* cooldown, const bool* found_inf, int64_t n, float growth,
                         float backoff, int32_t window, float min_scale, float max_scale, cudaStream_t stream) {
  return launch(scale_update_kernel, per_element_launch(n), stream, scales, cooldown, found_inf, n, growth, backoff,
                window, min_scale, max_scale);
}

cudaError_t adamw_step(const TensorEntry* entries, const ChunkRef* chunks, int64_t num_chunks, const bool* found_inf,
                       const float* step_size, const float* bias_correction2_sqrt, const float* decay,
                       AdamWConstants c, cudaStream_t stream) {
  return launch(adamw_kernel, chunk_launch(num_chunks), stream, entries, chunks, found_inf, step_size,
                bias_correction2_sqrt, decay, c);
}

#endif  // __CUDACC_RTC__

}  // namespace dalle_fast::cuda
