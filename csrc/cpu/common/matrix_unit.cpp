// matrix_unit.h: CPUID, the OS's enabled register state and, for AMX, the kernel's permission.
// Default target code, safe on any x86-64.
#include "cpu/common/matrix_unit.h"

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVT_PREFILL_X86 1
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace kvtuner::cpu {

namespace {

#if defined(KVT_PREFILL_X86)

uint64_t enabled_register_state() {  // XCR0: the register files the OS saves and restores
  uint32_t eax, edx;
  asm volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// AMX tile data is off for a process until it asks the kernel (Linux >= 5.16; elsewhere we
// leave AMX alone).
bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchRequestXcompPerm = 0x1023;
  constexpr long kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureTileData) == 0;
#else
  return false;
#endif
}

MatrixUnit detect_matrix_unit() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return MatrixUnit::kNone;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave || !fma || !f16c) return MatrixUnit::kNone;
  const uint64_t xcr0 = enabled_register_state();
  constexpr uint64_t kAvx512State = 0xe6;  // SSE, AVX, opmask, upper ZMM halves, ZMM16-31
  constexpr uint64_t kTileState = 0x60000;  // TILECFG, TILEDATA
  if ((xcr0 & kAvx512State) != kAvx512State) return MatrixUnit::kNone;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return MatrixUnit::kNone;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
  const bool amx = (d & (1u << 22)) && (d & (1u << 24));
  unsigned a1, b1, c1, d1;
  if (!avx512 || !__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) || !(a1 & (1u << 5))) return MatrixUnit::kNone;
  if (amx && (xcr0 & kTileState) == kTileState && request_amx_permission()) return MatrixUnit::kAmx;
  return MatrixUnit::kAvx512Bf16;
}

#else

MatrixUnit detect_matrix_unit() { return MatrixUnit::kNone; }

#endif

}  // namespace

MatrixUnit detected_matrix_unit() {
  static const MatrixUnit detected = detect_matrix_unit();
  return detected;
}

}  // namespace kvtuner::cpu
