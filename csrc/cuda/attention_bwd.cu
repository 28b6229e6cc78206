// CUDA backward in two deterministic passes (no atomics), both recomputing P from the saved lse:
//   dkdv_kernel: one thread block per (batch * head, key block), walking the key-major layout;
//                dK and dV accumulate in registers (wmma fragments) of the warp owning those keys.
//   dq_kernel:   one thread block per (batch * head, query block), walking the query-major layout.
// delta = rowsum(dO * O) comes from the caller.
#include "tile.cuh"

namespace dalle_fast::cuda {
namespace {

using namespace nvcuda;

template <int D>
struct BwdSmem {
  static constexpr int ldt = D + kPadT;       // K, V, Q, dO rows (T)
  static constexpr int ldf = kBlock + kPadF;  // 64 x 64 fp32 scratch (P, dP)
  static constexpr int ldh = kBlock + kPadT;  // 64 x 64 T scratch (P or dS as matmul input)
  static constexpr int ldst = D + kPadF;      // per-warp 16 x D fp32 staging for the final store
  template <typename T>
  static constexpr size_t bytes() {
    const size_t scratch = 2 * kBlock * ldf > kWarps * 16 * ldst ? 2 * kBlock * ldf : kWarps * 16 * ldst;
    return sizeof(T) * (4 * kBlock * ldt + 2 * kBlock * ldh) + sizeof(float) * (scratch + 2 * kBlock);
  }
};

// acc[n] (16 x 16 fp32) += A (16 x 64, T, row-major with lda) @ B (64 x 16 N16, T, row-major with ldb):
// like rows_times, but accumulating into fragments that stay in registers across key/query blocks.
template <typename T, int N16, typename Acc>
__device__ __forceinline__ void mma_rows(Acc (&acc)[N16], const T* a, int lda, const T* b, int ldb) {
  for (int kk = 0; kk < kBlock / 16; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk * 16, lda);
    for (int n = 0; n < N16; ++n) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + kk * 16 * ldb + n * 16, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// ---- dK, dV: key-block parallel ---------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    dkdv_kernel(AttentionParams p, const T* __restrict__ grad_out, const float* __restrict__ lse,
                const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
  using L = BwdSmem<D>;
  const int nb = p.layout.num_blocks;
  const int kb = blockIdx.x % nb;
  const int64_t bh = blockIdx.x / nb;
  const int N = p.seq_len, k0 = kb * kBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  DALLE_FAST_DYNAMIC_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBlock * L::ldt;
  T* sQ = sV + kBlock * L::ldt;
  T* sdO = sQ + kBlock * L::ldt;
  T* sPt = sdO + kBlock * L::ldt;     // P^T [key][query] (T)
  T* sdSt = sPt + kBlock * L::ldh;    // dS^T [key][query] (T)
  float* sF = reinterpret_cast<float*>(sdSt + kBlock * L::ldh);
  float* sSt = sF;                    // S^T then P^T in fp32 [key][query]
  float* sdPt = sF + kBlock * L::ldf; // dP^T [key][query]
  float* sLse = sF + (2 * kBlock * L::ldf > kWarps * 16 * L::ldst ? 2 * kBlock * L::ldf : kWarps * 16 * L::ldst);
  float* sDelta = sLse + kBlock;

  const int64_t base = bh * N * D;
  const T* Q = static_cast<const T*>(p.q) + base;
  const T* dO = grad_out + base;
  load_tile<T, D>(sK, L::ldt, static_cast<const T*>(p.k) + base, k0, N);
  load_tile<T, D>(sV, L::ldt, static_cast<const T*>(p.v) + base, k0, N);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_dk[D / 16], acc_dv[D / 16];
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(acc_dk[n], 0.f);
    wmma::fill_fragment(acc_dv[n], 0.f);
  }
  const int my_row = warp * 16 + lane / 2;  // a key row of the tile
  const int half = lane & 1;                // alternate query columns: c = 2 * cc + half

