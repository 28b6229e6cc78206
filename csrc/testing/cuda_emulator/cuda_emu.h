// A host emulator of the CUDA execution model, so the kernels in csrc/cuda/ can run on a machine without
// a GPU. The .cu files are compiled unchanged as C++ (g++ -x c++ -include cuda_emu.h, with include/ of
// this folder ahead of the toolkit's headers), and every launch runs on the host:
//
//   - each thread block runs alone; each CUDA thread is a fiber (a register switch on x86-64, ucontext
//     elsewhere) with its own stack, so locals are per thread and shared memory is per block;
//   - __syncthreads, __syncwarp, shuffles, mma.sync and ldmatrix (ptx_emu.h) are real barriers: the
//     scheduler resumes a thread only when every thread the barrier names has arrived, and reports
//     divergence (a barrier some threads never reach) as a launch failure instead of hanging;
//   - lanes of a warp must meet at the same kind of collective (a shuffle does not pair with an mma), a
//     full-warp collective needs a full warp, and a shuffle reads lane lane ^ mask as PTX defines it;
//   - threads run one after another in a chosen schedule: warps one at a time, each up to its next
//     __syncthreads, in ascending or descending order; or (seeded shuffles) a random warp for a random
//     number of warp collectives, then another. Blocks run in grid order, reversed, or shuffled. cp.async
//     copies land at their issue or at their thread's wait, the two ends of what the hardware allows,
//     each with both serial orders. A kernel whose result depends on the schedule has a race, such as a
//     missing __syncthreads;
//   - shared memory is dynamic only (static __shared__ variables do not compile here: see launch.cuh).
//     It is filled with NaN bytes before each block, so reads of unwritten shared memory poison the
//     result, and fenced by guard bytes (also NaN) checked after it; ldmatrix and cp.async check that
//     their shared addresses fall inside it. A launch asking for more than 48 KiB needs
//     cudaFuncSetAttribute first, which refuses more than the emulated device's opt-in limit; launch
//     configurations are held to the hardware's grid and block limits;
//   - faults end the launch with an error instead of the process: a misaligned access or an index past
//     a fixed-size array (compiled with -fsanitize=alignment,bounds as traps), a wild pointer (SIGSEGV),
//     a thread stack overflow (guard page).
//
// What it cannot show: timing, memory coalescing, bank conflicts, the hardware's rounding inside the
// tensor cores and of the special-function unit (ex2.approx), or a misreading of the PTX fragment layouts that the kernels
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
#include <vector>

// Execution-space keywords: host code here. Static __shared__ variables are refused (see launch.cuh):
// the emulator could not poison them before each block as it does dynamic shared memory.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ \
  static_assert(false, "static __shared__ is not emulated: take shared memory with DALLE_FAST_DYNAMIC_SMEM");
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

// The shape of every launch since the log was last cleared, in order: emu_api.cpp compares it with the
// launches csrc/cuda/host_setup.h describes for the same call (what the NVRTC backend launches).
struct LaunchRecord {
  int64_t blocks;
  int64_t threads;
  size_t smem;
};
std::vector<LaunchRecord>& launch_log();

// Collectives, called by the running thread. Lanes that meet at a warp barrier must all be at the same
// kind of collective.
enum class Collective { kSyncwarp, kShuffle, kMma, kLdmatrix };
void block_barrier();
int block_barrier_or(int pred);
void warp_barrier(unsigned mask, Collective kind);
uint64_t* warp_exchange();       // 32 slots of the calling thread's warp
const void** warp_pointers();    // 32 x 4 pointer slots of the calling thread's warp
unsigned char* dynamic_smem();   // this block's dynamic shared memory
void async_copy(void* dst, const void* src, int bytes, int src_bytes);  // cp.async (see cuda_emu.cpp)
void async_commit();
void async_wait(int pending);
// Fails the launch unless [p, p + bytes) lies inside the block's shared memory.
void check_shared(const void* p, size_t bytes, const char* what);
bool is_shared(const void* p);
// Ends the launch with this error (cudaErrorLaunchFailure unless said) and message.
[[noreturn]] void fail(const char* what, cudaError_t err = cudaErrorLaunchFailure);
// For the C entry points: an error found before any launch, with its message.
cudaError_t host_error(cudaError_t err, const char* what);

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
cudaError_t set_func_max_dynamic_smem(const void* kernel, int bytes);
size_t smem_optin();  // the emulated device's cudaDevAttrMaxSharedMemoryPerBlockOptin

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
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emu::warp_barrier(mask, cuda_emu::Collective::kSyncwarp); }

// shfl.sync.bfly with width 32: lane l reads lane l ^ lane_mask, or keeps its own value when that lane
// is past 31.
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  if (mask != 0xffffffffu || width != 32) cuda_emu::fail("__shfl_xor_sync: only full-warp shuffles are emulated");
  uint64_t* slot = cuda_emu::warp_exchange();
  const unsigned lane = threadIdx.x % 32, src = lane ^ static_cast<unsigned>(lane_mask);
  std::memcpy(&slot[lane], &var, sizeof(T));
  cuda_emu::warp_barrier(mask, cuda_emu::Collective::kShuffle);
  T out = var;
  if (src < 32) std::memcpy(&out, &slot[src], sizeof(T));
  cuda_emu::warp_barrier(mask, cuda_emu::Collective::kShuffle);  // every lane has read before any slot is reused
  return out;
}

// IEEE round-to-nearest intrinsics are the plain operations here (built with -ffp-contract=off).
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }

// ---- runtime API used by the launchers -------------------------------------------------------------------------
template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;  // not emulated
  return cuda_emu::set_func_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

#include "ptx_emu.h"
