// Host emulation of the CUDA features our kernels use, so their logic is tested without a
// GPU (tests/kernels/test_cuda_emulated.py). A block runs as blockDim OS threads;
// __syncthreads and warp shuffles are barriers, so a lane that skips a barrier or shuffle
// its warp takes deadlocks, and the watchdog aborts. What it cannot check: alignment,
// memory-model races that barriers hide, and the accuracy of device math (host math is used).
// Include before the kernel headers; compile with g++ -std=c++20 -ffp-contract=off.
#pragma once

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// Blocks run one at a time, so a function-local static is the block's shared memory.
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

using std::max;
using std::min;

class EmuBarrier {
 public:
  explicit EmuBarrier(int count) : count_(count) {}

  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "cuda emulator: deadlock (a divergent __syncthreads or shuffle)\n");
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

struct EmuBlock {
  explicit EmuBlock(int threads) : block(threads), lanes(threads) {
    for (int w = 0; w * 32 < threads; ++w) warps.emplace_back(new EmuBarrier(std::min(32, threads - 32 * w)));
  }
  EmuBarrier block;
  std::vector<std::unique_ptr<EmuBarrier>> warps;
  std::vector<float> lanes;  // shuffle exchange
};

inline thread_local EmuBlock* emu_block = nullptr;
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;

inline void __syncthreads() { emu_block->block.wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  emu_block->lanes[tid] = v;
  emu_block->warps[warp]->wait();
  const float other = emu_block->lanes[warp * 32 + (lane ^ offset)];
  emu_block->warps[warp]->wait();
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

// Runs kernel() for every block of the grid, one block at a time.
inline void emu_launch(dim3 grid, int threads, const std::function<void()>& kernel) {
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        EmuBlock block(threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            emu_block = &block;
            threadIdx = dim3(t, 0, 0);
            blockIdx = dim3(x, y, z);
            kernel();
          });
        }
        for (auto& thread : pool) thread.join();
      }
    }
  }
}
