// Just enough of the CUDA runtime for g++ to build and run wkv7.cu on a CPU (tests/kernels/
// test_wkv7_cu_on_cpu.py): each thread block runs as blockDim.x std::threads that meet at
// __syncthreads() through a barrier; blocks run one after another, so `__shared__` can be a function-static
// array (one per kernel instantiation, shared by the block's threads, reused by the next block).
// The test rewrites `kernel<<<grid, block, shmem, stream>>>(args)` as `::cuda_cpu::launch(kernel, grid,
// block, shmem, stream, args)`.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ::cuda_cpu::block_barrier->wait()
#define __expf expf

struct uint3 {
  unsigned x, y, z;
};
inline thread_local uint3 threadIdx, blockIdx;

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error (CPU emulation)"; }

namespace cuda_cpu {

// A reusable barrier for one block's threads.
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      generation_++;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned count_, arrived_ = 0;
  unsigned long generation_ = 0;
};

inline thread_local Barrier* block_barrier = nullptr;

template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, std::size_t, cudaStream_t, A... args) {
  for (unsigned b = 0; b < grid; b++) {
    Barrier barrier(block);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; t++)
      threads.emplace_back([&, t] {
        blockIdx = {b, 0, 0};
        threadIdx = {t, 0, 0};
        block_barrier = &barrier;
        kernel(args...);
      });
    for (auto& thread : threads) thread.join();
  }
}

}  // namespace cuda_cpu
