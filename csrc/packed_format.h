// Byte sizes, offsets and the allowed values of the packed KV format (kvtuner_vllm/format.py
// is the definition in words). The one C++ source of the format's constants: the launchers'
// checks (launcher_args.h) and the CUDA kernels read them here, and the extension exports them
// (torch.ops.kvtuner.format_constants) so that a test holds format.py to the same numbers.
// Torch-free: CPU and CUDA use it.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define KVT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVT_HOST_DEVICE inline
#endif

namespace kvtuner {

enum class ElemType : int { kFloat32, kFloat16, kBFloat16 };

constexpr int kUnquantizedBits = 16;
constexpr int kParamBytesPerGroup = 4;  // fp16 scale, fp16 zero
constexpr float kFp16Max = 65504.0f;

// The values a layer's format may take (format.py SUPPORTED_*, MAX_RESIDUAL_LENGTH).
constexpr int kSupportedBits[] = {2, 4, 8, 16};
constexpr int kSupportedGroupSizes[] = {32, 64, 128};         // channels per group, or the head size
constexpr int kSupportedKeyGroupSizes[] = {16, 32, 64, 128};  // kivi: token positions per key group
constexpr int kSupportedHeadSizes[] = {64, 80, 96, 128, 256};  // what the CUDA attention is built for
constexpr int kHeadSizeMultiple = 16;  // the CPU kernels take any multiple of this up to kMaxHeadSize
constexpr int kMaxHeadSize = 256;
constexpr int kMaxResidualLength = 256;

template <std::size_t N>
constexpr bool one_of(int64_t value, const int (&allowed)[N]) {
  for (const int a : allowed) {
    if (value == a) return true;
  }
  return false;
}

// Bytes of one token's codes for one head; 16 bits stores the model dtype as is.
KVT_HOST_DEVICE int64_t code_bytes(int bits, int head_size, int elem_size) {
  return bits == kUnquantizedBits ? int64_t(head_size) * elem_size : int64_t(head_size) * bits / 8;
}

// Bytes of one token's scales and zeros for one head, groups of `group_size` values (kivi keys:
// `group_size` is the token group G_t, and a group's D pairs spread over its G_t tokens).
KVT_HOST_DEVICE int64_t param_bytes(int bits, int head_size, int group_size) {
  return bits == kUnquantizedBits ? 0 : int64_t(kParamBytesPerGroup) * head_size / group_size;
}

// One layer's format as the kernels take it (format.LayerFormat's kernel view).
struct FormatArgs {
  int key_bits, value_bits;
  int group_size;        // channels per group: values, and per-token keys
  int key_group_size;    // kivi: token positions per key group; 0 = per-token keys
  int residual_length;   // R: window of full-precision positions; 0 = none (format v1)
};

// Where K codes, K params, V codes and V params start inside one (block, head) plane.
// Kivi key params are (block_size / G_t) rows of head_size (scale, zero) pairs.
struct PlaneLayout {
  int64_t key_code_bytes, key_param_bytes, value_code_bytes, value_param_bytes;
  int64_t key_params_offset, value_codes_offset, value_params_offset;
  int64_t bytes_per_token;

  KVT_HOST_DEVICE PlaneLayout(const FormatArgs& f, int head_size, int elem_size, int block_size)
      : key_code_bytes(code_bytes(f.key_bits, head_size, elem_size)),
        key_param_bytes(param_bytes(f.key_bits, head_size, f.key_group_size > 0 ? f.key_group_size : f.group_size)),
        value_code_bytes(code_bytes(f.value_bits, head_size, elem_size)),
        value_param_bytes(param_bytes(f.value_bits, head_size, f.group_size)),
        key_params_offset(int64_t(block_size) * key_code_bytes),
        value_codes_offset(key_params_offset + int64_t(block_size) * key_param_bytes),
        value_params_offset(value_codes_offset + int64_t(block_size) * value_code_bytes),
        bytes_per_token(key_code_bytes + key_param_bytes + value_code_bytes + value_param_bytes) {}
};

// The full-precision window: the query at position p reads positions >= window_start(p) from
// the model dtype (the ring or the step's own rows), older ones from the packed pages.
KVT_HOST_DEVICE int window_start(int position, int block_size, int residual_length) {
  if (residual_length <= 0) return position + 1;
  const int block_start = position / block_size * block_size;
  const int recent = position - residual_length + 1;
  return block_start > recent ? block_start : recent;
}

}  // namespace kvtuner
