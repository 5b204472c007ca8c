// A CPU emulation of the CUDA execution model, enough to run the real kernels of csrc/ (compiled with
// DINOV3_HOST_EMULATION) on the host: every CUDA thread of a block is an OS thread, blocks run one after another,
// __syncthreads is a block barrier, warp shuffles go through a per-warp exchange buffer between two warp barriers.
// Shared by tests/kernels/gram_cuda_emu.cpp and tests/kernels/koleo_cuda_emu.cpp (each adds its tensor-core
// primitives). Include before the .cu file.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time: a function-local static is the block's shared memory

namespace emu {
struct Warp {
  explicit Warp() : bar(32) {}
  std::barrier<> bar;
  uint32_t u[32];        // shuffles
  uint32_t a[32][4];     // mma.sync operands (gram)
  uint32_t b[32][2];
};
inline thread_local uint3 t_thread;
inline thread_local uint3 t_block;
inline dim3 g_grid;
inline dim3 g_block;
inline std::barrier<>* g_block_bar = nullptr;
inline std::vector<std::unique_ptr<Warp>> g_warps;

inline int lane() { return static_cast<int>(t_thread.x & 31u); }
inline Warp& warp() { return *g_warps[t_thread.x >> 5]; }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

// Value of v in lane src(lane) of this warp; every lane of the warp must call it (full-mask shuffles only).
template <typename V, typename Src>
inline V exchange(unsigned mask, V v, Src src) {
  static_assert(sizeof(V) == 4 && std::is_trivially_copyable_v<V>, "32-bit shuffles only");
  if (mask != 0xffffffffu) fail("only full-warp shuffles are emulated");
  Warp& w = warp();
  const int l = lane();
  std::memcpy(&w.u[l], &v, 4);
  w.bar.arrive_and_wait();
  V r;
  std::memcpy(&r, &w.u[src(l) & 31], 4);
  w.bar.arrive_and_wait();
  return r;
}
}  // namespace emu

#define threadIdx (::emu::t_thread)
#define blockIdx (::emu::t_block)
#define gridDim (::emu::g_grid)
#define blockDim (::emu::g_block)

inline void __syncthreads() { emu::g_block_bar->arrive_and_wait(); }
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  if (width != 32) emu::fail("only width-32 shuffles are emulated");
  return emu::exchange(mask, v, [=](int l) { return l ^ lane_mask; });
}
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32) {
  if (width != 32) emu::fail("only width-32 shuffles are emulated");
  return emu::exchange(mask, v, [=](int) { return src_lane; });
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }  // blocks run in order: earlier blocks' writes are visible
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// kernel<<<grid, block>>>(args...), blocks in order (x fastest), one OS thread per CUDA thread of the block.
template <typename K, typename... Args>
void emu_launch(K* kernel, dim3 grid, dim3 block, Args... args) {
  const unsigned n = block.x;
  if (block.y != 1 || block.z != 1 || grid.z != 1 || n % 32 != 0) emu::fail("only 1-D blocks of whole warps");
  emu::g_grid = grid;
  emu::g_block = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(n);
      emu::g_block_bar = &bar;
      emu::g_warps.clear();
      for (unsigned w = 0; w < n / 32; ++w) emu::g_warps.push_back(std::make_unique<emu::Warp>());
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < n; ++t)
        threads.emplace_back([=] {
          emu::t_thread = make_uint3(t, 0, 0);
          emu::t_block = make_uint3(bx, by, 0);
          kernel(args...);
        });
      for (auto& th : threads) th.join();
    }
}

// extern "C" entry points: std::invalid_argument -> 1 (ValueError in Python), other exceptions -> 2.
template <typename F>
int emu_guarded(char* err, int errlen, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::invalid_argument& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return 2;
  }
}