  for (int e = p.layout.k_ptr[kb]; e < p.layout.k_ptr[kb + 1]; ++e) {
    const int q0 = p.layout.k_qblock[e] * kBlock;
    const bool full = tile_full(p.layout.k_full[e], q0, k0, N);
    __syncthreads();
    load_tile<T, D>(sQ, L::ldt, Q, q0, N);
    load_tile<T, D>(sdO, L::ldt, dO, q0, N);
    load_rows(sLse, lse + bh * N, q0, N, INFINITY);  // padded rows: P = 0 by construction
    load_rows(sDelta, delta + bh * N, q0, N, 0.f);
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 key rows.
    rows_times<T, D, kBlock, false>(sSt + warp * 16 * L::ldf, L::ldf, sK + warp * 16 * L::ldt, L::ldt, sQ, L::ldt);
    rows_times<T, D, kBlock, false>(sdPt + warp * 16 * L::ldf, L::ldf, sV + warp * 16 * L::ldt, L::ldt, sdO, L::ldt);
    __syncwarp();

    // P^T = exp(S^T * scale - lse) (0 where masked), dS^T = P^T (dP^T - delta).
    {
      const int j = k0 + my_row;
      for (int cc = 0; cc < kBlock / 2; ++cc) {
        const int c = 2 * cc + half, i = q0 + c;
        const bool on = full || visible(p.mask, i, j, N);
        const float pe = on ? __expf(sSt[my_row * L::ldf + c] * p.scale - sLse[c]) : 0.f;
        const float ds = pe * (sdPt[my_row * L::ldf + c] - sDelta[c]);
        sPt[my_row * L::ldh + c] = Elem<T>::from_float(pe);
        sdSt[my_row * L::ldh + c] = Elem<T>::from_float(ds);
      }
    }
    __syncwarp();

    // dV += P^T dO, dK += dS^T Q (scale applied at the end).
    mma_rows<T, D / 16>(acc_dv, sPt + warp * 16 * L::ldh, L::ldh, sdO, L::ldt);
    mma_rows<T, D / 16>(acc_dk, sdSt + warp * 16 * L::ldh, L::ldh, sQ, L::ldt);
  }
  __syncthreads();  // the fp32 scratch becomes per-warp staging below

