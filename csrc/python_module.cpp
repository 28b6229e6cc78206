// Makes the op library importable as dalle_fast._C: importing it runs the TORCH_LIBRARY registrations.
// Every entry point is a torch.ops.dalle_fast op; the module itself holds only what Python would
// otherwise restate about the build:
//   CUDA_HEAD_DIMS               tuple of the head dims the CUDA attention kernels are built for
//   CUDA_MIN_COMPUTE_CAPABILITY  (major, minor) of the oldest GPU they run on
//   WITH_CUDA                    whether this build has the CUDA kernels (the nvcc build)
//   CUDA_MAX_DECODE_HEAD_DIM     the largest head dim of the CUDA decode kernel
// The first two come from csrc/cuda/capabilities.h, which the kernels' dispatch reads, and describe the
// sources, so CPU-only builds have them too.
//
// It also holds the launch description of csrc/cuda/host_setup.h for the NVRTC backend
// (dalle_fast/ops/nvrtc.py), which compiles the same kernels at run time and launches them itself: which
// kernels to compile (kernel_names), the packed block layout and multi-tensor tables to upload, and for
// each op call the launches the nvcc launchers would make (kernel, blocks, threads, shared memory, and
// the arguments' bytes). Pointers are passed as integers (device addresses); nothing here touches a GPU.
#include <Python.h>

#include <string>
#include <vector>

#include "cuda/capabilities.h"
#include "cuda/host_setup.h"
#include "layout.h"

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


// ---- the launch description (host_setup.h) ------------------------------------------------------------

namespace hs = dalle_fast::cuda;

PyObject* bytes_of(const std::vector<uint8_t>& b) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(b.data()), static_cast<Py_ssize_t>(b.size()));
}

// [(kernel, blocks, threads, smem, (arg bytes, ...)), ...]; ValueError for a grid the launchers refuse.
PyObject* launch_list(const std::vector<hs::KernelLaunch>& launches) {
  for (const auto& l : launches) {
    if (l.shape.blocks > hs::kMaxGridBlocks) {
      PyErr_Format(PyExc_ValueError, "dalle_fast: %s would need %lld thread blocks; CUDA allows at most %lld",
                   l.kernel.c_str(), static_cast<long long>(l.shape.blocks), static_cast<long long>(hs::kMaxGridBlocks));
      return nullptr;
    }
  }
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(launches.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < launches.size(); ++i) {
    const auto& l = launches[i];
    PyObject* args = PyTuple_New(static_cast<Py_ssize_t>(l.args.size()));
    if (args == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    for (size_t a = 0; a < l.args.size(); ++a) {
      PyObject* b = bytes_of(l.args[a]);
      if (b == nullptr) {
        Py_DECREF(args);
        Py_DECREF(list);
        return nullptr;
      }
      PyTuple_SET_ITEM(args, a, b);
    }
    PyObject* item = Py_BuildValue("(sLinN)", l.kernel.c_str(), static_cast<long long>(l.shape.blocks),
                                   l.shape.threads, static_cast<Py_ssize_t>(l.shape.smem), args);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, item);
  }
  return list;
}

// A valid, normalised mask spec from the op's arguments; false (ValueError set) otherwise.
bool mask_spec(const char* kind, long long text_len, long long image_size, long long kernel_size,
               dalle_fast::MaskSpec* m) {
  if (!dalle_fast::parse_mask_kind(kind, &m->kind)) {
    PyErr_Format(PyExc_ValueError, "dalle_fast: kind must be causal, row, column or conv, got '%s'", kind);
    return false;
  }
  m->text_len = text_len;
  m->image_size = image_size;
  m->kernel_size = kernel_size;
  const std::string why = dalle_fast::validate_mask_spec(*m);
  if (!why.empty()) {
    PyErr_SetString(PyExc_ValueError, why.c_str());
    return false;
  }
  *m = dalle_fast::normalize_mask_spec(*m);
  return true;
}

void* ptr(unsigned long long address) { return reinterpret_cast<void*>(static_cast<uintptr_t>(address)); }

