#include "host_setup.h"

#include <algorithm>
#include <initializer_list>
#include <cstdlib>
#include <cstring>
#include <string>

namespace dalle_fast::cuda {

// ---- launch shapes ---------------------------------------------------------------------------------------

namespace {

// fp16 and bf16 alike.
constexpr size_t element_bytes(DType) { return 2; }

constexpr int kGradScalingThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = 4096;  // grid-stride loops cover the rest

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int forward_rows_per_warp(int head_dim) {
  if (head_dim > 64) return 16;
  const char* env = std::getenv("DALLE_FAST_FWD_ROWS_PER_WARP");
  return env != nullptr && std::atoi(env) == 16 ? 16 : 32;
}

int backward_stages(int head_dim, size_t smem_limit) {
  if (head_dim < 128) return 2;
  const char* forced = std::getenv("DALLE_FAST_BWD_STAGES");
  const bool fits = backward_smem_size(head_dim, 2, element_bytes(DType::kHalf)) <= smem_limit;
  return fits && (forced == nullptr || std::atoi(forced) != 1) ? 2 : 1;
}

size_t forward_smem_bytes(DType dtype, int head_dim) {
  return is_supported_head_dim(head_dim) ? forward_smem_size(head_dim, element_bytes(dtype)) : 0;
}

size_t backward_smem_bytes(DType dtype, int head_dim, size_t smem_limit) {
  if (!is_supported_head_dim(head_dim)) return 0;
  return backward_smem_size(head_dim, backward_stages(head_dim, smem_limit), element_bytes(dtype));
}

ForwardLaunch forward_launch(const AttentionParams& p) {
  const int rows = forward_rows_per_warp(p.head_dim);
  return {{p.batch_heads * p.layout.num_blocks, attention_threads(rows), forward_smem_bytes(p.dtype, p.head_dim)},
          rows};
}

BackwardLaunch backward_launch(const AttentionParams& p, size_t smem_limit) {
  const int threads = attention_threads(16);
  const int64_t rows_per_block = threads / (p.head_dim / 8);
  const int stages = backward_stages(p.head_dim, smem_limit);
  return {{ceil_div(p.batch_heads * p.seq_len, rows_per_block), threads, 0},
          {p.batch_heads * p.layout.num_blocks, threads,
           backward_smem_size(p.head_dim, stages, element_bytes(p.dtype))},
          stages};
}

bool decode_params_valid(const DecodeParams& p) {
  return p.batch_heads >= 0 && p.batch_heads <= kMaxGridBlocks && p.head_dim >= 1 &&
         p.head_dim <= kMaxDecodeHeadDim && p.num_intervals >= 0 && p.num_intervals <= kMaxDecodeIntervals &&
         p.splits >= 1 && p.splits <= kMaxDecodeSplits && p.batch_heads * p.splits <= kMaxGridBlocks &&
         (p.splits == 1 || p.partial != nullptr);
}

DecodeLaunch decode_launch(const DecodeParams& p) {
  int per_lane = 1;
  while (32 * per_lane < p.head_dim) per_lane *= 2;
  const int threads = kDecodeWarps * 32;
  return {{p.batch_heads * p.splits, threads, kDecodeSmemBytes},
          {p.splits > 1 ? p.batch_heads : 0, threads, 0},
          per_lane};
}

LaunchShape elementwise_launch(int64_t n) {
  return {std::clamp<int64_t>(ceil_div(n, kGradScalingThreads), 1, kMaxElementwiseBlocks), kGradScalingThreads, 0};
}

LaunchShape chunk_launch(int64_t num_chunks) { return {num_chunks, kGradScalingThreads, 0}; }

LaunchShape per_element_launch(int64_t n) { return {ceil_div(n, kGradScalingThreads), kGradScalingThreads, 0}; }

// ---- attention: the block layout -------------------------------------------------------------------------

namespace {

// Appends vec's bytes at the next 16-byte boundary of buf; returns where they start.
template <typename T>
size_t append_aligned(std::vector<uint8_t>& buf, const std::vector<T>& vec) {
  const size_t at = (buf.size() + 15) / 16 * 16;
  buf.resize(at + vec.size() * sizeof(T));
  if (!vec.empty()) std::memcpy(buf.data() + at, vec.data(), vec.size() * sizeof(T));
  return at;
}

}  // namespace

PackedLayout pack_layout(const BlockLayout& L) {
  PackedLayout out;
  out.q_ptr = append_aligned(out.bytes, L.q_ptr);
  out.q_kblock = append_aligned(out.bytes, L.q_kblock);
  out.q_full = append_aligned(out.bytes, L.q_full);
  out.k_ptr = append_aligned(out.bytes, L.k_ptr);
  out.k_qblock = append_aligned(out.bytes, L.k_qblock);
  out.k_full = append_aligned(out.bytes, L.k_full);
  out.num_blocks = static_cast<int32_t>(L.num_blocks);
  return out;
}

DeviceLayout PackedLayout::device_layout(const void* base) const {
  const auto* b = static_cast<const uint8_t*>(base);
  return DeviceLayout{reinterpret_cast<const int32_t*>(b + q_ptr), reinterpret_cast<const int32_t*>(b + q_kblock),
                      b + q_full,
                      reinterpret_cast<const int32_t*>(b + k_ptr), reinterpret_cast<const int32_t*>(b + k_qblock),
                      b + k_full,
                      num_blocks};
}

// ---- decode ------------------------------------------------------------------------------------------------

int64_t set_decode_intervals(DecodeParams& p, const MaskSpec& m, int64_t position, int64_t* num_keys) {
  std::vector<KeyInterval> iv(max_key_intervals(m));
  const int64_t n = key_intervals(m, position, iv.data());
  *num_keys = 0;
  for (int64_t t = 0; t < n; ++t) *num_keys += iv[t].hi - iv[t].lo;
  if (n > kMaxDecodeIntervals) return n;
  p.num_intervals = static_cast<int32_t>(n);
  for (int32_t t = 0; t < p.num_intervals; ++t) {
    p.lo[t] = static_cast<int32_t>(iv[t].lo);
    p.hi[t] = static_cast<int32_t>(iv[t].hi);
  }
  return n;
}

int decode_splits(int64_t batch_heads, int64_t num_keys, int sm_count) {
  if (batch_heads <= 0 || num_keys <= 0 || sm_count <= 1) return 1;  // one SM (the override): no sharing
  const int64_t blocks = kDecodeBlocksPerSm * static_cast<int64_t>(sm_count);
  const int64_t want = (blocks + batch_heads - 1) / batch_heads;
  const int64_t most = std::min<int64_t>(kMaxDecodeSplits, num_keys / kDecodeMinKeysPerSplit);
  return static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
}

size_t decode_workspace_floats(const DecodeParams& p) {
  return p.splits > 1 ? static_cast<size_t>(p.batch_heads) * p.splits * (p.head_dim + 2) : 0;
}

// ---- gradient scaling ----------------------------------------------------------------------------------------

void add_tensor_entry(std::vector<TensorEntry>& entries, int buffers, void* const* ptrs, const FloatKind* kinds,
                      int64_t numel, int32_t block) {
  if (numel == 0) return;
  TensorEntry e{};
  for (int i = 0; i < buffers; ++i) {
    e.ptr[i] = ptrs[i];
    e.kind[i] = static_cast<int32_t>(kinds[i]);
  }
  e.numel = numel;
  e.block = block;
  entries.push_back(e);
}

MultiTensorTables pack_tables(const std::vector<TensorEntry>& entries) {
  std::vector<ChunkRef> chunks;
  for (size_t t = 0; t < entries.size(); ++t)
    for (int64_t c = 0; c * kChunk < entries[t].numel; ++c)
      chunks.push_back({static_cast<int32_t>(t), static_cast<int32_t>(c)});
  MultiTensorTables out;
  out.chunks_offset = (entries.size() * sizeof(TensorEntry) + 15) / 16 * 16;
  out.num_chunks = static_cast<int64_t>(chunks.size());
  out.bytes.resize(out.chunks_offset + chunks.size() * sizeof(ChunkRef));
  if (!entries.empty()) std::memcpy(out.bytes.data(), entries.data(), entries.size() * sizeof(TensorEntry));
  if (!chunks.empty())
    std::memcpy(out.bytes.data() + out.chunks_offset, chunks.data(), chunks.size() * sizeof(ChunkRef));
  return out;
}

const TensorEntry* MultiTensorTables::entries(const void* base) const {
  return static_cast<const TensorEntry*>(base);
}

const ChunkRef* MultiTensorTables::chunks(const void* base) const {
  return reinterpret_cast<const ChunkRef*>(static_cast<const uint8_t*>(base) + chunks_offset);
}

AdamWConstants adamw_constants(double beta1, double beta2, double eps) {
  return AdamWConstants{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                        static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
}


// ---- launches by name ----------------------------------------------------------------------------------------
// None where the launchers would refuse the call (a head dim without kernels, invalid decode parameters),
// as where they would launch nothing.

namespace {

const char* const kNs = "dalle_fast::cuda::";

const char* type_name(DType t) { return t == DType::kHalf ? "__half" : "__nv_bfloat16"; }
const char* type_name(DecodeDType t) {
  return t == DecodeDType::kFloat ? "float" : t == DecodeDType::kHalf ? "__half" : "__nv_bfloat16";
}

// "dalle_fast::cuda::name<a, b, ...>" (no brackets without template arguments).
std::string instance(const char* name, std::initializer_list<std::string> targs) {
  std::string s = std::string(kNs) + name;
  if (targs.size() == 0) return s;
  s += "<";
  bool first = true;
  for (const std::string& a : targs) {
    s += (first ? "" : ", ") + a;
    first = false;
  }
  return s + ">";
}

template <typename... A>
std::vector<std::vector<uint8_t>> arg_bytes(const A&... a) {
  std::vector<std::vector<uint8_t>> out;
  auto add = [&](const auto& x) {
    std::vector<uint8_t> b(sizeof(x));
    std::memcpy(b.data(), &x, sizeof(x));
    out.push_back(std::move(b));
  };
  (add(a), ...);
  return out;
}

// The elements per lane decode instantiates: decode_launch's powers of 2, up to kMaxDecodeHeadDim / 32.
std::vector<int> decode_elems_per_lane() {
  std::vector<int> e;
  for (int x = 1; x <= kMaxDecodeHeadDim / 32; x *= 2) e.push_back(x);
  return e;
}

// A one-launch op: none when the launcher would launch nothing (no blocks).
std::vector<KernelLaunch> single(const char* kernel, const LaunchShape& s, std::vector<std::vector<uint8_t>> args) {
  if (s.blocks == 0) return {};
  return {KernelLaunch{instance(kernel, {}), s, std::move(args)}};
}

}  // namespace

std::vector<std::pair<std::string, std::vector<std::string>>> kernel_names() {
  std::vector<std::string> fwd, bwd, dec;
  for (DType t : {DType::kHalf, DType::kBFloat16}) {
    for (int d : kHeadDims) {
      const std::string T = type_name(t), D = std::to_string(d);
      for (int mt : d <= 64 ? std::vector<int>{1, 2} : std::vector<int>{1})
        fwd.push_back(instance("forward_kernel", {T, D, std::to_string(mt)}));
      bwd.push_back(instance("delta_kernel", {T, D}));
      for (int stages : d >= 128 ? std::vector<int>{1, 2} : std::vector<int>{2}) {
        bwd.push_back(instance("dkdv_kernel", {T, D, std::to_string(stages)}));
        bwd.push_back(instance("dq_kernel", {T, D, std::to_string(stages)}));
      }
    }
  }
  for (DecodeDType t : {DecodeDType::kFloat, DecodeDType::kHalf, DecodeDType::kBFloat16}) {
    for (int e : decode_elems_per_lane()) dec.push_back(instance("decode_kernel", {type_name(t), std::to_string(e)}));
    dec.push_back(instance("decode_merge_kernel", {type_name(t)}));
  }
  std::vector<std::string> gs;
  for (const char* k : {"grad_scale_kernel", "grad_unscale_filter_kernel", "multi_unscale_check_kernel",
                        "scale_update_kernel", "adamw_kernel"})
    gs.push_back(instance(k, {}));
  return {{"attention_fwd", fwd}, {"attention_bwd", bwd}, {"decode", dec}, {"grad_scaling", gs}};
}

std::vector<KernelLaunch> forward_launches(const AttentionParams& p, void* out, float* lse) {
  if (!is_supported_head_dim(p.head_dim)) return {};  // the launcher refuses it
  const ForwardLaunch plan = forward_launch(p);
  if (plan.shape.blocks == 0) return {};
  const int mt = plan.rows_per_warp / 16;
  return {{instance("forward_kernel", {type_name(p.dtype), std::to_string(p.head_dim), std::to_string(mt)}),
           plan.shape, arg_bytes(p, out, lse)}};
}

std::vector<KernelLaunch> backward_launches(const AttentionParams& p, const void* grad_out, const float* lse,
                                            float* delta, const void* out, void* dq, void* dk, void* dv,
                                            size_t smem_limit) {
  if (!is_supported_head_dim(p.head_dim)) return {};  // the launcher refuses it
  const BackwardLaunch plan = backward_launch(p, smem_limit);
  if (plan.passes.blocks == 0) return {};
  const std::string T = type_name(p.dtype), D = std::to_string(p.head_dim), S = std::to_string(plan.stages);
  const int64_t rows = p.batch_heads * p.seq_len;
  return {{instance("delta_kernel", {T, D}), plan.delta, arg_bytes(grad_out, out, delta, rows)},
          {instance("dkdv_kernel", {T, D, S}), plan.passes, arg_bytes(p, grad_out, lse, delta, dk, dv)},
          {instance("dq_kernel", {T, D, S}), plan.passes, arg_bytes(p, grad_out, lse, delta, dq)}};
}

std::vector<KernelLaunch> decode_launches(const DecodeParams& p) {
  if (p.batch_heads == 0 || !decode_params_valid(p)) return {};  // nothing to do, or the launcher refuses it
  const DecodeLaunch plan = decode_launch(p);
  const std::string T = type_name(p.dtype);
  std::vector<KernelLaunch> out{
      {instance("decode_kernel", {T, std::to_string(plan.elems_per_lane)}), plan.rows, arg_bytes(p)}};
  if (plan.merge.blocks > 0) out.push_back({instance("decode_merge_kernel", {T}), plan.merge, arg_bytes(p)});
  return out;
}

std::vector<KernelLaunch> grad_scale_launches(const void* in, void* out, int64_t n, FloatKind kind,
                                              const float* scales, int64_t block) {
  if (n == 0) return {};
  return single("grad_scale_kernel", elementwise_launch(n),
                arg_bytes(in, out, n, static_cast<int32_t>(kind), scales, block));
}

std::vector<KernelLaunch> grad_unscale_filter_launches(const void* in, void* out, int64_t n, FloatKind kind,
                                                       const float* scales, int64_t block, bool* found_inf) {
  if (n == 0) return {};
  return single("grad_unscale_filter_kernel", elementwise_launch(n),
                arg_bytes(in, out, n, static_cast<int32_t>(kind), scales, block, found_inf));
}

std::vector<KernelLaunch> multi_unscale_check_launches(const TensorEntry* entries, const ChunkRef* chunks,
                                                       int64_t num_chunks, const float* scales, bool* found_inf) {
  return single("multi_unscale_check_kernel", chunk_launch(num_chunks), arg_bytes(entries, chunks, scales, found_inf));
}

std::vector<KernelLaunch> scale_update_launches(float* scales, int32_t* cooldown, const bool* found_inf, int64_t n,
                                                float growth, float backoff, int32_t window, float min_scale,
                                                float max_scale) {
  return single("scale_update_kernel", per_element_launch(n),
                arg_bytes(scales, cooldown, found_inf, n, growth, backoff, window, min_scale, max_scale));
}

std::vector<KernelLaunch> adamw_launches(const TensorEntry* entries, const ChunkRef* chunks, int64_t num_chunks,
                                         const bool* found_inf, const float* step_size,
                                         const float* bias_correction2_sqrt, const float* decay, AdamWConstants c) {
  return single("adamw_kernel", chunk_launch(num_chunks),
                arg_bytes(entries, chunks, found_inf, step_size, bias_correction2_sqrt, decay, c));
}

}  // namespace dalle_fast::cuda
