// CUDA backward in two deterministic passes (no atomics), both recomputing P from the saved lse and
// keeping their accumulators in registers (mma.sync m16n8k16 + ldmatrix, layouts in ptx.cuh):
//   dkdv_kernel: one thread block per (batch * head, key block), walking the key-major layout; each warp
//                owns 16 keys (their K and V fragments in registers up to head dim 64) and accumulates
//                their dK and dV rows over every query block that reads them.
//   dq_kernel:   one thread block per (batch * head, query block), walking the query-major layout; each
//                warp owns 16 queries and accumulates their dQ rows.
// Queries (in dkdv) and keys (in dq) are taken 16 at a time, so a step's probabilities, packed from its two
// 16 x 8 accumulator tiles, are exactly the A fragment of the next product. A small first kernel computes
// delta = rowsum(dO * O) in fp32.
// Stages: 2 streams the next block's tiles in while this one is computed (double buffers); 1 loads them
// between blocks, for GPUs whose per-block shared memory cannot hold the double buffers (head dim 128 on
// sm_86 / sm_89: 103 KiB double-buffered, 68.5 KiB single, 99 KiB allowed). backward_stages (host_setup.h)
// picks 2 when it fits; DALLE_FAST_BWD_STAGES=1 picks 1 at head dim 128 anyway (to test that path on a
// larger GPU).
#include <cmath>

#include "tile.cuh"

namespace dalle_fast::cuda {
namespace {

// Shared memory: two resident tiles, two streamed ones Stages times, and lse and delta of the streamed
// query blocks Stages times (backward_smem_size in host_setup.h counts the same).
template <int D, int Stages>
struct BwdSmem {
  static_assert(Stages == 1 || Stages == 2, "one or two buffers per streamed tile");
  static constexpr int ld = tile_ld(D);  // rows of the T tiles
};

// Before step e: block e's tiles are in shared memory. Stages 2 also starts block e + 1's loads into the
// other buffer (next_tiles); stages 1 waits for the loads done_step() started. Returns whether own() (a
// check of this thread's share of block e's tiles) holds for some thread of the block.
template <int Stages, typename Fetch, typename Own>
__device__ __forceinline__ bool begin_step(int e, int e_end, Fetch&& fetch, Own&& own) {
  if constexpr (Stages == 2) {
    return next_tiles(e, e_end, fetch, own);
  } else {
    ptx::cp_async_wait<0>();
    return __syncthreads_or(own()) != 0;
  }
}

// After step e: every warp is done with its buffer; stages 1 then starts block e + 1's loads into it.
template <int Stages, typename Fetch>
__device__ __forceinline__ void done_step(int e, int e_end, Fetch&& fetch) {
  __syncthreads();
  if constexpr (Stages == 1) {
    if (e + 1 < e_end) fetch(e + 1);
    ptx::cp_async_commit();
  }
}

// ---- delta = rowsum(dO * O) in fp32 -------------------------------------------------------------------

// D / 8 threads per row, each with 16 bytes (8 elements) of dO and of O; the group sums by butterfly
// shuffles (offsets below D / 8 stay inside the aligned group).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) delta_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                                                       float* __restrict__ delta, int64_t rows) {
  constexpr int kPerRow = D / 8;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kPerRow;
  const int c = threadIdx.x % kPerRow * 8;
  float sum = 0.f;
  if (row < rows) {
    const uint4 a = *reinterpret_cast<const uint4*>(grad_out + row * D + c);
    const uint4 b = *reinterpret_cast<const uint4*>(out + row * D + c);
    T x[8], y[8];
    memcpy(static_cast<void*>(x), &a, 16);
    memcpy(static_cast<void*>(y), &b, 16);
    #pragma unroll
    for (int i = 0; i < 8; ++i) sum = __fmaf_rn(Elem<T>::to_float(x[i]), Elem<T>::to_float(y[i]), sum);
  }
  #pragma unroll
  for (int off = kPerRow / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (row < rows && threadIdx.x % kPerRow == 0) delta[row] = sum;
}

// ---- dK, dV: key-block parallel ---------------------------------------------------------------------

template <typename T, int D, int Stages>
__global__ void __launch_bounds__(kThreads, 2)
    dkdv_kernel(AttentionParams p, const T* __restrict__ grad_out, const float* __restrict__ lse,
                const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
  using L = BwdSmem<D, Stages>;
  constexpr int KS = D / 16, DT = D / 8;
  const int nb = p.layout.num_blocks;
  const int kb = blockIdx.x % nb;
  const int64_t bh = blockIdx.x / nb;
  const int N = p.seq_len, k0 = kb * kBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  DALLE_FAST_DYNAMIC_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBlock * L::ld;
  // Buffer b of each streamed array is its base + b * (its size): arithmetic, not pointer arrays, which
  // would live in local memory when indexed by a runtime buffer number.
  constexpr int kTile = kBlock * L::ld;
  T* sQs = sV + kTile;
  T* sdOs = sQs + Stages * kTile;
  float* sLses = reinterpret_cast<float*>(sdOs + Stages * kTile);  // lse in log2 units
  float* sDeltas = sLses + Stages * kBlock;

  const int64_t base = bh * N * D;
  const T* Q = static_cast<const T*>(p.q) + base;
  const T* dO = grad_out + base;
  const int e_begin = p.layout.k_ptr[kb], e_end = p.layout.k_ptr[kb + 1];
  // Query block e's Q and dO go to buffer (e - e_begin) % Stages by cp.async; its lse and delta by plain loads.
  auto fetch = [&](int e) {
    const int q0 = p.layout.k_qblock[e] * kBlock, buf = (e - e_begin) & (Stages - 1);
    load_tile_async<T, D>(sQs + buf * kTile, L::ld, Q, q0, N);
    load_tile_async<T, D>(sdOs + buf * kTile, L::ld, dO, q0, N);
    for (int r = threadIdx.x; r < kBlock; r += kThreads) {
      const bool real = q0 + r < N;  // padded queries: lse = +inf makes P = 0
      sLses[buf * kBlock + r] = real ? lse[bh * N + q0 + r] * static_cast<float>(M_LOG2E) : INFINITY;
      sDeltas[buf * kBlock + r] = real ? delta[bh * N + q0 + r] : 0.f;
    }
  };
  load_tile_async<T, D>(sK, L::ld, static_cast<const T*>(p.k) + base, k0, N);
  load_tile_async<T, D>(sV, L::ld, static_cast<const T*>(p.v) + base, k0, N);
  if (e_begin < e_end) fetch(e_begin);
  ptx::cp_async_commit();

  // The warp's K and V rows as A fragments: up to head dim 64 loaded once and kept in registers (at 128
  // they would spill, and are read from shared memory at every step instead).
  constexpr bool kKeepKV = D <= 64;
  uint32_t ka_all[kKeepKV ? KS : 1][4], va_all[kKeepKV ? KS : 1][4];
  if constexpr (kKeepKV) {
    ptx::cp_async_wait<0>();
    __syncthreads();
    #pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      ptx::ldmatrix_x4(ka_all[ks], a_row(sK, L::ld, warp * 16, ks * 16, lane));
      ptx::ldmatrix_x4(va_all[ks], a_row(sV, L::ld, warp * 16, ks * 16, lane));
    }
  }

