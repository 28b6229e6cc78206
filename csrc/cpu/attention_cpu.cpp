// CPU block-sparse attention: flash-style online softmax over the blocks of a DALL-E mask layout.
//
// Work per query block: consecutive key blocks of the layout are merged into chunks of at most
// kMaxChunk keys, so one GEMM covers, e.g., the whole dense text prefix. Only partial blocks pay for
// masking, by per-row key intervals rather than a mask tensor. Nothing of size seq_len^2 exists.
//
// A key the mask hides from a query never affects that query's output or gradients, nor the key's own
// gradients (docs/kernels.md#non-finite-values). Hidden pairs only exist in partial blocks, where their
// weight (P, or dS in the backward) is made exactly 0; a GEMM that sums over pairs would still form
// 0 * x, which is NaN for a non-finite x. So the operand rows of partial blocks are checked for
// non-finite values (each block once, NonfiniteBlocks), and where one is found that GEMM runs on a copy
// with the non-finite values zeroed and the visible pairs' non-finite products are added one by one
// (gemm_over_pairs). Finite inputs take the plain GEMMs.
#include "attention_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.h"

namespace dalle_fast::cpu {
namespace {

constexpr int64_t kMaxChunk = 512;  // keys (forward) or query rows (backward) per GEMM
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Element loops below are written for auto-vectorisation; on x86 GCC builds AVX-512 and AVX2 clones too
// and picks one at load time, so the wheel runs on any x86-64 while using the widest vectors present.
// The clones give the same bits: -ffp-contract=off keeps FMAs out, and the loops fix their summation
// order (8 explicit lanes), which vector width does not change.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DF_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DF_VECTOR_CLONES
#endif

// exp(x) to ~2 ulp in [-87, 88] from a Cephes-style polynomial, exactly 0 below (so -inf maps to 0).
// Branch-free so loops over it vectorise (the build passes -fno-trapping-math, which lets GCC turn
// the clamps into vector selects).
inline float exp_poly(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer (|t| < 2^22)
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float two_n = __builtin_bit_cast(float, bits);
  return x < -87.0f ? 0.0f : p * two_n;
}

// x <- exp(x - shift); returns the sum.
DF_VECTOR_CLONES float exp_shift_sum(float* x, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_poly(x[j] - shift);
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += x[j + l];
  float sum = 0.f;
  for (; j < n; ++j) sum += x[j];
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

DF_VECTOR_CLONES float max_of(const float* x, int64_t n) {
  float lanes[8] = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = std::max(lanes[l], x[j + l]);
  float m = kNegInf;
  for (; j < n; ++j) m = std::max(m, x[j]);
  for (int l = 0; l < 8; ++l) m = std::max(m, lanes[l]);
  return m;
}

DF_VECTOR_CLONES float dot(const float* a, const float* b, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[j + l] * b[j + l];
  float sum = 0.f;
  for (; j < n; ++j) sum += a[j] * b[j];
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

// dp <- p * (dp - d): the softmax backward of one row. Returns whether a result is not finite.
DF_VECTOR_CLONES bool softmax_grad_row(float* dp, const float* p, int64_t n, float d) {
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    dp[j] = p[j] * (dp[j] - d);
    bad |= !std::isfinite(dp[j]);
  }
  return bad != 0;
}

// Whether x[0, n) holds a NaN or an infinity.
DF_VECTOR_CLONES bool any_nonfinite(const float* x, int64_t n) {
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= !std::isfinite(x[j]);
  return bad != 0;
}

DF_VECTOR_CLONES void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// Sets s[j - k0] = value for every key j in [k0, k1) outside query i's intervals.
void fill_hidden(const MaskSpec& m, int64_t i, int64_t k0, int64_t k1, float* s, KeyInterval* iv, float value) {
  const int64_t n = key_intervals(m, i, iv);
  int64_t pos = k0;
  for (int64_t t = 0; t < n && pos < k1; ++t) {
    const int64_t lo = std::min(std::max(iv[t].lo, pos), k1);
    std::fill(s + (pos - k0), s + (lo - k0), value);
    pos = std::max(pos, iv[t].hi);
  }
  if (pos < k1) std::fill(s + (pos - k0), s + (k1 - k0), value);
}

void mask_row(const MaskSpec& m, int64_t i, int64_t k0, int64_t k1, float* s, KeyInterval* iv) {
  fill_hidden(m, i, k0, k1, s, iv, kNegInf);
}

// Whether each block of `block` rows of one (batch, head)'s x [seq_len, D] holds a non-finite value,
// scanned on first request: only chunks with hidden pairs ask, just before their GEMM reads the same rows
// (which the scan has then brought into cache).
class NonfiniteBlocks {
 public:
  void reset(const float* x, int64_t seq_len, int64_t D, int64_t block) {
    x_ = x, seq_len_ = seq_len, D_ = D, block_ = block;
    state_.assign((seq_len + block - 1) / block, kUnknown);
  }
  bool operator[](int64_t b) {
    if (state_[b] == kUnknown) {
      const int64_t t0 = b * block_, t1 = std::min(t0 + block_, seq_len_);
      state_[b] = any_nonfinite(x_ + t0 * D_, (t1 - t0) * D_) ? kBad : kFinite;
    }
    return state_[b] == kBad;
  }

 private:
  static constexpr uint8_t kUnknown = 0, kFinite = 1, kBad = 2;
  const float* x_ = nullptr;
  int64_t seq_len_ = 0, D_ = 0, block_ = 1;
  std::vector<uint8_t> state_;
};

// C[M, D] += alpha op(A) X, X [Kc, D], where op(A) [M, Kc] (A [Kc, M] read transposed when trans_a)
// pairs C's rows with X's rows, visible(m, kk) says which pairs the mask allows and A is exactly 0 at the
// others. A plain GEMM when x_nonfinite is false (X is finite, or every pair is visible). Otherwise the
// GEMM runs on a copy of X with its non-finite values zeroed, so the finite terms are summed as for a
// finite X and a hidden pair adds 0 * 0; the visible pairs' non-finite products are then added one by
// one, in IEEE arithmetic (NaN stays NaN). The copy keeps X's address modulo 64 bytes: a BLAS may round
// differently at another alignment, and rows that meet no non-finite value must get the bits a finite X
// gives them.
template <typename Visible>
void gemm_over_pairs(bool x_nonfinite, bool trans_a, int64_t M, int64_t D, int64_t Kc, float alpha, const float* A,
                     int64_t lda, const float* X, float* C, std::vector<float>& scratch, Visible visible) {
  if (!x_nonfinite) {
    gemm(trans_a, false, M, D, Kc, alpha, A, lda, X, D, 1.f, C, D);
    return;
  }
  scratch.resize(Kc * D + 16);
  const auto misalign = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 64; };
  float* Xf = scratch.data() + (misalign(X) + 64 - misalign(scratch.data())) % 64 / sizeof(float);
  for (int64_t x = 0; x < Kc * D; ++x) Xf[x] = std::isfinite(X[x]) ? X[x] : 0.f;
  gemm(trans_a, false, M, D, Kc, alpha, A, lda, Xf, D, 1.f, C, D);
  for (int64_t kk = 0; kk < Kc; ++kk) {
    const float* x = X + kk * D;
    if (!any_nonfinite(x, D)) continue;
    for (int64_t mm = 0; mm < M; ++mm) {
      if (!visible(mm, kk)) continue;
      const float a = alpha * (trans_a ? A[kk * lda + mm] : A[mm * lda + kk]);
      for (int64_t d = 0; d < D; ++d)
        if (!std::isfinite(x[d])) C[mm * D + d] += a * x[d];
    }
  }
}

// Iterates the layout row [begin, end) as chunks of consecutive blocks spanning at most kMaxChunk
// tokens: fn(first_entry, last_entry_exclusive, token_start, token_end).
template <typename Fn>
void for_each_chunk(const int32_t* blocks, int32_t begin, int32_t end, int64_t block, int64_t seq_len, Fn fn) {
  int32_t e = begin;
  while (e < end) {
    int32_t f = e + 1;
    while (f < end && blocks[f] == blocks[f - 1] + 1 && (blocks[f] + 1 - blocks[e]) * block <= kMaxChunk) ++f;
    const int64_t t0 = blocks[e] * block;
    const int64_t t1 = std::min<int64_t>((blocks[f - 1] + 1) * block, seq_len);
    fn(e, f, t0, t1);
    e = f;
  }
}

}  // namespace

void attention_forward(const AttentionShape& s, const float* q, const float* k, const float* v, float* out,
                       float* lse) {
  const int64_t N = s.mask.seq_len(), D = s.head_dim, B = kForwardBlock;
  const auto layout = get_block_layout(s.mask, B);
  const int64_t nqb = layout->num_blocks;
  const int64_t sub = kForwardSuperRows / B;  // query blocks per task
  const int64_t nsuper = (nqb + sub - 1) / sub;
  const int64_t max_iv = max_key_intervals(s.mask);

  // A task is a super-block of `sub` query blocks. Key blocks that are full for every one of them (the
  // dense text prefix of image queries, the past of causal queries) are processed once with all rows,
  // so those GEMMs are tall and the packed keys are reused; the rest block by block. Online softmax
  // makes the order of key chunks irrelevant.
  at::parallel_for(0, s.batch_heads * nsuper, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = sub * B;
    std::vector<float> S(R * kMaxChunk), acc(R * D), m(R), l(R), scratch;
    std::vector<KeyInterval> iv(max_iv);
    std::vector<int32_t> full_count(nqb), blocks;
    std::vector<uint8_t> full;
    NonfiniteBlocks v_bad;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nsuper, sb = task % nsuper;
      const int64_t qb0 = sb * sub, qb1 = std::min(nqb, qb0 + sub);
      const int64_t r0 = qb0 * B, rn = std::min(qb1 * B, N) - r0;
      const float* K = k + bh * N * D;
      const float* V = v + bh * N * D;
      v_bad.reset(V, N, D, B);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);

      // Rows [row0, row0 + qn) of the super-block against the key blocks blocks[] (full flags full[]).
      auto attend = [&](int64_t row0, int64_t qn) {
        const float* Q = q + (bh * N + r0 + row0) * D;
        for_each_chunk(blocks.data(), 0, static_cast<int32_t>(blocks.size()), B, N,
                       [&](int32_t e0, int32_t e1, int64_t c0, int64_t c1) {
                         const int64_t kn = c1 - c0;
                         gemm(false, true, qn, kn, D, s.scale, Q, D, K + c0 * D, D, 0.f, S.data(), kn);
                         for (int32_t e = e0; e < e1; ++e) {
                           if (full[e]) continue;
                           const int64_t k0 = blocks[e] * B, k1 = std::min(k0 + B, N);
                           for (int64_t r = 0; r < qn; ++r)
                             mask_row(s.mask, r0 + row0 + r, k0, k1, S.data() + r * kn + (k0 - c0), iv.data());
                         }
                         for (int64_t r = 0; r < qn; ++r) {
                           float* row = S.data() + r * kn;
                           const int64_t x = row0 + r;
                           const float m_new = std::max(m[x], max_of(row, kn));
                           if (m_new == kNegInf) {  // no score above -inf yet (max_of skips NaN)
                             // Weight 0 for -inf, hidden keys included; a NaN score stays and makes l NaN.
                             float sum = 0.f;
                             for (int64_t j = 0; j < kn; ++j) {
                               row[j] = row[j] == kNegInf ? 0.f : row[j];
                               sum += row[j];
                             }
                             l[x] += sum;
                             continue;
                           }
                           const float alpha = std::exp(m[x] - m_new);
                           l[x] = l[x] * alpha + exp_shift_sum(row, kn, m_new);
                           scale_row(acc.data() + x * D, D, alpha);
                           m[x] = m_new;
                         }
                         // P V; P is exactly 0 at hidden keys (exp of -inf: the max is never NaN).
                         // Hidden pairs only exist in partial blocks (a full one is seen by every row).
                         bool v_nonfinite = false;
                         for (int32_t e = e0; e < e1; ++e) v_nonfinite |= !full[e] && v_bad[blocks[e]];
                         gemm_over_pairs(v_nonfinite, false, qn, D, kn, 1.f, S.data(), kn, V + c0 * D,
                                         acc.data() + row0 * D, scratch, [&](int64_t r, int64_t j) {
                                           return mask_allows(s.mask, r0 + row0 + r, c0 + j);
                                         });
                       });
      };

      // Key blocks full for every query block of the super-block: once, with all rows.
      std::fill(full_count.begin(), full_count.end(), 0);
      for (int64_t qb = qb0; qb < qb1; ++qb)
        for (int32_t e = layout->q_ptr[qb]; e < layout->q_ptr[qb + 1]; ++e)
          full_count[layout->q_kblock[e]] += layout->q_full[e];
      blocks.clear();
      for (int64_t kb = 0; kb < nqb; ++kb)
        if (full_count[kb] == qb1 - qb0) blocks.push_back(static_cast<int32_t>(kb));
      full.assign(blocks.size(), 1);
      if (qb1 - qb0 > 1 && !blocks.empty()) attend(0, rn);
      const bool shared_done = qb1 - qb0 > 1;
      // Everything else, one query block at a time.
      for (int64_t qb = qb0; qb < qb1; ++qb) {
        blocks.clear();
        full.clear();
        for (int32_t e = layout->q_ptr[qb]; e < layout->q_ptr[qb + 1]; ++e) {
          if (shared_done && full_count[layout->q_kblock[e]] == qb1 - qb0) continue;
          blocks.push_back(layout->q_kblock[e]);
          full.push_back(layout->q_full[e]);
        }
        attend((qb - qb0) * B, std::min((qb + 1) * B, N) - qb * B);
      }

      float* O = out + (bh * N + r0) * D;
      float* L = lse + bh * N + r0;
      for (int64_t r = 0; r < rn; ++r) {
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < D; ++d) O[r * D + d] = acc[r * D + d] * inv;
        L[r] = m[r] + std::log(l[r]);
      }
    }
  });
}

