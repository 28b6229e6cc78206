// Emulator stand-in for <cuda_runtime.h>: the toolkit's runtime API declarations plus the emulator
// (kernels compiled with g++ run on the host; see ../cuda_emu.h).
#pragma once
#include <cuda_runtime_api.h>

#include "../cuda_emu.h"
