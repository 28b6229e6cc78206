// Shared pieces of the CUDA attention kernels: element conversion, tile loads into shared memory, the
// element mask of partial blocks, tensor-core fragment addressing, and launch helpers. Tensor-core math
// is mma.sync m16n8k16 with ldmatrix (ptx.cuh: fp16 / bf16 inputs, fp32 accumulation; sm_80 and newer).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../layout.h"
#include "attention_cuda.h"
#include "host_setup.h"
#include "launch.cuh"
#include "ptx.cuh"

namespace dalle_fast::cuda {

// Threads of a block whose warps own 16 x MT rows of a 64-row tile (the launch shapes of host_setup.h
// use the same attention_threads).
template <int MT>
constexpr int threads_for() {
  return attention_threads(16 * MT);
}
constexpr int kThreads = threads_for<1>();  // the backward: four warps of 16 rows

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

// acc (16 x 8 DT, DT tiles) += a (a 16 x 16 A fragment) times rows k0 .. k0 + 15 of the shared tile s,
// read as B(k, n) = s[k0 + k][n] with ldmatrix .trans (e.g. P V with s = V).
template <typename T, int DT>
__device__ __forceinline__ void mma_a_rows(float (&acc)[DT][4], const uint32_t (&a)[4], const T* s, int ld, int k0,
                                           int lane) {
#pragma unroll
  for (int dt = 0; dt < DT; dt += 2) {
    uint32_t b[4];
    ptx::ldmatrix_x4_trans(b, bt_rows(s, ld, k0, dt * 8, lane));
    mma_pair<T>(acc[dt], acc[dt + 1], a, b);
  }
}

// The same for MT row tiles at once: acc[mt] += a[mt] times the rows, each B fragment loaded once for
// all MT of them (a warp with 32 rows reads shared memory half as often per mma as one with 16).
template <typename T, int MT, int DT>
__device__ __forceinline__ void mma_a_rows(float (&acc)[MT][DT][4], const uint32_t (&a)[MT][4], const T* s, int ld,
                                           int k0, int lane) {
#pragma unroll
  for (int dt = 0; dt < DT; dt += 2) {
    uint32_t b[4];
    ptx::ldmatrix_x4_trans(b, bt_rows(s, ld, k0, dt * 8, lane));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mma_pair<T>(acc[mt][dt], acc[mt][dt + 1], a[mt], b);
  }
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

// Copies rows [row0, row0 + kBlock) of a [seq_len, D] matrix into a shared tile with leading dim ld by
// cp.async, 16 bytes per thread per step (the block's Threads threads), as part of the caller's next
// commit group; rows past seq_len become zeros.
template <typename T, int D, int Threads = kThreads>
__device__ __forceinline__ void load_tile_async(T* tile, int ld, const T* src, int row0, int seq_len) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = D / kVec;
  for (int idx = threadIdx.x; idx < kBlock * kPerRow; idx += Threads) {
    const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
    const bool valid = row0 + r < seq_len;
    ptx::cp_async_16(tile + r * ld + c, valid ? src + static_cast<int64_t>(row0 + r) * D + c : src, valid);
  }
}

// Sets to -inf the scores of a warp's row tiles that the mask hides, for a partial layout entry:
// s[mt][nt][2 h + b] is query row0 + 16 mt + 8 h against key key0 + 8 nt + b. Each query row is
// prepared once (query_row) and, for conv, each key column once (token_pos, one division), so an
// element costs a few compares (layout.h; padding past seq_len is never visible).
template <int MT, int NT>
__device__ __forceinline__ void mask_rows(float (&s)[MT][NT][4], const MaskSpec& m, int row0, int key0, int seq_len) {
  QueryRow<int> rows[MT][2];
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    #pragma unroll
    for (int h = 0; h < 2; ++h) rows[mt][h] = query_row<int>(m, row0 + 16 * mt + 8 * h, seq_len);
  if (m.kind == MaskKind::kConv) {
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      #pragma unroll
      for (int b = 0; b < 2; ++b) {
        const TokenPos<int> key = token_pos<int>(m, key0 + 8 * nt + b);
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          #pragma unroll
          for (int h = 0; h < 2; ++h)
            if (!query_row_sees_conv<int>(m, rows[mt][h], key)) s[mt][nt][2 * h + b] = -INFINITY;
      }
  } else {
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      #pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int i = 0; i < 4; ++i)
          if (!query_row_sees<int>(m, rows[mt][i / 2], key0 + 8 * nt + i % 2)) s[mt][nt][i] = -INFINITY;
  }
}

// Whether row `r` of a backward chunk (a query row in the dQ pass, a key row in the dK/dV pass) meets
// column `col` (a key, or a query): the layout.h split forms, named alike for both passes.
__device__ __forceinline__ bool row_meets(const MaskSpec& m, const QueryRow<int>& r, int col) {
  return query_row_sees<int>(m, r, col);
}
__device__ __forceinline__ bool row_meets(const MaskSpec&, const KeyRow<int>& r, int col) {
  return key_row_seen_by<int>(r, col);
}
__device__ __forceinline__ bool row_meets_conv(const MaskSpec& m, const QueryRow<int>& r, const TokenPos<int>& col) {
  return query_row_sees_conv<int>(m, r, col);
}
__device__ __forceinline__ bool row_meets_conv(const MaskSpec& m, const KeyRow<int>& r, const TokenPos<int>& col) {
  return key_row_seen_by_conv<int>(m, r, col);
}

// The mask of a 16-row x 16-column chunk of a partial tile in the backward passes: on[half][i] for
// accumulator element i of n-tile half, that is row r0 + 8 (i / 2) (rows[i / 2]) and column
// c0 + 8 half + i % 2. Rows are queries (Row = QueryRow, dQ pass: columns are keys) or keys (Row =
// KeyRow, dK/dV pass: columns are queries); for conv each column's position is computed once, for
// both rows.
template <typename Row>
__device__ __forceinline__ void chunk_mask(bool (&on)[2][4], const MaskSpec& m, const Row (&rows)[2], int c0) {
  #pragma unroll
  for (int half = 0; half < 2; ++half)
    #pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int col = c0 + 8 * half + b;
      if (m.kind == MaskKind::kConv) {
        const TokenPos<int> pos = token_pos<int>(m, col);
        #pragma unroll
        for (int h = 0; h < 2; ++h) on[half][2 * h + b] = row_meets_conv(m, rows[h], pos);
      } else {
        #pragma unroll
        for (int h = 0; h < 2; ++h) on[half][2 * h + b] = row_meets(m, rows[h], col);
      }
    }
}

