// NVRTC stand-in for <cuda_runtime_api.h> (README.md): what the kernels use of it is built into NVRTC (memcpy) or
// host-only code that NVRTC does not see.
#pragma once
