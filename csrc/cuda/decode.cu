// CUDA decode attention: one query row per (batch, head) against a key/value cache, for sampling. Only
// the query's key intervals are read. Lanes split the head dimension (element d on lane d % 32) and a
// butterfly shuffle sums each dot product. Decode is bound by memory latency, not bandwidth or math, so
// the kernel keeps many loads in flight: each of the kDecodeWarps warps takes kDecodeUnroll keys at a
// time (keys j, j + kDecodeWarps, ... of an interval), issuing all their K and V loads before it waits on
// any, and reduces their dot products side by side; and when batch * heads blocks would leave SMs idle,
// `splits` blocks share a row's keys (flash-decoding) and a second kernel merges their results. Every
// warp keeps a flash-style online softmax in base 2 (the query prescaled by scale log2 e); blocks and
// splits merge in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attention_cuda.h"
#include "host_setup.h"
#include "launch.cuh"

namespace dalle_fast::cuda {
namespace {

// kDecodeWarps, the shared memory's size and the elements per lane are decode_launch's (host_setup.h).
constexpr int kDecodeUnroll = 4;                       // keys in flight per warp
constexpr int kMaxPerLane = kMaxDecodeHeadDim / 32;   // head_dim <= 256 = 32 lanes x 8
// Multiply-adds are written as __fmaf_rn (what nvcc would contract them to), other products and sums
// as __fmul_rn / __fadd_rn: the host emulator, which fuses nothing, then rounds these steps as the GPU
// does (exp2f itself may differ by an ulp or two).

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Split `split` of `splits` takes keys [first, last) of the row's keys counted across its intervals.
__device__ __forceinline__ void split_range(const DecodeParams& p, int split, int64_t* first, int64_t* last) {
  int64_t total = 0;
  for (int t = 0; t < p.num_intervals; ++t) total += p.hi[t] - p.lo[t];
  *first = total * split / p.splits;
  *last = total * (split + 1) / p.splits;
}

// E: elements per lane, head_dim <= 32 E (the registers of a larger E would hold only zeros).
template <typename T, int E>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_kernel(DecodeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = p.head_dim;
  const int64_t bh = blockIdx.x / p.splits;
  const int split = static_cast<int>(blockIdx.x % p.splits);
  const T* Q = static_cast<const T*>(p.q) + bh * D;
  const T* K = static_cast<const T*>(p.k) + bh * p.seq_len * D;
  const T* V = static_cast<const T*>(p.v) + bh * p.seq_len * D;

  float q[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    q[e] = d < D ? load_f(Q + d) * (p.scale * static_cast<float>(M_LOG2E)) : 0.f;
    acc[e] = 0.f;
  }
  int64_t first, last;
  split_range(p, split, &first, &last);
  float m = -INFINITY, l = 0.f;  // running max (log2 units) and sum of this warp's keys
  int64_t before = 0;            // keys in the intervals before t
  for (int t = 0; t < p.num_intervals; before += p.hi[t] - p.lo[t], ++t) {
    // This split's part of interval t: [lo, hi).
    const int64_t lo = p.lo[t] + std::max<int64_t>(0, first - before);
    const int64_t hi = p.lo[t] + std::min<int64_t>(p.hi[t] - p.lo[t], last - before);
    for (int64_t j0 = lo + warp; j0 < hi; j0 += kDecodeWarps * kDecodeUnroll) {
      // Key u of this step is j0 + u kDecodeWarps (the same for every lane: the shuffles stay uniform).
      float kx[kDecodeUnroll][E], vx[kDecodeUnroll][E];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const int64_t j = j0 + u * kDecodeWarps;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int d = lane + 32 * e;
          const bool in = j < hi && d < D;
          kx[u][e] = in ? load_f(K + j * D + d) : 0.f;
          vx[u][e] = in ? load_f(V + j * D + d) : 0.f;
        }
      }
      float s[kDecodeUnroll];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        s[u] = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) s[u] = __fmaf_rn(q[e], kx[u][e], s[u]);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2)
#pragma unroll
        for (int u = 0; u < kDecodeUnroll; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], off);
      float m_new = m;
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u)
        if (j0 + u * kDecodeWarps < hi) m_new = fmaxf(m_new, s[u]);
      const float corr = m == -INFINITY ? 0.f : exp2f(m - m_new);  // no key yet: nothing to rescale
      l = __fmul_rn(l, corr);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = __fmul_rn(acc[e], corr);
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        // A -inf score (overflow) weighs 0, even while the max is still -inf (exp2(-inf + inf) is NaN).
        const float w = j0 + u * kDecodeWarps < hi && s[u] != -INFINITY ? exp2f(s[u] - m_new) : 0.f;
        l = __fadd_rn(l, w);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = __fmaf_rn(w, vx[u][e], acc[e]);
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
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    if (d < D) s_acc[warp][d] = acc[e];
  }
  __syncthreads();
  // Merge the warps in order: rescale each to the common maximum (a warp with no keys has m = -inf, l = 0).
  float mx = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, s_m[w]);
  float weight[kDecodeWarps], total = 0.f;
  for (int w = 0; w < kDecodeWarps; ++w) {
    weight[w] = s_m[w] == -INFINITY ? 0.f : exp2f(s_m[w] - mx);
    total = __fmaf_rn(s_l[w], weight[w], total);
  }
  // One block per row: the output. Several: this split's max, sum and unnormalised output, for
  // decode_merge_kernel.
  T* O = static_cast<T*>(p.out) + bh * D;
  float* part = p.splits == 1 ? nullptr : p.partial + static_cast<int64_t>(blockIdx.x) * (D + 2);
  if (part != nullptr && threadIdx.x == 0) {
    part[0] = mx;
    part[1] = total;
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < kDecodeWarps; ++w) o = __fmaf_rn(s_acc[w][d], weight[w], o);
    if (part == nullptr)
      store_f(O + d, o / total);
    else
      part[2 + d] = o;
  }
}

