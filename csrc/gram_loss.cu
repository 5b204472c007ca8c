// Fused Gram-anchoring loss, CUDA backend. Same algorithm and contract as dinov3_kernels/_triton/gram.py:
//
//   _gram_fwd_kernel, per group g and tile pair (i <= j) of the P x P Gram matrices (one CTA each; the Gram tiles are
//   never stored to global memory):
//     Gs = diag(r_si) S_i S_jᵀ diag(r_sj),  Gt likewise,  r = 1 / max(|x|, eps) (1 without apply_norm)
//     E  = clamp(Gs) - clamp(Gt) on valid rows/cols,  partial[g, pair] = (1 or 2) * Σ E²
//     W_s = E where not (clamp_s and Gs < 0), else 0;  W_t = -E where not (clamp_t and Gt < 0)
//     stores the 64x64 tile W (in the input dtype) of the pairs i <= j, and r of the rows of block i (from the
//     diagonal pair), for the inputs that get a gradient;
//   _gram_grad_kernel, per group, row block i and 64 columns of D (one CTA each): acc[rows_i] = scale * Σ_j W_ij X̂_j
//     with W_ij the stored tile, or the transpose of W_ji for j < i, and X̂ = X * r staged in the input dtype: every
//     gradient element is written once by one CTA, so the result is deterministic (no atomics). 16-bit: step j + 1's
//     W tile and X chunk are copied with cp.async while step j multiplies (two stages);
//   then gram_norm_bwd turns the fp32 gradient w.r.t. x̂ into the gradient w.r.t. x.
//
// Tensor cores: bf16/fp16 use mma.sync m16n8k16 (fp32 accumulation); fp32 uses IEEE SIMT FMAs, or mma.sync m16n8k8 on
// TF32 when allow_tf32. The gradient dot multiplies W (rounded to the input dtype) by Ŝ = S * r staged in the input
// dtype; scaling the rows rather than W keeps fp16 finite when a row norm is tiny.
#include "common.cuh"
#include "gram_tiling.cuh"