  float* stage = sF + warp * 16 * L::ldst;
  store_rows<T, D / 16>(acc_dk, stage, L::ldst, dk + base, k0 + warp * 16, N, p.scale);
  store_rows<T, D / 16>(acc_dv, stage, L::ldst, dv + base, k0 + warp * 16, N, 1.f);
}

// ---- dQ: query-block parallel -----------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    dq_kernel(AttentionParams p, const T* __restrict__ grad_out, const float* __restrict__ lse,
              const float* __restrict__ delta, T* __restrict__ dq) {
  using L = BwdSmem<D>;
  const int nb = p.layout.num_blocks;
  const int qb = blockIdx.x % nb;
  const int64_t bh = blockIdx.x / nb;
  const int N = p.seq_len, q0 = qb * kBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  DALLE_FAST_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBlock * L::ldt;
  T* sK = sdO + kBlock * L::ldt;
  T* sV = sK + kBlock * L::ldt;
  T* sdS = sV + kBlock * L::ldt;  // dS [query][key] (T)
  float* sF = reinterpret_cast<float*>(sdS + 2 * kBlock * L::ldh);
  float* sS = sF;                     // S [query][key]
  float* sdP = sF + kBlock * L::ldf;  // dP [query][key]
  float* sLse = sF + (2 * kBlock * L::ldf > kWarps * 16 * L::ldst ? 2 * kBlock * L::ldf : kWarps * 16 * L::ldst);
  float* sDelta = sLse + kBlock;

  const int64_t base = bh * N * D;
  const T* K = static_cast<const T*>(p.k) + base;
  const T* V = static_cast<const T*>(p.v) + base;
  load_tile<T, D>(sQ, L::ldt, static_cast<const T*>(p.q) + base, q0, N);
  load_tile<T, D>(sdO, L::ldt, grad_out + base, q0, N);
  load_rows(sLse, lse + bh * N, q0, N, INFINITY);  // padded rows: P = 0 by construction
  load_rows(sDelta, delta + bh * N, q0, N, 0.f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_dq[D / 16];
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(acc_dq[n], 0.f);
  const int my_row = warp * 16 + lane / 2;
  const int half = lane & 1;

  for (int e = p.layout.q_ptr[qb]; e < p.layout.q_ptr[qb + 1]; ++e) {
    const int k0 = p.layout.q_kblock[e] * kBlock;
    const bool full = tile_full(p.layout.q_full[e], q0, k0, N);
    __syncthreads();
    load_tile<T, D>(sK, L::ldt, K, k0, N);
    load_tile<T, D>(sV, L::ldt, V, k0, N);
    __syncthreads();

    rows_times<T, D, kBlock, false>(sS + warp * 16 * L::ldf, L::ldf, sQ + warp * 16 * L::ldt, L::ldt, sK, L::ldt);
    rows_times<T, D, kBlock, false>(sdP + warp * 16 * L::ldf, L::ldf, sdO + warp * 16 * L::ldt, L::ldt, sV, L::ldt);
    __syncwarp();
    {
      const int i = q0 + my_row;
      for (int cc = 0; cc < kBlock / 2; ++cc) {
        const int c = 2 * cc + half;
        const bool on = full || visible(p.mask, i, k0 + c, N);
        const float pe = on ? __expf(sS[my_row * L::ldf + c] * p.scale - sLse[my_row]) : 0.f;
        sdS[my_row * L::ldh + c] = Elem<T>::from_float(pe * (sdP[my_row * L::ldf + c] - sDelta[my_row]));
      }
    }
    __syncwarp();
    // dQ += dS K (scale applied at the end).
    mma_rows<T, D / 16>(acc_dq, sdS + warp * 16 * L::ldh, L::ldh, sK, L::ldt);
  }
  __syncthreads();
  store_rows<T, D / 16>(acc_dq, sF + warp * 16 * L::ldst, L::ldst, dq + base, q0 + warp * 16, N, p.scale);
}

template <typename T, int D>
cudaError_t launch(const AttentionParams& p, const void* grad_out, const float* lse, const float* delta, void* dq,
                   void* dk, void* dv, cudaStream_t stream) {
  const int64_t blocks = p.batch_heads * p.layout.num_blocks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = BwdSmem<D>::template bytes<T>();
  auto k1 = dkdv_kernel<T, D>;
  auto k2 = dq_kernel<T, D>;
  cudaError_t err = prepare_launch(k1, smem);
  if (err == cudaSuccess) err = prepare_launch(k2, smem);
  if (err != cudaSuccess) return err;
  const T* g = static_cast<const T*>(grad_out);
  const unsigned grid = static_cast<unsigned>(blocks);
  DALLE_FAST_LAUNCH(k1, grid, kThreads, smem, stream)(p, g, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  DALLE_FAST_LAUNCH(k2, grid, kThreads, smem, stream)(p, g, lse, delta, static_cast<T*>(dq));
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const AttentionParams& p, const void* g, const float* lse, const float* delta, void* dq,
                              void* dk, void* dv, cudaStream_t s) {
  switch (p.head_dim) {
    case 32:
      return launch<T, 32>(p, g, lse, delta, dq, dk, dv, s);
    case 64:
      return launch<T, 64>(p, g, lse, delta, dq, dk, dv, s);
    case 128:
      return launch<T, 128>(p, g, lse, delta, dq, dk, dv, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_backward(const AttentionParams& p, const void* grad_out, const float* lse, const float* delta,
                               void* dq, void* dk, void* dv, cudaStream_t stream) {
  return p.dtype == DType::kHalf ? dispatch_head_dim<__half>(p, grad_out, lse, delta, dq, dk, dv, stream)
                                 : dispatch_head_dim<__nv_bfloat16>(p, grad_out, lse, delta, dq, dk, dv, stream);
}

size_t backward_smem_bytes(DType, int head_dim) { return smem_bytes_for_head_dim<BwdSmem>(head_dim); }

}  // namespace dalle_fast::cuda
