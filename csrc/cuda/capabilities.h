// What the CUDA attention kernels support, stated once: the launchers instantiate one kernel per head
// dim listed here, the torch glue checks arguments against the same list, and dalle_fast._C exposes both
// values to Python (csrc/python_module.cpp). Plain C++ with no includes, because CPU-only builds read it
// too: the values describe these sources, not the machine or the build.
#pragma once

namespace dalle_fast::cuda {

// Head dims with a forward and backward instantiation (decode takes any head dim up to 256).
inline constexpr int kHeadDims[] = {32, 64, 128};
inline constexpr int kNumHeadDims = sizeof(kHeadDims) / sizeof(kHeadDims[0]);

// Oldest GPU the kernels run on, as major * 10 + minor: bf16 mma.sync, ldmatrix and cp.async are sm_80.
inline constexpr int kMinComputeCapability = 80;

constexpr bool is_supported_head_dim(int head_dim) {
  for (int d : kHeadDims)
    if (d == head_dim) return true;
  return false;
}

}  // namespace dalle_fast::cuda
