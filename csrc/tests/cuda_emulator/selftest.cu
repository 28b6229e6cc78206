// Deliberately faulty kernels: tests/test_cuda_emulated.py checks that the emulator reports each fault
// (or, for the race, that the result changes with the thread order), so its clean runs of the real
// kernels mean something. Compiled for the emulator only.
#include <cuda_runtime.h>

#include <cstdint>

#include "../../cuda/launch.cuh"
#include "../../cuda/ptx.cuh"

namespace {

constexpr int kN = 64;  // threads per block

// Reads a neighbour's shared slot without __syncthreads: a race. (Dynamic shared memory, which the
// emulator refills before each block, so a stale value from an earlier launch cannot hide the race.)
__global__ void race_kernel(float* out) {
  DALLE_FAST_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % kN];
}

// Only half the block reaches the barrier.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < kN / 2) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Only odd lanes take part in a full-warp shuffle.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Launched with kN floats of dynamic shared memory, writes past them.
__global__ void smem_overflow_kernel(float* out) {
  DALLE_FAST_DYNAMIC_SMEM(smem);
  reinterpret_cast<float*>(smem)[threadIdx.x + kN / 2] = 1.f;
  out[threadIdx.x] = 0.f;
}

// Reads dynamic shared memory nobody wrote.
__global__ void uninitialized_smem_kernel(float* out) {
  DALLE_FAST_DYNAMIC_SMEM(smem);
  out[threadIdx.x] = reinterpret_cast<const float*>(smem)[threadIdx.x];
}

// Correct: a butterfly sum over each warp and a block-wide OR, to check the collectives' results.
__global__ void collectives_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int any = __syncthreads_or(threadIdx.x == kN - 1);
  out[threadIdx.x] = v + 1000.f * any;
}

// Reads its own cp.async copy without waiting for it: right only if the copy happened to land early.
__global__ void async_without_wait_kernel(float* out) {
  DALLE_FAST_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem) + 4 * threadIdx.x;
  dalle_fast::cuda::ptx::cp_async_16(s, out + 4 * (threadIdx.x % 16), true);
  dalle_fast::cuda::ptx::cp_async_commit();
  const float v = s[0];
  dalle_fast::cuda::ptx::cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = v;
}

// An ldmatrix row address that is 8-byte but not 16-byte aligned.
__global__ void misaligned_ldmatrix_kernel(float* out) {
  DALLE_FAST_DYNAMIC_SMEM(smem);
  uint32_t r[4];
  dalle_fast::cuda::ptx::ldmatrix_x4(r, smem + 16 * (threadIdx.x % 8) + 8);
  out[threadIdx.x] = static_cast<float>(r[0]);
}

// An ldmatrix past the end of the block's shared memory.
__global__ void ldmatrix_outside_smem_kernel(float* out) {
  DALLE_FAST_DYNAMIC_SMEM(smem);
  uint32_t r[4];
  dalle_fast::cuda::ptx::ldmatrix_x4(r, smem + 16 * threadIdx.x + 16 * kN);
  out[threadIdx.x] = static_cast<float>(r[0]);
}

// Even lanes shuffle while odd lanes __syncwarp: a barrier each, but not the same collective.
__global__ void mixed_collectives_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2)
    __syncwarp();
  else
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  out[threadIdx.x] = v;
}

// A 16-byte vector load from an address that is only 4-byte aligned.
__global__ void misaligned_global_kernel(float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(out + 1 + 4 * (threadIdx.x % 8));
  out[threadIdx.x] = static_cast<float>(v.x & 1);
}

// A read through a wild pointer.
__global__ void wild_pointer_kernel(float* out) {
  volatile uintptr_t address = 64;
  const float* wild = reinterpret_cast<const float*>(address);
  out[threadIdx.x] = wild[threadIdx.x];
}

// An index one past a thread's fixed-size array.
__global__ void local_array_overflow_kernel(float* out) {
  float a[4] = {0.f, 1.f, 2.f, 3.f};
  volatile int i = 4 + static_cast<int>(threadIdx.x % 2);
  out[threadIdx.x] = a[i];
}

__device__ int deep(int n, volatile unsigned char* prev) {
  volatile unsigned char frame[512];
  frame[0] = static_cast<unsigned char>(n + prev[0]);
  if (n == 0) return frame[0];
  const int r = deep(n - 1, frame);
  return r + frame[0];  // the frame stays live across the call
}

