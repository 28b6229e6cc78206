// Deliberately faulty kernels: tests/test_cuda_emulated.py checks that the emulator reports each fault
// (or, for the race, that the result changes with the thread order), so its clean runs of the real
// kernels mean something. Compiled for the emulator only.
#include <cuda_runtime.h>

#include "../../cuda/launch.cuh"

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

}  // namespace

// which: 0 race, 1 divergent barrier, 2 divergent shuffle, 3 shared-memory overflow, 4 uninitialized
// shared memory, 5 collectives. out: kN floats. Returns the launch's cudaError_t.
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
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
