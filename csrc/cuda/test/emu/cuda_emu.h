// A host emulation of the parts of the CUDA execution model the fastlars kernels use, so the
// kernel sources (csrc/cuda/*.cu) run unchanged on a machine without a GPU and can be compared
// with the reference backend in CI.
//
// Blocks run one after another. The threads of a block are coroutines (ucontext) on one OS
// thread, switched only at __syncthreads() and at warp shuffles, so __shared__ variables
// (defined `static`) are shared by the block as on the GPU. A barrier that can never complete
// (some threads wait on it while others have exited or wait elsewhere) aborts with a message:
// on a GPU that is a hang or undefined behaviour.
//
// Include this header before any csrc/cuda header, with FASTLARS_CUDA_EMULATION defined.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#ifndef FASTLARS_CUDA_EMULATION
#error "define FASTLARS_CUDA_EMULATION before including cuda_emu.h"
#endif

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

namespace fastlars::emu {

struct Dim3 {
  unsigned x, y, z;
};

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Thread {
  ucontext_t ctx;    // used once, to start the coroutine on its own stack
  jmp_buf resume;    // later switches use _setjmp/_longjmp, which skip the signal-mask syscalls
  bool started = false;
  Wait wait = Wait::kNone;
};

struct Block {
  unsigned threads = 0;
  unsigned index = 0;
  unsigned grid = 0;
  unsigned current = 0;
  std::vector<Thread> t;
  std::vector<float> shfl;  // one slot per thread, for warp shuffles
  std::vector<uint32_t> shfl_bits;  // the same for 32-bit integer shuffles
  ucontext_t scheduler;
  jmp_buf scheduler_jmp;
  const std::function<void()>* body = nullptr;
};

inline Block& block() {
  static Block b;
  return b;
}

inline std::vector<std::vector<char>>& stacks() {
  static std::vector<std::vector<char>> s;
  return s;
}

inline Dim3 thread_idx() { return {block().current, 0, 0}; }
inline Dim3 block_idx() { return {block().index, 0, 0}; }
inline Dim3 block_dim() { return {block().threads, 1, 1}; }
inline Dim3 grid_dim() { return {block().grid, 1, 1}; }

inline void wait_for(Wait w) {
  Block& b = block();
  Thread& me = b.t[b.current];
  me.wait = w;
  if (_setjmp(me.resume) == 0) _longjmp(b.scheduler_jmp, 1);
}

inline void entry() {
  Block& b = block();
  (*b.body)();
  b.t[b.current].wait = Wait::kDone;
  _longjmp(b.scheduler_jmp, 1);  // never returns: the coroutine's stack is simply reused
}

// Runs thread i until it waits or exits.
inline void resume(unsigned i) {
  Block& b = block();
  b.current = i;
  Thread& th = b.t[i];
  if (_setjmp(b.scheduler_jmp) == 0) {
    if (!th.started) {
      th.started = true;
      swapcontext(&b.scheduler, &th.ctx);
    } else {
      _longjmp(th.resume, 1);
    }
  }
}

[[noreturn]] inline void deadlock(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s in block %u: a barrier not every thread can reach\n", what, block().index);
  std::abort();
}

// Main-array accesses of the kernels (multi_tensor_apply.cuh's load/store report each one), so the tests
// can tell which path ran. A misaligned vector access aborts: on a GPU it faults.
struct AccessCounts {
  int64_t vector = 0;  // 16-byte accesses
  int64_t scalar = 0;  // one-element accesses
};

inline AccessCounts& access_counts() {
  static AccessCounts c;
  return c;
}

inline void note_access(const void* p, int bytes, bool vector) {
  if (!vector) {
    ++access_counts().scalar;
    return;
  }
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0) {
    std::fprintf(stderr, "cuda_emu: a %d-byte vector access at %p in block %u is misaligned (a fault on a GPU)\n",
                 bytes, p, block().index);
    std::abort();
  }
  ++access_counts().vector;
}