  const float scale_log2 = p.scale * static_cast<float>(M_LOG2E);
  const int key0 = k0 + warp * 16 + g;  // the thread's key rows: key0 and key0 + 8
  const KeyRow<int> key_rows[2] = {key_row<int>(p.mask, key0, N), key_row<int>(p.mask, key0 + 8, N)};
  float acc_dk[DT][4], acc_dv[DT][4];
  #pragma unroll
  for (int dt = 0; dt < DT; ++dt)
    #pragma unroll
    for (int i = 0; i < 4; ++i) acc_dk[dt][i] = acc_dv[dt][i] = 0.f;

  for (int e = e_begin; e < e_end; ++e) {
    const int q0 = p.layout.k_qblock[e] * kBlock, buf = (e - e_begin) & (Stages - 1);
    const bool full = tile_full(p.layout.k_full[e], q0, k0, N);
    const T* sQ = sQs + buf * kTile;
    const T* sdO = sdOs + buf * kTile;
    const float* sLse = sLses + buf * kBlock;
    const float* sDelta = sDeltas + buf * kBlock;
    // (K and V came with the first group.) A partial block whose Q or dO holds a NaN or an infinity takes
    // dK and dV over visible pairs only (tile.cuh).
    const bool nonfinite = begin_step<Stages>(e, e_end, fetch, [&] {
      return !full && (own_share_nonfinite<T, D>(sQ, L::ld) || own_share_nonfinite<T, D>(sdO, L::ld));
    });

    #pragma unroll
    for (int kk = 0; kk < kBlock / 16; ++kk) {  // queries kk * 16 .. kk * 16 + 15
      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys: B(k = d, n = query) = Q[query][d].
      float st[2][4] = {}, dpt[2][4] = {};
      #pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t qb[4], ob[4];
        ptx::ldmatrix_x4(qb, b_rows(sQ, L::ld, kk * 16, ks * 16, lane));
        ptx::ldmatrix_x4(ob, b_rows(sdO, L::ld, kk * 16, ks * 16, lane));
        if constexpr (kKeepKV) {
          mma_pair<T>(st[0], st[1], ka_all[ks], qb);
          mma_pair<T>(dpt[0], dpt[1], va_all[ks], ob);
        } else {
          uint32_t ka[4], va[4];
          ptx::ldmatrix_x4(ka, a_row(sK, L::ld, warp * 16, ks * 16, lane));
          ptx::ldmatrix_x4(va, a_row(sV, L::ld, warp * 16, ks * 16, lane));
          mma_pair<T>(st[0], st[1], ka, qb);
          mma_pair<T>(dpt[0], dpt[1], va, ob);
        }
      }
      // P^T = exp(S^T * scale - lse[query]), dS^T = P^T (dP^T - delta[query]), both exactly 0 where masked
      // (whatever lse, dP or delta hold there), packed as the A fragments (16 keys x 16 queries) of
      // dV += P^T dO and dK += dS^T Q.
      bool on[2][4] = {{true, true, true, true}, {true, true, true, true}};
      if (!full) chunk_mask(on, p.mask, key_rows, q0 + kk * 16 + 2 * t);
      uint32_t pa[4], dsa[4];
      float pv[2][4], dsv[2][4];
      #pragma unroll
      for (int half = 0; half < 2; ++half) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int c = kk * 16 + half * 8 + 2 * t + i % 2;  // query column within the block
          pv[half][i] = on[half][i] ? ptx::exp2_approx(__fmaf_rn(st[half][i], scale_log2, -sLse[c])) : 0.f;
          dsv[half][i] = on[half][i] ? pv[half][i] * (dpt[half][i] - sDelta[c]) : 0.f;
        }
        pa[2 * half] = pack2<T>(pv[half][0], pv[half][1]);
        pa[2 * half + 1] = pack2<T>(pv[half][2], pv[half][3]);
        dsa[2 * half] = pack2<T>(dsv[half][0], dsv[half][1]);
        dsa[2 * half + 1] = pack2<T>(dsv[half][2], dsv[half][3]);
      }
      // B(k = query, n = d) = dO[query][d] and Q[query][d]: rows of sdO / sQ, read transposed.
      if (!nonfinite) {
        mma_a_rows<T>(acc_dv, pa, sdO, L::ld, kk * 16, lane);
        mma_a_rows<T>(acc_dk, dsa, sQ, L::ld, kk * 16, lane);
      } else {
        mma_a_rows_over_pairs<T>(acc_dv, pa, pair_signs<T>(pv[0], pv[1], on), sdO, L::ld, kk * 16, lane);
        mma_a_rows_over_pairs<T>(acc_dk, dsa, pair_signs<T>(dsv[0], dsv[1], on), sQ, L::ld, kk * 16, lane);
      }
    }
    done_step<Stages>(e, e_end, fetch);
  }

  #pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = key0 + 8 * h;
    if (r >= N) continue;
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int64_t off = base + static_cast<int64_t>(r) * D + dt * 8 + 2 * t;
      store2<T>(dk + off, acc_dk[dt][2 * h] * p.scale, acc_dk[dt][2 * h + 1] * p.scale);
      store2<T>(dv + off, acc_dv[dt][2 * h], acc_dv[dt][2 * h + 1]);
    }
  }
}

