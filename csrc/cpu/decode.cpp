// CPU decode attention: one query row per (batch, head) against a key/value cache, visiting only the
// key intervals of the row's mask. Reads fp32, fp16 or bf16 in place (a cache is never staged to fp32:
// that would copy all of it for every token); all arithmetic is fp32.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_cpu.h"

namespace dalle_fast::cpu {
namespace {

// q . k over D elements in 8 independent lanes, so the loop vectorises without reassociation flags.
template <typename T>
inline float dot_lanes(const float* q, const T* k, int64_t D) {
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += q[d + l] * static_cast<float>(k[d + l]);
  float sum = 0.f;
  for (; d < D; ++d) sum += q[d] * static_cast<float>(k[d]);
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

template <typename T>
void decode(const DecodeShape& s, const T* q, const T* k, const T* v, T* out) {
  const int64_t N = s.seq_len, D = s.head_dim;
  std::vector<KeyInterval> iv(max_key_intervals(s.mask));
  const int64_t n_iv = key_intervals(s.mask, s.position, iv.data());
  int64_t n_keys = 0;
  for (int64_t t = 0; t < n_iv; ++t) n_keys += iv[t].hi - iv[t].lo;
  // Enough (batch, head) rows per task that a thread's share outweighs the cost of waking it.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n_keys * D));
  at::parallel_for(0, s.batch_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), scores(n_keys);
    for (int64_t bh = begin; bh < end; ++bh) {
      const T* Q = q + bh * D;
      const T* K = k + bh * N * D;
      const T* V = v + bh * N * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(Q[d]) * s.scale;
      float mx = -std::numeric_limits<float>::infinity();
      int64_t x = 0;
      for (int64_t t = 0; t < n_iv; ++t) {
        for (int64_t j = iv[t].lo; j < iv[t].hi; ++j, ++x) {
          const float dot = dot_lanes(qf.data(), K + j * D, D);
          scores[x] = dot;
          mx = std::max(mx, dot);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float sum = 0.f;
      x = 0;
      for (int64_t t = 0; t < n_iv; ++t) {
        for (int64_t j = iv[t].lo; j < iv[t].hi; ++j, ++x) {
          const float p = std::exp(scores[x] - mx);
          sum += p;
          const T* vj = V + j * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vj[d]);
        }
      }
      T* O = out + bh * D;
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) O[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

template <typename T>
void decode_as(const DecodeShape& s, const void* q, const void* k, const void* v, void* out) {
  decode<T>(s, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out));
}

}  // namespace

void attention_decode(const DecodeShape& s, DType dtype, const void* q, const void* k, const void* v, void* out) {
  switch (dtype) {
    case DType::kFloat:
      return decode_as<float>(s, q, k, v, out);
    case DType::kHalf:
      return decode_as<c10::Half>(s, q, k, v, out);
    case DType::kBFloat16:
      return decode_as<c10::BFloat16>(s, q, k, v, out);
  }
}

}  // namespace dalle_fast::cpu
