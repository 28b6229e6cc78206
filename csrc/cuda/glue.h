// Shared by the CUDA torch glue (the *_glue.cpp files, which include torch headers): the launch check.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace dalle_fast::cuda {

// TORCH_CHECK on a kernel wrapper's status. A failed runtime call (cudaFuncSetAttribute, a launch) also
// leaves CUDA's last error set: it is cleared first, or torch's next launch check would report it as its own.
inline void check_launch(cudaError_t err, const char* what) {
  if (err != cudaSuccess) (void)cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "dalle_fast: CUDA ", what, " launch failed: ", cudaGetErrorString(err));
}

}  // namespace dalle_fast::cuda