// ---- dQ: query-block parallel -----------------------------------------------------------------------

template <typename T, int D, int Stages>
__global__ void __launch_bounds__(kThreads, 2)
    dq_kernel(AttentionParams p, const T* __restrict__ grad_out, const float* __restrict__ lse,
              const float* __restrict__ delta, T* __restrict__ dq) {
  using L = BwdSmem<D, Stages>;
  constexpr int KS = D / 16, DT = D / 8;
  const int nb = p.layout.num_blocks;
  const int qb = blockIdx.x % nb;
  const int64_t bh = blockIdx.x / nb;
  const int N = p.seq_len, q0 = qb * kBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  DALLE_FAST_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBlock * L::ld;
  constexpr int kTile = kBlock * L::ld;  // buffer b of K / V: sKs / sVs + b * kTile
  T* sKs = sdO + kTile;
  T* sVs = sKs + Stages * kTile;

  const int64_t base = bh * N * D;
  const T* K = static_cast<const T*>(p.k) + base;
  const T* V = static_cast<const T*>(p.v) + base;
  const int e_begin = p.layout.q_ptr[qb], e_end = p.layout.q_ptr[qb + 1];
  // Key block e's K and V go to buffer (e - e_begin) % Stages, as one cp.async group.
  auto fetch = [&](int e) {
    const int k0 = p.layout.q_kblock[e] * kBlock, buf = (e - e_begin) & (Stages - 1);
    load_tile_async<T, D>(sKs + buf * kTile, L::ld, K, k0, N);
    load_tile_async<T, D>(sVs + buf * kTile, L::ld, V, k0, N);
  };
  load_tile_async<T, D>(sQ, L::ld, static_cast<const T*>(p.q) + base, q0, N);
  load_tile_async<T, D>(sdO, L::ld, grad_out + base, q0, N);
  if (e_begin < e_end) fetch(e_begin);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();

  // The warp's Q and dO rows as A fragments, loaded once; lse (log2 units) and delta of rows g, g + 8.
  uint32_t qa[KS][4], oa[KS][4];
  #pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    ptx::ldmatrix_x4(qa[ks], a_row(sQ, L::ld, warp * 16, ks * 16, lane));
    ptx::ldmatrix_x4(oa[ks], a_row(sdO, L::ld, warp * 16, ks * 16, lane));
  }
  const float scale_log2 = p.scale * static_cast<float>(M_LOG2E);
  const int row0 = q0 + warp * 16 + g;
  const QueryRow<int> query_rows[2] = {query_row<int>(p.mask, row0, N), query_row<int>(p.mask, row0 + 8, N)};
  float lse2[2], dlt[2];
  #pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + 8 * h;  // padded rows: lse = +inf makes P = 0
    lse2[h] = r < N ? lse[bh * N + r] * static_cast<float>(M_LOG2E) : INFINITY;
    dlt[h] = r < N ? delta[bh * N + r] : 0.f;
  }
  float acc_dq[DT][4];
  #pragma unroll
  for (int dt = 0; dt < DT; ++dt)
    #pragma unroll
    for (int i = 0; i < 4; ++i) acc_dq[dt][i] = 0.f;

  for (int e = e_begin; e < e_end; ++e) {
    const int k0 = p.layout.q_kblock[e] * kBlock, buf = (e - e_begin) & (Stages - 1);
    const bool full = tile_full(p.layout.q_full[e], q0, k0, N);
    const T* sK = sKs + buf * kTile;
    const T* sV = sVs + buf * kTile;
    // A partial block whose K holds a NaN or an infinity takes dQ over visible pairs only (tile.cuh).
    const bool k_nonfinite =
        begin_step<Stages>(e, e_end, fetch, [&] { return !full && own_share_nonfinite<T, D>(sK, L::ld); });

    #pragma unroll
    for (int kk = 0; kk < kBlock / 16; ++kk) {  // keys kk * 16 .. kk * 16 + 15
      // S = Q K^T, dP = dO V^T: B(k = d, n = key) = K[key][d], V[key][d].
      float s[2][4] = {}, dp[2][4] = {};
      #pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t kb4[4], vb4[4];
        ptx::ldmatrix_x4(kb4, b_rows(sK, L::ld, kk * 16, ks * 16, lane));
        ptx::ldmatrix_x4(vb4, b_rows(sV, L::ld, kk * 16, ks * 16, lane));
        mma_pair<T>(s[0], s[1], qa[ks], kb4);
        mma_pair<T>(dp[0], dp[1], oa[ks], vb4);
      }
      // dS = P (dP - delta), P = exp(S * scale - lse), exactly 0 where masked, as the A fragment of
      // dQ += dS K.
      bool on[2][4] = {{true, true, true, true}, {true, true, true, true}};
      if (!full) chunk_mask(on, p.mask, query_rows, k0 + kk * 16 + 2 * t);
      uint32_t dsa[4];
      float dsv[2][4];
      #pragma unroll
      for (int half = 0; half < 2; ++half) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float pe = on[half][i] ? ptx::exp2_approx(__fmaf_rn(s[half][i], scale_log2, -lse2[i / 2])) : 0.f;
          dsv[half][i] = on[half][i] ? pe * (dp[half][i] - dlt[i / 2]) : 0.f;
        }
        dsa[2 * half] = pack2<T>(dsv[half][0], dsv[half][1]);
        dsa[2 * half + 1] = pack2<T>(dsv[half][2], dsv[half][3]);
      }
      // B(k = key, n = d) = K[key][d]: rows of sK, read transposed.
      if (!k_nonfinite)
        mma_a_rows<T>(acc_dq, dsa, sK, L::ld, kk * 16, lane);
      else
        mma_a_rows_over_pairs<T>(acc_dq, dsa, pair_signs<T>(dsv[0], dsv[1], on), sK, L::ld, kk * 16, lane);
    }
    done_step<Stages>(e, e_end, fetch);
  }

  #pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + 8 * h;
    if (r >= N) continue;
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      store2<T>(dq + base + static_cast<int64_t>(r) * D + dt * 8 + 2 * t, acc_dq[dt][2 * h] * p.scale,
                acc_dq[dt][2 * h + 1] * p.scale);
  }
}