// ---- non-finite values at hidden pairs (docs/kernels.md#non-finite-values) ------------------------------
// The products that sum over (query, key) pairs (P V; dS^T Q, P^T dO and dS K in the backward) take A
// fragments that are exactly 0 at pairs the mask hides. An mma still forms 0 * x there, NaN for a
// non-finite x in the B tile. Tiles of partial blocks whose B operand holds a non-finite value therefore
// run mma_*_over_pairs: the mma reads B with its non-finite values zeroed (so every other output gets
// the bits of a finite B), and the non-finite terms of visible pairs are counted by three more mmas on
// 0/1 indicator fragments (weights > 0, < 0, and 0 or NaN, at visible pairs only) against B's kinds, and
// added as NaN, +inf or -inf, as IEEE arithmetic would have summed them.

// Does this thread's share of a tile that load_tile_async<T, D, Threads> filled hold a NaN or an
// infinity? Reads only the 16-byte pieces this thread copied, which its cp_async_wait made visible to it.
template <typename T, int D, int Threads = kThreads>
__device__ __forceinline__ bool own_share_nonfinite(const T* tile, int ld) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = D / kVec;
  constexpr uint16_t kExp = std::is_same_v<T, __half> ? 0x7c00 : 0x7f80;  // all ones: inf or NaN
  bool bad = false;
  for (int idx = threadIdx.x; idx < kBlock * kPerRow; idx += Threads) {
    uint16_t x[kVec];
    memcpy(x, tile + (idx / kPerRow) * ld + (idx % kPerRow) * kVec, 16);
    #pragma unroll
    for (int i = 0; i < kVec; ++i) bad |= (x[i] & kExp) == kExp;
  }
  return bad;
}

