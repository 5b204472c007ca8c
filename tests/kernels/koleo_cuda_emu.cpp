// Runs csrc/koleo_loss.cu on the CPU with the execution model of tests/kernels/cuda_emu.h (threads, barriers, warp
// shuffles). nvcuda::wmma is supplied here: a fragment is opaque in CUDA (the kernel never touches .x[]), so each lane
// holds the whole 16×16 tile and load/mma/store are whole-tile operations, from the WMMA documentation's semantics
// (matrix_a row_major: A[m][k] = p[m*ldm + k]; matrix_b col_major: B[k][n] = p[n*ldm + k]; D = A·B + C with
// half/bf16 operands and float accumulation; mem_row_major store: p[m*ldm + n] = D[m][n]).
// Built by tests/kernels/test_koleo_cuda.py with the host C++ compiler; entry points are extern "C" for ctypes.
#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only the 16x16x16 shape is emulated");
  T x[16][16];  // [row][col] of the tile: A (m, k), B (k, n), C (m, n)
};

// Which warp the lane belongs to does not matter: every lane holds the tile, so no warp exchange is needed; each
// lane reads the operands itself (the kernel's __syncthreads must have made them visible, as on the GPU).
template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) f.x[m][k] = p[m * ldm + k];
}
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.x[k][n] = p[n * ldm + k];
}
template <typename T, typename V>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, V v) {
  for (auto& row : f.x)
    for (auto& e : row) e = static_cast<T>(v);
}

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// Tensor cores: the products of 16-bit operands are exact in float; the 16-term sum is taken exactly (double) and
// rounded once when added to the fp32 accumulator (the hardware's internal order is unspecified, this is the
// most accurate model; the tests' index checks leave a margin for it).
template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "half/bf16 operands");
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      double s = 0.0;
      for (int k = 0; k < 16; ++k) s += static_cast<double>(to_f(a.x[m][k])) * to_f(b.x[k][n]);
      out[m][n] = static_cast<float>(static_cast<double>(c.x[m][n]) + s);
    }
  std::memcpy(d.x, out, sizeof(out));  // d may alias c
}

// Lane l writes the elements e = 16m + n with e % 32 == l: each element once, as the real lanes split the tile.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (layout != mem_row_major) emu::fail("only mem_row_major stores are emulated");
  for (int e = emu::lane(); e < 256; e += 32) p[(e / 16) * ldm + e % 16] = f.x[e / 16][e % 16];
}
}  // namespace wmma
}  // namespace nvcuda

#define DINOV3_HOST_EMULATION 1
#include "koleo_loss.cu"

extern "C" {
long long emu_koleo_num_partials(long long n) { return dinov3::koleo_num_partials(n); }

int emu_koleo_kmax(int topk, char* err, int errlen) {
  int out = -1;
  if (emu_guarded(err, errlen, [&] { out = dinov3::koleo_kmax(topk); })) return -1;
  return out;
}

int emu_koleo_candidates(int topk, int dtype, long long M, int spares, char* err, int errlen) {
  int out = -1;
  if (emu_guarded(err, errlen, [&] { out = dinov3::koleo_candidates(topk, dtype, M, spares); })) return -1;
  return out;
}

int emu_koleo_fwd(uintptr_t s, int dtype, long long M, long long D, long long sm, long long sd, long long offset,
                  long long n, int topk, int candidates, float eps, float pdist_eps, long long splits,
                  uintptr_t part_val, uintptr_t part_idx, uintptr_t norm, uintptr_t u_ws, uintptr_t counter,
                  uintptr_t idx, uintptr_t dist, uintptr_t partial, uintptr_t loss, char* err, int errlen) {
  return emu_guarded(err, errlen, [&] {
    dinov3::koleo_fwd_cuda(reinterpret_cast<const void*>(s), dtype, M, D, sm, sd, offset, n, topk, candidates, eps,
                           pdist_eps, splits, reinterpret_cast<float*>(part_val), reinterpret_cast<int*>(part_idx),
                           reinterpret_cast<float*>(norm), reinterpret_cast<void*>(u_ws),
                           reinterpret_cast<int*>(counter),
                           reinterpret_cast<int64_t*>(idx), reinterpret_cast<float*>(dist),
                           reinterpret_cast<float*>(partial), reinterpret_cast<float*>(loss), nullptr);
  });
}
}