namespace dinov3 {
namespace {

using gram::frag_col;
using gram::frag_row;
using gram::kGradChunk;
using gram::kThreads;
using gram::kTile;

// ---- element packing ----------------------------------------------------------------------------------------------
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kVec = 4;  // elements per 16 bytes
  __device__ static float load(const float* p) { return *p; }
  __device__ static void unpack(const uint4& u, float (&f)[4]) {
    f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y); f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float (&f)[4]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};
template <typename T16>
struct Elem16 {
  static constexpr int kVec = 8;
  __device__ static float load(const T16* p) { return to_float<T16>(*p); }
  __device__ static float lo(uint32_t w) { return to_float<T16>(bits_to(static_cast<unsigned short>(w & 0xffffu))); }
  __device__ static float hi(uint32_t w) { return to_float<T16>(bits_to(static_cast<unsigned short>(w >> 16))); }
  __device__ static uint32_t two(float a, float b) {  // element a in the low half, as mma.sync expects
    return static_cast<uint32_t>(to_bits(from_float<T16>(a))) | (static_cast<uint32_t>(to_bits(from_float<T16>(b))) << 16);
  }
  __device__ static void unpack(const uint4& u, float (&f)[8]) {
    f[0] = lo(u.x); f[1] = hi(u.x); f[2] = lo(u.y); f[3] = hi(u.y);
    f[4] = lo(u.z); f[5] = hi(u.z); f[6] = lo(u.w); f[7] = hi(u.w);
  }
  __device__ static uint4 pack(const float (&f)[8]) {
    return make_uint4(two(f[0], f[1]), two(f[2], f[3]), two(f[4], f[5]), two(f[6], f[7]));
  }
  __device__ static T16 bits_to(unsigned short b);
  __device__ static unsigned short to_bits(T16 v);
};
template <>
__device__ __forceinline__ __half Elem16<__half>::bits_to(unsigned short b) { return __ushort_as_half(b); }
template <>
__device__ __forceinline__ unsigned short Elem16<__half>::to_bits(__half v) { return __half_as_ushort(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 Elem16<__nv_bfloat16>::bits_to(unsigned short b) { return __ushort_as_bfloat16(b); }
template <>
__device__ __forceinline__ unsigned short Elem16<__nv_bfloat16>::to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <>
struct Elem<__half> : Elem16<__half> {};
template <>
struct Elem<__nv_bfloat16> : Elem16<__nv_bfloat16> {};

// ---- tensor-core primitives ----------------------------------------------------------------------------------------
#if defined(DINOV3_HOST_EMULATION)
// tests/kernels/gram_cuda_emu.cpp runs these kernels on the CPU and supplies mma_16816, mma_1688_tf32 and to_tf32,
// emulated from the PTX ISA fragment layouts.
#else
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif  // DINOV3_HOST_EMULATION

__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t lds16(const void* p) { return *reinterpret_cast<const unsigned short*>(p); }

// ---- shared memory --------------------------------------------------------------------------------------------------
// Row pitches padded so the fragment reads of a warp hit distinct banks.
// kFwdStages: 2 in the forward (its pipeline), 1 in the gradient kernel (which only needs the union's size).
template <typename T, int kFwdStages = 2>
struct Smem {
  static constexpr bool kIs16 = sizeof(T) == 2;
  static constexpr int kChunk = gram::gram_chunk(sizeof(T));
  static constexpr int kLdA = kChunk + (kIs16 ? 8 : 4);       // forward operand tiles (T)
  static constexpr int kLdW = kTile + (kIs16 ? 8 : 1);        // W (T; odd fp32 pitch: staged transposed too)
  static constexpr int kLdX = kGradChunk + (kIs16 ? 8 : 4);   // staged X̂ chunk of the gradient (T)
  // Every array starts 16-byte aligned: staging writes 16-byte vectors.
  // Two stages of the forward's operand tiles: chunk c + 1 is copied (cp.async) while chunk c is multiplied. Rows of
  // kLdA elements are 80 bytes in every dtype, so each staged 16-byte vector is aligned.
  struct FwdStage {
    alignas(16) T si[kTile * kLdA];
    alignas(16) T sj[kTile * kLdA];
    alignas(16) T ti[kTile * kLdA];
    alignas(16) T tj[kTile * kLdA];
  };
  struct Fwd {
    FwdStage stage[kFwdStages];
  };
  // The gradient kernel's stages: two in 16-bit (step j + 1's W tile and X chunk copied with cp.async while step j
  // multiplies; W as stored, its transpose taken by the fragment loads), one in fp32 (two would pass the 48 KB of
  // static shared memory; W_jiᵀ written transposed as staged).
  static constexpr int kGradStages = kIs16 ? 2 : 1;
  struct Grad {
    alignas(16) T x[kGradStages][kTile * kLdX];
    alignas(16) T w[kGradStages][kTile * kLdW];
  };
  union __align__(16) {
    Fwd fwd;
    Grad grad;
  } u;
  float rinv[4][kTile];  // forward: 1/max(|x|, eps) of rows s_i, s_j, t_i, t_j (1 without apply_norm)
  float red[kThreads / 32];
};
static_assert(sizeof(Smem<float>) <= 48 * 1024 && sizeof(Smem<__half>) <= 48 * 1024, "over the static smem limit");
template <typename T>
using GradSmem = Smem<T, 1>;

// ---- staging: global (any strides) -> shared --------------------------------------------------------------------
// Rows row0.. of a (P, D) slice, columns k0..k0+COLS, zero outside. vec_ok: stride_d == 1 and every row start 16-byte
// aligned, so in-range 16-byte groups load as one vector. SCALE: each row is scaled by rscale[row] before rounding to
// T. ASYNC (no SCALE): in-range 16-byte groups are copied with cp.async (the caller commits and waits); the rest is
// stored synchronously, visible after the same barrier.
template <typename T, int COLS, int LD, bool SCALE, bool ASYNC = false>
__device__ __forceinline__ void stage_tile(T* dst, const T* src, int64_t stride_p, int64_t stride_d, int row0, int P,
                                           int k0, int D, bool vec_ok, const float* rscale) {
  static_assert(!ASYNC || (!SCALE && LD * sizeof(T) % 16 == 0), "cp.async copies raw, aligned vectors");
  constexpr int VEC = Elem<T>::kVec;
  using Map = gram::StageMap<COLS, VEC>;
  const int tid = threadIdx.x;
  const int kc = Map::col(tid);
  const int gk = k0 + kc;
#pragma unroll
  for (int p = 0; p < Map::kPasses; ++p) {
    const int r = Map::row(tid, p);
    const int grow = row0 + r;
    float f[VEC];
    if (grow < P) {
      const T* rp = src + static_cast<int64_t>(grow) * stride_p;
      if (ASYNC && vec_ok && gk + VEC <= D) {
        cp_async16(dst + r * LD + kc, rp + gk, true);
        continue;
      }
      if (vec_ok && gk + VEC <= D) {
        Elem<T>::unpack(__ldg(reinterpret_cast<const uint4*>(rp + gk)), f);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) f[e] = gk + e < D ? Elem<T>::load(rp + static_cast<int64_t>(gk + e) * stride_d) : 0.f;
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) f[e] = 0.f;
    }
    if (SCALE) {
      const float s = rscale[r];
#pragma unroll
      for (int e = 0; e < VEC; ++e) f[e] *= s;
    }
    *reinterpret_cast<uint4*>(dst + r * LD + kc) = Elem<T>::pack(f);
  }
}

// Per-row sums of squares of the raw values of a staged tile (each thread the rows and columns it staged): the forward
// copies its tiles with cp.async, past the registers, so the norms are read back from shared memory.
template <typename T, int COLS, int LD>
__device__ __forceinline__ void tile_sq(const T* tile, float (&sq)[gram::StageMap<COLS, Elem<T>::kVec>::kPasses]) {
  constexpr int VEC = Elem<T>::kVec;
  using Map = gram::StageMap<COLS, VEC>;
  const int kc = Map::col(threadIdx.x);
#pragma unroll
  for (int p = 0; p < Map::kPasses; ++p) {
    float f[VEC];
    Elem<T>::unpack(*reinterpret_cast<const uint4*>(tile + Map::row(threadIdx.x, p) * LD + kc), f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) sq[p] = fmaf(f[e], f[e], sq[p]);
  }
}

// Scales, in place, the 16-byte vectors of a staged tile this thread staged (the same map as stage_tile) by their
// row's factor, rounding to T: after the thread's cp.async copies have landed, what SCALE staging gives.
template <typename T, int COLS, int LD>
__device__ __forceinline__ void scale_rows(T* tile, const float* rscale) {
  constexpr int VEC = Elem<T>::kVec;
  using Map = gram::StageMap<COLS, VEC>;
  const int kc = Map::col(threadIdx.x);
#pragma unroll
  for (int p = 0; p < Map::kPasses; ++p) {
    const int r = Map::row(threadIdx.x, p);
    uint4* v = reinterpret_cast<uint4*>(tile + r * LD + kc);
    float f[VEC];
    Elem<T>::unpack(*v, f);
    const float s = rscale[r];
#pragma unroll
    for (int e = 0; e < VEC; ++e) f[e] *= s;
    *v = Elem<T>::pack(f);
  }
}

// ---- warp-tile products: acc[mi][ni][c] at (frag_row, frag_col) of the 64x64 output ---------------------------------
// Gram step: acc += A Bᵀ over kChunk columns, A and B both (64, kChunk) row-major in shared memory.
template <typename T, bool TF32>
__device__ __forceinline__ void gram_step(float (&acc)[2][4][4], const T* a, const T* b, int warp, int lane) {
  constexpr int LD = Smem<T>::kLdA;
  constexpr int kChunk = Smem<T>::kChunk;
  const int g = lane >> 2, t = lane & 3;
  const int rbase = (warp >> 1) * 32 + g, nbase = (warp & 1) * 32 + g;
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += 16) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const T* p = a + (rbase + mi * 16) * LD + kk + 2 * t;
        af[mi][0] = lds32(p);
        af[mi][1] = lds32(p + 8 * LD);
        af[mi][2] = lds32(p + 8);
        af[mi][3] = lds32(p + 8 * LD + 8);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const T* p = b + (nbase + ni * 8) * LD + kk + 2 * t;
        bf[ni][0] = lds32(p);
        bf[ni][1] = lds32(p + 8);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  } else {
    if constexpr (TF32) {
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += 8) {
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const float* p = a + (rbase + mi * 16) * LD + kk + t;
          af[mi][0] = to_tf32(p[0]);
          af[mi][1] = to_tf32(p[8 * LD]);
          af[mi][2] = to_tf32(p[4]);
          af[mi][3] = to_tf32(p[8 * LD + 4]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const float* p = b + (nbase + ni * 8) * LD + kk + t;
          bf[ni][0] = to_tf32(p[0]);
          bf[ni][1] = to_tf32(p[4]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_1688_tf32(acc[mi][ni], af[mi], bf[ni]);
      }
    } else {
      // IEEE fp32: each thread owns a 4x8 block of outputs (rows rbase + {0,8,16,24}, cols 2t.. of each n8 group).
      const int cbase = (warp & 1) * 32 + 2 * t;
#pragma unroll 1
      for (int k = 0; k < kChunk; k += 4) {
        float4 av[2][2], bv[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) av[mi][h] = *reinterpret_cast<const float4*>(a + (rbase + mi * 16 + 8 * h) * LD + k);
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) bv[ni][e] = *reinterpret_cast<const float4*>(b + (cbase + ni * 8 + e) * LD + k);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const float4 x = av[mi][c >> 1], y = bv[ni][c & 1];
              float s = acc[mi][ni][c];
              s = fmaf(x.x, y.x, s);
              s = fmaf(x.y, y.y, s);
              s = fmaf(x.z, y.z, s);
              s = fmaf(x.w, y.w, s);
              acc[mi][ni][c] = s;
            }
      }
    }
  }
}

