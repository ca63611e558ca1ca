// CPU kernels that write the caches: quantize_and_cache (packed pages) and write_window (the
// rings), torch-free. launchers.cpp checks the arguments and runs them in parallel; format.py's
// quantize_and_cache_ref and write_window_ref are the definitions they match byte for byte.
#pragma once

#include <cstdint>

#include "kernel_params.h"

namespace kvtuner::cpu {

using ::kvtuner::CacheWriteParams;
using ::kvtuner::WindowWriteParams;

// Rows [begin, end): values, and keys of the per-token scheme, of every KV head; slot < 0 skipped.
void write_tokens(const CacheWriteParams& params, int64_t begin, int64_t end);

// Kivi keys: the key groups that sequence `seq`'s rows complete, one KV head.
void write_kivi_groups(const CacheWriteParams& params, int seq, int kv_head);

// write_window of one sequence: its last min(R, rows) rows into its ring block.
void write_window_sequence(const WindowWriteParams& params, int seq);

}  // namespace kvtuner::cpu
