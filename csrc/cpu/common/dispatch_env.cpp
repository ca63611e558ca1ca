// dispatch_env.h: each variable is a table of accepted names (or a positive integer), parsed by
// the two functions below, which alone decide what "unset" and "invalid" mean.
#include "cpu/common/dispatch_env.h"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace kvtuner::cpu {
namespace {

template <typename T>
struct Choice {
  const char* name;
  T value;
};

// The variable's value, or null when it is unset or empty (both mean the default).
const char* env_value(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr && *value != '\0' ? value : nullptr;
}

[[noreturn]] void reject(const char* variable, const char* value, const std::string& accepted) {
  throw std::invalid_argument(std::string(variable) + " must be " + accepted + " (or unset), got '" + value + "'");
}

template <typename T, size_t N>
T env_choice(const char* variable, const Choice<T> (&choices)[N], T unset) {
  const char* value = env_value(variable);
  if (value == nullptr) return unset;
  std::string accepted = "one of ";
  for (size_t i = 0; i < N; ++i) {
    if (std::string(value) == choices[i].name) return choices[i].value;
    accepted += (i > 0 ? ", " : "") + std::string(choices[i].name);
  }
  reject(variable, value, accepted);
}

// Decimal digits only (no sign, no spaces, no suffix), 1 to INT_MAX.
int env_positive_int(const char* variable, int unset) {
  const char* value = env_value(variable);
  if (value == nullptr) return unset;
  char* end = nullptr;
  errno = 0;
  const long parsed = std::strtol(value, &end, 10);
  const bool digits = *value >= '0' && *value <= '9' && *end == '\0';
  if (!digits || errno == ERANGE || parsed < 1 || parsed > INT_MAX) reject(variable, value, "a positive integer");
  return int(parsed);
}

constexpr Choice<VectorIsa> kVectorIsas[] = {
    {"avx512", VectorIsa::kAvx512}, {"avx2", VectorIsa::kAvx2}, {"baseline", VectorIsa::kBaseline}};
constexpr Choice<bool> kDecodeIsas[] = {{"amx", true}, {"off", false}};
constexpr Choice<MatrixUnit> kPrefillIsas[] = {
    {"amx", MatrixUnit::kAmx}, {"avx512_bf16", MatrixUnit::kAvx512Bf16}, {"off", MatrixUnit::kNone}};

}  // namespace

const char* vector_isa_name(VectorIsa isa) {
  switch (isa) {
    case VectorIsa::kAvx512: return "avx512";
    case VectorIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

const char* matrix_unit_name(MatrixUnit unit) {
  switch (unit) {
    case MatrixUnit::kAmx: return "amx";
    case MatrixUnit::kAvx512Bf16: return "avx512_bf16";
    default: return "none";
  }
}

VectorIsa cpu_isa_cap() { return env_choice("KVTUNER_CPU_ISA", kVectorIsas, VectorIsa::kAvx512); }

bool decode_amx_allowed() { return env_choice("KVTUNER_DECODE_ISA", kDecodeIsas, true); }

MatrixUnit prefill_unit_cap() { return env_choice("KVTUNER_PREFILL_ISA", kPrefillIsas, MatrixUnit::kAmx); }

int prefill_min_rows(int unset) { return env_positive_int("KVTUNER_PREFILL_MIN_ROWS", unset); }

}  // namespace kvtuner::cpu