PyObject* kernel_names(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  for (const auto& [source, names] : hs::kernel_names()) {
    PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
    if (tuple == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    for (size_t i = 0; i < names.size(); ++i) PyTuple_SET_ITEM(tuple, i, PyUnicode_FromString(names[i].c_str()));
    const int rc = PyDict_SetItemString(out, source.c_str(), tuple);
    Py_DECREF(tuple);
    if (rc != 0) {
      Py_DECREF(out);
      return nullptr;
    }
  }
  return out;
}

// layout_image(kind, text_len, image_size, kernel_size) -> bytes: pack_layout of the kernels' block layout.
PyObject* layout_image(PyObject*, PyObject* args) {
  const char* kind;
  long long text_len, image_size, kernel_size;
  if (!PyArg_ParseTuple(args, "sLLL", &kind, &text_len, &image_size, &kernel_size)) return nullptr;
  dalle_fast::MaskSpec m;
  if (!mask_spec(kind, text_len, image_size, kernel_size, &m)) return nullptr;
  return bytes_of(hs::pack_layout(*dalle_fast::get_block_layout(m, hs::kBlock)).bytes);
}

// The AttentionParams of a call; the layout's device copy (layout_image's bytes) starts at `layout`.
bool attention_params(unsigned long long q, unsigned long long k, unsigned long long v, unsigned long long layout,
                      long long batch_heads, long long seq_len, int head_dim, double scale, int dtype,
                      const char* kind, long long text_len, long long image_size, long long kernel_size,
                      hs::AttentionParams* p) {
  dalle_fast::MaskSpec m;
  if (!mask_spec(kind, text_len, image_size, kernel_size, &m)) return false;
  if (!hs::is_supported_head_dim(head_dim) || (dtype != 0 && dtype != 1) || seq_len < 0 ||
      seq_len > hs::kMaxSeqLen || seq_len != m.seq_len() || batch_heads < 0) {
    PyErr_Format(PyExc_ValueError, "dalle_fast: no CUDA attention kernel for head_dim %d, dtype %d, seq_len %lld "
                 "(mask seq_len %lld), batch_heads %lld", head_dim, dtype, seq_len,
                 static_cast<long long>(m.seq_len()), batch_heads);
    return false;
  }
  const hs::PackedLayout packed = hs::pack_layout(*dalle_fast::get_block_layout(m, hs::kBlock));
  *p = hs::AttentionParams{ptr(q), ptr(k), ptr(v), batch_heads, static_cast<int32_t>(seq_len), head_dim,
                           static_cast<float>(scale), static_cast<hs::DType>(dtype), m,
                           packed.device_layout(ptr(layout))};
  return true;
}

// forward_launches(q, k, v, out, lse, layout, batch_heads, seq_len, head_dim, scale, dtype, kind, text_len,
// image_size, kernel_size); dtype 0 float16, 1 bfloat16.
PyObject* forward_launches(PyObject*, PyObject* args) {
  unsigned long long q, k, v, out, lse, layout;
  long long batch_heads, seq_len, text_len, image_size, kernel_size;
  int head_dim, dtype;
  double scale;
  const char* kind;
  if (!PyArg_ParseTuple(args, "KKKKKKLLidisLLL", &q, &k, &v, &out, &lse, &layout, &batch_heads, &seq_len, &head_dim,
                        &scale, &dtype, &kind, &text_len, &image_size, &kernel_size))
    return nullptr;
  hs::AttentionParams p;
  if (!attention_params(q, k, v, layout, batch_heads, seq_len, head_dim, scale, dtype, kind, text_len, image_size,
                        kernel_size, &p))
    return nullptr;
  return launch_list(hs::forward_launches(p, ptr(out), static_cast<float*>(ptr(lse))));
}

// backward_launches(q, k, v, grad_out, out, lse, delta, dq, dk, dv, layout, smem_limit, batch_heads, seq_len,
// head_dim, scale, dtype, kind, text_len, image_size, kernel_size).
PyObject* backward_launches(PyObject*, PyObject* args) {
  unsigned long long q, k, v, grad_out, out, lse, delta, dq, dk, dv, layout, smem_limit;
  long long batch_heads, seq_len, text_len, image_size, kernel_size;
  int head_dim, dtype;
  double scale;
  const char* kind;
  if (!PyArg_ParseTuple(args, "KKKKKKKKKKKKLLidisLLL", &q, &k, &v, &grad_out, &out, &lse, &delta, &dq, &dk, &dv,
                        &layout, &smem_limit, &batch_heads, &seq_len, &head_dim, &scale, &dtype, &kind, &text_len,
                        &image_size, &kernel_size))
    return nullptr;
  hs::AttentionParams p;
  if (!attention_params(q, k, v, layout, batch_heads, seq_len, head_dim, scale, dtype, kind, text_len, image_size,
                        kernel_size, &p))
    return nullptr;
  return launch_list(hs::backward_launches(p, ptr(grad_out), static_cast<const float*>(ptr(lse)),
                                           static_cast<float*>(ptr(delta)), ptr(out), ptr(dq), ptr(dk), ptr(dv),
                                           static_cast<size_t>(smem_limit)));
}

// Shared-memory bytes of the forward and the backward at this dtype, head dim and opt-in limit (0: none).
PyObject* attention_smem_bytes(PyObject*, PyObject* args) {
  int dtype, head_dim;
  unsigned long long smem_limit;
  if (!PyArg_ParseTuple(args, "iiK", &dtype, &head_dim, &smem_limit)) return nullptr;
  const auto t = static_cast<hs::DType>(dtype);
  return Py_BuildValue("(nn)", static_cast<Py_ssize_t>(hs::forward_smem_bytes(t, head_dim)),
                       static_cast<Py_ssize_t>(hs::backward_smem_bytes(t, head_dim, smem_limit)));
}

// The DecodeParams of a call; false (ValueError set) when the row has too many key intervals.
bool decode_params(const char* kind, long long text_len, long long image_size, long long kernel_size,
                   long long position, long long batch_heads, long long seq_len, int head_dim, double scale,
                   int dtype, int sm_count, hs::DecodeParams* p, int64_t* num_keys) {
  dalle_fast::MaskSpec m;
  if (!mask_spec(kind, text_len, image_size, kernel_size, &m)) return false;
  if (position < 0 || position >= m.seq_len() || dtype < 0 || dtype > 2) {
    PyErr_Format(PyExc_ValueError, "dalle_fast: position must be in [0, %lld), got %lld (dtype %d)",
                 static_cast<long long>(m.seq_len()), position, dtype);
    return false;
  }
  *p = hs::DecodeParams{};
  const int64_t n = hs::set_decode_intervals(*p, m, position, num_keys);
  if (n > hs::kMaxDecodeIntervals) {
    PyErr_Format(PyExc_ValueError, "dalle_fast: this conv row has %lld key intervals; the CUDA decode kernel takes "
                 "at most %d (use a smaller kernel_size)", static_cast<long long>(n), hs::kMaxDecodeIntervals);
    return false;
  }
  p->batch_heads = batch_heads;
  p->seq_len = static_cast<int32_t>(seq_len);
  p->head_dim = head_dim;
  p->scale = static_cast<float>(scale);
  p->dtype = static_cast<hs::DecodeDType>(dtype);
  p->splits = hs::decode_splits(batch_heads, *num_keys, sm_count);
  return true;
}

// decode_workspace(kind, text_len, image_size, kernel_size, position, batch_heads, head_dim, sm_count)
// -> floats of the splits' workspace (0 for one split).
PyObject* decode_workspace(PyObject*, PyObject* args) {
  const char* kind;
  long long text_len, image_size, kernel_size, position, batch_heads;
  int head_dim, sm_count;
  if (!PyArg_ParseTuple(args, "sLLLLLii", &kind, &text_len, &image_size, &kernel_size, &position, &batch_heads,
                        &head_dim, &sm_count))
    return nullptr;
  hs::DecodeParams p;
  int64_t num_keys = 0;
  if (!decode_params(kind, text_len, image_size, kernel_size, position, batch_heads, 0, head_dim, 1.0, 0, sm_count,
                     &p, &num_keys))
    return nullptr;
  return PyLong_FromSize_t(hs::decode_workspace_floats(p));
}

// decode_launches(q, k, v, out, partial, kind, text_len, image_size, kernel_size, position, batch_heads,
// seq_len, head_dim, scale, dtype, sm_count); dtype 0 float32, 1 float16, 2 bfloat16; partial: a workspace
// of decode_workspace(...) floats (any address when that is 0).
PyObject* decode_launches(PyObject*, PyObject* args) {
  unsigned long long q, k, v, out, partial;
  const char* kind;
  long long text_len, image_size, kernel_size, position, batch_heads, seq_len;
  int head_dim, dtype, sm_count;
  double scale;
  if (!PyArg_ParseTuple(args, "KKKKKsLLLLLLidii", &q, &k, &v, &out, &partial, &kind, &text_len, &image_size,
                        &kernel_size, &position, &batch_heads, &seq_len, &head_dim, &scale, &dtype, &sm_count))
    return nullptr;
  hs::DecodeParams p;
  int64_t num_keys = 0;
  if (!decode_params(kind, text_len, image_size, kernel_size, position, batch_heads, seq_len, head_dim, scale, dtype,
                     sm_count, &p, &num_keys))
    return nullptr;
  p.q = ptr(q);
  p.k = ptr(k);
  p.v = ptr(v);
  p.out = ptr(out);
  p.partial = p.splits > 1 ? static_cast<float*>(ptr(partial)) : nullptr;
  if (p.batch_heads > 0 && !hs::decode_params_valid(p)) {
    PyErr_Format(PyExc_ValueError, "dalle_fast: no CUDA decode kernel for head_dim %d, batch_heads %lld", head_dim,
                 batch_heads);
    return nullptr;
  }
  return launch_list(hs::decode_launches(p));
}

// grad_scale_launches(in, out, n, kind, scales, block); kind 0 float32, 1 float16, 2 bfloat16.
PyObject* grad_scale_launches(PyObject*, PyObject* args) {
  unsigned long long in, out, scales;
  long long n, block;
  int kind;
  if (!PyArg_ParseTuple(args, "KKLiKL", &in, &out, &n, &kind, &scales, &block)) return nullptr;
  return launch_list(hs::grad_scale_launches(ptr(in), ptr(out), n, static_cast<hs::FloatKind>(kind),
                                             static_cast<const float*>(ptr(scales)), block));
}

// grad_unscale_filter_launches(in, out, n, kind, scales, block, found_inf).
PyObject* grad_unscale_filter_launches(PyObject*, PyObject* args) {
  unsigned long long in, out, scales, found;
  long long n, block;
  int kind;
  if (!PyArg_ParseTuple(args, "KKLiKLK", &in, &out, &n, &kind, &scales, &block, &found)) return nullptr;
  return launch_list(hs::grad_unscale_filter_launches(ptr(in), ptr(out), n, static_cast<hs::FloatKind>(kind),
                                                      static_cast<const float*>(ptr(scales)), block,
                                                      static_cast<bool*>(ptr(found))));
}

// tensor_tables([((ptr, ...), (kind, ...), numel, block), ...]) -> (bytes, chunks_offset, num_chunks): a
// multi-tensor launch's tables (pack_tables), to upload; empty tensors get no entry.
PyObject* tensor_tables(PyObject*, PyObject* args) {
  PyObject* list;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list)) return nullptr;
  std::vector<hs::TensorEntry> entries;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    PyObject *ptrs, *kinds;
    long long numel, block;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(list, i), "O!O!LL", &PyTuple_Type, &ptrs, &PyTuple_Type, &kinds, &numel,
                          &block))
      return nullptr;
    const Py_ssize_t n = PyTuple_GET_SIZE(ptrs);
    if (n < 1 || n > 4 || PyTuple_GET_SIZE(kinds) != n) {
      PyErr_SetString(PyExc_ValueError, "dalle_fast: a tensor entry takes 1 to 4 buffers and a kind for each");
      return nullptr;
    }
    void* p[4];
    hs::FloatKind k[4];
    for (Py_ssize_t b = 0; b < n; ++b) {
      p[b] = ptr(PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(ptrs, b)));
      k[b] = static_cast<hs::FloatKind>(PyLong_AsLong(PyTuple_GET_ITEM(kinds, b)));
    }
    if (PyErr_Occurred()) return nullptr;
    hs::add_tensor_entry(entries, static_cast<int>(n), p, k, numel, static_cast<int32_t>(block));
  }
  const hs::MultiTensorTables t = hs::pack_tables(entries);
  return Py_BuildValue("(NnL)", bytes_of(t.bytes), static_cast<Py_ssize_t>(t.chunks_offset),
                       static_cast<long long>(t.num_chunks));
}

