// The kernels' parameter types: what a launch passes to a kernel by value or through a device table.
// Plain C++ over layout.h, read by the kernels (nvcc and NVRTC), by host_setup.h (which fills them) and by
// the launchers. Launcher declarations, which need the CUDA runtime's types, are in attention_cuda.h and
// grad_scaling.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../layout.h"

namespace dalle_fast::cuda {

// ---- attention ----------------------------------------------------------------------------------------

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

// ---- decode ------------------------------------------------------------------------------------------

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

// ---- gradient scaling ----------------------------------------------------------------------------------

enum class FloatKind : int32_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// One tensor of a multi-tensor launch: up to four buffers of `numel` elements (unscale: the gradient;
// AdamW: param, grad, exp_avg, exp_avg_sq) and its block index.
struct TensorEntry {
  void* ptr[4];
  int32_t kind[4];
  int64_t numel;
  int32_t block;
  int32_t pad;
};

// Each thread block of a multi-tensor launch handles one chunk of kChunk elements of one tensor.
struct ChunkRef {
  int32_t tensor;
  int32_t chunk;
};
constexpr int64_t kChunk = 65536;

struct AdamWConstants {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};
}  // namespace dalle_fast::cuda
