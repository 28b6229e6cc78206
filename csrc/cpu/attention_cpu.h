// CPU block-sparse attention kernels on raw fp32 buffers (the torch glue is attention_glue.cpp).
#pragma once

#include <cstdint>

#include "../layout.h"

namespace dalle_fast::cpu {

// q, k, v, out, grads: contiguous [batch * heads, seq_len, head_dim] fp32; lse: [batch * heads, seq_len].
struct AttentionShape {
  int64_t batch_heads;
  int64_t head_dim;
  float scale;
  MaskSpec mask;  // kColumn: the buffers hold transposed image states
};

// Flash-style forward: visits only the layout's blocks, masks only partial ones, writes the
// log-sum-exp of every query row for the backward. Parallel over (batch * heads, super-block of
// kForwardSuperRows query rows).
void attention_forward(const AttentionShape& s, const float* q, const float* k, const float* v, float* out,
                       float* lse);

// Backward from the saved log-sum-exp. Key-block outer loop per (batch, head), so dK and dV are
// accumulated privately and dQ in row order: deterministic, no atomics. Parallel over batch * heads.
void attention_backward(const AttentionShape& s, const float* q, const float* k, const float* v,
                        const float* out, const float* grad_out, const float* lse, float* dq, float* dk,
                        float* dv);

// One query row against a key/value cache (sampling: one new token per step), on raw buffers of
// `dtype`: q, out [batch * heads, head_dim]; k, v [batch * heads, seq_len, head_dim], contiguous. The
// query sits at kernel-order position `position` and reads only the keys key_intervals() gives it (keys
// after it are never read); scores, softmax and the weighted sum are fp32. Parallel over batch * heads.
enum class DType : int32_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };
struct DecodeShape {
  int64_t batch_heads;
  int64_t seq_len;
  int64_t head_dim;
  int64_t position;
  float scale;
  MaskSpec mask;  // kColumn: the cache holds transposed image states
};
void attention_decode(const DecodeShape& s, DType dtype, const void* q, const void* k, const void* v, void* out);

// Block sizes (one layout block = this many tokens) used by the CPU passes.
constexpr int64_t kForwardBlock = 32;
constexpr int64_t kForwardSuperRows = 256;  // query rows per forward task (a multiple of kForwardBlock)
constexpr int64_t kBackwardBlock = 64;

}  // namespace dalle_fast::cpu
