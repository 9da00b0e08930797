// A CPU stand-in for the few CUDA features the kernels of csrc/ use, so that tests/test_csrc.py
// can compile the very same .cu sources as plain C++ (g++ -x c++ -include host_simulator.h) and
// run them on machines without a GPU, through the same C-ABI launchers.
//
// Each block's 256 threads run as fibers on one CPU thread; __syncthreads is a block barrier,
// __shfl_down_sync an exchange through a per-warp barrier, __shared__ variables are static
// (blocks run one after another), __ldcs/__stcs plain accesses, and __expf is modelled as
// exp2f(x * log2 e), which keeps the rounding of its argument that the hardware instruction has.
//
// What this checks: the kernels' indexing (head/body/tail, split-V slices, chunks, strides,
// alignment), their math and reductions, ignored rows, in-place writes. What it cannot: code
// generation for sm_80/sm_90, the memory model, real warp-synchronous execution, performance.
#ifndef PREFOPT_HOST_SIMULATOR_H_
#define PREFOPT_HOST_SIMULATOR_H_

#ifdef __CUDACC__
#error "host_simulator.h is for a plain C++ compiler, not nvcc"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include <ucontext.h>

namespace prefopt_sim {

// The threads of a block are fibers (ucontext) scheduled round-robin on the calling thread: a
// thread runs until it waits at a barrier, then the next one runs. Blocks run one after another.
inline uint3 thread_index;
inline uint3 block_index;

struct Fibers {
  static constexpr size_t kStackBytes = 256 * 1024;
  std::vector<ucontext_t> contexts;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<char> done;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  int current = -1;
  long progress = 0;  // barrier arrivals and finished threads: a round without any is a deadlock
};
inline Fibers fibers;
inline std::mutex launch_mutex;  // one simulated launch at a time

inline void yield() { swapcontext(&fibers.contexts[fibers.current], &fibers.scheduler); }

inline void fiber_entry(int t) {
  (*fibers.body)();
  fibers.done[t] = 1;
  ++fibers.progress;
  swapcontext(&fibers.contexts[t], &fibers.scheduler);
}

struct Barrier {
  explicit Barrier(int count) : count(count) {}
  void wait() {
    const unsigned generation_seen = generation;
    ++fibers.progress;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == generation_seen) yield();
  }
  int count;
  int arrived = 0;
  unsigned generation = 0;
};

struct Block {
  explicit Block(int threads) : sync(threads), lanes(2 * threads), phase(threads, 0) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(std::min(32, threads - 32 * w));
  }
  Barrier sync;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;  // two buffers, alternating per shuffle
  std::vector<int> phase;       // per thread: which buffer its next shuffle uses
};

inline Block* current_block = nullptr;

inline void sync_threads() { current_block->sync.wait(); }

template <typename T>
T shfl_down(unsigned /*mask*/, T value, int offset) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- and 64-bit shuffles only");
  Block& block = *current_block;
  const int t = static_cast<int>(thread_index.x);
  const int warp = t / 32, lane = t % 32;
  const int threads = static_cast<int>(block.phase.size());
  // Double-buffered: a lane writes this buffer again only two shuffles later, after every lane of
  // its warp has passed the next barrier, hence finished reading it.
  uint64_t* buffer = block.lanes.data() + (block.phase[t] ^= 1) * threads;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  buffer[t] = bits;
  block.warps[warp].wait();
  // As on the GPU: a lane whose source is outside the warp gets its own value back.
  const uint64_t got = buffer[lane + offset < 32 ? t + offset : t];
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

template <typename T>
T ldcs(const T* address) { return *address; }

template <typename T>
void stcs(T* address, T value) { *address = value; }

inline float fast_exp(float x) { return exp2f(x * 1.4426950408889634f); }

inline cudaError_t last_error() { return cudaSuccess; }

inline void run_block(int threads, const std::function<void()>& body, uint3 block) {
  while (static_cast<int>(fibers.stacks.size()) < threads) {
    fibers.stacks.emplace_back(new char[Fibers::kStackBytes]);
  }
  fibers.contexts.assign(threads, ucontext_t{});
  fibers.done.assign(threads, 0);
  fibers.body = &body;
  block_index = block;
  for (int t = 0; t < threads; ++t) {
    getcontext(&fibers.contexts[t]);
    fibers.contexts[t].uc_stack.ss_sp = fibers.stacks[t].get();
    fibers.contexts[t].uc_stack.ss_size = Fibers::kStackBytes;
    fibers.contexts[t].uc_link = nullptr;
    makecontext(&fibers.contexts[t], reinterpret_cast<void (*)()>(fiber_entry), 1, t);
  }
  for (int remaining = threads; remaining > 0;) {
    const long progress = fibers.progress;
    for (int t = 0; t < threads; ++t) {
      if (fibers.done[t]) continue;
      fibers.current = t;
      thread_index = make_uint3(static_cast<unsigned>(t), 0, 0);
      swapcontext(&fibers.scheduler, &fibers.contexts[t]);
      remaining -= fibers.done[t];
    }
    if (remaining > 0 && fibers.progress == progress) {
      std::fprintf(stderr, "host simulator: the threads of block (%u, %u, %u) wait on each other forever\n",
                   block.x, block.y, block.z);
      std::abort();
    }
  }
}

template <typename Body>
void launch(dim3 grid, dim3 block, Body body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  std::lock_guard<std::mutex> lock(launch_mutex);
  const std::function<void()> run = body;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block state(threads);
        current_block = &state;
        run_block(threads, run, make_uint3(x, y, z));
        current_block = nullptr;
      }
    }
  }
}

}  // namespace prefopt_sim

namespace prefopt {
using std::max;
using std::min;
}

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx prefopt_sim::thread_index
#define blockIdx prefopt_sim::block_index
#define __syncthreads() prefopt_sim::sync_threads()
#define __shfl_down_sync prefopt_sim::shfl_down
#define __ldcs prefopt_sim::ldcs
#define __stcs prefopt_sim::stcs
#define __expf prefopt_sim::fast_exp
#define cudaGetLastError() prefopt_sim::last_error()
#define PREFOPT_LAUNCH(kernel, grid, block, stream, params) \
  prefopt_sim::launch(dim3(grid), dim3(block), [&] { kernel(params); })

#endif  // PREFOPT_HOST_SIMULATOR_H_
