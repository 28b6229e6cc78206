// CUDA forward: one thread block per (batch * head, 64-row query block), visiting only the key blocks
// of the layout. Each warp owns 16 x MT query rows (MT = 1: four warps; MT = 2: two warps) and keeps
// everything of them in registers, as in FlashAttention-2: its Q fragments, the scores S = Q K^T of the
// current 64-key block (mma.sync m16n8k16, fp32), the running row max and sum, and the output
// accumulator. P = exp2(S c - max c) goes from the S accumulators straight into the A fragments of P V. With
// MT = 2 every K and V fragment a warp loads from shared memory serves two row tiles, which halves the
// shared-memory traffic per mma; head dim 128 keeps MT = 1, whose registers would not hold twice the
// accumulators (forward_rows_per_warp in host_setup.h). Partial blocks are masked element-wise by index
// arithmetic; the log-sum-exp is saved for the backward.
#include <cfloat>
#include <cmath>

#include "tile.cuh"

namespace dalle_fast::cuda {
namespace {

// Shared memory: Q, then K and V twice (forward_smem_size in host_setup.h counts the same five tiles).
template <int D>
struct FwdSmem {
  static constexpr int ld = tile_ld(D);  // Q, K, V rows (T)
};

template <typename T, int D, int MT>
__global__ void __launch_bounds__(threads_for<MT>())
    forward_kernel(AttentionParams p, T* __restrict__ out, float* __restrict__ lse) {
  using L = FwdSmem<D>;
  constexpr int kThr = threads_for<MT>();
  constexpr int KS = D / 16;       // k-steps of Q K^T
  constexpr int NT = kBlock / 8;   // 8-key tiles of S
  constexpr int DT = D / 8;        // 8-column tiles of O
  const int nb = p.layout.num_blocks;
  const int qb = blockIdx.x % nb;
  const int64_t bh = blockIdx.x / nb;
  const int N = p.seq_len, q0 = qb * kBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  DALLE_FAST_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  // Buffer b of K is sK + b * kTile, of V sV + b * kTile (arithmetic, not pointer arrays, which would
  // live in local memory when indexed by a runtime buffer number).
  constexpr int kTile = kBlock * L::ld;
  T* sK = sQ + kTile;
  T* sV = sQ + 3 * kTile;

  const T* Q = static_cast<const T*>(p.q) + bh * N * D;
  const T* K = static_cast<const T*>(p.k) + bh * N * D;
  const T* V = static_cast<const T*>(p.v) + bh * N * D;
  const int e_begin = p.layout.q_ptr[qb], e_end = p.layout.q_ptr[qb + 1];
  // Key block e's K and V go to buffer (e - e_begin) % 2, as one cp.async group.
  auto fetch = [&](int e) {
    const int k0 = p.layout.q_kblock[e] * kBlock, buf = (e - e_begin) & 1;
    load_tile_async<T, D, kThr>(sK + buf * kTile, L::ld, K, k0, N);
    load_tile_async<T, D, kThr>(sV + buf * kTile, L::ld, V, k0, N);
  };
  load_tile_async<T, D, kThr>(sQ, L::ld, Q, q0, N);
  if (e_begin < e_end) fetch(e_begin);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();

  // The warp's Q rows as A fragments, loaded once: row tile mt is rows 16 (MT warp + mt) .. + 15.
  uint32_t qa[MT][KS][4];
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    #pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      ptx::ldmatrix_x4(qa[mt][ks], a_row(sQ, L::ld, (MT * warp + mt) * 16, ks * 16, lane));

  // Scores stay raw (Q K^T) with a positive factor c = |scale| log2 e applied inside the exponential:
  // the running max is taken on raw scores and exp2(S c - m c) is one FFMA and one MUFU per element.
  // A negative scale negates Q's fragments instead (sign bits); a zero scale becomes FLT_MIN, whose
  // weights are as uniform as zero's, without turning masked scores into -inf * 0.
  if (p.scale < 0.f) {
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      #pragma unroll
      for (int ks = 0; ks < KS; ++ks)
        #pragma unroll
        for (int r = 0; r < 4; ++r) qa[mt][ks][r] ^= 0x80008000u;
  }
  const float c = fmaxf(fabsf(p.scale) * static_cast<float>(M_LOG2E), FLT_MIN);

  // Rows g and g + 8 of each row tile: running max m, kept as max * c (the exponent's units), and this
  // thread's share of the running sum l (its 2 columns of each tile; summed over the 4 threads at the end).
  // m is rounded once (__fmul_rn) and alpha = exp2(m_old - m_new) subtracts two stored values
  // (__fsub_rn), so a block that does not raise the max rescales by exactly 1: FMA contraction of
  // m_old * c - m_new * c would leave a rounding residue that drifts the accumulators block after block.
  // Every float operation on m and l names its rounding (the _rn intrinsics), so nvcc fuses nothing of
  // its own: both warp layouts do the same arithmetic in the same order, and the host emulator rounds
  // these steps as the GPU does (ex2.approx, log2f and the tensor cores' sums may differ slightly).
  const int row0 = q0 + MT * warp * 16 + g;  // row of (mt, h): row0 + 16 mt + 8 h
  float m[MT][2], l[MT][2];
  float o[MT][DT][4];
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      m[mt][h] = -INFINITY;
      l[mt][h] = 0.f;
    }
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      #pragma unroll
      for (int i = 0; i < 4; ++i) o[mt][dt][i] = 0.f;
  }

