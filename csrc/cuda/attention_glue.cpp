// CUDA torch glue for dalle_fast::sparse_attention_fwd / _bwd / _decode: argument checks, the device copy
// of the block layout (cached per mask and device), torch's current stream, and the launch error check.
// What a launch needs beyond tensors (layout packing, decode's key intervals and splits, shared-memory
// sizes) comes from host_setup.h, which the emulator's C API calls too.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>

#include "../checks.h"
#include "attention_cuda.h"
#include "capabilities.h"
#include "glue.h"
#include "host_setup.h"

namespace dalle_fast {
namespace {

using cuda::kMaxSeqLen;

// Uploaded layouts live as long as the process; there are a handful of (mask, device) pairs per model.
struct UploadedLayout {
  at::Tensor buffer;  // pack_layout's bytes on the device
  cuda::DeviceLayout layout;
};

cuda::DeviceLayout device_layout(const MaskSpec& m, const at::Device& device) {
  using Key = std::tuple<int32_t, int64_t, int64_t, int64_t, int32_t>;
  static std::mutex mutex;
  // Never destroyed: freeing CUDA memory from static destructors at exit can fail after the driver shuts down.
  static auto& cache = *new std::map<Key, UploadedLayout>();
  const int64_t ks = m.kind == MaskKind::kConv ? m.kernel_size : 0;
  const Key key{static_cast<int32_t>(m.kind), m.text_len, m.image_size, ks, device.index()};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "dalle_fast: the first call for a mask uploads its block layout, which cannot happen during CUDA "
                "graph capture; run the model once before capturing");
    const cuda::PackedLayout packed = cuda::pack_layout(*get_block_layout(m, cuda::kBlock));
    at::Tensor host = at::empty({static_cast<int64_t>(packed.bytes.size())}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(host.data_ptr(), packed.bytes.data(), packed.bytes.size());
    at::Tensor buffer = host.to(device);
    const cuda::DeviceLayout layout = packed.device_layout(buffer.data_ptr());
    it = cache.emplace(key, UploadedLayout{std::move(buffer), layout}).first;
  }
  return it->second.layout;
}

// Contiguous and 16-byte aligned (the kernels load 16 bytes at a time).
at::Tensor prepared(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// "(32, 64, 128)": the head dims of capabilities.h, as Python prints the tuple _C.CUDA_HEAD_DIMS.
std::string head_dims_text() {
  std::ostringstream out;
  out << "(";
  for (int i = 0; i < cuda::kNumHeadDims; ++i) out << (i ? ", " : "") << cuda::kHeadDims[i];
  out << ")";
  return out.str();
}

void check_cuda_inputs(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cuda(), "dalle_fast: expected CUDA tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "dalle_fast: CUDA kernels take float16 or bfloat16, got ", q.scalar_type());
  const int64_t d = q.size(3);
  TORCH_CHECK(cuda::is_supported_head_dim(static_cast<int>(d)), "dalle_fast: head_dim (q.shape[3]) must be one of ",
              head_dims_text(), " on CUDA, got ", d);
  TORCH_CHECK(q.size(2) <= kMaxSeqLen, "dalle_fast: seq_len must be at most ", kMaxSeqLen,
              " for the CUDA kernels, got ", q.size(2));
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()));
  constexpr int kMin = cuda::kMinComputeCapability;
  TORCH_CHECK(major * 10 + minor >= kMin, "dalle_fast: the CUDA attention kernels need a GPU of compute capability ",
              kMin / 10, ".", kMin % 10, " or newer (bf16 mma.sync, ldmatrix, cp.async); this one is ", major, ".",
              minor);
}

// The current device's opt-in shared memory per block.
size_t shared_memory_limit() {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(limit);
}

// Clear error instead of a failed launch on GPUs whose per-block shared memory is too small.
void check_shared_memory(size_t need, size_t limit, const char* pass, int64_t head_dim) {
  TORCH_CHECK(need <= limit, "dalle_fast: the CUDA ", pass, " kernel for head_dim ", head_dim, " needs ", need,
              " bytes of shared memory per block; this GPU allows ", limit, ". Use a smaller head_dim on this GPU.");
}

