// Registers the kernels as torch.ops.kvtuner.* (schemas mark written tensors with `!`) and
// makes the library importable as the Python module `kvtuner_vllm._C`, whose attribute
// `torch_version` tells Python which torch the extension was compiled against.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

#ifndef KVTUNER_TORCH_VERSION
#error "setup.py defines KVTUNER_TORCH_VERSION (the torch version the extension is built against)"
#endif

TORCH_LIBRARY(kvtuner, m) {
  m.def(
      "quantize_and_cache(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, Tensor? ring_cache, "
      "Tensor? ring_block_ids, Tensor? query_start_loc, Tensor? seq_lens, int key_bits, int value_bits, "
      "int group_size, int key_group_size, int residual_length) -> ()");
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key, Tensor value, Tensor kv_cache, Tensor? ring_cache, "
      "Tensor? ring_block_ids, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, int max_query_len, "
      "int max_seq_len, float scale, int key_bits, int value_bits, int group_size, int key_group_size, "
      "int residual_length, float softcap, Tensor? workspace) -> ()");
  m.def(
      "write_window(Tensor key, Tensor value, Tensor(a!) ring_cache, Tensor ring_block_ids, Tensor query_start_loc, "
      "Tensor seq_lens, int residual_length) -> ()");
  // Debug counters of the CPU kernels' routes (cpu/route_counts.h); no tensors, so one kernel
  // for every dispatch key.
  m.def("cpu_route_counts() -> (Dict(str, int) items, Dict(str, int) sequences, str vector_isa, str matrix_unit)",
        &cpu_route_counts);
  m.def("reset_cpu_route_counts() -> ()", &reset_cpu_route_counts);
}

TORCH_LIBRARY_IMPL(kvtuner, CPU, m) {
  m.impl("quantize_and_cache", &quantize_and_cache_cpu);
  m.impl("paged_attention", &paged_attention_cpu);
  m.impl("write_window", &write_window_cpu);
}

#ifdef KVTUNER_WITH_CUDA
TORCH_LIBRARY_IMPL(kvtuner, CUDA, m) {
  m.impl("quantize_and_cache", &quantize_and_cache_cuda);
  m.impl("paged_attention", &paged_attention_cuda);
  m.impl("write_window", &write_window_cuda);
}
#endif

// Importing the module loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kvtuner kernels (torch.ops.kvtuner)", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "torch_version", KVTUNER_TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
