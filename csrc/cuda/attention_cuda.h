// CUDA block-sparse attention: the launchers (the kernels' parameter types are in kernel_params.h). Plain
// CUDA/C++ (no torch headers), so the .cu files compile in seconds. What a caller prepares before a launch (the layout's
// device copy, decode's key intervals and splits, shared-memory sizes) is in host_setup.h; the torch
// glue is attention_glue.cpp.
#pragma once

#include "kernel_params.h"

// NVRTC compiles the kernels without the CUDA runtime's headers, and reads no launcher.
#ifndef __CUDACC_RTC__
#include <cuda_runtime_api.h>

namespace dalle_fast::cuda {

// out (same dtype as q), lse (fp32).
cudaError_t attention_forward(const AttentionParams& p, void* out, float* lse, cudaStream_t stream);

// grad_out and out like q. Writes delta = rowsum(grad_out * out) in fp32 ([batch_heads, seq_len], a
// workspace), then dq, dk, dv (dtype of q) in two deterministic passes: key-block parallel for dk/dv,
// query-block parallel for dq; no atomics. smem_limit: cudaDevAttrMaxSharedMemoryPerBlockOptin, which
// picks double- or single-buffered passes (backward_stages in host_setup.h).
cudaError_t attention_backward(const AttentionParams& p, const void* grad_out, const void* out, const float* lse,
                               float* delta, void* dq, void* dk, void* dv, size_t smem_limit, cudaStream_t stream);

// ---- decode: one query row per (batch, head) against a key/value cache ----

// One thread block per (batch, head, split); its warps split the block's keys, each keeps an online
// softmax, and the block merges them in a fixed order. With splits > 1 a second kernel merges the
// splits, again in a fixed order: deterministic, no atomics.
cudaError_t attention_decode(const DecodeParams& p, cudaStream_t stream);

}  // namespace dalle_fast::cuda

#endif  // __CUDACC_RTC__
