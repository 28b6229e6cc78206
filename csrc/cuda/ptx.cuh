// The tensor-core PTX the attention kernels use: mma.sync m16n8k16 (fp16 / bf16 inputs, fp32
// accumulation) and ldmatrix. Fragment layouts are the PTX ISA's ("Matrix Fragments for mma.m16n8k16
// with floating point type"). With g = lane / 4 and t = lane % 4, each 32-bit register holds two 16-bit
// elements, the lower column (or k) in the low half:
//   A, 16 x 16 (m x k):  a[0] = (g, 2t..2t+1)   a[1] = (g + 8, 2t..)   a[2] = (g, 2t + 8..)   a[3] = (g + 8, 2t + 8..)
//   B, 16 x 8  (k x n):  b[0] = (k 2t..2t+1, n g)   b[1] = (k 2t + 8.., n g)
//   C, 16 x 8  (fp32):   c[0], c[1] = (g, 2t), (g, 2t + 1)   c[2], c[3] = (g + 8, 2t), (g + 8, 2t + 1)
// ldmatrix .x4 loads four 8 x 8 matrices of 16-bit elements from shared memory: lane l gives the address
// of row l % 8 of matrix l / 8 (16 contiguous bytes) and receives in r[i] row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 of matrix i; with .trans, the same of matrix i's transpose.
//
// Also ex2.approx (the softmax's exponential, explicit because the extension is built without
// --use_fast_math, which would also flush the gradient-scaling kernels' subnormals to zero) and
// cp.async, for tile loads that overlap the math. The host emulator
// (csrc/testing/cuda_emulator/ptx_emu.h) defines DALLE_FAST_EMULATED_PTX and implements all of these from
// the same definitions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "capabilities.h"

#ifndef DALLE_FAST_EMULATED_PTX
#ifdef __CUDA_ARCH__
static_assert(__CUDA_ARCH__ >= dalle_fast::cuda::kMinComputeCapability * 10,
              "the attention kernels need sm_80 or newer (bf16 mma.sync, ldmatrix, cp.async): drop this arch");
#endif

namespace dalle_fast::cuda::ptx {

// d += a b (16 x 8 fp32 tile).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// cp.async: 16 bytes global -> shared without passing through registers; valid = false writes 16 zero
// bytes and reads nothing. Copies of a commit group are visible to the issuing thread after
// cp_async_wait<N> (at most N newer groups still in flight), to other threads after a barrier.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

// 2^x in the special-function unit (about 2 ulp; -inf gives +0), what exp2f becomes under fast math.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace dalle_fast::cuda::ptx
#endif
