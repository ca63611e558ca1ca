// C entry points over the CUDA ops' torch-free side, run by the host emulator (emulator.h), for
// tests/kernels/test_cuda_emulated.py. Everything below the parameter structs is the real code:
// the .cu files are included as they are (plan, dispatch, grids, launches), their launches
// going to the emulator through KVT_LAUNCH. What this file adds is what csrc/launcher_args.h
// does with tensors: filling the parameter structs, here from plain descriptors.
#include "emulator.h"

#include "cuda/paged_attention.cu"
#include "cuda/paged_attention_bf16.cu"
#include "cuda/paged_attention_fp16.cu"
#include "cuda/paged_attention_fp32.cu"
#include "cuda/cache_writes.cu"

using namespace kvtuner;

extern "C" {

// A tensor as Python sees it (data pointer, sizes, strides in elements); up to 4 dims.
struct TensorArg {
  void* data;
  int64_t sizes[4];
  int64_t strides[4];
};

// The batch and format arguments shared by the ops.
struct BatchArg {
  const int32_t* query_start_loc;
  const int32_t* seq_lens;
  int32_t num_seqs;
  const TensorArg* ring;  // null without a window
  const int32_t* ring_block_ids;
  int32_t dtype;  // ElemType
  int32_t format[5];  // key_bits, value_bits, group_size, key_group_size, residual_length
};

const char* emu_error() { return emu::state.error.c_str(); }

void emu_clear_error() { emu::state.error.clear(); }

}  // extern "C"

namespace {

FormatArgs format_args(const BatchArg& b) {
  return FormatArgs{b.format[0], b.format[1], b.format[2], b.format[3], b.format[4]};
}

SequenceArgs sequence_args(const BatchArg& b) { return SequenceArgs{b.query_start_loc, b.seq_lens, b.num_seqs}; }

RingArgs ring_args(const BatchArg& b) {
  if (b.ring == nullptr) return RingArgs{nullptr, 0, 0, nullptr};
  return RingArgs{b.ring->data, b.ring->strides[0], b.ring->strides[1], b.ring_block_ids};
}

// The step's key and value rows [T, H_kv, D], as every op's params hold them.
template <class Params>
void set_key_value(Params& p, const TensorArg& key, const TensorArg& value) {
  p.key = key.data;
  p.value = value.data;
  p.key_stride_token = key.strides[0];
  p.key_stride_head = key.strides[1];
  p.value_stride_token = value.strides[0];
  p.value_stride_head = value.strides[1];
}

}  // namespace

extern "C" {

int emu_quantize_and_cache(const TensorArg* key, const TensorArg* value, const TensorArg* cache,
                           const int64_t* slot_mapping, int64_t num_slots, const BatchArg* batch) {
  cuda::CacheWriteLaunch launch{};
  CacheWriteParams& p = launch.p;
  set_key_value(p, *key, *value);
  p.cache = static_cast<uint8_t*>(cache->data);
  p.cache_stride_block = cache->strides[0];
  p.cache_stride_head = cache->strides[1];
  p.slot_mapping = slot_mapping;
  p.num_tokens = num_slots;
  p.seqs = sequence_args(*batch);
  p.ring = ring_args(*batch);
  p.num_kv_heads = int(key->sizes[1]);
  p.head_size = int(key->sizes[2]);
  p.block_size = int(cache->sizes[2]);
  p.format = format_args(*batch);
  p.dtype = ElemType(batch->dtype);
  launch.num_cache_blocks = cache->sizes[0];
  launch.num_ring_blocks = batch->ring != nullptr ? batch->ring->sizes[0] : 0;
  cuda::launch_quantize_and_cache(launch, nullptr);
  return emu::state.error.empty() ? 0 : 1;
}

int emu_write_window(const TensorArg* key, const TensorArg* value, const BatchArg* batch) {
  cuda::WindowWriteLaunch launch{};
  WindowWriteParams& p = launch.p;
  set_key_value(p, *key, *value);
  p.seqs = sequence_args(*batch);
  p.ring = ring_args(*batch);
  p.num_kv_heads = int(key->sizes[1]);
  p.head_size = int(key->sizes[2]);
  p.residual_length = batch->format[4];
  p.dtype = ElemType(batch->dtype);
  launch.num_rows = key->sizes[0];
  launch.num_ring_blocks = batch->ring->sizes[0];
  cuda::launch_write_window(launch, nullptr);
  return emu::state.error.empty() ? 0 : 1;
}

// plan: (decode_tiles_per_seq, num_partitions, prefill_tiles, workspace_bytes).
void emu_plan_attention(int64_t num_tokens, int num_seqs, int num_q_heads, int num_kv_heads, int head_size,
                        int max_query_len, int64_t* plan) {
  const cuda::AttentionPlan a =
      cuda::plan_attention(num_tokens, num_seqs, num_q_heads, num_kv_heads, head_size, max_query_len);
  plan[0] = a.decode_tiles_per_seq;
  plan[1] = a.num_partitions;
  plan[2] = a.prefill_tiles;
  plan[3] = a.workspace_bytes;
}

int emu_paged_attention(const TensorArg* out, const TensorArg* query, const TensorArg* key, const TensorArg* value,
                        const TensorArg* cache, const TensorArg* block_table, const BatchArg* batch,
                        int max_query_len, float scale, float softcap) {
  cuda::AttentionLaunch launch{};
  AttentionParams& p = launch.p;
  p.out = out->data;
  p.out_stride_token = out->strides[0];
  p.out_stride_head = out->strides[1];
  p.query = query->data;
  p.query_stride_token = query->strides[0];
  p.query_stride_head = query->strides[1];
  set_key_value(p, *key, *value);
  p.cache = static_cast<const uint8_t*>(cache->data);
  p.cache_stride_block = cache->strides[0];
  p.cache_stride_head = cache->strides[1];
  p.block_table = static_cast<const int32_t*>(block_table->data);
  p.block_table_stride = block_table->strides[0];
  p.seqs = sequence_args(*batch);
  p.ring = ring_args(*batch);
  p.num_q_heads = int(query->sizes[1]);
  p.num_kv_heads = int(cache->sizes[1]);
  p.head_size = int(query->sizes[2]);
  p.block_size = int(cache->sizes[2]);
  p.max_query_len = max_query_len;
  p.format = format_args(*batch);
  p.scale = scale;
  p.softcap = softcap;
  p.dtype = ElemType(batch->dtype);
  launch.plan = cuda::plan_attention(query->sizes[0], p.seqs.num_seqs, p.num_q_heads, p.num_kv_heads, p.head_size,
                                     max_query_len);
  launch.num_cache_blocks = cache->sizes[0];
  launch.num_ring_blocks = batch->ring != nullptr ? batch->ring->sizes[0] : 0;
  // NaN-filled: a partial result that the reduce reads without a block having written it shows.
  std::vector<float> workspace(launch.plan.workspace_bytes / sizeof(float), NAN);
  launch.workspace = workspace.data();
  cuda::launch_paged_attention(launch, nullptr);
  return emu::state.error.empty() ? 0 : 1;
}

}  // extern "C"
