// Registers the kernels as torch.ops.kvtuner.* (schemas mark written tensors with `!`) and
// makes the library importable as the Python module `kvtuner_vllm._C`, whose attribute
// `torch_version` tells Python which torch the extension was compiled against.
#include <Python.h>
#include <torch/library.h>

#include <cstddef>
#include <string>

#include "cuda/kernels/work_split.h"
#include "ops.h"
#include "packed_format.h"

#ifndef KVTUNER_TORCH_VERSION
#error "setup.py defines KVTUNER_TORCH_VERSION (the torch version the extension is built against)"
#endif

namespace {

template <std::size_t N>
c10::List<int64_t> int_list(const int (&values)[N]) {
  c10::List<int64_t> list;
  for (const int v : values) list.push_back(v);
  return list;
}

c10::List<int64_t> int_list(int64_t value) { return c10::List<int64_t>({value}); }

// The format's constants (packed_format.h) and the CUDA work split's (cuda/kernels/work_split.h)
// by name, every value a list: Python reads them instead of copying them, and a test holds
// kvtuner_vllm/format.py to them. Plain C++ headers, so CPU-only builds export the CUDA ones too.
c10::Dict<std::string, c10::List<int64_t>> format_constants() {
  namespace cu = kvtuner::cuda;
  c10::Dict<std::string, c10::List<int64_t>> d;
  d.insert("supported_bits", int_list(kvtuner::kSupportedBits));
  d.insert("unquantized_bits", int_list(kvtuner::kUnquantizedBits));
  d.insert("supported_group_sizes", int_list(kvtuner::kSupportedGroupSizes));
  d.insert("supported_key_group_sizes", int_list(kvtuner::kSupportedKeyGroupSizes));
  d.insert("supported_head_sizes", int_list(kvtuner::kSupportedHeadSizes));
  d.insert("head_size_multiple", int_list(kvtuner::kHeadSizeMultiple));
  d.insert("max_head_size", int_list(kvtuner::kMaxHeadSize));
  d.insert("max_residual_length", int_list(kvtuner::kMaxResidualLength));
  d.insert("param_bytes_per_group", int_list(kvtuner::kParamBytesPerGroup));
  d.insert("fp16_max", int_list(int64_t(kvtuner::kFp16Max)));
  d.insert("cuda_decode_rows", int_list(cu::kDecodeRows));
  d.insert("cuda_decode_max_query", int_list(cu::kDecodeMaxQuery));
  d.insert("cuda_split_target_blocks", int_list(cu::kSplitTargetCtas));
  d.insert("cuda_max_partitions", int_list(cu::kMaxPartitions));
  return d;
}

void check_heads(int64_t num_q_heads, int64_t num_kv_heads, int64_t head_size) {
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads > 0 && num_q_heads % num_kv_heads == 0 && head_size > 0,
              "need positive head counts, num_q_heads a multiple of num_kv_heads, and a positive head size; got ",
              num_q_heads, ", ", num_kv_heads, ", ", head_size);
}

// The CUDA paged_attention's workspace for a batch (cuda::plan_attention's), on any build.
int64_t attention_workspace_size(int64_t num_seqs, int64_t max_query_len, int64_t num_q_heads, int64_t num_kv_heads,
                                 int64_t head_size) {
  check_heads(num_q_heads, num_kv_heads, head_size);
  if (num_seqs <= 0 || max_query_len <= 0) return 0;
  return kvtuner::cuda::attention_workspace_bytes(int(num_seqs), int(max_query_len), int(num_q_heads),
                                                  int(num_kv_heads), int(head_size));
}

int64_t max_attention_workspace_size(int64_t num_q_heads, int64_t num_kv_heads, int64_t head_size) {
  check_heads(num_q_heads, num_kv_heads, head_size);
  return kvtuner::cuda::max_attention_workspace_bytes(int(num_q_heads), int(num_kv_heads), int(head_size));
}

}  // namespace

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
  // The format's constants and the CUDA workspace sizes: no tensors either.
  m.def("format_constants() -> Dict(str, int[])", &format_constants);
  m.def("attention_workspace_size(int num_seqs, int max_query_len, int num_q_heads, int num_kv_heads, "
        "int head_size) -> int",
        &attention_workspace_size);
  m.def("max_attention_workspace_size(int num_q_heads, int num_kv_heads, int head_size) -> int",
        &max_attention_workspace_size);
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
