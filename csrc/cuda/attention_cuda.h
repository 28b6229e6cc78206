// CUDA block-sparse attention: the kernels' parameters and their launchers. Plain CUDA/C++ (no torch
// headers), so the .cu files compile in seconds. What a caller prepares before a launch (the layout's
// device copy, decode's key intervals and splits, shared-memory sizes) is in host_setup.h; the torch
// glue is attention_glue.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../layout.h"

namespace dalle_fast::cuda {

// Layout block for queries and keys; the host glue uploads get_block_layout(mask, kBlock).
constexpr int kBlock = 64;

enum class DType : int32_t { kHalf = 0, kBFloat16 = 1 };

// The block layout on the device (see BlockLayout in layout.h).
struct DeviceLayout {
  const int32_t* q_ptr;
  const int32_t* q_kblock;
  const uint8_t* q_full;
  const int32_t* k_ptr;
  const int32_t* k_qblock;
  const uint8_t* k_full;
  int32_t num_blocks;
};

// Tensors are contiguous [batch_heads, seq_len, head_dim] (16-byte aligned); lse, delta [batch_heads, seq_len].
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t batch_heads;
  int32_t seq_len;
  int32_t head_dim;  // one of kHeadDims (capabilities.h)
  float scale;
  DType dtype;
  MaskSpec mask;  // kColumn: transposed image states
  DeviceLayout layout;
};

// out (same dtype as q), lse (fp32).
cudaError_t attention_forward(const AttentionParams& p, void* out, float* lse, cudaStream_t stream);

// grad_out and out like q. Writes delta = rowsum(grad_out * out) in fp32 ([batch_heads, seq_len], a
// workspace), then dq, dk, dv (dtype of q) in two deterministic passes: key-block parallel for dk/dv,
// query-block parallel for dq; no atomics. smem_limit: cudaDevAttrMaxSharedMemoryPerBlockOptin, which
// picks double- or single-buffered passes (backward_stages in host_setup.h).
cudaError_t attention_backward(const AttentionParams& p, const void* grad_out, const void* out, const float* lse,
                               float* delta, void* dq, void* dk, void* dv, size_t smem_limit, cudaStream_t stream);

// ---- decode: one query row per (batch, head) against a key/value cache ----

// Key intervals one decode call may visit (the conv mask of kernel_size k has at most k / 2 + 2).
constexpr int kMaxDecodeIntervals = 64;

// Decode takes fp32 too (a cache may be fp32), hence an enum of its own.
enum class DecodeDType : int32_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// q, out [batch_heads, head_dim]; k, v [batch_heads, seq_len, head_dim], contiguous, of dtype `dtype`.
// The host fills the query's key intervals (set_decode_intervals in host_setup.h) and, for splits > 1, a
// float workspace of decode_workspace_floats(p) elements.
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t batch_heads;
  int32_t seq_len;
  int32_t head_dim;  // 1 .. kMaxDecodeHeadDim (host_setup.h)
  float scale;
  DecodeDType dtype;
  int32_t num_intervals;
  int32_t lo[kMaxDecodeIntervals];
  int32_t hi[kMaxDecodeIntervals];
  int32_t splits;   // thread blocks per (batch, head), each over an equal share of the keys (>= 1)
  float* partial;   // splits > 1: [batch_heads, splits, head_dim + 2] (max, sum, unnormalised output)
};

// One thread block per (batch, head, split); its warps split the block's keys, each keeps an online
// softmax, and the block merges them in a fixed order. With splits > 1 a second kernel merges the
// splits, again in a fixed order: deterministic, no atomics.
cudaError_t attention_decode(const DecodeParams& p, cudaStream_t stream);

}  // namespace dalle_fast::cuda