// Gradient step: out += W X̂ over the 64 rows of X̂, W (64, 64) and X̂ (64, kGradChunk) in shared memory. 16-bit:
// `w_s` holds the stored tile, W_ij, or W_ji with TRANS (then W = W_jiᵀ: the A fragments read it by columns); fp32: W
// itself (transposed when staged).
template <typename T, bool TF32, bool TRANS = false>
__device__ __forceinline__ void grad_step(float (&out)[2][4][4], const T* w_s, const T* x, int warp, int lane) {
  constexpr int LDW = Smem<T>::kLdW;
  constexpr int LDX = Smem<T>::kLdX;
  const int g = lane >> 2, t = lane & 3;
  const int rbase = (warp >> 1) * 32 + g;
  if constexpr (sizeof(T) == 2) {
    const T* a = w_s;
    const int nbase = (warp & 1) * 32 + g;
#pragma unroll
    for (int kk = 0; kk < kTile; kk += 16) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        if constexpr (!TRANS) {
          const T* p = a + (rbase + mi * 16) * LDW + kk + 2 * t;
          af[mi][0] = lds32(p);
          af[mi][1] = lds32(p + 8 * LDW);
          af[mi][2] = lds32(p + 8);
          af[mi][3] = lds32(p + 8 * LDW + 8);
        } else {
          // A(r, k) = W_ji[k][r]: the two k-consecutive elements of a register come from two rows of the tile.
          const T* p = a + (kk + 2 * t) * LDW + rbase + mi * 16;
          af[mi][0] = lds16(p) | (lds16(p + LDW) << 16);
          af[mi][1] = lds16(p + 8) | (lds16(p + LDW + 8) << 16);
          af[mi][2] = lds16(p + 8 * LDW) | (lds16(p + 9 * LDW) << 16);
          af[mi][3] = lds16(p + 8 * LDW + 8) | (lds16(p + 9 * LDW + 8) << 16);
        }
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        // B(k, n) = X[k][n]: the two k-consecutive elements of a register come from two rows of X.
        const T* p = x + (kk + 2 * t) * LDX + nbase + ni * 8;
        bf[ni][0] = lds16(p) | (lds16(p + LDX) << 16);
        bf[ni][1] = lds16(p + 8 * LDX) | (lds16(p + 9 * LDX) << 16);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<T>(out[mi][ni], af[mi], bf[ni]);
    }
  } else {
    const float* w = w_s;
    auto wa = [&](int r, int k) { return w[r * LDW + k]; };
    if constexpr (TF32) {
      const int nbase = (warp & 1) * 32 + g;
#pragma unroll 2
      for (int kk = 0; kk < kTile; kk += 8) {
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int r = rbase + mi * 16;
          af[mi][0] = to_tf32(wa(r, kk + t));
          af[mi][1] = to_tf32(wa(r + 8, kk + t));
          af[mi][2] = to_tf32(wa(r, kk + t + 4));
          af[mi][3] = to_tf32(wa(r + 8, kk + t + 4));
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          bf[ni][0] = to_tf32(x[(kk + t) * LDX + nbase + ni * 8]);
          bf[ni][1] = to_tf32(x[(kk + t + 4) * LDX + nbase + ni * 8]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_1688_tf32(out[mi][ni], af[mi], bf[ni]);
      }
    } else {
      const int cbase = (warp & 1) * 32 + 2 * t;
#pragma unroll 2
      for (int k = 0; k < kTile; ++k) {
        float av[2][2];
        float2 bv[4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) av[mi][h] = wa(rbase + mi * 16 + 8 * h, k);
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) bv[ni] = *reinterpret_cast<const float2*>(x + k * LDX + cbase + ni * 8);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            out[mi][ni][0] = fmaf(av[mi][0], bv[ni].x, out[mi][ni][0]);
            out[mi][ni][1] = fmaf(av[mi][0], bv[ni].y, out[mi][ni][1]);
            out[mi][ni][2] = fmaf(av[mi][1], bv[ni].x, out[mi][ni][2]);
            out[mi][ni][3] = fmaf(av[mi][1], bv[ni].y, out[mi][ni][3]);
          }
      }
    }
  }
}