  for (int e = e_begin; e < e_end; ++e) {
    const int k0 = p.layout.q_kblock[e] * kBlock, buf = (e - e_begin) & 1;
    const bool full = tile_full(p.layout.q_full[e], q0, k0, N);
    const T* sKb = sK + buf * kTile;
    const T* sVb = sV + buf * kTile;
    // A partial block whose V holds a NaN or an infinity takes P V over visible pairs only (tile.cuh).
    const bool v_nonfinite =
        next_tiles(e, e_end, fetch, [&] { return !full && own_share_nonfinite<T, D, kThr>(sVb, L::ld); });

    // S = Q K^T: B(k = d, n = key) = K[key][d], rows of sK as they are; each K fragment serves MT tiles.
    float s[MT][NT][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      #pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][nt][i] = 0.f;
    #pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      #pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        uint32_t kb[4];
        ptx::ldmatrix_x4(kb, b_rows(sKb, L::ld, nt * 8, ks * 16, lane));
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_pair<T>(s[mt][nt], s[mt][nt + 1], qa[mt][ks], kb);
      }

    // Mask, new row max; rescale what was accumulated so far.
    if (!full) mask_rows<MT, NT>(s, p.mask, row0, k0 + 2 * t, N);
    float base[MT][2];  // the new m (0 for a row that has seen no key yet)
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {-INFINITY, -INFINITY};  // this block's raw max
      #pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int i = 0; i < 4; ++i) mx[i / 2] = fmaxf(mx[i / 2], s[mt][nt][i]);
      float alpha[2];
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        // A row that has seen no key yet keeps m = -inf: its p and alpha must not become NaN.
        const float mc = fmaxf(m[mt][h], __fmul_rn(mx[h], c));
        base[mt][h] = mc == -INFINITY ? 0.f : mc;
        alpha[h] = ptx::exp2_approx(__fsub_rn(m[mt][h], base[mt][h]));
        m[mt][h] = mc;
        l[mt][h] = __fmul_rn(l[mt][h], alpha[h]);
      }
      #pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        #pragma unroll
        for (int i = 0; i < 4; ++i) o[mt][dt][i] *= alpha[i / 2];
    }

    // P = exp2(S c - m c), summed into l, packed into the A fragments of P V (16 keys per k-step: tiles
    // 2 kk and 2 kk + 1 of S are exactly the A layout), then O += P V with B(k = key, n = d) = V[key][d],
    // which ldmatrix .trans reads from the rows of sV, once for all MT row tiles.
    #pragma unroll
    for (int kk = 0; kk < kBlock / 16; ++kk) {
      uint32_t pa[MT][4];
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int half = 0; half < 2; ++half) {
          float* st = s[mt][2 * kk + half];
          #pragma unroll
          for (int i = 0; i < 4; ++i) {
            st[i] = ptx::exp2_approx(__fmaf_rn(st[i], c, -base[mt][i / 2]));
            l[mt][i / 2] = __fadd_rn(l[mt][i / 2], st[i]);
          }
          pa[mt][2 * half] = pack2<T>(st[0], st[1]);
          pa[mt][2 * half + 1] = pack2<T>(st[2], st[3]);
        }
      if (!v_nonfinite) {
        mma_a_rows<T>(o, pa, sVb, L::ld, kk * 16, lane);
      } else {  // one row tile at a time, which re-reads V but needs fewer registers
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const QueryRow<int> rows[2] = {query_row<int>(p.mask, row0 + 16 * mt, N),
                                         query_row<int>(p.mask, row0 + 16 * mt + 8, N)};
          bool on[2][4];
          chunk_mask(on, p.mask, rows, k0 + kk * 16 + 2 * t);
          const PairSigns signs = pair_signs<T>(s[mt][2 * kk], s[mt][2 * kk + 1], on);  // s holds P by now
          mma_a_rows_over_pairs<T>(o[mt], pa[mt], signs, sVb, L::ld, kk * 16, lane);
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer before the next iteration refills it
  }

  // l over the 4 threads of each row; out = O / l, lse = (m + log2 l) ln 2 (m is already times c).
  T* O = out + bh * N * D;
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      float lh = l[mt][h];
      lh += __shfl_xor_sync(0xffffffffu, lh, 1);
      lh += __shfl_xor_sync(0xffffffffu, lh, 2);
      const int r = row0 + 16 * mt + 8 * h;
      if (r >= N) continue;
      const float inv = 1.f / lh;
      #pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        store2<T>(O + static_cast<int64_t>(r) * D + dt * 8 + 2 * t, o[mt][dt][2 * h] * inv,
                  o[mt][dt][2 * h + 1] * inv);
      if (t == 0) lse[bh * N + r] = (m[mt][h] + log2f(lh)) * static_cast<float>(M_LN2);
    }
}

