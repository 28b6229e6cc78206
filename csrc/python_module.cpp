// Makes the op library importable as dalle_fast._C: importing it runs the TORCH_LIBRARY registrations.
// No Python bindings are defined; every entry point is a torch.ops.dalle_fast op.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dalle_fast op library", -1, nullptr};
  return PyModule_Create(&module_def);
}