struct FwdArgs {
  const void* s;
  const void* t;
  void* w_s;      // (G, num_pairs, 64, 64) in T: W_s of every tile pair (written when grad_s)
  void* w_t;      // the same for W_t (when grad_t)
  float* rinv_s;  // (G, nb * 64): r of every row of S, padded rows included (when grad_s)
  float* rinv_t;  // the same for T (when grad_t)
  float* partial;
  int G, P, D, nb;
  int64_t s_stride_g, s_stride_p, s_stride_d, t_stride_g, t_stride_p, t_stride_d;
  int64_t num_pairs;
  float eps;
  bool apply_norm, clamp_s, clamp_t, grad_s, grad_t, s_vec_ok, t_vec_ok;
};

// Launch bounds: with none ptxas took 128 registers and spilled 12 B (IEEE fp32, sm_90a); 3 CTAs/SM (<= 170 registers)
// spilled 12 B for TF32 on sm_80, so fp32 asks for 2 (it runs at 3 on sm_90a, 168 registers) and 16-bit for 3 (4
// spilled 24 B in bf16).
template <typename T, bool TF32>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 2 ? 3 : 2) _gram_fwd_kernel(const FwdArgs args) {
  __shared__ Smem<T> sm;
  constexpr int LDA = Smem<T>::kLdA;
  constexpr int kChunk = Smem<T>::kChunk;
  using Map = gram::StageMap<kChunk, Elem<T>::kVec>;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t pid = blockIdx.x;
  int i, j;
  gram::tile_pair(pid, i, j);
  const int P = args.P, D = args.D;
  const T* s_base = static_cast<const T*>(args.s);
  const T* t_base = static_cast<const T*>(args.t);

  for (int g = blockIdx.y; g < args.G; g += gridDim.y) {
    const T* s_g = s_base + static_cast<int64_t>(g) * args.s_stride_g;
    const T* t_g = t_base + static_cast<int64_t>(g) * args.t_stride_g;

    float acc_s[2][4][4], acc_t[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc_s[mi][ni][c] = acc_t[mi][ni][c] = 0.f;
    // Sums of squares of the rows this thread stages: [s_i, s_j, t_i, t_j][pass].
    float sq[4][Map::kPasses];
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int p = 0; p < Map::kPasses; ++p) sq[q][p] = 0.f;

    // The four operand tiles of chunk k0 into stage st (cp.async where the rows allow it).
    auto stage_chunk = [&](typename Smem<T>::FwdStage& st, int k0) {
      stage_tile<T, kChunk, LDA, false, true>(st.si, s_g, args.s_stride_p, args.s_stride_d, i * kTile, P, k0, D,
                                              args.s_vec_ok, nullptr);
      stage_tile<T, kChunk, LDA, false, true>(st.sj, s_g, args.s_stride_p, args.s_stride_d, j * kTile, P, k0, D,
                                              args.s_vec_ok, nullptr);
      stage_tile<T, kChunk, LDA, false, true>(st.ti, t_g, args.t_stride_p, args.t_stride_d, i * kTile, P, k0, D,
                                              args.t_vec_ok, nullptr);
      stage_tile<T, kChunk, LDA, false, true>(st.tj, t_g, args.t_stride_p, args.t_stride_d, j * kTile, P, k0, D,
                                              args.t_vec_ok, nullptr);
    };
    // Stage 0 is free: every thread passed the barrier ending the previous group's last chunk.
    stage_chunk(sm.u.fwd.stage[0], 0);
    cp_async_commit();
    for (int k0 = 0, c = 0; k0 < D; k0 += kChunk, ++c) {
      if (k0 + kChunk < D) stage_chunk(sm.u.fwd.stage[(c + 1) & 1], k0 + kChunk);
      cp_async_commit();  // possibly empty: one group per chunk
      cp_async_wait<1>();
      __syncthreads();  // chunk c has landed for every thread
      const typename Smem<T>::FwdStage& st = sm.u.fwd.stage[c & 1];
      tile_sq<T, kChunk, LDA>(st.si, sq[0]);
      tile_sq<T, kChunk, LDA>(st.sj, sq[1]);
      tile_sq<T, kChunk, LDA>(st.ti, sq[2]);
      tile_sq<T, kChunk, LDA>(st.tj, sq[3]);
      gram_step<T, TF32>(acc_s, st.si, st.sj, warp, lane);
      gram_step<T, TF32>(acc_t, st.ti, st.tj, warp, lane);
      __syncthreads();  // every read of this stage is done before chunk c + 2 is copied into it
    }
    cp_async_wait<0>();  // the last (empty) group

    // Row norms: the lanes staging one row are consecutive lanes of one warp.
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int p = 0; p < Map::kPasses; ++p) {
        float v = sq[q][p];
#pragma unroll
        for (int off = Map::kLanesPerRow / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (tid % Map::kLanesPerRow == 0)
          sm.rinv[q][Map::row(tid, p)] = args.apply_norm ? 1.f / fmaxf(sqrtf(v), args.eps) : 1.f;
      }
    __syncthreads();

    // E and the gradient weights, in place: acc_s <- W_s, acc_t <- W_t.
    float lsum = 0.f;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int r = frag_row(warp, lane, mi, c), col = frag_col(warp, lane, ni, c);
          const float gs = acc_s[mi][ni][c] * sm.rinv[0][r] * sm.rinv[1][col];
          const float gt = acc_t[mi][ni][c] * sm.rinv[2][r] * sm.rinv[3][col];
          // x < 0 ? 0 : x rather than fmaxf: NaN must propagate as in the reference.
          const bool neg_s = args.clamp_s && gs < 0.f;
          const bool neg_t = args.clamp_t && gt < 0.f;
          const float cs = neg_s ? 0.f : gs;
          const float ct = neg_t ? 0.f : gt;
          const bool valid = i * kTile + r < P && j * kTile + col < P;
          const float e = valid ? cs - ct : 0.f;
          lsum = fmaf(e, e, lsum);
          acc_s[mi][ni][c] = neg_s ? 0.f : e;
          acc_t[mi][ni][c] = neg_t ? 0.f : -e;
        }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) lsum += __shfl_xor_sync(0xffffffffu, lsum, off);
    if (lane == 0) sm.red[warp] = lsum;
    __syncthreads();
    if (tid == 0) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) total += sm.red[w];
      // An off-diagonal tile stands for itself and its transpose.
      args.partial[static_cast<int64_t>(g) * args.num_pairs + pid] = total * (i == j ? 1.f : 2.f);
    }

    // W of this pair, and r of block i from the diagonal pair, for the gradient kernel.
    const int64_t w_off = (static_cast<int64_t>(g) * args.num_pairs + pid) * (kTile * kTile);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (!(q == 0 ? args.grad_s : args.grad_t)) continue;
      T* w_g = static_cast<T*>(q == 0 ? args.w_s : args.w_t) + w_off;
      const float(&w)[2][4][4] = q == 0 ? acc_s : acc_t;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            w_g[frag_row(warp, lane, mi, c) * kTile + frag_col(warp, lane, ni, c)] = from_float<T>(w[mi][ni][c]);
      if (i == j && tid < kTile)
        (q == 0 ? args.rinv_s : args.rinv_t)[static_cast<int64_t>(g) * args.nb * kTile + i * kTile + tid] =
            sm.rinv[2 * q][tid];
    }
  }
}