// Runs `body` as every thread of every block of a 1-D launch.
inline void run_grid(unsigned grid, unsigned threads, const std::function<void()>& body) {
  constexpr size_t kStack = 256 * 1024;  // kernels take their argument tables (up to 32 KB) by value
  Block& b = block();
  b.threads = threads;
  b.grid = grid;
  b.body = &body;
  b.t.assign(threads, Thread{});
  b.shfl.assign(threads, 0.0f);
  b.shfl_bits.assign(threads, 0u);
  if (stacks().size() < threads) stacks().resize(threads, std::vector<char>(kStack));
  for (unsigned blk = 0; blk < grid; ++blk) {
    b.index = blk;
    for (unsigned i = 0; i < threads; ++i) {
      Thread& th = b.t[i];
      th.wait = Wait::kNone;
      th.started = false;
      getcontext(&th.ctx);
      th.ctx.uc_stack.ss_sp = stacks()[i].data();
      th.ctx.uc_stack.ss_size = kStack;
      th.ctx.uc_link = nullptr;
      makecontext(&th.ctx, entry, 0);
    }
    for (;;) {
      bool ran = false;
      for (unsigned i = 0; i < threads; ++i) {
        if (b.t[i].wait != Wait::kNone) continue;
        resume(i);
        ran = true;
      }
      if (ran) continue;
      unsigned done = 0, at_block = 0;
      for (const Thread& th : b.t) {
        done += th.wait == Wait::kDone;
        at_block += th.wait == Wait::kBlock;
      }
      if (done == threads) break;
      bool released = false;
      for (unsigned w = 0; w * 32 < threads; ++w) {  // warps whose every lane waits at a shuffle
        const unsigned first = w * 32, last = first + 32 < threads ? first + 32 : threads;
        unsigned waiting = 0;
        for (unsigned i = first; i < last; ++i) waiting += b.t[i].wait == Wait::kWarp;
        if (waiting == 0) continue;
        if (waiting != last - first) {
          bool others_can_move = false;  // lanes still to arrive may be blocked elsewhere for now
          for (unsigned i = first; i < last; ++i) others_can_move |= b.t[i].wait == Wait::kBlock;
          if (!others_can_move) deadlock("a full-mask warp shuffle without the whole warp");
          continue;
        }
        for (unsigned i = first; i < last; ++i) b.t[i].wait = Wait::kNone;
        released = true;
      }
      if (!released && at_block > 0) {
        if (at_block != threads) deadlock("__syncthreads() not reached by every thread of the block");
        for (Thread& th : b.t) th.wait = Wait::kNone;
        released = true;
      }
      if (!released) deadlock("threads blocked forever");
    }
  }
}

}  // namespace fastlars::emu

#define threadIdx (::fastlars::emu::thread_idx())
#define blockIdx (::fastlars::emu::block_idx())
#define blockDim (::fastlars::emu::block_dim())
#define gridDim (::fastlars::emu::grid_dim())

inline void __syncthreads() { ::fastlars::emu::wait_for(::fastlars::emu::Wait::kBlock); }

// Full-mask shuffle: every lane of the warp must call it (as the kernels do).
inline float __shfl_down_sync(unsigned /*mask*/, float v, int offset) {
  auto& b = ::fastlars::emu::block();
  const unsigned me = b.current;
  b.shfl[me] = v;
  ::fastlars::emu::wait_for(::fastlars::emu::Wait::kWarp);
  const unsigned lane = me % 32;
  const unsigned src = me + offset;
  const float out = (lane + offset < 32 && src < b.threads) ? b.shfl[src] : v;
  ::fastlars::emu::wait_for(::fastlars::emu::Wait::kWarp);  // nobody overwrites a slot before all have read
  return out;
}

// Full-mask butterfly shuffle of a 32-bit integer: lane l gets lane (l ^ lane_mask)'s value.
inline unsigned __shfl_xor_sync(unsigned /*mask*/, unsigned v, int lane_mask) {
  auto& b = ::fastlars::emu::block();
  const unsigned me = b.current;
  b.shfl_bits[me] = v;
  ::fastlars::emu::wait_for(::fastlars::emu::Wait::kWarp);
  const unsigned src = (me / 32) * 32 + ((me % 32) ^ static_cast<unsigned>(lane_mask));
  const unsigned out = src < b.threads ? b.shfl_bits[src] : v;
  ::fastlars::emu::wait_for(::fastlars::emu::Wait::kWarp);
  return out;
}
