// A host emulator of the CUDA execution model, so the kernels in csrc/cuda/ can run on a machine without
// a GPU. The .cu files are compiled unchanged as C++ (g++ -x c++ -include cuda_emu.h, with include/ of
// this folder ahead of the toolkit's headers), and every launch runs on the host:
//
//   - each thread block runs alone; each CUDA thread is a fiber (ucontext) with its own stack, so
//     locals are per thread and __shared__ memory is per block;
//   - __syncthreads, __syncwarp, shuffles, mma.sync and ldmatrix (ptx_emu.h) are real barriers: the
//     scheduler resumes a thread only when every thread the barrier names has arrived, and reports
//     divergence (a barrier some threads never reach) as a launch failure instead of hanging;
//   - threads run one after another in a chosen schedule: warps one at a time, each up to its next
//     __syncthreads, in ascending or descending order; or (seeded shuffles) a random warp for a random
//     number of warp collectives, then another. cp.async copies land at their issue (even schedules)
//     or at their thread's wait (odd ones), the two ends of what the hardware allows. A kernel whose
//     result depends on the schedule has a race, such as a missing __syncthreads;
//   - dynamic shared memory is filled with NaN bytes before each block (reads of unwritten shared memory
//     poison the result) and fenced by guard bytes checked after it; a launch asking for more than 48 KiB
//     needs cudaFuncSetAttribute first, and no launch may exceed the emulated device's opt-in limit.
//
// What it cannot show: timing, memory coalescing, bank conflicts, the hardware's rounding inside the
// tensor cores and of fast-math intrinsics, or a misreading of the PTX fragment layouts that the kernels
// and ptx_emu.h would share (both follow the layouts restated in csrc/cuda/ptx.cuh). Those need the GPU
// runbook (benchmarks/gpu_runbook.sh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <math.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// Execution-space keywords: host code here. __shared__ variables with static storage are one per block
// because blocks run one at a time.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

using std::isfinite;

namespace cuda_emu {

// ---- the scheduler (cuda_emu.cpp) -----------------------------------------------------------------------

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  const void* kernel;  // for the shared-memory attribute set by cudaFuncSetAttribute
};

// Runs body once per thread of every block of the grid; returns cudaSuccess or the failure it found.
cudaError_t run_grid(const LaunchConfig& cfg, const std::function<void()>& body);

// Collectives, called by the running thread.
void block_barrier();
int block_barrier_or(int pred);
void warp_barrier(unsigned mask);
uint64_t* warp_exchange();       // 32 slots of the calling thread's warp
const void** warp_pointers();    // 32 x 4 pointer slots of the calling thread's warp
unsigned char* dynamic_smem();   // this block's dynamic shared memory
void async_copy(void* dst, const void* src, int bytes, int src_bytes);  // cp.async (see cuda_emu.cpp)
void async_commit();
void async_wait(int pending);
[[noreturn]] void fail(const char* what);  // ends the launch with cudaErrorLaunchFailure and this message

template <typename Kernel>
struct Launcher {
  Kernel* kernel;
  LaunchConfig cfg;
  template <typename... Args>
  void operator()(Args&&... args) const {
    Kernel* k = kernel;
    std::function<void()> body = [=]() { k(args...); };
    run_grid(cfg, body);
  }
};

template <typename Kernel>
Launcher<Kernel> launch(Kernel* kernel, dim3 grid, dim3 block, size_t smem) {
  return Launcher<Kernel>{kernel, LaunchConfig{grid, block, smem, reinterpret_cast<const void*>(kernel)}};
}

// Error of the last launch and the emulated device (cuda_emu.cpp).
cudaError_t take_last_error();
void set_func_max_dynamic_smem(const void* kernel, int bytes);

}  // namespace cuda_emu

// The built-in variables of the running thread (set by the scheduler before it resumes a thread).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// ---- launch and dynamic shared memory: the macros of csrc/cuda/launch.cuh ----------------------------------
#define DALLE_FAST_LAUNCH(kernel, grid, block, smem, stream) ::cuda_emu::launch(kernel, dim3(grid), dim3(block), smem)
#define DALLE_FAST_DYNAMIC_SMEM(name) unsigned char* name = ::cuda_emu::dynamic_smem()

// ---- device functions --------------------------------------------------------------------------------------
inline void __syncthreads() { cuda_emu::block_barrier(); }
inline int __syncthreads_or(int pred) { return cuda_emu::block_barrier_or(pred); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emu::warp_barrier(mask); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  if (mask != 0xffffffffu || width != 32) cuda_emu::fail("__shfl_xor_sync: only full-warp shuffles are emulated");
  uint64_t* slot = cuda_emu::warp_exchange();
  const int lane = threadIdx.x % 32;
  std::memcpy(&slot[lane], &var, sizeof(T));
  cuda_emu::warp_barrier(mask);
  T out;
  std::memcpy(&out, &slot[(lane ^ lane_mask) & 31], sizeof(T));
  cuda_emu::warp_barrier(mask);  // every lane has read before any slot is reused
  return out;
}

// IEEE round-to-nearest intrinsics are the plain operations here (built with -ffp-contract=off).
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }

// ---- runtime API used by the launchers -------------------------------------------------------------------------
template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    cuda_emu::set_func_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

#include "ptx_emu.h"