struct GradArgs {
  const void* x;     // S or T, (G, P, D) with any strides
  const void* w;     // the W tiles the forward wrote, (G, num_pairs, 64, 64) in T
  const float* rinv; // (G, nb * 64)
  float* acc;        // (G, P, D) contiguous fp32: the gradient w.r.t. x̂, every element written once
  int G, P, D, nb, nd;  // nb row blocks, nd = ceil(D / kGradChunk) column chunks
  int64_t stride_g, stride_p, stride_d, num_pairs;
  float scale;
  bool vec_ok;
};

// One CTA per (row block i, column chunk), looping over the groups on grid axis y: acc[rows_i, chunk] =
// scale * Σ_j W_ij X̂_j[:, chunk], summed in a fixed order of j.
template <typename T, bool TF32>
__global__ void __launch_bounds__(kThreads) _gram_grad_kernel(const GradArgs args) {
  __shared__ GradSmem<T> sm;
  constexpr int LDW = Smem<T>::kLdW;
  constexpr int LDX = Smem<T>::kLdX;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int i = static_cast<int>(blockIdx.x) / args.nd;
  const int d0 = (static_cast<int>(blockIdx.x) % args.nd) * kGradChunk;
  const int P = args.P, D = args.D;
  for (int g = blockIdx.y; g < args.G; g += gridDim.y) {
    const T* x_g = static_cast<const T*>(args.x) + static_cast<int64_t>(g) * args.stride_g;
    const T* w_g = static_cast<const T*>(args.w) + static_cast<int64_t>(g) * args.num_pairs * (kTile * kTile);
    const float* rinv_g = args.rinv + static_cast<int64_t>(g) * args.nb * kTile;
    float out[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) out[mi][ni][c] = 0.f;
    if constexpr (sizeof(T) == 2) {
      // Two stages: step j + 1's W tile (as stored: W_ij, or W_ji for j < i, transposed by the fragment loads) and
      // raw X chunk are copied with cp.async while step j multiplies; each thread scales the X vectors it staged by
      // the rows' r once they land (x̂ = x r rounded to T, as the one-stage path stages it).
      auto issue = [&](int j, int st) {
        const bool trans = j < i;  // only pairs i <= j are stored: W_ij = W_jiᵀ
        const T* src = w_g + gram::pair_index(trans ? j : i, trans ? i : j) * (kTile * kTile);
        constexpr int kPerRow = kTile * static_cast<int>(sizeof(T)) / 16;  // 16-byte vectors per tile row
        for (int e = tid; e < kTile * kPerRow; e += kThreads) {
          const int r = e / kPerRow, c = (e % kPerRow) * (16 / static_cast<int>(sizeof(T)));
          cp_async16(sm.u.grad.w[st] + r * LDW + c, src + r * kTile + c, true);
        }
        stage_tile<T, kGradChunk, LDX, false, true>(sm.u.grad.x[st], x_g, args.stride_p, args.stride_d, j * kTile, P,
                                                    d0, D, args.vec_ok, nullptr);
      };
      // Stage 0 is free: every thread passed the barrier ending the previous group's last step.
      issue(0, 0);
      cp_async_commit();
      for (int j = 0; j < args.nb; ++j) {
        if (j + 1 < args.nb) issue(j + 1, (j + 1) & 1);
        cp_async_commit();  // possibly empty: one group per step
        cp_async_wait<1>();  // this thread's copies of step j have landed
        scale_rows<T, kGradChunk, LDX>(sm.u.grad.x[j & 1], rinv_g + j * kTile);
        __syncthreads();  // step j's tiles are complete and scaled for every thread
        if (j < i)
          grad_step<T, TF32, true>(out, sm.u.grad.w[j & 1], sm.u.grad.x[j & 1], warp, lane);
        else
          grad_step<T, TF32, false>(out, sm.u.grad.w[j & 1], sm.u.grad.x[j & 1], warp, lane);
        __syncthreads();  // every read of this stage is done before step j + 2 is copied into it
      }
      cp_async_wait<0>();  // the last (empty) group
    } else {
      for (int j = 0; j < args.nb; ++j) {
        const bool trans = j < i;  // only pairs i <= j are stored: W_ij = W_jiᵀ
        const T* src = w_g + gram::pair_index(trans ? j : i, trans ? i : j) * (kTile * kTile);
        __syncthreads();  // the previous step's readers are done
        // Coalesced reads of the stored tile; the transpose is taken on the shared-memory side.
        for (int e = tid; e < kTile * kTile; e += kThreads) {
          const int r = e / kTile, c = e % kTile;
          sm.u.grad.w[0][trans ? c * LDW + r : r * LDW + c] = src[e];
        }
        stage_tile<T, kGradChunk, LDX, true>(sm.u.grad.x[0], x_g, args.stride_p, args.stride_d, j * kTile, P, d0, D,
                                             args.vec_ok, rinv_g + j * kTile);
        __syncthreads();
        grad_step<T, TF32>(out, sm.u.grad.w[0], sm.u.grad.x[0], warp, lane);
      }
    }
    float* acc_g = args.acc + static_cast<int64_t>(g) * P * D;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int grow = i * kTile + frag_row(warp, lane, mi, c);
          const int gd = d0 + frag_col(warp, lane, ni, c);
          if (grow < P && gd < D) acc_g[static_cast<int64_t>(grow) * D + gd] = args.scale * out[mi][ni][c];
        }
  }
}

