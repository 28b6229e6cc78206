// The host side of every CUDA launch, without torch: what the torch glue (attention_glue.cpp,
// grad_scaling_glue.cpp) and the emulator's C API (csrc/testing/cuda_emulator/emu_api.cpp) both prepare
// before calling a launcher, and the shape of each launch (blocks, threads, dynamic shared memory) that
// the launchers in the .cu files use. Plain C++ over the CUDA runtime's types and layout.h, so every
// caller, including a later backend that compiles the kernels at run time, shares one description.
#pragma once

#include <cstddef>
#include <cstdint>
#ifndef __CUDACC_RTC__
#include <string>
#include <utility>
#include <vector>
#endif

#include "../layout.h"
#include "capabilities.h"
#include "kernel_params.h"

namespace dalle_fast::cuda {

// ---- launch shapes ---------------------------------------------------------------------------------------

// One kernel launch: `blocks` thread blocks in a 1-D grid, `threads` per block, `smem` bytes of dynamic
// shared memory. Launchers refuse more than kMaxGridBlocks blocks (cudaErrorInvalidConfiguration).
struct LaunchShape {
  int64_t blocks;
  int threads;
  size_t smem;
};
constexpr int64_t kMaxGridBlocks = 0x7fffffff;

// The attention kernels index tokens in 32 bits, tiles running up to two blocks past seq_len included.
constexpr int64_t kMaxSeqLen = 0x7fffffff - 2 * kBlock;

// Shared-memory tiles hold kBlock rows of head_dim elements plus kPadT of padding: rows stay 16-byte
// aligned for ldmatrix, and the 8 rows of an 8 x 8 matrix fall in different banks.
constexpr int kPadT = 8;
constexpr int tile_ld(int head_dim) { return head_dim + kPadT; }

// Threads of an attention block whose warps own `rows_per_warp` rows each of a 64-row tile.
constexpr int attention_threads(int rows_per_warp) { return kBlock / rows_per_warp * 32; }

// Dynamic shared memory of the forward: Q, and K and V twice (the next key block loads during this one).
constexpr size_t forward_smem_size(int head_dim, size_t elem_bytes) {
  return elem_bytes * 5 * kBlock * tile_ld(head_dim);
}
// Of each backward pass: two resident tiles, two streamed ones `stages` times, and the lse and delta of
// the streamed query blocks `stages` times.
constexpr size_t backward_smem_size(int head_dim, int stages, size_t elem_bytes) {
  return elem_bytes * (2 + 2 * stages) * kBlock * tile_ld(head_dim) + sizeof(float) * 2 * stages * kBlock;
}

// Rows per warp of the forward: 32 (every K and V fragment read from shared memory serves two row tiles)
// up to head dim 64, 16 at 128, whose registers would not hold twice the accumulators.
// DALLE_FAST_FWD_ROWS_PER_WARP=16 selects 16 at every head dim, to compare the two. (The backward keeps
// 16: with 32 rows the dQ pass's accumulators and Q and dO fragments spill at head dim 64.)
int forward_rows_per_warp(int head_dim);

// Buffers per streamed tile of the backward passes: 2 (the next block's tiles load during this one) where
// they fit in smem_limit (cudaDevAttrMaxSharedMemoryPerBlockOptin), else 1 (head dim 128 on 99 KiB GPUs).
// Only head dim 128 can need 1 (below it every sm_80+ GPU holds the double buffers, so no single-buffered
// build exists); DALLE_FAST_BWD_STAGES=1 asks for 1 there anyway, to test that path on a larger GPU.
int backward_stages(int head_dim, size_t smem_limit);

// Per-block dynamic shared memory a launch of this dtype and head dim asks for (the glue checks it
// against the device's limit first); 0 for a head dim without kernels.
size_t forward_smem_bytes(DType dtype, int head_dim);
size_t backward_smem_bytes(DType dtype, int head_dim, size_t smem_limit);

// Forward: one block per (batch * head, query block), rows_per_warp as forward_rows_per_warp. Both launch
// functions take p.head_dim from kHeadDims (the launchers check it first).
struct ForwardLaunch {
  LaunchShape shape;
  int rows_per_warp;
};
ForwardLaunch forward_launch(const AttentionParams& p);

// Backward: delta = rowsum(dO * O) (D / 8 threads per row), then the dK/dV and dQ passes, one block per
// (batch * head, key or query block) each.
struct BackwardLaunch {
  LaunchShape delta;
  LaunchShape passes;
  int stages;
};
BackwardLaunch backward_launch(const AttentionParams& p, size_t smem_limit);

// Decode: kDecodeWarps warps per block; a lane holds head_dim / 32 elements rounded up to a power of 2,
// at most kMaxDecodeHeadDim / 32. Shared memory: each warp's running max and sum, then its partial row.
constexpr int kDecodeWarps = 8;
constexpr int kMaxDecodeHeadDim = 256;
constexpr size_t kDecodeSmemBytes = sizeof(float) * kDecodeWarps * (2 + kMaxDecodeHeadDim);

// Whether p is within what the decode kernels take (head dim, intervals, splits, grid size).
bool decode_params_valid(const DecodeParams& p);

// One block per (batch * head, split); with splits > 1 a merge kernel, one block per (batch * head)
// (merge.blocks is 0 otherwise). p must be valid.
struct DecodeLaunch {
  LaunchShape rows;
  LaunchShape merge;
  int elems_per_lane;
};
DecodeLaunch decode_launch(const DecodeParams& p);

// Gradient scaling: grid-stride loops over n elements (at most 4096 blocks), one block per chunk of a
// multi-tensor launch, and one thread per element (the scale update).
LaunchShape elementwise_launch(int64_t n);
LaunchShape chunk_launch(int64_t num_chunks);
LaunchShape per_element_launch(int64_t n);

// The kernels read the constants above; what follows is the host's alone (NVRTC does not see it).
#ifndef __CUDACC_RTC__

// ---- attention: the block layout as the kernels read it -----------------------------------------------

// get_block_layout(mask, kBlock) packed into one buffer: its host image, and where each array starts (16-
// byte aligned offsets). The glue copies `bytes` to the device once per (mask, device); the emulator
// reads the image in place. Either way device_layout(base) gives the kernels' pointers into the copy.
struct PackedLayout {
  std::vector<uint8_t> bytes;
  size_t q_ptr, q_kblock, q_full, k_ptr, k_qblock, k_full;
  int32_t num_blocks;
  DeviceLayout device_layout(const void* base) const;
};
PackedLayout pack_layout(const BlockLayout& layout);

// ---- decode: the query row's keys ------------------------------------------------------------------------

// Sets p.num_intervals, p.lo, p.hi to the key intervals of query row `position` (key_intervals in
// layout.h) and returns how many the row has, with *num_keys the keys it sees. When the row has more than
// kMaxDecodeIntervals intervals, p is left as it was and the caller refuses the call.
int64_t set_decode_intervals(DecodeParams& p, const MaskSpec& m, int64_t position, int64_t* num_keys);

// How many blocks share one row's keys: enough that batch_heads * splits puts kDecodeBlocksPerSm blocks
// on each of `sm_count` SMs (a small batch alone leaves most of a GPU idle, and decode is bound by memory
// latency, so it wants many warps per SM), with at least kDecodeMinKeysPerSplit keys per split, at most
// kMaxDecodeSplits. 1 when batch_heads suffices, and for sm_count 1. The split count changes the order
// of the sums, so a row's last bits may differ between batch sizes and GPUs (never between two runs of
// one call).
constexpr int kDecodeBlocksPerSm = 4;
constexpr int kDecodeMinKeysPerSplit = 128;
constexpr int kMaxDecodeSplits = 64;
int decode_splits(int64_t batch_heads, int64_t num_keys, int sm_count);

// Floats of the splits' workspace (p.partial) for p.splits > 1; 0 for one split.
size_t decode_workspace_floats(const DecodeParams& p);

// ---- gradient scaling: multi-tensor tables ---------------------------------------------------------------

// Appends the entry of one tensor of a multi-tensor launch: its `buffers` buffers of `numel` elements
// (ptrs[i] of kind kinds[i]) and its block. An empty tensor gets no entry: it has no chunk to process.
void add_tensor_entry(std::vector<TensorEntry>& entries, int buffers, void* const* ptrs, const FloatKind* kinds,
                      int64_t numel, int32_t block);

// A launch's tables as one buffer [entries | chunks]: the host image, to copy to the device in one
// transfer (the emulator reads it in place), and where the chunks start. One ChunkRef per kChunk
// elements of each tensor, in entry order.
struct MultiTensorTables {
  std::vector<uint8_t> bytes;
  size_t chunks_offset;
  int64_t num_chunks;
  const TensorEntry* entries(const void* base) const;
  const ChunkRef* chunks(const void* base) const;
};
MultiTensorTables pack_tables(const std::vector<TensorEntry>& entries);

// AdamW's constants in fp32, rounded from the double hyperparameters (1 - beta is taken in double).
AdamWConstants adamw_constants(double beta1, double beta2, double eps);


// ---- launches by name: the NVRTC backend ---------------------------------------------------------------------

// One kernel launch of an op, for a backend that loads the kernels by name (dalle_fast/ops/nvrtc.py, which
// compiles the same .cu files with NVRTC): the kernel's instantiation as a C++ name expression, e.g.
// "dalle_fast::cuda::forward_kernel<__half, 64, 2>", its shape, and its arguments' bytes in the kernel's
// parameter order. The launchers of the .cu files make the same choices from the same plans
// (forward_launch, backward_launch, decode_launch, elementwise_launch, ...); the functions below return
// the launches those launchers would make, in order, and none where they would launch nothing.
struct KernelLaunch {
  std::string kernel;
  LaunchShape shape;
  std::vector<std::vector<uint8_t>> args;
};

// The .cu files (their stems) and every kernel instantiation their launchers can make: what NVRTC compiles.
std::vector<std::pair<std::string, std::vector<std::string>>> kernel_names();

// p.head_dim must be one of kHeadDims; pointers are device pointers of the tensors named in attention_cuda.h.
std::vector<KernelLaunch> forward_launches(const AttentionParams& p, void* out, float* lse);
std::vector<KernelLaunch> backward_launches(const AttentionParams& p, const void* grad_out, const float* lse,
                                            float* delta, const void* out, void* dq, void* dk, void* dv,
                                            size_t smem_limit);
// p as attention_decode takes it (decode_params_valid).
std::vector<KernelLaunch> decode_launches(const DecodeParams& p);

std::vector<KernelLaunch> grad_scale_launches(const void* in, void* out, int64_t n, FloatKind kind,
                                              const float* scales, int64_t block);
std::vector<KernelLaunch> grad_unscale_filter_launches(const void* in, void* out, int64_t n, FloatKind kind,
                                                       const float* scales, int64_t block, bool* found_inf);
std::vector<KernelLaunch> multi_unscale_check_launches(const TensorEntry* entries, const ChunkRef* chunks,
                                                       int64_t num_chunks, const float* scales, bool* found_inf);
std::vector<KernelLaunch> scale_update_launches(float* scales, int32_t* cooldown, const bool* found_inf, int64_t n,
                                                float growth, float backoff, int32_t window, float min_scale,
                                                float max_scale);
std::vector<KernelLaunch> adamw_launches(const TensorEntry* entries, const ChunkRef* chunks, int64_t num_chunks,
                                         const bool* found_inf, const float* step_size,
                                         const float* bias_correction2_sqrt, const float* decay, AdamWConstants c);

#endif  // __CUDACC_RTC__

}  // namespace dalle_fast::cuda