cuda::AttentionParams params_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskSpec& m,
                                double scale) {
  return cuda::AttentionParams{q.data_ptr(),
                               k.data_ptr(),
                               v.data_ptr(),
                               q.size(0) * q.size(1),
                               static_cast<int32_t>(q.size(2)),
                               static_cast<int32_t>(q.size(3)),
                               static_cast<float>(scale),
                               q.scalar_type() == at::kHalf ? cuda::DType::kHalf : cuda::DType::kBFloat16,
                               m,
                               device_layout(m, q.device())};
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in, c10::string_view kind,
                                                             int64_t text_len, int64_t image_size,
                                                             int64_t kernel_size, double scale) {
  const MaskSpec m = check_mask_spec(std::string(kind), text_len, image_size, kernel_size);
  check_scale(scale);
  check_qkv(q_in, k_in, v_in, m);
  check_cuda_inputs(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = prepared(q_in), k = prepared(k_in), v = prepared(v_in);
  const auto dtype = q.scalar_type() == at::kHalf ? cuda::DType::kHalf : cuda::DType::kBFloat16;
  check_shared_memory(cuda::forward_smem_bytes(dtype, q.size(3)), shared_memory_limit(), "forward", q.size(3));
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const cudaError_t err = cuda::attention_forward(params_of(q, k, v, m, scale), out.data_ptr(),
                                                  lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  cuda::check_launch(err, "forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, c10::string_view kind, int64_t text_len, int64_t image_size,
    int64_t kernel_size, double scale) {
  const MaskSpec m = check_mask_spec(std::string(kind), text_len, image_size, kernel_size);
  check_scale(scale);
  check_qkv(q_in, k_in, v_in, m);
  check_cuda_inputs(q_in);
  check_same(grad_out_in, "grad_out", q_in, "q");
  check_same(out_in, "out", q_in, "q");
  check_lse(lse_in, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = prepared(q_in), k = prepared(k_in), v = prepared(v_in), g = prepared(grad_out_in),
                   o = prepared(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const auto dtype = q.scalar_type() == at::kHalf ? cuda::DType::kHalf : cuda::DType::kBFloat16;
  const size_t smem_limit = shared_memory_limit();
  check_shared_memory(cuda::backward_smem_bytes(dtype, q.size(3), smem_limit), smem_limit, "backward", q.size(3));
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options()),
             dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  // delta = rowsum(dO * O) in fp32, written by the first kernel of the backward.
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const cudaError_t err =
      cuda::attention_backward(params_of(q, k, v, m, scale), g.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                               delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), smem_limit,
                               c10::cuda::getCurrentCUDAStream());
  cuda::check_launch(err, "backward");
  return {dq, dk, dv};
}

// The SMs decode fills (cuda::decode_splits): the current device's, or DALLE_FAST_DECODE_SMS when set
// (1 turns key splitting off; tests use it to compare split and unsplit results).
int decode_sm_count(const at::Device& device) {
  if (const char* env = std::getenv("DALLE_FAST_DECODE_SMS")) return std::max(1, std::atoi(env));
  static std::mutex mutex;
  static std::map<int, int> sms_of;  // per device index, asked once
  std::lock_guard<std::mutex> lock(mutex);
  auto it = sms_of.find(device.index());
  if (it == sms_of.end()) {
    int sms = 1;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
    it = sms_of.emplace(device.index(), sms).first;
  }
  return it->second;
}

at::Tensor sparse_attention_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       c10::string_view kind, int64_t text_len, int64_t image_size,
                                       int64_t kernel_size, double scale, int64_t position) {
  const MaskSpec m = check_mask_spec(std::string(kind), text_len, image_size, kernel_size);
  check_scale(scale);
  check_decode(q_in, k_in, v_in, m, position);
  TORCH_CHECK(q_in.device().is_cuda(), "dalle_fast: expected CUDA tensors, got ", q_in.device());
  const auto dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "dalle_fast: the CUDA decode kernel takes float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(q_in.size(2) >= 1 && q_in.size(2) <= cuda::kMaxDecodeHeadDim, "dalle_fast: head_dim (q.shape[2]) must be "
              "in [1, ", cuda::kMaxDecodeHeadDim, "] for decode, got ", q_in.size(2));
  TORCH_CHECK(k_in.size(2) <= kMaxSeqLen, "dalle_fast: seq_len must be at most ", kMaxSeqLen,
              " for the CUDA kernels, got ", k_in.size(2));
  TORCH_CHECK(q_in.size(0) * q_in.size(1) <= INT32_MAX, "dalle_fast: batch * heads too large for the CUDA decode "
              "kernel (one thread block each, at most 2^31 - 1), got ", q_in.size(0) * q_in.size(1));
  cuda::DecodeParams p{};
  int64_t num_keys = 0;
  const int64_t n_iv = cuda::set_decode_intervals(p, m, position, &num_keys);
  TORCH_CHECK(n_iv <= cuda::kMaxDecodeIntervals, "dalle_fast: this conv row has ", n_iv, " key intervals; the CUDA "
              "decode kernel takes at most ", cuda::kMaxDecodeIntervals, " (use a smaller kernel_size)");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.batch_heads = q.size(0) * q.size(1);
  p.seq_len = static_cast<int32_t>(k.size(2));
  p.head_dim = static_cast<int32_t>(q.size(2));
  p.scale = static_cast<float>(scale);
  p.dtype = dt == at::kFloat   ? cuda::DecodeDType::kFloat
            : dt == at::kHalf  ? cuda::DecodeDType::kHalf
                               : cuda::DecodeDType::kBFloat16;
  p.splits = cuda::decode_splits(p.batch_heads, num_keys, decode_sm_count(q.device()));
  at::Tensor workspace;  // the splits' partial results, when there are several
  if (p.splits > 1) {
    workspace = at::empty({static_cast<int64_t>(cuda::decode_workspace_floats(p))}, q.options().dtype(at::kFloat));
    p.partial = workspace.data_ptr<float>();
  }
  const cudaError_t err = cuda::attention_decode(p, c10::cuda::getCurrentCUDAStream());
  cuda::check_launch(err, "decode");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd_cuda);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd_cuda);
  m.impl("sparse_attention_decode", &sparse_attention_decode_cuda);
}

}  // namespace dalle_fast