// One warp per row: x̂ = x / max(|x|, eps) -> dx = (g - x̂ (x̂·g)) / |x| if |x| > eps, else g / eps; dx = g without
// apply_norm. gxh and out are contiguous (R, D); x has any strides.
constexpr int kNormRowsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kNormRowsPerBlock * 32)
    _gram_norm_bwd_kernel(const T* __restrict__ x, const float* __restrict__ gxh, T* __restrict__ out, int64_t R,
                          int D, int64_t stride_r, int64_t stride_d, float eps, bool apply_norm) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormRowsPerBlock + (threadIdx.x >> 5);
  if (row >= R) return;  // whole warps leave together; no block-level barrier follows
  const T* xr = x + row * stride_r;
  const float* gr = gxh + row * D;
  T* orow = out + row * D;
  float r = 1.f, proj = 0.f;
  if (apply_norm) {
    float sq = 0.f, xg = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float xv = Elem<T>::load(xr + static_cast<int64_t>(d) * stride_d);
      sq = fmaf(xv, xv, sq);
      xg = fmaf(xv, gr[d], xg);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      sq += __shfl_xor_sync(0xffffffffu, sq, off);
      xg += __shfl_xor_sync(0xffffffffu, xg, off);
    }
    const float norm = sqrtf(sq);
    r = 1.f / fmaxf(norm, eps);
    // Below eps the clamp is active and the norm carries no gradient.
    proj = norm > eps ? xg * r * r * r : 0.f;
  }
  for (int d = lane; d < D; d += 32) {
    const float gv = gr[d];
    float v = gv;
    if (apply_norm) v = gv * r - Elem<T>::load(xr + static_cast<int64_t>(d) * stride_d) * proj;
    orow[d] = from_float<T>(v);
  }
}