// The A fragment's pairs by the sign of the weight the mma multiplies (x rounded to T): pos (> 0), neg
// (< 0), zero (0 or NaN), each a 0/1 fragment that is 0 at hidden pairs. x0[i], x1[i] are element i of
// the fragment's n-tiles 0 and 1 (packed into a[2 half + i / 2], as the kernels pack A), on[half][i]
// whether its pair is visible.
struct PairSigns {
  uint32_t pos[4], neg[4], zero[4];
};
template <typename T>
__device__ __forceinline__ PairSigns pair_signs(const float (&x0)[4], const float (&x1)[4], const bool (&on)[2][4]) {
  PairSigns k;
  #pragma unroll
  for (int half = 0; half < 2; ++half)
    #pragma unroll
    for (int row = 0; row < 2; ++row) {
      float pos[2], neg[2], zero[2];
      #pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int i = 2 * row + b;
        const float w = Elem<T>::to_float(Elem<T>::from_float(half == 0 ? x0[i] : x1[i]));
        pos[b] = on[half][i] && w > 0.f ? 1.f : 0.f;
        neg[b] = on[half][i] && w < 0.f ? 1.f : 0.f;
        zero[b] = on[half][i] && !(w > 0.f) && !(w < 0.f) ? 1.f : 0.f;
      }
      k.pos[2 * half + row] = pack2<T>(pos[0], pos[1]);
      k.neg[2 * half + row] = pack2<T>(neg[0], neg[1]);
      k.zero[2 * half + row] = pack2<T>(zero[0], zero[1]);
    }
  return k;
}

// Splits a register of two T into the same with non-finite values zeroed (finite) and their kinds
// (kinds): 1 for +inf, 32 for -inf, 1024 for NaN, 0 for finite, as T. An mma sums 16 products of 0/1
// weights with kinds, so each count (at most 16) keeps its own digit, base 32, of the exact fp32 sum.
template <typename T>
__device__ __forceinline__ void split_nonfinite(uint32_t reg, uint32_t* finite, uint32_t* kinds) {
  constexpr uint32_t kExp = std::is_same_v<T, __half> ? 0x7c00 : 0x7f80;
  constexpr uint32_t kSign = 0x8000, kMantissa = 0xffff & ~(kSign | kExp);
  uint32_t f = 0;
  float kind[2];
  #pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t x = reg >> (16 * h) & 0xffff;
    const bool nonfinite = (x & kExp) == kExp;
    kind[h] = !nonfinite ? 0.f : (x & kMantissa) ? 1024.f : (x & kSign) ? 32.f : 1.f;
    f |= (nonfinite ? 0u : x) << (16 * h);
  }
  *finite = f;
  *kinds = pack2<T>(kind[0], kind[1]);
}

// Which non-finite terms a count of kinds (split_nonfinite's digits) holds: bit 0 +inf, bit 1 -inf, bit 2 NaN.
__device__ __forceinline__ uint32_t kinds_in(float count) {
  return (fmodf(count, 32.f) > 0.f ? 1u : 0u) | (fmodf(count, 1024.f) >= 32.f ? 2u : 0u) | (count >= 1024.f ? 4u : 0u);
}

