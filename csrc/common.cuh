// Helpers shared by the kernels in csrc/. No torch headers: launchers take raw device pointers, sizes, strides
// and a cudaStream_t, so the extension does not depend on the torch version.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dinov3 {

// Throws std::runtime_error (a Python RuntimeError through pybind11) with the CUDA error string.
#define DINOV3_CUDA_CHECK(expr)                                                                    \
  do {                                                                                             \
    cudaError_t err__ = (expr);                                                                    \
    if (err__ != cudaSuccess) {                                                                    \
      throw std::runtime_error(std::string("dinov3_kernels CUDA error: ") + cudaGetErrorString(err__) + \
                               " at " __FILE__ ":" + std::to_string(__LINE__));                     \
    }                                                                                              \
  } while (0)

// Every launch is followed by this: catches bad configurations at the launch site.
#define DINOV3_CHECK_LAUNCH() DINOV3_CUDA_CHECK(cudaGetLastError())

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Dtype codes shared with Python (dinov3_kernels/_backend.py: CUDA_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16-byte cp.async (sm_80+): global -> shared without a trip through registers, so a tile's loads overlap the math
// on the previous one. `valid` false zero-fills the 16 bytes (src-size 0; `g` must still be a mapped address).
// cp_async_commit closes this thread's batch of copies; cp_async_wait<N> returns once at most N of its batches are
// still in flight. The host emulation (tests/kernels/cuda_emu.h, included before this file) poisons the destination
// at issue and lands a batch only at its wait, so a read before the wait (or its barrier) fails the tests.
#if defined(DINOV3_HOST_EMULATION)
inline void cp_async16(void* s, const void* g, bool valid) { emu::cp_async_16(s, g, valid ? 16 : 0); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async16(void* s, const void* g, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(s));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(g), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace dinov3