// ---- host side --------------------------------------------------------------------------------------------------
void check_sizes(const char* fn, int64_t G, int64_t P, int64_t D) {
  if (G < 1 || P < 1 || D < 1)
    throw std::invalid_argument(std::string(fn) + ": G, P and D must be >= 1, got " + std::to_string(G) + ", " +
                                std::to_string(P) + ", " + std::to_string(D));
  if (G > INT32_MAX || P > INT32_MAX || D > INT32_MAX)
    throw std::invalid_argument(std::string(fn) + ": G, P and D must each be < 2**31");
}

[[noreturn]] void bad_dtype(const char* fn, int code) {
  throw std::invalid_argument(std::string(fn) + ": unsupported dtype code " + std::to_string(code) +
                              " (expected 0 = float32, 1 = float16, 2 = bfloat16)");
}

// 16-byte vector loads are legal when stride_d == 1 and every row start is 16-byte aligned.
bool vec_loads_ok(std::uintptr_t ptr, int64_t G, int64_t P, int64_t stride_g, int64_t stride_p, int64_t stride_d,
                  int elem_size) {
  const int64_t vec = 16 / elem_size;
  return stride_d == 1 && ptr % 16 == 0 && (G == 1 || stride_g % vec == 0) && (P == 1 || stride_p % vec == 0);
}

// One CTA per grid-x item and group; groups beyond grid axis y's 65535 are looped over by the kernels.
template <typename Args>
void launch_over_groups(void (*kernel)(const Args), const Args& args, int64_t items, cudaStream_t stream) {
  const unsigned gy = static_cast<unsigned>(args.G < 65535 ? args.G : 65535);
  const dim3 grid(static_cast<unsigned>(items), gy);
#if defined(DINOV3_HOST_EMULATION)
  emu_launch(kernel, grid, dim3(kThreads), args);
#else
  kernel<<<grid, kThreads, 0, stream>>>(args);
  DINOV3_CHECK_LAUNCH();
#endif
}

template <typename T, bool TF32>
void launch_all(const FwdArgs& f, GradArgs (&grads)[2], cudaStream_t stream) {
  launch_over_groups(_gram_fwd_kernel<T, TF32>, f, f.num_pairs, stream);
  for (int q = 0; q < 2; ++q)
    if (q == 0 ? f.grad_s : f.grad_t)
      launch_over_groups(_gram_grad_kernel<T, TF32>, grads[q], static_cast<int64_t>(grads[q].nb) * grads[q].nd, stream);
}

template <typename T>
void launch_norm_bwd(std::uintptr_t x, std::uintptr_t gxh, std::uintptr_t out, int64_t R, int64_t D, int64_t stride_r,
                     int64_t stride_d, float eps, bool apply_norm, cudaStream_t stream) {
  const int64_t blocks = (R + kNormRowsPerBlock - 1) / kNormRowsPerBlock;
  if (blocks > INT32_MAX) throw std::invalid_argument("gram_norm_bwd: too many rows");
#if defined(DINOV3_HOST_EMULATION)
  emu_launch(_gram_norm_bwd_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kNormRowsPerBlock * 32),
             reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(gxh), reinterpret_cast<T*>(out), R,
             static_cast<int>(D), stride_r, stride_d, eps, apply_norm);
#else
  _gram_norm_bwd_kernel<T><<<static_cast<unsigned>(blocks), kNormRowsPerBlock * 32, 0, stream>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(gxh), reinterpret_cast<T*>(out), R,
      static_cast<int>(D), stride_r, stride_d, eps, apply_norm);
  DINOV3_CHECK_LAUNCH();
#endif
}

}  // namespace

int64_t gram_num_partials(int64_t G, int64_t P) {
  check_sizes("gram_num_partials", G, P, 1);
  return G * gram::num_tile_pairs(P);
}

