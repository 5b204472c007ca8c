// Runs csrc/gram_loss.cu on the CPU through the CUDA emulation in cuda_emu.h (threads, barriers, shuffles, mma.sync
// from the PTX ISA fragment tables, independently of the kernel).
// Built by tests/kernels/test_gram_cuda.py with the host C++ compiler; entry points are extern "C" for ctypes.
#include "cuda_emu.h"

namespace dinov3 {
namespace {
// The primitives gram_loss.cu expects, on the PTX-table emulations of cuda_emu.h.
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma_m16n8k16<T>(d, a, b[0], b[1]);
}
void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma_m16n8k8_tf32(d, a, b[0], b[1]);
}
using emu::to_tf32;
}  // namespace
}  // namespace dinov3

#define DINOV3_HOST_EMULATION 1
#include "gram_loss.cu"
#undef DINOV3_CHECK_LAUNCH

extern "C" {
long long emu_gram_num_partials(long long G, long long P, char* err, int errlen) {
  long long out = -1;
  if (emu_guarded(err, errlen, [&] { out = dinov3::gram_num_partials(G, P); })) return -1;
  return out;
}

int emu_gram_fwd(uintptr_t s, uintptr_t t, uintptr_t acc_s, uintptr_t acc_t, uintptr_t w_s, uintptr_t w_t,
                 uintptr_t rinv_s, uintptr_t rinv_t, uintptr_t partial, long long G,
                 long long P, long long D, long long sg, long long sp, long long sd, long long tg, long long tp,
                 long long td, int dtype, double scale, double eps, int apply_norm, int clamp_s, int clamp_t,
                 int grad_s, int grad_t, int allow_tf32, char* err, int errlen) {
  return emu_guarded(err, errlen, [&] {
    dinov3::gram_fwd(s, t, acc_s, acc_t, w_s, w_t, rinv_s, rinv_t, partial, G, P, D, sg, sp, sd, tg, tp, td, dtype, scale, eps, apply_norm,
                     clamp_s, clamp_t, grad_s, grad_t, allow_tf32, 0);
  });
}

int emu_gram_norm_bwd(uintptr_t x, uintptr_t gxh, uintptr_t out, long long R, long long D, long long sr, long long sd,
                      int dtype, double eps, int apply_norm, char* err, int errlen) {
  return emu_guarded(err, errlen, [&] { dinov3::gram_norm_bwd(x, gxh, out, R, D, sr, sd, dtype, eps, apply_norm, 0); });
}
}
