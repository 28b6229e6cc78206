// Emulated PTX for csrc/cuda/ptx.cuh: mma.sync m16n8k16 and ldmatrix .x4 (.trans), built from the PTX
// ISA's fragment definitions as restated in ptx.cuh; ex2.approx; and cp.async (a copy lands at its issue
// or at its thread's wait, by schedule: see cuda_emu.cpp). mma and ldmatrix are warp collectives: lanes
// post their operands, wait for the whole warp, compute their own results from every lane's operands,
// and wait again before any lane may change its operands.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define DALLE_FAST_EMULATED_PTX 1

namespace dalle_fast::cuda::ptx {
namespace emu {

template <typename T>
float to_float(uint16_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else
    return __bfloat162float(v);
}

inline uint16_t half_of(uint32_t reg, int h) { return static_cast<uint16_t>(h ? reg >> 16 : reg & 0xffffu); }
inline int lane() { return static_cast<int>(threadIdx.x % 32); }

}  // namespace emu

template <typename T>
void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const void** slots = cuda_emu::warp_pointers();
  const int l = emu::lane(), g = l / 4, t = l % 4;
  slots[4 * l] = a;
  slots[4 * l + 1] = b;
  cuda_emu::warp_barrier(0xffffffffu, cuda_emu::Collective::kMma);
  // A(r, k): lane 4 (r % 8) + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2.
  auto A = [&](int r, int k) {
    const auto* regs = static_cast<const uint32_t*>(slots[4 * (4 * (r % 8) + (k % 8) / 2)]);
    return emu::to_float<T>(emu::half_of(regs[(r >= 8) + 2 * (k >= 8)], k % 2));
  };
  // B(k, n): lane 4 n + (k % 8) / 2, register k >= 8, half k % 2.
  auto B = [&](int k, int n) {
    const auto* regs = static_cast<const uint32_t*>(slots[4 * (4 * n + (k % 8) / 2) + 1]);
    return emu::to_float<T>(emu::half_of(regs[k >= 8], k % 2));
  };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    out[i] = acc;
  }
  cuda_emu::warp_barrier(0xffffffffu, cuda_emu::Collective::kMma);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

namespace emu {
// Element (row, col) of matrix i of an ldmatrix: row `row` starts at the address lane 8 i + row posted.
inline uint16_t element(const void** slots, int i, int row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(slots[4 * (8 * i + row) + 2]) + 2 * col, 2);
  return v;
}

inline void ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
  const void** slots = cuda_emu::warp_pointers();
  const int l = lane();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
    cuda_emu::fail("ldmatrix: a row address is not 16-byte aligned", cudaErrorMisalignedAddress);
  cuda_emu::check_shared(row, 16, "ldmatrix: a row address");
  slots[4 * l + 2] = row;
  cuda_emu::warp_barrier(0xffffffffu, cuda_emu::Collective::kLdmatrix);
  uint32_t out[4];
  for (int i = 0; i < 4; ++i) {
    // Plain: row l / 4, columns 2 (l % 4) + h. Transposed: rows 2 (l % 4) + h, column l / 4.
    const uint16_t lo = trans ? element(slots, i, 2 * (l % 4), l / 4) : element(slots, i, l / 4, 2 * (l % 4));
    const uint16_t hi = trans ? element(slots, i, 2 * (l % 4) + 1, l / 4) : element(slots, i, l / 4, 2 * (l % 4) + 1);
    out[i] = lo | static_cast<uint32_t>(hi) << 16;
  }
  cuda_emu::warp_barrier(0xffffffffu, cuda_emu::Collective::kLdmatrix);
  for (int i = 0; i < 4; ++i) r[i] = out[i];
}
}  // namespace emu

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emu::ldmatrix(r, row, false); }

// The special-function unit's 2^x is within 2 ulp of the exact one; the host's exp2f stands in, with
// .ftz's flush of subnormal results to +0 (arguments in (-150, -126)).
inline float exp2_approx(float x) {
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    cuda_emu::fail("cp.async: a 16-byte copy with an unaligned address", cudaErrorMisalignedAddress);
  cuda_emu::async_copy(dst, src, 16, valid ? 16 : 0);
}
inline void cp_async_commit() { cuda_emu::async_commit(); }
template <int N>
void cp_async_wait() {
  cuda_emu::async_wait(N);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emu::ldmatrix(r, row, true); }

}  // namespace dalle_fast::cuda::ptx
