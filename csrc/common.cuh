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

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace dinov3
