// Emulator stand-in for <mma.h>: nvcuda::wmma 16x16x16 fragments (fp16 / bf16 inputs, fp32 accumulator).
//
// Fragments are opaque in CUDA, so the emulator picks its own layout: lane l holds elements
// [8 l, 8 l + 8) of the 16x16 tile in row-major order. load/store/mma are warp collectives as the CUDA
// documentation defines them: each waits until every lane of the warp has arrived. mma_sync multiplies
// in fp32 (exact for fp16 and bf16 products) and adds over k in order.
#pragma once

#include <cstddef>

#include "../cuda_emu.h"

namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements the 16x16x16 shape only");
  static constexpr int num_elements = 8;
  T x[num_elements];
};

namespace detail {
inline int lane() { return static_cast<int>(threadIdx.x % 32); }
template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(v);
  else
    return static_cast<float>(v);
}
// Memory offset of tile element (r, c) for a row-major (or column-major) tile with leading dim ldm.
inline size_t offset(int r, int c, unsigned ldm, bool row) { return row ? size_t(r) * ldm + c : size_t(c) * ldm + r; }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  for (auto& e : f.x) e = static_cast<T>(v);
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  cuda_emu::warp_barrier(0xffffffffu);
  const int l = detail::lane();
  for (int e = 0; e < 8; ++e) {
    const int idx = 8 * l + e;
    f.x[e] = ptr[detail::offset(idx / 16, idx % 16, ldm, std::is_same_v<Layout, row_major>)];
  }
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* ptr, unsigned ldm, layout_t layout) {
  cuda_emu::warp_barrier(0xffffffffu);
  const int l = detail::lane();
  for (int e = 0; e < 8; ++e) {
    const int idx = 8 * l + e;
    f.x[e] = ptr[detail::offset(idx / 16, idx % 16, ldm, layout == mem_row_major)];
  }
}

template <typename T>
void store_matrix_sync(T* ptr, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  cuda_emu::warp_barrier(0xffffffffu);
  const int l = detail::lane();
  for (int e = 0; e < 8; ++e) {
    const int idx = 8 * l + e;
    ptr[detail::offset(idx / 16, idx % 16, ldm, layout == mem_row_major)] = f.x[e];
  }
}

// d = a b + c. Each lane computes its own 8 elements of d from the whole of a and b, read from every
// lane's fragment through the warp's pointer slots.
template <typename TA, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TA, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  const void** slots = cuda_emu::warp_pointers();
  const int l = detail::lane();
  slots[4 * l] = &a;
  slots[4 * l + 1] = &b;
  cuda_emu::warp_barrier(0xffffffffu);
  auto elem_a = [&](int r, int k) {
    const int idx = 16 * r + k;
    return detail::to_float(static_cast<const fragment<matrix_a, 16, 16, 16, TA, LA>*>(slots[4 * (idx / 8)])->x[idx % 8]);
  };
  auto elem_b = [&](int k, int n) {
    const int idx = 16 * k + n;
    return detail::to_float(
        static_cast<const fragment<matrix_b, 16, 16, 16, TA, LB>*>(slots[4 * (idx / 8) + 1])->x[idx % 8]);
  };
  float out[8];
  for (int e = 0; e < 8; ++e) {
    const int idx = 8 * l + e, r = idx / 16, n = idx % 16;
    float acc = c.x[e];
    for (int k = 0; k < 16; ++k) acc += elem_a(r, k) * elem_b(k, n);
    out[e] = acc;
  }
  cuda_emu::warp_barrier(0xffffffffu);  // every lane has read a and b before any lane changes them
  for (int e = 0; e < 8; ++e) d.x[e] = out[e];
}

}  // namespace nvcuda::wmma