void attention_backward(const AttentionShape& s, const float* q, const float* k, const float* v,
                        const float* out, const float* grad_out, const float* lse, float* dq, float* dk,
                        float* dv) {
  const int64_t N = s.mask.seq_len(), D = s.head_dim, B = kBackwardBlock;
  const auto layout = get_block_layout(s.mask, B);
  const int64_t max_iv = max_key_intervals(s.mask);

  const int64_t nb = layout->num_blocks;

  at::parallel_for(0, s.batch_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(kMaxChunk * B), dP(kMaxChunk * B), dk_acc(B * D), dv_acc(B * D), delta(N), scratch;
    std::vector<KeyInterval> iv(max_iv);
    std::vector<uint8_t> row_bad(kMaxChunk);
    NonfiniteBlocks q_bad, k_bad, do_bad;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t off = bh * N * D;
      const float *Q = q + off, *K = k + off, *V = v + off, *dO = grad_out + off, *O = out + off;
      const float* lse_bh = lse + bh * N;
      float *dQ = dq + off, *dK = dk + off, *dV = dv + off;
      q_bad.reset(Q, N, D, B);
      k_bad.reset(K, N, D, B);
      do_bad.reset(dO, N, D, B);
      // delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax-backward row term.
      for (int64_t i = 0; i < N; ++i) delta[i] = dot(dO + i * D, O + i * D, D);
      std::fill(dQ, dQ + N * D, 0.f);

      for (int64_t kb = 0; kb < nb; ++kb) {
        const int64_t k0 = kb * B, kn = std::min(B, N - k0);
        std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
        for_each_chunk(
            layout->k_qblock.data(), layout->k_ptr[kb], layout->k_ptr[kb + 1], B, N,
            [&](int32_t e0, int32_t e1, int64_t c0, int64_t c1) {
              const int64_t qn = c1 - c0;
              gemm(false, true, qn, kn, D, s.scale, Q + c0 * D, D, K + k0 * D, D, 0.f, P.data(), kn);
              bool partial = false;
              for (int32_t e = e0; e < e1; ++e) {
                if (layout->k_full[e]) continue;
                partial = true;
                const int64_t r0 = layout->k_qblock[e] * B, r1 = std::min(r0 + B, N);
                for (int64_t i = r0; i < r1; ++i)
                  mask_row(s.mask, i, k0, k0 + kn, P.data() + (i - c0) * kn, iv.data());
              }
              for (int64_t r = 0; r < qn; ++r) exp_shift_sum(P.data() + r * kn, kn, lse_bh[c0 + r]);
              // In partial blocks, zero the entries of the rows where row_needs_it(r) at hidden keys.
              auto zero_hidden = [&](float* rows, auto&& row_needs_it) {
                for (int32_t e = e0; e < e1; ++e) {
                  if (layout->k_full[e]) continue;
                  const int64_t r0 = layout->k_qblock[e] * B, r1 = std::min(r0 + B, N);
                  for (int64_t i = r0; i < r1; ++i)
                    if (row_needs_it(i - c0)) fill_hidden(s.mask, i, k0, k0 + kn, rows + (i - c0) * kn, iv.data(), 0);
                }
              };
              // P = exp(-inf - lse) = 0 at hidden keys, unless the row's lse is not finite (the row saw a NaN
              // or +inf score).
              if (partial) zero_hidden(P.data(), [&](int64_t r) { return !std::isfinite(lse_bh[c0 + r]); });
              // Non-finite operands in partial blocks (every row of a full block sees every key).
              bool q_nonfinite = false, do_nonfinite = false;
              for (int32_t e = e0; e < e1; ++e) {
                q_nonfinite |= !layout->k_full[e] && q_bad[layout->k_qblock[e]];
                do_nonfinite |= !layout->k_full[e] && do_bad[layout->k_qblock[e]];
              }
              // Pairs (key j, query i) of the dV and dK products, (query i, key j) of dQ's.
              const auto key_sees = [&](int64_t j, int64_t i) { return mask_allows(s.mask, c0 + i, k0 + j); };
              const auto query_sees = [&](int64_t i, int64_t j) { return mask_allows(s.mask, c0 + i, k0 + j); };
              gemm_over_pairs(do_nonfinite, true, kn, D, qn, 1.f, P.data(), kn, dO + c0 * D, dv_acc.data(),
                              scratch, key_sees);
              gemm(false, true, qn, kn, D, 1.f, dO + c0 * D, D, V + k0 * D, D, 0.f, dP.data(), kn);
              // dS = P (dP - delta); at a hidden key 0 * (dP - delta), NaN when dP or delta is not finite.
              bool ds_nonfinite = false;
              for (int64_t r = 0; r < qn; ++r) {
                row_bad[r] = softmax_grad_row(dP.data() + r * kn, P.data() + r * kn, kn, delta[c0 + r]);
                ds_nonfinite |= row_bad[r] != 0;
              }
              if (partial && ds_nonfinite) zero_hidden(dP.data(), [&](int64_t r) { return row_bad[r] != 0; });
              gemm_over_pairs(q_nonfinite, true, kn, D, qn, 1.f, dP.data(), kn, Q + c0 * D, dk_acc.data(),
                              scratch, key_sees);
              gemm_over_pairs(partial && k_bad[kb], false, qn, D, kn, s.scale, dP.data(), kn, K + k0 * D,
                              dQ + c0 * D, scratch, query_sees);
            });
        for (int64_t x = 0; x < kn * D; ++x) {
          dK[k0 * D + x] = dk_acc[x] * s.scale;
          dV[k0 * D + x] = dv_acc[x];
        }
      }
    }
  });
}

}  // namespace dalle_fast::cpu
