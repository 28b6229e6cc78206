// Deliberately faulty kernels: tests/test_cuda_emulated.py checks that the emulator reports each fault
// (or, for the race, that the result changes with the thread order), so its clean runs of the real
// kernels mean something. Compiled for the emulator only.
#include <cuda_runtime.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

// Correct, and written from the PTX ISA's tables rather than from the emulator: an ldmatrix .x4 (plain
// and .trans) of 4 matrices of known ids must hand each lane the elements the ISA names. Lane 8 i + r
// posts row r of matrix i; lane l gets, in register i, row l / 4 and columns 2 (l % 4), 2 (l % 4) + 1 of
// matrix i (plain) or of its transpose (.trans), the lower column in the low half. out[l]: plain
// mismatches of lane l, out[32 + l]: transposed ones.
__global__ void ldmatrix_layout_kernel(float* out) {
  DALLE_FAST_DYNAMIC_SMEM(smem);
  auto* ids = reinterpret_cast<uint16_t*>(smem);  // matrix i, row r, column c at (8 i + r) * 8 + c
  const int l = threadIdx.x;
  for (int c = 0; c < 8; ++c) ids[l * 8 + c] = static_cast<uint16_t>(l * 8 + c);
  __syncthreads();
  uint32_t plain[4], trans[4];
  dalle_fast::cuda::ptx::ldmatrix_x4(plain, ids + l * 8);
  dalle_fast::cuda::ptx::ldmatrix_x4_trans(trans, ids + l * 8);
  int bad_plain = 0, bad_trans = 0;
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {
      const int row = l / 4, col = 2 * (l % 4) + h;
      bad_plain += static_cast<uint16_t>(plain[i] >> (16 * h)) != (8 * i + row) * 8 + col;
      bad_trans += static_cast<uint16_t>(trans[i] >> (16 * h)) != (8 * i + col) * 8 + row;
    }
  out[l] = static_cast<float>(bad_plain);
  out[32 + l] = static_cast<float>(bad_trans);
}

// Small integers: exact in fp16 and bf16, and their products' sums exact in fp32.
__device__ float mat_a(int r, int k) { return static_cast<float>((3 * r + 5 * k) % 7 - 3); }
__device__ float mat_b(int k, int n) { return static_cast<float>((2 * k + 3 * n) % 5 - 2); }
__device__ float mat_c(int r, int n) { return static_cast<float>(r - 2 * n); }

__device__ uint32_t pack(__half lo, __half hi) {
  return __half_as_ushort(lo) | static_cast<uint32_t>(__half_as_ushort(hi)) << 16;
}
__device__ uint32_t pack(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return __bfloat16_as_ushort(lo) | static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16;
}
__device__ __half to_t(float x, __half) { return __float2half_rn(x); }
__device__ __nv_bfloat16 to_t(float x, __nv_bfloat16) { return __float2bfloat16_rn(x); }

// Correct, and written from the PTX ISA's fragment tables for mma.m16n8k16 (.f16/.bf16 inputs, .f32
// accumulators), element by element: with g = lane / 4 and t = lane % 4, A's element a_i (i = 0..7, two
// per register, low half first) is at row g + 8 ((i / 2) % 2), column 2 t + i % 2 + 8 (i / 4); B's b_i
// (i = 0..3) at row 2 t + i % 2 + 8 (i / 2), column g; C's and D's c_i at row g + 8 (i / 2), column
// 2 t + i % 2. Each lane checks its 4 results of D = A B + C against the sums. out[l]: mismatches of
// lane l with fp16 inputs, out[32 + l]: with bf16.
template <typename T>
__device__ int mma_mismatches() {
  const int l = threadIdx.x % 32, g = l / 4, t = l % 4;
  float a_el[8], b_el[4];
  for (int i = 0; i < 8; ++i) a_el[i] = mat_a(g + 8 * ((i / 2) % 2), 2 * t + i % 2 + 8 * (i / 4));
  for (int i = 0; i < 4; ++i) b_el[i] = mat_b(2 * t + i % 2 + 8 * (i / 2), g);
  uint32_t a[4], b[2];
  for (int j = 0; j < 4; ++j) a[j] = pack(to_t(a_el[2 * j], T()), to_t(a_el[2 * j + 1], T()));
  for (int j = 0; j < 2; ++j) b[j] = pack(to_t(b_el[2 * j], T()), to_t(b_el[2 * j + 1], T()));
  float d[4];
  for (int i = 0; i < 4; ++i) d[i] = mat_c(g + 8 * (i / 2), 2 * t + i % 2);
  dalle_fast::cuda::ptx::mma16816<T>(d, a, b);
  int bad = 0;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
    float want = mat_c(r, n);
    for (int k = 0; k < 16; ++k) want += mat_a(r, k) * mat_b(k, n);
    bad += d[i] != want;
  }
  return bad;
}

__global__ void mma_layout_kernel(float* out) {
  out[threadIdx.x] = static_cast<float>(mma_mismatches<__half>());
  out[32 + threadIdx.x] = static_cast<float>(mma_mismatches<__nv_bfloat16>());
}

}  // namespace

// which: 0 race, 1 divergent barrier, 2 divergent shuffle, 3 shared-memory overflow, 4 uninitialized
// shared memory, 5 collectives, 6 cp.async read without wait, 7 misaligned ldmatrix, 8 ldmatrix outside
// shared memory, 9 mixed collectives, 10 misaligned global load, 11 wild pointer, 12 local array
// overflow, 13 stack overflow, 14 full-warp shuffle in a partial warp, 15 shuffle lane masks, 16 64 KiB
// of shared memory without cudaFuncSetAttribute, 17 cudaFuncSetAttribute above the device's limit, 18
// 64 KiB with it, 19 integer division by zero, 20 ldmatrix layouts, 21 mma layouts. out: kN floats.
// Returns the launch's cudaError_t.
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
    case 20:
      DALLE_FAST_LAUNCH(ldmatrix_layout_kernel, 1, 32, 32 * 8 * sizeof(uint16_t), nullptr)(out);
      break;
    case 21:
      DALLE_FAST_LAUNCH(mma_layout_kernel, 1, 32, 0, nullptr)(out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
