// Runs csrc/gram_loss.cu on the CPU: every CUDA thread of a block is an OS thread, __syncthreads a block barrier,
// warp shuffles and mma.sync go through per-warp exchange buffers. The mma.sync fragment layouts here are written
// from the PTX ISA tables (independently of the kernel), so the kernel's fragment indexing is checked against them.
// Built by tests/kernels/test_gram_cuda.py with the host C++ compiler; entry points are extern "C" for ctypes.
#include "cuda_emu.h"

namespace dinov3 {
namespace {
// ---- mma.sync, from the PTX ISA fragment tables (groupID = lane / 4, threadID_in_group = lane % 4) ---------------
template <typename T>
float dec16(uint32_t reg, int half) {
  const unsigned short bits = static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffffu);
  if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(bits));
  else return __bfloat162float(__ushort_as_bfloat16(bits));
}

// m16n8k16 .f16/.bf16: A element (m, k) lives in lane (m%8)*4 + (k%8)/2, register (m/8) + 2*(k/8), half k%2;
// B element (k, n) in lane n*4 + (k%8)/2, register k/8, half k%2; C/D element (m, n) in lane (m%8)*4 + n/2,
// register 2*(m/8) + n%2.
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::Warp& w = emu::warp();
  const int l = emu::lane();
  std::memcpy(w.a[l], a, sizeof(a));
  std::memcpy(w.b[l], b, sizeof(b));
  w.bar.arrive_and_wait();
  for (int r = 0; r < 4; ++r) {
    // Which (m, n) this lane's register r holds.
    int m = -1, n = -1;
    for (int mm = 0; mm < 16; ++mm)
      for (int nn = 0; nn < 8; ++nn)
        if ((mm % 8) * 4 + nn / 2 == l && 2 * (mm / 8) + nn % 2 == r) m = mm, n = nn;
    double s = 0.0;
    for (int k = 0; k < 16; ++k) {
      const float av = dec16<T>(w.a[(m % 8) * 4 + (k % 8) / 2][(m / 8) + 2 * (k / 8)], k % 2);
      const float bv = dec16<T>(w.b[n * 4 + (k % 8) / 2][k / 8], k % 2);
      s += static_cast<double>(av) * bv;
    }
    d[r] = static_cast<float>(d[r] + s);
  }
  w.bar.arrive_and_wait();
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to a 10-bit mantissa.
uint32_t to_tf32(float x) {
  uint32_t u = __float_as_uint(x);
  if (std::isfinite(x)) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}

// m16n8k8 .tf32: A (m, k) in lane (m%8)*4 + k%4, register (m/8) + 2*(k/4); B (k, n) in lane n*4 + k%4, register k/4;
// C/D as for m16n8k16.
void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::Warp& w = emu::warp();
  const int l = emu::lane();
  std::memcpy(w.a[l], a, sizeof(a));
  std::memcpy(w.b[l], b, sizeof(b));
  w.bar.arrive_and_wait();
  for (int r = 0; r < 4; ++r) {
    const int m = l / 4 + 8 * (r / 2), n = 2 * (l % 4) + r % 2;
    double s = 0.0;
    for (int k = 0; k < 8; ++k) {
      const float av = __uint_as_float(w.a[(m % 8) * 4 + k % 4][(m / 8) + 2 * (k / 4)]);
      const float bv = __uint_as_float(w.b[n * 4 + k % 4][k / 4]);
      s += static_cast<double>(av) * bv;
    }
    d[r] = static_cast<float>(d[r] + s);
  }
  w.bar.arrive_and_wait();
}
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

int emu_gram_fwd(uintptr_t s, uintptr_t t, uintptr_t acc_s, uintptr_t acc_t, uintptr_t partial, long long G,
                 long long P, long long D, long long sg, long long sp, long long sd, long long tg, long long tp,
                 long long td, int dtype, double scale, double eps, int apply_norm, int clamp_s, int clamp_t,
                 int grad_s, int grad_t, int allow_tf32, char* err, int errlen) {
  return emu_guarded(err, errlen, [&] {
    dinov3::gram_fwd(s, t, acc_s, acc_t, partial, G, P, D, sg, sp, sd, tg, tp, td, dtype, scale, eps, apply_norm,
                     clamp_s, clamp_t, grad_s, grad_t, allow_tf32, 0);
  });
}

int emu_gram_norm_bwd(uintptr_t x, uintptr_t gxh, uintptr_t out, long long R, long long D, long long sr, long long sd,
                      int dtype, double eps, int apply_norm, char* err, int errlen) {
  return emu_guarded(err, errlen, [&] { dinov3::gram_norm_bwd(x, gxh, out, R, D, sr, sd, dtype, eps, apply_norm, 0); });
}
}
