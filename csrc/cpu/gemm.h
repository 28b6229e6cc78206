// Row-major fp32 GEMM on small blocks for the CPU kernels: C = alpha * op(A) op(B) + beta * C.
//
// Uses the BLAS that libtorch_cpu already carries (MKL's or OpenBLAS's sgemm_, resolved as a weak
// symbol through our link against libtorch_cpu) and falls back to a portable loop when the running
// torch exports none. DALLE_FAST_PORTABLE_GEMM=1 forces the fallback (tests use it).
#pragma once

#include <cstdint>

namespace dalle_fast::cpu {

// trans_a: A is stored [K, M] and read transposed; otherwise stored [M, K]. Likewise trans_b: B stored
// [N, K] when trans_b, else [K, N]. Leading dimensions are row strides, as in row-major C.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Which implementation gemm() uses: "blas" or "portable".
const char* gemm_backend();

}  // namespace dalle_fast::cpu