// multi_unscale_check_launches(entries, chunks, num_chunks, scales, found_inf): device addresses of the
// uploaded tables (start and start + chunks_offset).
PyObject* multi_unscale_check_launches(PyObject*, PyObject* args) {
  unsigned long long entries, chunks, scales, found;
  long long num_chunks;
  if (!PyArg_ParseTuple(args, "KKLKK", &entries, &chunks, &num_chunks, &scales, &found)) return nullptr;
  return launch_list(hs::multi_unscale_check_launches(static_cast<const hs::TensorEntry*>(ptr(entries)),
                                                      static_cast<const hs::ChunkRef*>(ptr(chunks)), num_chunks,
                                                      static_cast<const float*>(ptr(scales)),
                                                      static_cast<bool*>(ptr(found))));
}

// scale_update_launches(scales, cooldown, found_inf, n, growth, backoff, window, min_scale, max_scale).
PyObject* scale_update_launches(PyObject*, PyObject* args) {
  unsigned long long scales, cooldown, found;
  long long n, window;
  double growth, backoff, lo, hi;
  if (!PyArg_ParseTuple(args, "KKKLddLdd", &scales, &cooldown, &found, &n, &growth, &backoff, &window, &lo, &hi))
    return nullptr;
  return launch_list(hs::scale_update_launches(
      static_cast<float*>(ptr(scales)), static_cast<int32_t*>(ptr(cooldown)), static_cast<const bool*>(ptr(found)), n,
      static_cast<float>(growth), static_cast<float>(backoff), static_cast<int32_t>(window), static_cast<float>(lo),
      static_cast<float>(hi)));
}