// d0 += a b[0..1], d1 += a b[2..3] (mma_pair) for a B fragment that may hold non-finite values, a being
// exactly 0 at hidden pairs and signs its visible weights by sign (pair_signs). One indicator mma at a time,
// each leaving 3 bits per element, keeps the registers this needs small.
template <typename T>
__device__ __forceinline__ void mma_pair_over_pairs(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4],
                                                    const PairSigns& signs, const uint32_t (&b)[4]) {
  uint32_t finite[4], kinds[4];
  #pragma unroll
  for (int r = 0; r < 4; ++r) split_nonfinite<T>(b[r], &finite[r], &kinds[r]);
  mma_pair<T>(d0, d1, a, finite);
  uint32_t terms[2][4] = {};  // per element: bit 0 +inf, bit 1 -inf, bit 2 NaN
  {
    float c[2][4] = {};  // w > 0 keeps an infinity's sign
    mma_pair<T>(c[0], c[1], signs.pos, kinds);
    #pragma unroll
    for (int n = 0; n < 2; ++n)
      #pragma unroll
      for (int i = 0; i < 4; ++i) terms[n][i] |= kinds_in(c[n][i]);
  }
  {
    float c[2][4] = {};  // w < 0 flips it
    mma_pair<T>(c[0], c[1], signs.neg, kinds);
    #pragma unroll
    for (int n = 0; n < 2; ++n)
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t k = kinds_in(c[n][i]);
        terms[n][i] |= (k & 4u) | (k & 1u) << 1 | (k & 2u) >> 1;
      }
  }
  {
    float c[2][4] = {};  // w = 0 or NaN makes NaN of any non-finite value
    mma_pair<T>(c[0], c[1], signs.zero, kinds);
    #pragma unroll
    for (int n = 0; n < 2; ++n)
      #pragma unroll
      for (int i = 0; i < 4; ++i) terms[n][i] |= c[n][i] > 0.f ? 4u : 0u;
  }
  #pragma unroll
  for (int n = 0; n < 2; ++n)
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t k = terms[n][i];
      float& d = n == 0 ? d0[i] : d1[i];
      if ((k & 4u) || k == 3u) d = NAN;  // a NaN term, or +inf and -inf
      else if (k == 1u) d += INFINITY;
      else if (k == 2u) d -= INFINITY;
    }
}

// mma_a_rows for a tile s that may hold non-finite values.
template <typename T, int DT>
__device__ __forceinline__ void mma_a_rows_over_pairs(float (&acc)[DT][4], const uint32_t (&a)[4],
                                                      const PairSigns& signs, const T* s, int ld, int k0,
                                                      int lane) {
#pragma unroll
  for (int dt = 0; dt < DT; dt += 2) {
    uint32_t b[4];
    ptx::ldmatrix_x4_trans(b, bt_rows(s, ld, k0, dt * 8, lane));
    mma_pair_over_pairs<T>(acc[dt], acc[dt + 1], a, signs, b);
  }
}

// A layout entry needs no element mask when the layout says full and the tile has no padding.
__device__ __forceinline__ bool tile_full(bool layout_full, int q0, int k0, int seq_len) {
  return layout_full && q0 + kBlock <= seq_len && k0 + kBlock <= seq_len;
}

// One step of a double-buffered walk over layout entries: starts the cp.async loads of entry e + 1 (into
// the buffer every warp finished with at the end of the previous step), then waits until entry e's loads
// have landed, for this thread and (barrier) for every thread of the block. Returns whether own() (a
// check of this thread's share of entry e's tiles, which it may read once its loads have landed) holds
// for some thread of the block.
template <typename Fetch, typename Own>
__device__ __forceinline__ bool next_tiles(int e, int e_end, Fetch&& fetch, Own&& own) {
  if (e + 1 < e_end) fetch(e + 1);
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();
  return __syncthreads_or(own()) != 0;
}

#ifndef __CUDACC_RTC__  // launch helpers: host code
// f(std::integral_constant<int, D>{}) for D = head_dim when it is one of kHeadDims (capabilities.h): one
// instantiation per listed head dim. `otherwise` for others.
template <typename R, typename F, size_t... I>
R with_head_dim_of(int head_dim, R otherwise, F&& f, std::index_sequence<I...>) {
  R result = otherwise;
  (void)((head_dim == kHeadDims[I] ? (result = f(std::integral_constant<int, kHeadDims[I]>{}), true) : false) ||
         ...);
  return result;
}
template <typename R, typename F>
R with_head_dim(int head_dim, R otherwise, F&& f) {
  return with_head_dim_of(head_dim, otherwise, f, std::make_index_sequence<kNumHeadDims>{});
}

template <typename Kernel>
cudaError_t prepare_launch(Kernel kernel, size_t smem_bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
}

#endif  // __CUDACC_RTC__

}  // namespace dalle_fast::cuda