#ifndef __CUDACC_RTC__  // the launchers (host code): NVRTC compiles the kernels alone

template <typename T, int D, int Stages>
cudaError_t launch_passes(const AttentionParams& p, const LaunchShape& s, const T* g, const float* lse,
                          const float* delta, void* dq, void* dk, void* dv, cudaStream_t stream) {
  auto k1 = dkdv_kernel<T, D, Stages>;
  auto k2 = dq_kernel<T, D, Stages>;
  cudaError_t err = prepare_launch(k1, s.smem);
  if (err == cudaSuccess) err = prepare_launch(k2, s.smem);
  if (err != cudaSuccess) return err;
  const unsigned grid = static_cast<unsigned>(s.blocks);
  DALLE_FAST_LAUNCH(k1, grid, s.threads, s.smem, stream)(p, g, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  DALLE_FAST_LAUNCH(k2, grid, s.threads, s.smem, stream)(p, g, lse, delta, static_cast<T*>(dq));
  return cudaGetLastError();
}

// plan: backward_launch(p, smem_limit), whose threads are kThreads.
template <typename T, int D>
cudaError_t launch(const AttentionParams& p, const BackwardLaunch& plan, const void* grad_out, const void* out,
                   const float* lse, float* delta, void* dq, void* dk, void* dv, cudaStream_t stream) {
  if (plan.passes.blocks == 0) return cudaSuccess;
  if (plan.passes.blocks > kMaxGridBlocks || plan.delta.blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  const int64_t rows = p.batch_heads * p.seq_len;
  auto k0 = delta_kernel<T, D>;
  DALLE_FAST_LAUNCH(k0, static_cast<unsigned>(plan.delta.blocks), plan.delta.threads, 0, stream)(
      static_cast<const T*>(grad_out), static_cast<const T*>(out), delta, rows);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const T* g = static_cast<const T*>(grad_out);
  if constexpr (D >= 128) {
    if (plan.stages == 1) return launch_passes<T, D, 1>(p, plan.passes, g, lse, delta, dq, dk, dv, stream);
  }
  return launch_passes<T, D, 2>(p, plan.passes, g, lse, delta, dq, dk, dv, stream);
}

#endif  // __CUDACC_RTC__

}  // namespace

#ifndef __CUDACC_RTC__

cudaError_t attention_backward(const AttentionParams& p, const void* grad_out, const void* out, const float* lse,
                               float* delta, void* dq, void* dk, void* dv, size_t smem_limit, cudaStream_t stream) {
  if (!is_supported_head_dim(p.head_dim)) return cudaErrorInvalidValue;
  const BackwardLaunch plan = backward_launch(p, smem_limit);
  return with_head_dim(p.head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    return p.dtype == DType::kHalf
               ? launch<__half, D>(p, plan, grad_out, out, lse, delta, dq, dk, dv, stream)
               : launch<__nv_bfloat16, D>(p, plan, grad_out, out, lse, delta, dq, dk, dv, stream);
  });
}

#endif  // __CUDACC_RTC__

}  // namespace dalle_fast::cuda
