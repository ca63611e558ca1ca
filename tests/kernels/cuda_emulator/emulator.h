// Host emulation of the CUDA features our kernels use, so their logic is tested without a GPU
// (tests/kernels/test_cuda_emulated.py). The threads of a block are cooperative fibers
// (ucontext) on one OS thread: each runs until its next __syncthreads or warp shuffle, and a
// barrier opens when every thread of its scope (block or warp) waits at one. A thread that
// skips a barrier its block or warp takes leaves the others waiting: the launch fails with
// "deadlock". A failed debug check (KVT_DEVICE_CHECK) fails the launch with its message, as a
// trap fails a real launch. Blocks run one at a time, so a function-local static is the
// block's shared memory. What it cannot check: alignment, races that the barriers hide,
// and the accuracy of device math (host math is used).
// Include before the kernel headers; compile with g++ -std=c++20 -ffp-contract=off.
#pragma once

#define KVTUNER_EMULATOR 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

using std::max;
using std::min;

inline dim3 threadIdx;  // of the fiber running now
inline dim3 blockIdx;

namespace emu {

enum class Wait { kRunnable, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  Wait wait = Wait::kRunnable;
};

// The launch in progress and the first error of the process (sticky, as CUDA's).
struct State {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::vector<float> exchange;  // shuffle values, by thread
  const std::function<void()>* kernel = nullptr;
  std::string error;
};

inline State state;
constexpr size_t kStackBytes = 256 * 1024;

inline void yield(Wait wait) {
  Fiber& fiber = state.fibers[state.current];
  fiber.wait = wait;
  swapcontext(&fiber.context, &state.scheduler);
}

inline void fiber_main() {
  (*state.kernel)();
  yield(Wait::kDone);  // never resumed
}

// Runs the fibers of one block until all are done; false (and state.error) on a deadlock or trap.
inline bool run_block(int threads) {
  for (;;) {
    bool all_done = true;
    for (int t = 0; t < threads; ++t) {
      if (state.fibers[t].wait != Wait::kRunnable) continue;
      state.current = t;
      threadIdx = dim3(unsigned(t), 0, 0);
      swapcontext(&state.scheduler, &state.fibers[t].context);
      if (!state.error.empty()) return false;
    }
    int at_block = 0;
    for (const Fiber& f : state.fibers) {
      at_block += f.wait == Wait::kBlock;
      all_done = all_done && f.wait == Wait::kDone;
    }
    if (all_done) return true;
    bool released = false;
    if (at_block == threads) {
      for (Fiber& f : state.fibers) f.wait = Wait::kRunnable;
      released = true;
    }
    for (int warp = 0; warp * 32 < threads; ++warp) {
      const int end = std::min(threads, warp * 32 + 32);
      bool all = true;
      for (int t = warp * 32; t < end; ++t) all = all && state.fibers[t].wait == Wait::kWarp;
      if (!all) continue;
      for (int t = warp * 32; t < end; ++t) state.fibers[t].wait = Wait::kRunnable;
      released = true;
    }
    if (!released) {
      state.error = "deadlock: a thread skipped a __syncthreads or warp shuffle that others wait at (block " +
                    std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
                    std::to_string(blockIdx.z) + ")";
      return false;
    }
  }
}

// Runs kernel() for every block of the grid, one block at a time. After an error, launches
// do nothing (as after a trap on a GPU).
inline void launch(dim3 grid, int threads, const std::function<void()>& kernel) {
  if (!state.error.empty()) return;
  std::vector<std::unique_ptr<char[]>> stacks;
  for (int t = 0; t < threads; ++t) stacks.emplace_back(new char[kStackBytes]);
  state.fibers.assign(threads, Fiber{});
  state.exchange.assign(threads, 0.0f);
  state.kernel = &kernel;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        for (int t = 0; t < threads; ++t) {
          Fiber& f = state.fibers[t];
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = stacks[t].get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_main, 0);
          f.wait = Wait::kRunnable;
        }
        if (!run_block(threads)) return;
      }
    }
  }
}

}  // namespace emu

inline void __syncthreads() { emu::yield(emu::Wait::kBlock); }

inline void __syncwarp(unsigned = 0xffffffffu) { emu::yield(emu::Wait::kWarp); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const int tid = int(threadIdx.x);
  emu::state.exchange[tid] = v;
  emu::yield(emu::Wait::kWarp);  // every lane has published its value
  const float other = emu::state.exchange[(tid & ~31) | ((tid & 31) ^ offset)];
  emu::yield(emu::Wait::kWarp);  // every lane has read before any lane publishes again
  return other;
}

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The device intrinsics are IEEE round-to-nearest, as host float ops without contraction.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }

template <typename T>
cudaError_t cudaFuncSetAttribute(T*, cudaFuncAttribute, int) {
  return cudaSuccess;  // the emulator's shared memory has no limit
}

#define KVT_LAUNCH(kernel, grid, threads, shared_bytes, stream, ...) \
  emu::launch(grid, threads, [&] { kernel(__VA_ARGS__); })

namespace kvtuner::cuda {

// KVT_DEVICE_CHECK's failure: the launch stops with the message (the fiber is never resumed).
inline void device_check_failed(const char* what, long long value, const char* file, int line) {
  emu::state.error = std::string("kvtuner debug check failed: ") + what + " (value " + std::to_string(value) +
                     ") at " + file + ":" + std::to_string(line);
  emu::yield(emu::Wait::kDone);
}

}  // namespace kvtuner::cuda
