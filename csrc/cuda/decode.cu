// CUDA decode attention: one query row per (batch, head) against a key/value cache, for sampling. Only
// the query's key intervals are read. Each warp takes every kDecodeWarps-th key of each interval, lanes
// split the head dimension (element d on lane d % 32), a butterfly shuffle sums the dot product, and the
// warp keeps a flash-style online softmax; the block then merges the warps' partial results.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "attention_cuda.h"
#include "launch.cuh"

namespace dalle_fast::cuda {
namespace {

constexpr int kDecodeWarps = 4;
constexpr int kMaxPerLane = 8;  // head_dim <= 256 = 32 lanes x 8
// Shared memory: each warp's running max and sum, then its partial output row.
constexpr size_t kDecodeSmemBytes = sizeof(float) * kDecodeWarps * (2 + 32 * kMaxPerLane);

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

template <typename T>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_kernel(DecodeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = p.head_dim;
  const int64_t bh = blockIdx.x;
  const T* Q = static_cast<const T*>(p.q) + bh * D;
  const T* K = static_cast<const T*>(p.k) + bh * p.seq_len * D;
  const T* V = static_cast<const T*>(p.v) + bh * p.seq_len * D;

  float q[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int d = lane + 32 * e;
    q[e] = d < D ? load_f(Q + d) * p.scale : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int t = 0; t < p.num_intervals; ++t) {
    for (int64_t j = p.lo[t] + warp; j < p.hi[t]; j += kDecodeWarps) {
      const T* kj = K + j * D;
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int d = lane + 32 * e;
        if (d < D) s += q[e] * load_f(kj + d);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
      const float m_new = fmaxf(m, s);
      const float corr = m == -INFINITY ? 0.f : expf(m - m_new);  // no key yet: nothing to rescale
      const float w = expf(s - m_new);
      l = l * corr + w;
      const T* vj = V + j * D;
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int d = lane + 32 * e;
        if (d < D) acc[e] = acc[e] * corr + w * load_f(vj + d);
      }
      m = m_new;
    }
  }

  DALLE_FAST_DYNAMIC_SMEM(smem);
  float* s_m = reinterpret_cast<float*>(smem);
  float* s_l = s_m + kDecodeWarps;
  auto* s_acc = reinterpret_cast<float(*)[32 * kMaxPerLane]>(s_l + kDecodeWarps);
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < D) s_acc[warp][d] = acc[e];
  }
  __syncthreads();
  // Merge the warps in order: rescale each to the common maximum (a warp with no keys has m = -inf, l = 0).
  float mx = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, s_m[w]);
  float weight[kDecodeWarps], total = 0.f;
  for (int w = 0; w < kDecodeWarps; ++w) {
    weight[w] = s_m[w] == -INFINITY ? 0.f : expf(s_m[w] - mx);
    total += s_l[w] * weight[w];
  }
  T* O = static_cast<T*>(p.out) + bh * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < kDecodeWarps; ++w) o += s_acc[w][d] * weight[w];
    store_f(O + d, o / total);
  }
}

}  // namespace

cudaError_t attention_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch_heads == 0) return cudaSuccess;
  if (p.batch_heads > 0x7fffffffLL || p.head_dim < 1 || p.head_dim > 32 * kMaxPerLane ||
      p.num_intervals > kMaxDecodeIntervals)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.batch_heads)), block(kDecodeWarps * 32);
  switch (p.dtype) {
    case DecodeDType::kFloat:
      DALLE_FAST_LAUNCH(decode_kernel<float>, grid, block, kDecodeSmemBytes, stream)(p);
      break;
    case DecodeDType::kHalf:
      DALLE_FAST_LAUNCH(decode_kernel<__half>, grid, block, kDecodeSmemBytes, stream)(p);
      break;
    case DecodeDType::kBFloat16:
      DALLE_FAST_LAUNCH(decode_kernel<__nv_bfloat16>, grid, block, kDecodeSmemBytes, stream)(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace dalle_fast::cuda
