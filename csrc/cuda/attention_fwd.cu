// CUDA forward: one thread block per (batch * head, 64-row query block), visiting only the key blocks
// of the layout. Flash-style online softmax; Q K^T and P V on tensor cores (wmma, fp32 accumulation);
// partial blocks masked element-wise by index arithmetic; the log-sum-exp saved for the backward.
#include <cmath>

#include "tile.cuh"

namespace dalle_fast::cuda {
namespace {

template <int D>
struct FwdSmem {
  static constexpr int ldt = D + kPadT;                              // Q, K, V rows (T)
  static constexpr int ldp = kBlock + kPadT;                         // P rows (T)
  static constexpr int lds = (D > kBlock ? D : kBlock) + kPadF;      // S, then P V (fp32)
  static constexpr int ldo = D + kPadF;                              // running output (fp32)
  template <typename T>
  static constexpr size_t bytes() {
    return sizeof(T) * (3 * kBlock * ldt + kBlock * ldp) + sizeof(float) * (kBlock * lds + kBlock * ldo + 3 * kBlock);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(AttentionParams p, T* __restrict__ out, float* __restrict__ lse) {
  using L = FwdSmem<D>;
  const int nb = p.layout.num_blocks;
  const int qb = blockIdx.x % nb;
  const int64_t bh = blockIdx.x / nb;
  const int N = p.seq_len, q0 = qb * kBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  DALLE_FAST_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlock * L::ldt;
  T* sV = sK + kBlock * L::ldt;
  T* sP = sV + kBlock * L::ldt;
  float* sS = reinterpret_cast<float*>(sP + kBlock * L::ldp);
  float* sO = sS + kBlock * L::lds;
  float* sM = sO + kBlock * L::ldo;
  float* sL = sM + kBlock;
  float* sAlpha = sL + kBlock;

  const T* Q = static_cast<const T*>(p.q) + bh * N * D;
  const T* K = static_cast<const T*>(p.k) + bh * N * D;
  const T* V = static_cast<const T*>(p.v) + bh * N * D;

  load_tile<T, D>(sQ, L::ldt, Q, q0, N);
  for (int idx = threadIdx.x; idx < kBlock * L::ldo; idx += kThreads) sO[idx] = 0.f;
  for (int r = threadIdx.x; r < kBlock; r += kThreads) {
    sM[r] = -INFINITY;
    sL[r] = 0.f;
  }

  // Softmax work split: two lanes per row (kBlock = 64 columns).
  const int my_row = warp * 16 + lane / 2;
  const int half = lane & 1;

  for (int e = p.layout.q_ptr[qb]; e < p.layout.q_ptr[qb + 1]; ++e) {
    const int k0 = p.layout.q_kblock[e] * kBlock;
    const bool full = tile_full(p.layout.q_full[e], q0, k0, N);
    __syncthreads();  // previous iteration done with sK / sV
    load_tile<T, D>(sK, L::ldt, K, k0, N);
    load_tile<T, D>(sV, L::ldt, V, k0, N);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    rows_times<T, D, kBlock, false>(sS + warp * 16 * L::lds, L::lds, sQ + warp * 16 * L::ldt, L::ldt, sK, L::ldt);
    __syncwarp();

    // Online softmax over this block for the warp's rows. The two lanes of a row take alternate
    // columns (c = 2 * cc + half), which halves shared-memory bank conflicts against split halves.
    {
      const int i = q0 + my_row;
      float* srow = sS + my_row * L::lds;
      float mx = -INFINITY;
      for (int cc = 0; cc < kBlock / 2; ++cc) {
        const int c = 2 * cc + half;
        float x = srow[c] * p.scale;
        if (!full && !visible(p.mask, i, k0 + c, N)) x = -INFINITY;
        srow[c] = x;
        mx = fmaxf(mx, x);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = sM[my_row];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      T* prow = sP + my_row * L::ldp;
      for (int cc = 0; cc < kBlock / 2; ++cc) {
        const int c = 2 * cc + half;
        const float pe = m_new == -INFINITY ? 0.f : __expf(srow[c] - m_new);
        prow[c] = Elem<T>::from_float(pe);
        sum += pe;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float alpha = m_new == -INFINITY ? 1.f : __expf(m_old - m_new);
      __syncwarp();
      if (half == 0) {
        sM[my_row] = m_new;
        sL[my_row] = sL[my_row] * alpha + sum;
        sAlpha[my_row] = alpha;
      }
    }
    __syncwarp();

    // P V for the warp's rows, staged in its rows of sS (S is no longer needed there).
    rows_times<T, kBlock, D, true>(sS + warp * 16 * L::lds, L::lds, sP + warp * 16 * L::ldp, L::ldp, sV, L::ldt);
    __syncwarp();

    // O = alpha * O + P V.
    for (int idx = lane; idx < 16 * D; idx += 32) {
      const int r = warp * 16 + idx / D, c = idx % D;
      sO[r * L::ldo + c] = sO[r * L::ldo + c] * sAlpha[r] + sS[r * L::lds + c];
    }
  }
  __syncwarp();

  // out = O / l, lse = m + log(l) for the warp's rows.
  T* O = out + bh * N * D;
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = warp * 16 + idx / D, c = idx % D;
    if (q0 + r < N) O[static_cast<int64_t>(q0 + r) * D + c] = Elem<T>::from_float(sO[r * L::ldo + c] / sL[r]);
  }
  if (lane < 16) {
    const int r = warp * 16 + lane;
    if (q0 + r < N) lse[bh * N + q0 + r] = sM[r] + logf(sL[r]);
  }
}

template <typename T, int D>
cudaError_t launch(const AttentionParams& p, void* out, float* lse, cudaStream_t stream) {
  const size_t smem = FwdSmem<D>::template bytes<T>();
  auto kernel = forward_kernel<T, D>;
  cudaError_t err = prepare_launch(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = p.batch_heads * p.layout.num_blocks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  DALLE_FAST_LAUNCH(kernel, grid, kThreads, smem, stream)(p, static_cast<T*>(out), lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const AttentionParams& p, void* out, float* lse, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32:
      return launch<T, 32>(p, out, lse, stream);
    case 64:
      return launch<T, 64>(p, out, lse, stream);
    case 128:
      return launch<T, 128>(p, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_forward(const AttentionParams& p, void* out, float* lse, cudaStream_t stream) {
  return p.dtype == DType::kHalf ? dispatch_head_dim<__half>(p, out, lse, stream)
                                 : dispatch_head_dim<__nv_bfloat16>(p, out, lse, stream);
}

size_t forward_smem_bytes(DType, int head_dim) { return smem_bytes_for_head_dim<FwdSmem>(head_dim); }

}  // namespace dalle_fast::cuda