// One block per (batch, head): the splits' results, rescaled to their common maximum, in split order. A
// split whose sum is 0 saw no key (or only -inf scores) and adds nothing; one with a key has a sum of at
// least 1 (its top key's weight), or NaN, which propagates as it does with a single block.
template <typename T>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_merge_kernel(DecodeParams p) {
  const int D = p.head_dim;
  const int64_t bh = blockIdx.x;
  const float* part = p.partial + bh * p.splits * (D + 2);
  float mx = -INFINITY;
  for (int s = 0; s < p.splits; ++s)
    if (part[s * (D + 2) + 1] != 0.f) mx = fmaxf(mx, part[s * (D + 2)]);
  float total = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const float ls = part[s * (D + 2) + 1];
    if (ls != 0.f) total = __fmaf_rn(ls, exp2f(part[s * (D + 2)] - mx), total);
  }
  T* O = static_cast<T*>(p.out) + bh * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < p.splits; ++s)
      if (part[s * (D + 2) + 1] != 0.f)
        o = __fmaf_rn(part[s * (D + 2) + 2 + d], exp2f(part[s * (D + 2)] - mx), o);
    store_f(O + d, o / total);
  }
}

#ifndef __CUDACC_RTC__  // the launchers (host code): NVRTC compiles the kernels alone

template <typename T>
cudaError_t launch(const DecodeParams& p, const DecodeLaunch& plan, cudaStream_t stream) {
  const LaunchShape& s = plan.rows;
  const unsigned blocks = static_cast<unsigned>(s.blocks);
  switch (plan.elems_per_lane) {
    case 1:
      DALLE_FAST_LAUNCH((decode_kernel<T, 1>), blocks, s.threads, s.smem, stream)(p);
      break;
    case 2:
      DALLE_FAST_LAUNCH((decode_kernel<T, 2>), blocks, s.threads, s.smem, stream)(p);
      break;
    case 4:
      DALLE_FAST_LAUNCH((decode_kernel<T, 4>), blocks, s.threads, s.smem, stream)(p);
      break;
    default:
      DALLE_FAST_LAUNCH((decode_kernel<T, kMaxPerLane>), blocks, s.threads, s.smem, stream)(p);
  }
  if (plan.merge.blocks == 0) return cudaGetLastError();
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  DALLE_FAST_LAUNCH(decode_merge_kernel<T>, static_cast<unsigned>(plan.merge.blocks), plan.merge.threads,
                    plan.merge.smem, stream)(p);
  return cudaGetLastError();
}

#endif  // __CUDACC_RTC__

}  // namespace

#ifndef __CUDACC_RTC__

cudaError_t attention_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch_heads == 0) return cudaSuccess;
  if (!decode_params_valid(p)) return cudaErrorInvalidValue;
  const DecodeLaunch plan = decode_launch(p);
  switch (p.dtype) {
    case DecodeDType::kFloat:
      return launch<float>(p, plan, stream);
    case DecodeDType::kHalf:
      return launch<__half>(p, plan, stream);
    case DecodeDType::kBFloat16:
      return launch<__nv_bfloat16>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

#endif  // __CUDACC_RTC__

}  // namespace dalle_fast::cuda