void gram_fwd(std::uintptr_t s_ptr, std::uintptr_t t_ptr, std::uintptr_t acc_s_ptr, std::uintptr_t acc_t_ptr,
              std::uintptr_t w_s_ptr, std::uintptr_t w_t_ptr, std::uintptr_t rinv_s_ptr, std::uintptr_t rinv_t_ptr,
              std::uintptr_t partial_ptr, int64_t G, int64_t P, int64_t D, int64_t s_stride_g, int64_t s_stride_p,
              int64_t s_stride_d, int64_t t_stride_g, int64_t t_stride_p, int64_t t_stride_d, int dtype_code,
              double scale, double eps, bool apply_norm, bool clamp_s, bool clamp_t, bool grad_s, bool grad_t,
              bool allow_tf32, std::uintptr_t stream) {
  check_sizes("gram_fwd", G, P, D);
  int elem_size;
  switch (dtype_code) {
    case kFloat32: elem_size = 4; break;
    case kFloat16:
    case kBFloat16: elem_size = 2; break;
    default: bad_dtype("gram_fwd", dtype_code);
  }
  const int64_t nb = (P + kTile - 1) / kTile, nd = (D + kGradChunk - 1) / kGradChunk;
  if (nb * nd > INT32_MAX) throw std::invalid_argument("gram_fwd: P and D too large");
  FwdArgs a;
  a.s = reinterpret_cast<const void*>(s_ptr);
  a.t = reinterpret_cast<const void*>(t_ptr);
  a.w_s = reinterpret_cast<void*>(w_s_ptr);
  a.w_t = reinterpret_cast<void*>(w_t_ptr);
  a.rinv_s = reinterpret_cast<float*>(rinv_s_ptr);
  a.rinv_t = reinterpret_cast<float*>(rinv_t_ptr);
  a.partial = reinterpret_cast<float*>(partial_ptr);
  a.G = static_cast<int>(G);
  a.P = static_cast<int>(P);
  a.D = static_cast<int>(D);
  a.nb = static_cast<int>(nb);
  a.s_stride_g = s_stride_g; a.s_stride_p = s_stride_p; a.s_stride_d = s_stride_d;
  a.t_stride_g = t_stride_g; a.t_stride_p = t_stride_p; a.t_stride_d = t_stride_d;
  a.num_pairs = gram::num_tile_pairs(P);
  if (a.num_pairs > INT32_MAX) throw std::invalid_argument("gram_fwd: P too large");
  a.eps = static_cast<float>(eps);
  a.apply_norm = apply_norm;
  a.clamp_s = clamp_s;
  a.clamp_t = clamp_t;
  a.grad_s = grad_s;
  a.grad_t = grad_t;
  a.s_vec_ok = vec_loads_ok(s_ptr, G, P, s_stride_g, s_stride_p, s_stride_d, elem_size);
  a.t_vec_ok = vec_loads_ok(t_ptr, G, P, t_stride_g, t_stride_p, t_stride_d, elem_size);
  GradArgs grads[2];
  for (int q = 0; q < 2; ++q) {
    GradArgs& ga = grads[q];
    ga.x = q == 0 ? a.s : a.t;
    ga.w = q == 0 ? a.w_s : a.w_t;
    ga.rinv = q == 0 ? a.rinv_s : a.rinv_t;
    ga.acc = reinterpret_cast<float*>(q == 0 ? acc_s_ptr : acc_t_ptr);
    ga.G = a.G; ga.P = a.P; ga.D = a.D; ga.nb = a.nb; ga.nd = static_cast<int>(nd);
    ga.stride_g = q == 0 ? s_stride_g : t_stride_g;
    ga.stride_p = q == 0 ? s_stride_p : t_stride_p;
    ga.stride_d = q == 0 ? s_stride_d : t_stride_d;
    ga.num_pairs = a.num_pairs;
    ga.scale = static_cast<float>(scale);
    ga.vec_ok = q == 0 ? a.s_vec_ok : a.t_vec_ok;
  }
  const cudaStream_t st = as_stream(stream);
  switch (dtype_code) {
    case kFloat32:
      if (allow_tf32) launch_all<float, true>(a, grads, st);
      else launch_all<float, false>(a, grads, st);
      break;
    case kFloat16: launch_all<__half, false>(a, grads, st); break;
    default: launch_all<__nv_bfloat16, false>(a, grads, st); break;
  }
}

void gram_norm_bwd(std::uintptr_t x_ptr, std::uintptr_t gxh_ptr, std::uintptr_t out_ptr, int64_t R, int64_t D,
                   int64_t stride_r, int64_t stride_d, int dtype_code, double eps, bool apply_norm,
                   std::uintptr_t stream) {
  if (R < 1 || D < 1 || D > INT32_MAX)
    throw std::invalid_argument("gram_norm_bwd: R and D must be >= 1 and D < 2**31, got " + std::to_string(R) + ", " +
                                std::to_string(D));
  const float e = static_cast<float>(eps);
  const cudaStream_t st = as_stream(stream);
  switch (dtype_code) {
    case kFloat32: launch_norm_bwd<float>(x_ptr, gxh_ptr, out_ptr, R, D, stride_r, stride_d, e, apply_norm, st); break;
    case kFloat16: launch_norm_bwd<__half>(x_ptr, gxh_ptr, out_ptr, R, D, stride_r, stride_d, e, apply_norm, st); break;
    case kBFloat16:
      launch_norm_bwd<__nv_bfloat16>(x_ptr, gxh_ptr, out_ptr, R, D, stride_r, stride_d, e, apply_norm, st);
      break;
    default: bad_dtype("gram_norm_bwd", dtype_code);
  }
}

}  // namespace dinov3