#ifndef __CUDACC_RTC__  // the launchers (host code): NVRTC compiles the kernels alone

// s: forward_launch(p), whose threads are threads_for<MT>().
template <typename T, int D, int MT>
cudaError_t launch(const AttentionParams& p, const LaunchShape& s, void* out, float* lse, cudaStream_t stream) {
  auto kernel = forward_kernel<T, D, MT>;
  cudaError_t err = prepare_launch(kernel, s.smem);
  if (err != cudaSuccess) return err;
  if (s.blocks == 0) return cudaSuccess;
  if (s.blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  DALLE_FAST_LAUNCH(kernel, static_cast<unsigned>(s.blocks), s.threads, s.smem, stream)(p, static_cast<T*>(out), lse);
  return cudaGetLastError();
}

#endif  // __CUDACC_RTC__

}  // namespace

#ifndef __CUDACC_RTC__

cudaError_t attention_forward(const AttentionParams& p, void* out, float* lse, cudaStream_t stream) {
  if (!is_supported_head_dim(p.head_dim)) return cudaErrorInvalidValue;
  const ForwardLaunch plan = forward_launch(p);
  return with_head_dim(p.head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if constexpr (D <= 64) {
      if (plan.rows_per_warp == 32)
        return p.dtype == DType::kHalf ? launch<__half, D, 2>(p, plan.shape, out, lse, stream)
                                       : launch<__nv_bfloat16, D, 2>(p, plan.shape, out, lse, stream);
    }
    return p.dtype == DType::kHalf ? launch<__half, D, 1>(p, plan.shape, out, lse, stream)
                                   : launch<__nv_bfloat16, D, 1>(p, plan.shape, out, lse, stream);
  });
}

#endif  // __CUDACC_RTC__

}  // namespace dalle_fast::cuda
