// The environment variables that steer which CPU kernel runs, read in one place with one rule:
// unset or empty means the default; any other value must be one the variable accepts, else
// std::invalid_argument names the variable, the value and the accepted values (the op raises
// it as a ValueError: every reader runs while the call is planned, on the calling thread).
//
//   KVTUNER_CPU_ISA           avx512 | avx2 | baseline: the widest vector kernel build that may
//                             run (unset: avx512); read once per process (attention.cpp)
//   KVTUNER_DECODE_ISA        amx | off: whether the AMX decode kernel may run (unset: amx)
//   KVTUNER_PREFILL_ISA       amx | avx512_bf16 | off: the highest matrix unit the prefill route
//                             may use (unset: amx)
//   KVTUNER_PREFILL_MIN_ROWS  a positive integer: the prefill route's threshold in query rows
//                             per KV head (unset: kMinPrefillRows)
// The last three are read at every call, so that a test or benchmark can compare the routes in
// one process. Torch-free.
#pragma once

namespace kvtuner::cpu {

// Vector kernel builds, narrowest first (attention_isa.h).
enum class VectorIsa : int { kBaseline, kAvx2, kAvx512 };

// What computes the prefill kernel's matrix products, lowest first (each tier also needs
// everything of the tier below).
enum class MatrixUnit : int { kNone, kAvx512Bf16, kAmx };

const char* vector_isa_name(VectorIsa isa);    // "baseline", "avx2", "avx512"
const char* matrix_unit_name(MatrixUnit unit);  // "none", "avx512_bf16", "amx"

VectorIsa cpu_isa_cap();
bool decode_amx_allowed();
MatrixUnit prefill_unit_cap();
int prefill_min_rows(int unset);

}  // namespace kvtuner::cpu
