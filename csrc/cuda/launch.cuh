// Kernel launch and dynamic shared memory, as macros so the host emulator in csrc/testing/cuda_emulator/
// (which compiles these .cu files with g++ and defines both first) can run the kernels without a GPU.
//
//   DALLE_FAST_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...);
//   DALLE_FAST_DYNAMIC_SMEM(smem);  // unsigned char smem[], 128-byte aligned
//
// Kernels take all their shared memory this way, none as static __shared__ variables: the emulator
// fills dynamic shared memory with NaN before every block, so a read of a slot nobody wrote shows, and it
// rejects static __shared__ at compile time because it could not do the same for those.
#pragma once

#ifndef DALLE_FAST_LAUNCH
#define DALLE_FAST_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

#ifndef DALLE_FAST_DYNAMIC_SMEM
#define DALLE_FAST_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
