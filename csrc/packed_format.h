// Byte sizes and offsets of the packed KV format (kvtuner_vllm/format.py is the
// definition; this header mirrors it for the kernels). Torch-free: CPU and CUDA use it.
#pragma once

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

// Bytes of one token's codes for one head; 16 bits stores the model dtype as is.
KVT_HOST_DEVICE int64_t code_bytes(int bits, int head_size, int elem_size) {
  return bits == kUnquantizedBits ? int64_t(head_size) * elem_size : int64_t(head_size) * bits / 8;
}

KVT_HOST_DEVICE int64_t param_bytes(int bits, int head_size, int group_size) {
  return bits == kUnquantizedBits ? 0 : int64_t(kParamBytesPerGroup) * head_size / group_size;
}

// Where K codes, K params, V codes and V params start inside one (block, head) plane.
struct PlaneLayout {
  int64_t key_code_bytes, key_param_bytes, value_code_bytes, value_param_bytes;
  int64_t key_params_offset, value_codes_offset, value_params_offset;
  int64_t bytes_per_token;

  KVT_HOST_DEVICE PlaneLayout(int key_bits, int value_bits, int head_size, int group_size, int elem_size,
                              int block_size)
      : key_code_bytes(code_bytes(key_bits, head_size, elem_size)),
        key_param_bytes(param_bytes(key_bits, head_size, group_size)),
        value_code_bytes(code_bytes(value_bits, head_size, elem_size)),
        value_param_bytes(param_bytes(value_bits, head_size, group_size)),
        key_params_offset(int64_t(block_size) * key_code_bytes),
        value_codes_offset(key_params_offset + int64_t(block_size) * key_param_bytes),
        value_params_offset(value_codes_offset + int64_t(block_size) * value_code_bytes),
        bytes_per_token(key_code_bytes + key_param_bytes + value_code_bytes + value_param_bytes) {}
};

}  // namespace kvtuner