// adamw_launches(entries, chunks, num_chunks, found_inf, step_size, bias_correction2_sqrt, decay, beta1,
// beta2, eps).
PyObject* adamw_launches(PyObject*, PyObject* args) {
  unsigned long long entries, chunks, found, step, bc2, decay;
  long long num_chunks;
  double beta1, beta2, eps;
  if (!PyArg_ParseTuple(args, "KKLKKKKddd", &entries, &chunks, &num_chunks, &found, &step, &bc2, &decay, &beta1,
                        &beta2, &eps))
    return nullptr;
  return launch_list(hs::adamw_launches(static_cast<const hs::TensorEntry*>(ptr(entries)),
                                        static_cast<const hs::ChunkRef*>(ptr(chunks)), num_chunks,
                                        static_cast<const bool*>(ptr(found)), static_cast<const float*>(ptr(step)),
                                        static_cast<const float*>(ptr(bc2)), static_cast<const float*>(ptr(decay)),
                                        hs::adamw_constants(beta1, beta2, eps)));
}

PyMethodDef kMethods[] = {
    {"kernel_names", kernel_names, METH_NOARGS, "{source stem: (kernel name expressions, ...)} to compile"},
    {"layout_image", layout_image, METH_VARARGS, "the packed block layout's bytes, to upload"},
    {"forward_launches", forward_launches, METH_VARARGS, "the forward's launches"},
    {"backward_launches", backward_launches, METH_VARARGS, "the backward's launches"},
    {"attention_smem_bytes", attention_smem_bytes, METH_VARARGS, "(forward, backward) shared-memory bytes"},
    {"decode_workspace", decode_workspace, METH_VARARGS, "floats of decode's split workspace"},
    {"decode_launches", decode_launches, METH_VARARGS, "decode's launches"},
    {"grad_scale_launches", grad_scale_launches, METH_VARARGS, "grad_scale's launches"},
    {"grad_unscale_filter_launches", grad_unscale_filter_launches, METH_VARARGS, "grad_unscale_filter's launches"},
    {"tensor_tables", tensor_tables, METH_VARARGS, "a multi-tensor launch's tables"},
    {"multi_unscale_check_launches", multi_unscale_check_launches, METH_VARARGS, "multi_unscale_check_'s launches"},
    {"scale_update_launches", scale_update_launches, METH_VARARGS, "resblock_scale_update_'s launches"},
    {"adamw_launches", adamw_launches, METH_VARARGS, "adamw_step_'s launches"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dalle_fast op library", -1, kMethods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  constexpr int kMinCc = dalle_fast::cuda::kMinComputeCapability;
  if (!add(module, "CUDA_HEAD_DIMS", head_dims()) ||
      !add(module, "CUDA_MIN_COMPUTE_CAPABILITY", Py_BuildValue("(ii)", kMinCc / 10, kMinCc % 10)) ||
      !add(module, "WITH_CUDA", PyBool_FromLong(kWithCuda)) ||
      !add(module, "CUDA_MAX_DECODE_HEAD_DIM", PyLong_FromLong(dalle_fast::cuda::kMaxDecodeHeadDim))) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
