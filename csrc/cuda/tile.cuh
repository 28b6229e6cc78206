// Shared pieces of the CUDA attention kernels: element conversion, tile loads into shared memory, the
// element mask of partial blocks, and launch helpers. Tensor-core math uses nvcuda::wmma 16x16x16
// fragments (fp16 / bf16 inputs, fp32 accumulation; sm_80 and newer).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../layout.h"
#include "attention_cuda.h"
#include "launch.cuh"
#include "ptx.cuh"

namespace dalle_fast::cuda {

constexpr int kWarps = 4;  // each warp owns 16 rows of a 64-row tile
constexpr int kThreads = kWarps * 32;
constexpr int kPadT = 8;  // elements of padding per shared row: keeps wmma pointers 32-byte aligned,
constexpr int kPadF = 4;  // and staggers rows across banks

template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// ---- tensor-core fragments (layouts in ptx.cuh) ----------------------------------------------------------

// ldmatrix .x4 row address of this lane for the A fragment of the 16 x 16 block at (r0, c0) of a
// row-major shared tile: matrices (r0, c0), (r0 + 8, c0), (r0, c0 + 8), (r0 + 8, c0 + 8) -> a[0..3].
template <typename T>
__device__ __forceinline__ const T* a_row(const T* s, int ld, int r0, int c0, int lane) {
  return s + (r0 + lane % 8 + 8 * (lane / 8 % 2)) * ld + c0 + 8 * (lane / 16);
}

// Row address for the B fragments of two 8-wide n-tiles (n0, n0 + 8) at k-step k0, where B(k, n) =
// s[n][k] (the tile's rows are B's columns, e.g. K for Q K^T): r[0..1] is tile n0's b, r[2..3] tile n0 + 8's.
template <typename T>
__device__ __forceinline__ const T* b_rows(const T* s, int ld, int n0, int k0, int lane) {
  return s + (n0 + lane % 8 + 8 * (lane / 16)) * ld + k0 + 8 * (lane / 8 % 2);
}

// The same for B(k, n) = s[k][n] (the tile's rows are B's rows, e.g. V for P V), read with ldmatrix .trans.
template <typename T>
__device__ __forceinline__ const T* bt_rows(const T* s, int ld, int k0, int n0, int lane) {
  return s + (k0 + lane % 8 + 8 * (lane / 8 % 2)) * ld + n0 + 8 * (lane / 16);
}

// d0 += a b[0..1], d1 += a b[2..3]: two 16 x 8 tiles sharing the A fragment.
template <typename T>
__device__ __forceinline__ void mma_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[4]) {
  const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
  ptx::mma16816<T>(d0, a, b0);
  ptx::mma16816<T>(d1, a, b1);
}

// Two fp32 values as the T pair of one 32-bit register (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = Elem<T>::from_float(lo), h = Elem<T>::from_float(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return lb | static_cast<uint32_t>(hb) << 16;
}

// Stores two adjacent T (4-byte aligned) in one 32-bit store.
template <typename T>
__device__ __forceinline__ void store2(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = pack2<T>(lo, hi);
}

// Copies rows [row0, row0 + kBlock) of a [seq_len, D] matrix into a shared tile with leading dim ld,
// 16 bytes per thread per step; rows past seq_len become zeros.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* tile, int ld, const T* src, int row0, int seq_len) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = D / kVec;
  for (int idx = threadIdx.x; idx < kBlock * kPerRow; idx += kThreads) {
    const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < seq_len) val = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(row0 + r) * D + c);
    *reinterpret_cast<uint4*>(tile + r * ld + c) = val;
  }
}

// Loads kBlock fp32 values (lse or delta rows), `fill` past seq_len.
__device__ __forceinline__ void load_rows(float* dst, const float* src, int row0, int seq_len, float fill) {
  for (int r = threadIdx.x; r < kBlock; r += kThreads) dst[r] = row0 + r < seq_len ? src[row0 + r] : fill;
}

// May query i see key j? Rows and columns past seq_len are padding and never visible.
__device__ __forceinline__ bool visible(const MaskSpec& m, int i, int j, int seq_len) {
  return i < seq_len && j < seq_len && mask_allows(m, i, j);
}

// A layout entry needs no element mask when the layout says full and the tile has no padding.
__device__ __forceinline__ bool tile_full(bool layout_full, int q0, int k0, int seq_len) {
  return layout_full && q0 + kBlock <= seq_len && k0 + kBlock <= seq_len;
}

// dst (16 x N fp32, leading dim ldd) = A (16 x K, T, row-major) @ B, where B is K x N row-major when
// B_ROW, else B is stored as an N x K row-major matrix and read transposed. One warp; K, N multiples of 16.
template <typename T, int K, int N, bool B_ROW>
__device__ __forceinline__ void rows_times(float* dst, int ldd, const T* a, int lda, const T* b, int ldb) {
  using BLayout = typename std::conditional<B_ROW, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
  for (int n = 0; n < N / 16; ++n) {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
    nvcuda::wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < K / 16; ++kk) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> fa;
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
      nvcuda::wmma::load_matrix_sync(fa, a + kk * 16, lda);
      nvcuda::wmma::load_matrix_sync(fb, B_ROW ? b + kk * 16 * ldb + n * 16 : b + n * 16 * ldb + kk * 16, ldb);
      nvcuda::wmma::mma_sync(acc, fa, fb, acc);
    }
    nvcuda::wmma::store_matrix_sync(dst + n * 16, acc, ldd, nvcuda::wmma::mem_row_major);
  }
}

// Stores a warp's 16 x (16 * n) fp32 accumulator fragments as T rows in global memory (rows past
// seq_len skipped), through a per-warp fp32 staging area of 16 x ld.
template <typename T, int N16, typename Frag>
__device__ __forceinline__ void store_rows(Frag (&acc)[N16], float* stage, int ld, T* dst, int row0, int seq_len,
                                          float mul) {
  const int lane = threadIdx.x % 32;
  for (int n = 0; n < N16; ++n) nvcuda::wmma::store_matrix_sync(stage + n * 16, acc[n], ld, nvcuda::wmma::mem_row_major);
  __syncwarp();
  constexpr int D = N16 * 16;
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = idx / D, c = idx % D;
    if (row0 + r < seq_len) dst[static_cast<int64_t>(row0 + r) * D + c] = Elem<T>::from_float(stage[r * ld + c] * mul);
  }
  __syncwarp();
}

// Dynamic shared memory of a kernel whose carve-up is Smem<D> (fp16 and bf16 have the same size).
template <template <int> class Smem>
size_t smem_bytes_for_head_dim(int head_dim) {
  switch (head_dim) {
    case 32:
      return Smem<32>::template bytes<__half>();
    case 64:
      return Smem<64>::template bytes<__half>();
    case 128:
      return Smem<128>::template bytes<__half>();
  }
  return 0;
}

template <typename Kernel>
cudaError_t prepare_launch(Kernel kernel, size_t smem_bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
}

}  // namespace dalle_fast::cuda