// Recursion deeper than a thread's stack.
__global__ void stack_overflow_kernel(float* out) {
  volatile unsigned char start[1] = {0};
  out[threadIdx.x] = static_cast<float>(deep(100000, start));
}

// A full-warp shuffle in a block of 48 threads: the second warp has only 16.
__global__ void partial_warp_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// Correct: shuffles with lane masks 1 and 32 (lane ^ 32 is past the warp: each lane keeps its value).
__global__ void shuffle_lane_mask_kernel(float* out) {
  const float v = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1) + 1000.f * __shfl_xor_sync(0xffffffffu, v, 32);
}

// An integer division by a zero the compiler cannot see.
__global__ void divide_by_zero_kernel(float* out) {
  volatile int zero = 0;
  out[threadIdx.x] = static_cast<float>(static_cast<int>(threadIdx.x + 1) / zero);
}

// 64 KiB of shared memory: one instance launched without cudaFuncSetAttribute, one with it.
template <int Instance>
__global__ void large_smem_kernel(float* out) {
  DALLE_FAST_DYNAMIC_SMEM(smem);
  reinterpret_cast<float*>(smem)[threadIdx.x] = 1.f;
  out[threadIdx.x] = reinterpret_cast<float*>(smem)[threadIdx.x];
}

}  // namespace

// which: 0 race, 1 divergent barrier, 2 divergent shuffle, 3 shared-memory overflow, 4 uninitialized
// shared memory, 5 collectives, 6 cp.async read without wait, 7 misaligned ldmatrix, 8 ldmatrix outside
// shared memory, 9 mixed collectives, 10 misaligned global load, 11 wild pointer, 12 local array
// overflow, 13 stack overflow, 14 full-warp shuffle in a partial warp, 15 shuffle lane masks, 16 64 KiB
// of shared memory without cudaFuncSetAttribute, 17 cudaFuncSetAttribute above the device's limit, 18
// 64 KiB with it, 19 integer division by zero. out: kN floats. Returns the launch's cudaError_t.
extern "C" int emu_selftest(int which, float* out) {
  const size_t smem = kN * sizeof(float);
  switch (which) {
    case 0:
      DALLE_FAST_LAUNCH(race_kernel, 1, kN, smem, nullptr)(out);
      break;
    case 1:
      DALLE_FAST_LAUNCH(divergent_barrier_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 2:
      DALLE_FAST_LAUNCH(divergent_shuffle_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 3:
      DALLE_FAST_LAUNCH(smem_overflow_kernel, 1, kN, smem, nullptr)(out);
      break;
    case 4:
      DALLE_FAST_LAUNCH(uninitialized_smem_kernel, 1, kN, smem, nullptr)(out);
      break;
    case 5:
      DALLE_FAST_LAUNCH(collectives_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 6:
      DALLE_FAST_LAUNCH(async_without_wait_kernel, 1, kN, 4 * smem, nullptr)(out);
      break;
    case 7:
      DALLE_FAST_LAUNCH(misaligned_ldmatrix_kernel, 1, 32, 1024, nullptr)(out);
      break;
    case 8:
      DALLE_FAST_LAUNCH(ldmatrix_outside_smem_kernel, 1, 32, 16 * kN, nullptr)(out);
      break;
    case 9:
      DALLE_FAST_LAUNCH(mixed_collectives_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 10:
      DALLE_FAST_LAUNCH(misaligned_global_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 11:
      DALLE_FAST_LAUNCH(wild_pointer_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 12:
      DALLE_FAST_LAUNCH(local_array_overflow_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 13:
      DALLE_FAST_LAUNCH(stack_overflow_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 14:
      DALLE_FAST_LAUNCH(partial_warp_shuffle_kernel, 1, 48, 0, nullptr)(out);
      break;
    case 15:
      DALLE_FAST_LAUNCH(shuffle_lane_mask_kernel, 1, kN, 0, nullptr)(out);
      break;
    case 16:
      DALLE_FAST_LAUNCH(large_smem_kernel<0>, 1, kN, 64 * 1024, nullptr)(out);
      break;
    case 17:
      return cudaFuncSetAttribute(large_smem_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, 1 << 20);
    case 18: {
      const cudaError_t err =
          cudaFuncSetAttribute(large_smem_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
      if (err != cudaSuccess) return err;
      DALLE_FAST_LAUNCH(large_smem_kernel<1>, 1, kN, 64 * 1024, nullptr)(out);
      break;
    }
    case 19:
      DALLE_FAST_LAUNCH(divide_by_zero_kernel, 1, kN, 0, nullptr)(out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
