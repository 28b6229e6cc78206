// CPU host glue for dalle_fast::sparse_attention_fwd / _bwd / _decode: checks, fp32 staging, kernel call.
// fp32 inputs are used in place (made contiguous); for fwd and bwd, bf16 and fp16 are staged to fp32, so
// all math and accumulation happen in fp32 and only the results are rounded back. Decode reads its cache
// in its own dtype (and computes in fp32): staging would copy the whole cache for every token.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "attention_cpu.h"

namespace dalle_fast {
namespace {

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "dalle_fast: expected CPU tensors, got ", q.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "dalle_fast: CPU kernels take float32, bfloat16 or float16, got ", dt);
  const int64_t d = q.size(q.dim() - 1);
  TORCH_CHECK(d >= 1 && d <= 256, "dalle_fast: head_dim (q.shape[", q.dim() - 1, "]) must be in [1, 256] on CPU, got ",
              d);
}

cpu::AttentionShape shape_of(const at::Tensor& q, double scale, const MaskSpec& m) {
  return cpu::AttentionShape{q.size(0) * q.size(1), q.size(3), static_cast<float>(scale), m};
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, c10::string_view kind,
                                                            int64_t text_len, int64_t image_size,
                                                            int64_t kernel_size, double scale) {
  const MaskSpec m = check_mask_spec(std::string(kind), text_len, image_size, kernel_size);
  check_scale(scale);
  check_qkv(q, k, v, m);
  check_cpu(q);
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() > 0) {
    cpu::attention_forward(shape_of(q, scale, m), qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(),
                           out.data_ptr<float>(), lse.data_ptr<float>());
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, c10::string_view kind, int64_t text_len, int64_t image_size, int64_t kernel_size,
    double scale) {
  const MaskSpec m = check_mask_spec(std::string(kind), text_len, image_size, kernel_size);
  check_scale(scale);
  check_qkv(q, k, v, m);
  check_cpu(q);
  check_same(grad_out, "grad_out", q, "q");
  check_same(out, "out", q, "q");
  check_lse(lse, q);
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), of = as_f32(out), gf = as_f32(grad_out);
  const at::Tensor lf = lse.contiguous();
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(q.sizes(), opts), dv = at::empty(q.sizes(), opts);
  if (q.numel() > 0) {
    cpu::attention_backward(shape_of(q, scale, m), qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(),
                            of.data_ptr<float>(), gf.data_ptr<float>(), lf.data_ptr<float>(), dq.data_ptr<float>(),
                            dk.data_ptr<float>(), dv.data_ptr<float>());
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

at::Tensor sparse_attention_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      c10::string_view kind, int64_t text_len, int64_t image_size, int64_t kernel_size,
                                      double scale, int64_t position) {
  const MaskSpec m = check_mask_spec(std::string(kind), text_len, image_size, kernel_size);
  check_scale(scale);
  check_decode(q, k, v, m, position);
  check_cpu(q);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto dt = q.scalar_type();
  const auto dtype = dt == at::kFloat ? cpu::DType::kFloat : dt == at::kHalf ? cpu::DType::kHalf : cpu::DType::kBFloat16;
  if (q.numel() > 0) {
    const cpu::DecodeShape s{q.size(0) * q.size(1), k.size(2), q.size(2), position, static_cast<float>(scale), m};
    cpu::attention_decode(s, dtype, qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_attention_fwd", &sparse_attention_fwd_cpu);
  m.impl("sparse_attention_bwd", &sparse_attention_bwd_cpu);
  m.impl("sparse_attention_decode", &sparse_attention_decode_cpu);
}

}  // namespace dalle_fast
