// Makes the op library importable as dalle_fast._C: importing it runs the TORCH_LIBRARY registrations.
// Every entry point is a torch.ops.dalle_fast op; the module itself holds only what Python would
// otherwise restate about the build:
//   CUDA_HEAD_DIMS               tuple of the head dims the CUDA attention kernels are built for
//   CUDA_MIN_COMPUTE_CAPABILITY  (major, minor) of the oldest GPU they run on
//   WITH_CUDA                    whether this build has the CUDA kernels
// The first two come from csrc/cuda/capabilities.h, which the kernels' dispatch reads, and describe the
// sources, so CPU-only builds have them too.
#include <Python.h>

#include "cuda/capabilities.h"

namespace {

#ifdef DALLE_FAST_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

PyObject* head_dims() {
  using dalle_fast::cuda::kHeadDims, dalle_fast::cuda::kNumHeadDims;
  PyObject* dims = PyTuple_New(kNumHeadDims);
  if (dims == nullptr) return nullptr;
  for (int i = 0; i < kNumHeadDims; ++i) {
    PyObject* d = PyLong_FromLong(kHeadDims[i]);
    if (d == nullptr) {
      Py_DECREF(dims);
      return nullptr;
    }
    PyTuple_SET_ITEM(dims, i, d);  // steals d
  }
  return dims;
}

// Adds value (a new reference, or null after a failure) as module.name; false on failure.
bool add(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyModule_AddObjectRef(module, name, value);
  Py_DECREF(value);
  return rc == 0;
}

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dalle_fast op library", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  constexpr int kMinCc = dalle_fast::cuda::kMinComputeCapability;
  if (!add(module, "CUDA_HEAD_DIMS", head_dims()) ||
      !add(module, "CUDA_MIN_COMPUTE_CAPABILITY", Py_BuildValue("(ii)", kMinCc / 10, kMinCc % 10)) ||
      !add(module, "WITH_CUDA", PyBool_FromLong(kWithCuda))) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
