// Which matrix unit the CPU offers, detected once per process: the dispatch (attention.cpp,
// launchers.cpp) routes by it and the prefill kernel runs on it. Torch-free.
#pragma once

#include "cpu/common/dispatch_env.h"

namespace kvtuner::cpu {

// The best unit this CPU and OS offer (AMX needs the kernel's permission for tile data,
// requested once).
MatrixUnit detected_matrix_unit();

}  // namespace kvtuner::cpu
