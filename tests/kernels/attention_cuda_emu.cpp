// Runs csrc/rope_attention.cu on the CPU through the CUDA emulation in cuda_emu.h (threads, barriers, shuffles,
// ldmatrix and mma.sync from the PTX ISA tables, independently of the kernel; cp.async landing at its wait).
// Built by tests/kernels/test_attention_cuda.py with the host C++ compiler; entry points are extern "C" for ctypes.
#include "cuda_emu.h"

namespace dinov3 {
namespace {
// The primitives rope_attention.cu expects, on the PTX-table emulations of cuda_emu.h.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix_m8n8_x4(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix_m8n8_x4(r, p, true); }
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_m16n8k16<T>(c, a, b0, b1);
}
}  // namespace
}  // namespace dinov3

#define DINOV3_HOST_EMULATION 1
#include "rope_attention.cu"

extern "C" {
int emu_rope_attention_fwd(uintptr_t qkv, uintptr_t sin, uintptr_t cos, uintptr_t k_rot, uintptr_t out, uintptr_t lse,
                           long long B, long long N, long long H, long long Dh, long long num_prefix,
                           long long tab_cols, long long stride_b, long long stride_n, int dtype, double scale,
                           char* err, int errlen) {
  return emu_guarded(err, errlen, [&] {
    dinov3::rope_attention_fwd_cuda(qkv, sin, cos, k_rot, out, lse, B, N, H, Dh, num_prefix, tab_cols, stride_b,
                                    stride_n, dtype, static_cast<float>(scale), 0);
  });
}

int emu_rope_attention_bwd(uintptr_t qkv, uintptr_t sin, uintptr_t cos, uintptr_t out, uintptr_t lse, uintptr_t dout,
                           uintptr_t dqkv, uintptr_t dq_accum, uintptr_t delta, uintptr_t q_rot, long long B,
                           long long N, long long H, long long Dh, long long num_prefix, long long tab_cols,
                           long long stride_b, long long stride_n, int dtype, double scale, char* err, int errlen) {
  return emu_guarded(err, errlen, [&] {
    dinov3::rope_attention_bwd_cuda(qkv, sin, cos, out, lse, dout, dqkv, dq_accum, delta, q_rot, B, N, H, Dh,
                                    num_prefix, tab_cols, stride_b, stride_n, dtype, static_cast<float>(scale), 0);
  });
}
}
