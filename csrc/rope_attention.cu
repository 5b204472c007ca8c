// Fused RoPE-box attention (DINOv3): rotate-half RoPE on the q and k of patch tokens, then non-causal softmax
// attention, read straight from the packed qkv projection (B, N, 3C), C = H * Dh.
//
//   element (b, n, which, h, d) of qkv sits at b*stride_b + n*stride_n + which*C + h*Dh + d
//   x' = x * cos[p] + rotate_half(x) * sin[p],  p = n - num_prefix (n >= num_prefix only),
//   sin/cos fp32 (H*W, Dh) tables, or tied (H*W, Dh/2) tables when both halves of the head dim share their angles
//   (the DINOv3 RoPE tables): entry (p, d) sits at p * tab_ld + (d < Dh/2 ? d : d - Dh/2 + tab_hi), where
//   (tab_ld, tab_hi) = (Dh, Dh/2) for full tables and (Dh/2, 0) for tied ones (half the table bytes per token).
//   rotate_half(x) = concat(-x[Dh/2:], x[:Dh/2]); rotated in fp32, rounded to the input dtype (as the official code)
//   out (B, N, C) = softmax(scale * Q' K'^T) V,   lse (B, H, N) = natural-log logsumexp of scale * Q' K'^T
//
// bf16 / fp16: flash-attention-2 tiling on tensor cores (mma.sync m16n8k16, fp32 accumulation, ldmatrix):
//   forward  a small kernel rotates K once into a (B, N, C) workspace K'; then one CTA per (64 queries, head,
//            batch); 4 warps own 16 query rows each; K'/V tiles of 64 keys stream through two shared-memory stages
//            with cp.async (tile j + 1 loads while tile j is computed); online softmax in the log2 domain.
//   backward the same kernel rotates Q once into a workspace Q'; one CTA per (64 keys, head, batch); 4 warps own 16
//            keys each and loop over query tiles (Q'/dO tiles through two cp.async stages), keeping dK, dV in
//            registers; dQ goes through fp32 atomics into a workspace, finished (scale, inverse RoPE, rounding)
//            by a small kernel. Delta = rowsum(dO * O) comes from a preprocessing kernel.
// fp32: a SIMT path (one warp per query or key row, lanes over keys/queries for scores, over Dh for outputs). It is
//   exact fp32 arithmetic for correctness, not speed (training runs in bf16).
//
// Each row is rotated once: the streamed operand (K forward, Q backward) by the rotate kernel, the one a CTA keeps
// (its Q tile forward, K tile backward) as it is copied into shared memory; the fp32 path rotates each q/k tile it
// loads. Ragged edges: rows past N are zero-filled in shared memory, padded keys
// get -inf scores (probability 0), padded queries are never written.
#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

// DINOV3_LAUNCH(grid, block, smem, stream, kernel)(args...) is kernel<<<grid, block, smem, stream>>>(args...); the
// host emulation (tests/kernels/cuda_emu.h) runs the blocks on CPU threads instead and throws on misuse itself.
#if defined(DINOV3_HOST_EMULATION)
#define DINOV3_LAUNCH(grid, block, smem, stream, ...) ::emu::launch(__VA_ARGS__, grid, block, smem)
#undef DINOV3_CHECK_LAUNCH
#define DINOV3_CHECK_LAUNCH() static_cast<void>(0)
#else
#define DINOV3_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace dinov3 {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- small device helpers ------------------------------------------------------------------------------------------

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type v) { return __half22float2(v); }
  static __device__ __forceinline__ type from_float2(float lo, float hi) { return __floats2half2_rn(lo, hi); }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ type from_float2(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
};

// Two 16-bit values packed in a 32-bit register, the lower index in the low half (the mma/ldmatrix convention).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  typename Pair<T>::type v = Pair<T>::from_float2(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u) {
  typename Pair<T>::type v;
  memcpy(&v, &u, 4);
  return Pair<T>::to_float2(v);
}

#if defined(DINOV3_HOST_EMULATION)
// tests/kernels/attention_cuda_emu.cpp runs these kernels on the CPU and supplies ldmatrix_x4, ldmatrix_x4_trans
// and mma_16816, emulated from the PTX ISA fragment layouts.
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i; register i gets matrix i with
// lane l holding row l/4, columns 2(l%4), 2(l%4)+1 (with .trans: column l/4, rows 2(l%4), 2(l%4)+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulators. Fragments (PTX ISA, g = lane/4, t = lane%4):
//   A: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)      C: c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // DINOV3_HOST_EMULATION


// Per-lane offsets of the ldmatrix row address inside a 16x16 block (row, col) for the three operand shapes used:
//   A operand, row-major [m][k]:                 matrices (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15)
//   B operand stored [n][k] (two n-tiles of 8):  matrices (n0-7,k0-7) (n0-7,k8-15) (n8-15,k0-7) (n8-15,k8-15)
//   B operand stored [k][n] with .trans:         matrices (k0-7,n0-7) (k8-15,n0-7) (k0-7,n8-15) (k8-15,n8-15)
// The A form stored [k][m] with .trans (used for dS^T) has the same offsets as the [n][k] B form.
__device__ __forceinline__ int a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int a_col(int lane) { return (lane >> 4) * 8; }
__device__ __forceinline__ int bnk_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int bnk_col(int lane) { return ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int bkn_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int bkn_col(int lane) { return (lane >> 4) * 8; }

// C fragments of two adjacent n-tiles (16 keys) -> the A fragment of the next product (P V, dS^T Q, ...).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

__device__ __forceinline__ float4 ld_f4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Rotates elements [c, c + 8) (lo) and [c + Dh/2, c + Dh/2 + 8) (hi) of one patch token whose table row starts at
// `row`: first half x*cos - x[d+Dh/2]*sin, second half x*cos + x[d-Dh/2]*sin, in fp32, rounded to T once. Tables:
// second-half columns at + tab_hi; a tied table (tab_hi == 0) reads each angle once for both halves.
template <typename T>
__device__ __forceinline__ void rotate_chunk(uint4& lo, uint4& hi, const float* __restrict__ sin_tab,
                                             const float* __restrict__ cos_tab, int64_t row, int c, int tab_hi) {
  float c1[8], c2[8], s1[8], s2[8];
  *reinterpret_cast<float4*>(c1) = ld_f4(cos_tab + row + c);
  *reinterpret_cast<float4*>(c1 + 4) = ld_f4(cos_tab + row + c + 4);
  *reinterpret_cast<float4*>(s1) = ld_f4(sin_tab + row + c);
  *reinterpret_cast<float4*>(s1 + 4) = ld_f4(sin_tab + row + c + 4);
  if (tab_hi != 0) {
    *reinterpret_cast<float4*>(c2) = ld_f4(cos_tab + row + tab_hi + c);
    *reinterpret_cast<float4*>(c2 + 4) = ld_f4(cos_tab + row + tab_hi + c + 4);
    *reinterpret_cast<float4*>(s2) = ld_f4(sin_tab + row + tab_hi + c);
    *reinterpret_cast<float4*>(s2 + 4) = ld_f4(sin_tab + row + tab_hi + c + 4);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      c2[e] = c1[e];
      s2[e] = s1[e];
    }
  }
  uint32_t* l32 = reinterpret_cast<uint32_t*>(&lo);
  uint32_t* h32 = reinterpret_cast<uint32_t*>(&hi);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 x1 = unpack2<T>(l32[j]), x2 = unpack2<T>(h32[j]);
    const int e = 2 * j;
    l32[j] = pack2<T>(x1.x * c1[e] - x2.x * s1[e], x1.y * c1[e + 1] - x2.y * s1[e + 1]);
    h32[j] = pack2<T>(x2.x * c2[e] + x1.x * s2[e], x2.y * c2[e + 1] + x1.y * s2[e + 1]);
  }
}

// Copies rows [row0, row0 + R) of one head's q, k (ROTATE) or v into a shared tile (R x D, row pitch LD); rows at
// or past N are zero. `g` points at (b, n = 0, which, h, d = 0). 16-byte vectors: 8 elements of each half-row.
// Tables: row pitch tab_ld, second-half columns at + tab_hi (see the top of the file); a tied table (tab_hi == 0,
// uniform across the CTA) reads each angle once and uses it for both halves.
template <typename T, int D, int LD, int R, bool ROTATE>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ g, int64_t stride_n, int row0,
                                          int N, int num_prefix, const float* __restrict__ sin_tab,
                                          const float* __restrict__ cos_tab, int tab_ld, int tab_hi) {
  constexpr int HALF = D / 2;
  constexpr int CH = HALF / 8;
  for (int i = threadIdx.x; i < R * CH; i += kThreads) {
    const int r = i / CH, c = (i % CH) * 8;
    const int n = row0 + r;
    uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
    if (n < N) {
      const T* src = g + static_cast<int64_t>(n) * stride_n + c;
      lo = *reinterpret_cast<const uint4*>(src);
      hi = *reinterpret_cast<const uint4*>(src + HALF);
      if (ROTATE && n >= num_prefix)
        rotate_chunk<T>(lo, hi, sin_tab, cos_tab, static_cast<int64_t>(n - num_prefix) * tab_ld, c, tab_hi);
    }
    *reinterpret_cast<uint4*>(s + r * LD + c) = lo;
    *reinterpret_cast<uint4*>(s + r * LD + c + HALF) = hi;
  }
}

// ---- forward, tensor cores ------------------------------------------------------------------------------------------

struct FwdParams {
  const void* qkv;
  const float* sin;
  const float* cos;
  void* k_rot;  // (B, N, C) contiguous workspace: K rotated once (16-bit path; unused by the fp32 one)
  void* out;    // (B, N, C) contiguous
  float* lse;   // (B, H, N) contiguous
  int N, H, num_prefix;
  int tab_ld, tab_hi;  // sin/cos row pitch and second-half column offset: (Dh, Dh/2) full, (Dh/2, 0) tied
  int64_t stride_b, stride_n;
  float scale;
};

// What the rotate kernel reads and writes: q (which = 0) or k (which = 1) of the packed qkv, rotated into dst.
struct RotateArgs {
  const void* qkv;
  const float* sin;
  const float* cos;
  void* dst;  // (B, N, C) contiguous, the input dtype
  int N, H, num_prefix, which;
  int tab_ld, tab_hi;
  int64_t stride_b, stride_n;
};

// X' = RoPE(X) of every token, once, for X = K (forward) or Q (backward): the attention loops would otherwise rotate
// each tile of it once per tile of the other operand. One thread per (token, head, 8-element chunk of each half).
template <typename T, int D>
__global__ void __launch_bounds__(256) _rope_rotate_kernel(const RotateArgs a, int64_t items) {
  constexpr int HALF = D / 2, CH = HALF / 8;
  const int64_t C = static_cast<int64_t>(a.H) * D;
  for (int64_t i = blockIdx.x * int64_t(256) + threadIdx.x; i < items; i += int64_t(gridDim.x) * 256) {
    const int c = static_cast<int>(i % CH) * 8;
    const int64_t th = i / CH;  // (b * N + n) * H + h
    const int h = static_cast<int>(th % a.H);
    const int64_t bn = th / a.H;
    const int n = static_cast<int>(bn % a.N);
    const int64_t b = bn / a.N;
    const T* src = static_cast<const T*>(a.qkv) + b * a.stride_b + n * a.stride_n + a.which * C + h * D + c;
    uint4 lo = *reinterpret_cast<const uint4*>(src);
    uint4 hi = *reinterpret_cast<const uint4*>(src + HALF);
    if (n >= a.num_prefix)
      rotate_chunk<T>(lo, hi, a.sin, a.cos, static_cast<int64_t>(n - a.num_prefix) * a.tab_ld, c, a.tab_hi);
    T* dst = static_cast<T*>(a.dst) + bn * C + h * D + c;
    *reinterpret_cast<uint4*>(dst) = lo;
    *reinterpret_cast<uint4*>(dst + HALF) = hi;
  }
}

// Copies rows [row0, row0 + R) of a (rows, D) slice with row stride `stride` (16-byte aligned rows) into a shared
// tile (row pitch LD) with cp.async; rows at or past N are zero-filled. One commit group is the caller's business.
template <typename T, int D, int LD, int R>
__device__ __forceinline__ void copy_tile_async(T* __restrict__ s, const T* __restrict__ g, int64_t stride, int row0,
                                                int N) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < R * CH; i += kThreads) {
    const int r = i / CH, c = (i % CH) * 8;
    const int n = row0 + r;
    cp_async16(s + r * LD + c, n < N ? g + static_cast<int64_t>(n) * stride + c : g, n < N);
  }
}

// Shared memory of the forward: two stages of (K' tile, V tile), 64 x (D + 8) each; the Q tile passes through the
// second stage's K' buffer before the key loop.
template <int D>
struct FwdTile {
  static constexpr int BM = 64, BN = 64;
  static constexpr int LD = D + 8;  // 16-byte pad: the 8 rows of each ldmatrix land in distinct banks
  static constexpr size_t stage_elems = size_t(2) * BN * LD;
  template <typename T>
  static constexpr size_t smem_bytes() { return 2 * stage_elems * sizeof(T); }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) _rope_attention_fwd_kernel(const FwdParams p) {
  using Tile = FwdTile<D>;
  constexpr int BM = Tile::BM, BN = Tile::BN, LD = Tile::LD;
  constexpr int KS = D / 16;  // k-steps over the head dim
#if defined(DINOV3_HOST_EMULATION)
  unsigned char* smem_raw = emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  T* const stage0 = reinterpret_cast<T*>(smem_raw);
  T* const stage1 = stage0 + Tile::stage_elems;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int N = p.N;
  const int64_t C = static_cast<int64_t>(p.H) * D;
  const T* q_g = static_cast<const T*>(p.qkv) + b * p.stride_b + h * D;
  const T* v_g = q_g + 2 * C;
  const T* kr_g = static_cast<const T*>(p.k_rot) + static_cast<int64_t>(b) * N * C + h * D;  // K', row stride C

  // Key tile 0 in flight while the Q' tile is rotated into stage 1 and taken into registers.
  copy_tile_async<T, D, LD, BN>(stage0, kr_g, C, 0, N);
  copy_tile_async<T, D, LD, BN>(stage0 + BN * LD, v_g, p.stride_n, 0, N);
  cp_async_commit();
  load_tile<T, D, LD, BM, true>(stage1, q_g, p.stride_n, m0, N, p.num_prefix, p.sin, p.cos, p.tab_ld, p.tab_hi);
  __syncthreads();
  uint32_t q_frag[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    ldmatrix_x4(q_frag[ks], &stage1[(warp * 16 + a_row(lane)) * LD + ks * 16 + a_col(lane)]);
  __syncthreads();  // stage 1 is free for key tile 1

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 domain) of rows g and g+8
  float l_run[2] = {0.f, 0.f};              // this thread's part of the running sum
  const float scale_log2 = p.scale * kLog2e;

  for (int n0 = 0, j = 0; n0 < N; n0 += BN, ++j) {
    // Issue key tile j + 1 into the other stage (last read by tile j - 1, released by the barrier ending it), then
    // wait for tile j: its copies overlap nothing but the issue here, tile j + 1's overlap all of tile j's math.
    T* const next = (j & 1) ? stage0 : stage1;
    if (n0 + BN < N) {
      copy_tile_async<T, D, LD, BN>(next, kr_g, C, n0 + BN, N);
      copy_tile_async<T, D, LD, BN>(next + BN * LD, v_g, p.stride_n, n0 + BN, N);
    }
    cp_async_commit();  // possibly empty: the group count stays one per tile
    cp_async_wait<1>();
    __syncthreads();  // every thread's copies of tile j have landed
    const T* const k_s = (j & 1) ? stage1 : stage0;
    const T* const v_s = k_s + BN * LD;

    // S = Q' K'^T (16 x 64 per warp)
    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) {
        uint32_t kb[4];
        ldmatrix_x4(kb, &k_s[(j * 16 + bnk_row(lane)) * LD + ks * 16 + bnk_col(lane)]);
        mma_16816<T>(s[2 * j], q_frag[ks], kb[0], kb[1]);
        mma_16816<T>(s[2 * j + 1], q_frag[ks], kb[2], kb[3]);
      }
    }

    // Online softmax: scores to the log2 domain, padded keys to -inf.
    float m_new[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + i * 8 + 2 * t + (e & 1);
        s[i][e] = key < N ? s[i][e] * scale_log2 : -INFINITY;
        m_new[e >> 1] = fmaxf(m_new[e >> 1], s[i][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 1));
      m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 2));
      // key n0 < N exists in every tile, so m_new is finite; exp2(-inf) = 0 on the first tile
      alpha[r] = exp2f(m_run[r] - m_new[r]);
      m_run[r] = m_new[r];
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[i][e] = exp2f(s[i][e] - m_new[e >> 1]);
        l_run[e >> 1] += s[i][e];
      }
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }

    // O += P V  (P rounded to the input dtype, as flash-attention does)
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      uint32_t pa[4];
      c_to_a<T>(pa, s[2 * j], s[2 * j + 1]);
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, &v_s[(j * 16 + bkn_row(lane)) * LD + dt * 16 + bkn_col(lane)]);
        mma_16816<T>(o[2 * dt], pa, vb[0], vb[1]);
        mma_16816<T>(o[2 * dt + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every read of this stage is done before tile j + 2's copies are issued into it
  }
  cp_async_wait<0>();  // the last (empty) group

  // Finish: full row sums, normalize, write out and lse.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = 1.f / l;
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row < N) {
      T* dst = out + (static_cast<int64_t>(b) * N + row) * C + h * D;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<uint32_t*>(dst + i * 8 + 2 * t) = pack2<T>(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
      if (t == 0) p.lse[(static_cast<int64_t>(b) * p.H + h) * N + row] = (m_run[r] + log2f(l)) * kLn2;
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------------------------

struct BwdParams {
  const void* qkv;
  const float* sin;
  const float* cos;
  const void* out;    // (B, N, C) contiguous
  const void* dout;   // (B, N, C) contiguous
  const float* lse;   // (B, H, N)
  float* delta;       // (B, H, N) workspace: rowsum(dO * O)
  float* dq_accum;    // (B, N, C) fp32 workspace, zeroed: sum over keys of dS K' (unscaled, not un-rotated)
  void* q_rot;        // (B, N, C) contiguous workspace: Q rotated once (16-bit path; unused by the fp32 one)
  void* dqkv;         // (B, N, 3C) contiguous
  int N, H, num_prefix;
  int tab_ld, tab_hi;  // sin/cos row pitch and second-half column offset: (Dh, Dh/2) full, (Dh/2, 0) tied
  int64_t stride_b, stride_n;
  float scale;
};

// Delta[b, h, n] = sum_d dO * O: one warp per (b, n, h) row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) _rope_attention_bwd_delta_kernel(const BwdParams p, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int h = static_cast<int>(row % p.H);
  const int64_t bn = row / p.H;  // b * N + n
  const T* o = static_cast<const T*>(p.out) + row * D;
  const T* dO = static_cast<const T*>(p.dout) + row * D;
  float acc = 0.f;
#pragma unroll
  for (int d = lane; d < D; d += 32) acc += to_float(o[d]) * to_float(dO[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const int64_t b = bn / p.N, n = bn % p.N;
    p.delta[(b * p.H + h) * p.N + n] = acc;
  }
}

// Inverse RoPE (the transpose of the rotation) of one (d, d + Dh/2) pair of a gradient, h = Dh/2:
//   dx[d] = y[d] cos[d] + y[d+h] sin[d+h],   dx[d+h] = y[d+h] cos[d+h] - y[d] sin[d]
// with table entry d + h of a row at column d + tab_hi (tab_hi = 0: tied table).
__device__ __forceinline__ void rope_transpose(float& y1, float& y2, const float* sin_row, const float* cos_row,
                                               int d, int tab_hi) {
  const float a = y1 * cos_row[d] + y2 * sin_row[d + tab_hi];
  const float c = y2 * cos_row[d + tab_hi] - y1 * sin_row[d];
  y1 = a;
  y2 = c;
}

// dq_accum -> dqkv[:, :, q]: scale, inverse RoPE for patch tokens, round to the input dtype. One thread per pair.
template <typename T, int D>
__global__ void __launch_bounds__(256) _rope_attention_bwd_dq_kernel(const BwdParams p, int64_t pairs) {
  constexpr int HALF = D / 2;
  const int64_t C = static_cast<int64_t>(p.H) * D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % HALF);
    const int64_t row = i / HALF;  // (b * N + n) * H + h
    const int h = static_cast<int>(row % p.H);
    const int64_t bn = row / p.H;
    const int n = static_cast<int>(bn % p.N);
    const float* src = p.dq_accum + bn * C + h * D;
    float y1 = src[d] * p.scale, y2 = src[d + HALF] * p.scale;
    if (n >= p.num_prefix) {
      const int64_t off = static_cast<int64_t>(n - p.num_prefix) * p.tab_ld;
      rope_transpose(y1, y2, p.sin + off, p.cos + off, d, p.tab_hi);
    }
    T* dst = static_cast<T*>(p.dqkv) + bn * 3 * C + h * D;
    dst[d] = from_float<T>(y1);
    dst[d + HALF] = from_float<T>(y2);
  }
}

// BM = query rows per inner step: 64 for Dh 64, 32 for Dh 128 (keeps dK, dV, S, dP fragments within 255 registers).
// Shared memory: the K' and V tiles, two stages of (Q' tile, dO tile) streamed with cp.async, dS^T, and two stages
// of the query tile's lse and Delta.
template <int D>
struct BwdTile {
  static constexpr int BN = 64, BM = D == 64 ? 64 : 32, LD = D + 8, LDS = BM + 8;
  static constexpr size_t stage_elems = size_t(2) * BM * LD;
  static constexpr size_t smem_elems = size_t(2) * BN * LD + 2 * stage_elems + size_t(BN) * LDS;
  template <typename T>
  static constexpr size_t smem_bytes() { return smem_elems * sizeof(T) + size_t(4) * BM * sizeof(float); }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, D == 64 ? 3 : 2) _rope_attention_bwd_kernel(const BwdParams p) {
  using Tile = BwdTile<D>;
  constexpr int BN = Tile::BN, BM = Tile::BM, LD = Tile::LD, LDS = Tile::LDS;
  constexpr int KS = D / 16;
  constexpr int WM = BM / 16;   // warps along the queries of the dQ product
  constexpr int WD = 4 / WM;    // warps along the head dim of the dQ product
  constexpr int DW = D / WD;    // head-dim columns per warp in the dQ product (64 in both configurations)
  static_assert(BM <= kThreads, "one thread per query row carries the next tile's lse / Delta");
#if defined(DINOV3_HOST_EMULATION)
  unsigned char* smem_raw = emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + BN * LD;
  T* const stage0 = v_s + BN * LD;  // Q' tile, then dO tile
  T* const stage1 = stage0 + Tile::stage_elems;
  T* ds_s = stage1 + Tile::stage_elems;  // dS^T, [key][query]
  float* const stats0 = reinterpret_cast<float*>(ds_s + BN * LDS);  // lse * log2(e) (+inf for padded queries), Delta
  float* const stats1 = stats0 + 2 * BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * BN, h = blockIdx.y, b = blockIdx.z;
  const int N = p.N;
  const int64_t C = static_cast<int64_t>(p.H) * D;
  const T* q_g = static_cast<const T*>(p.qkv) + b * p.stride_b + h * D;
  const T* k_g = q_g + C;
  const T* v_g = q_g + 2 * C;
  const T* qr_g = static_cast<const T*>(p.q_rot) + static_cast<int64_t>(b) * N * C + h * D;  // Q', row stride C
  const T* do_g = static_cast<const T*>(p.dout) + static_cast<int64_t>(b) * N * C + h * D;
  const float* lse_g = p.lse + (static_cast<int64_t>(b) * p.H + h) * N;
  const float* delta_g = p.delta + (static_cast<int64_t>(b) * p.H + h) * N;
  float* dq_g = p.dq_accum + static_cast<int64_t>(b) * N * C + h * D;
  const float scale_log2 = p.scale * kLog2e;

  // Query tile 0 (Q', dO) in flight while this CTA's K' and V tiles load; its lse and Delta go to stage 0.
  copy_tile_async<T, D, LD, BM>(stage0, qr_g, C, 0, N);
  copy_tile_async<T, D, LD, BM>(stage0 + BM * LD, do_g, C, 0, N);
  cp_async_commit();
  load_tile<T, D, LD, BN, true>(k_s, k_g, p.stride_n, n0, N, p.num_prefix, p.sin, p.cos, p.tab_ld, p.tab_hi);
  load_tile<T, D, LD, BN, false>(v_s, v_g, p.stride_n, n0, N, 0, nullptr, nullptr, 0, 0);
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    const bool ok = i < N;
    stats0[i] = ok ? lse_g[i] * kLog2e : INFINITY;
    stats0[BM + i] = ok ? delta_g[i] : 0.f;
  }

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  const int key_row = warp * 16;  // this warp's keys in the tile
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) key_ok[r] = n0 + key_row + g + 8 * r < N;

  for (int m0 = 0, j = 0; m0 < N; m0 += BM, ++j) {
    // Issue query tile j + 1 into the other stage (last read by tile j - 1 before its dS^T barrier) and fetch its
    // lse / Delta into registers (stored at the end of this step); then wait for tile j.
    const int m1 = m0 + BM;
    float* const next_stats = (j & 1) ? stats0 : stats1;
    if (m1 < N) {
      T* const next = (j & 1) ? stage0 : stage1;
      copy_tile_async<T, D, LD, BM>(next, qr_g, C, m1, N);
      copy_tile_async<T, D, LD, BM>(next + BM * LD, do_g, C, m1, N);
    }
    cp_async_commit();  // possibly empty: one group per query tile
    float next_lse = INFINITY, next_delta = 0.f;  // BM <= kThreads: thread i < BM carries row m1 + i
    if (threadIdx.x < BM && m1 + static_cast<int>(threadIdx.x) < N) {
      next_lse = lse_g[m1 + threadIdx.x] * kLog2e;
      next_delta = delta_g[m1 + threadIdx.x];
    }
    cp_async_wait<1>();
    __syncthreads();  // every thread's copies of tile j have landed (and its stats, stored a step earlier)
    const T* const q_s = (j & 1) ? stage1 : stage0;
    const T* const do_s = q_s + BM * LD;
    const float* const lse_s = (j & 1) ? stats1 : stats0;
    const float* const delta_s = lse_s + BM;

    // S^T = K' Q'^T and dP^T = V dO^T (16 keys x BM queries per warp)
    float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t ka[4], va[4];
      ldmatrix_x4(ka, &k_s[(key_row + a_row(lane)) * LD + ks * 16 + a_col(lane)]);
      ldmatrix_x4(va, &v_s[(key_row + a_row(lane)) * LD + ks * 16 + a_col(lane)]);
#pragma unroll
      for (int j = 0; j < BM / 16; ++j) {
        uint32_t qb[4], db[4];
        ldmatrix_x4(qb, &q_s[(j * 16 + bnk_row(lane)) * LD + ks * 16 + bnk_col(lane)]);
        ldmatrix_x4(db, &do_s[(j * 16 + bnk_row(lane)) * LD + ks * 16 + bnk_col(lane)]);
        mma_16816<T>(st[2 * j], ka, qb[0], qb[1]);
        mma_16816<T>(st[2 * j + 1], ka, qb[2], qb[3]);
        mma_16816<T>(dpt[2 * j], va, db[0], db[1]);
        mma_16816<T>(dpt[2 * j + 1], va, db[2], db[3]);
      }
    }

    // P^T = exp(scale * S^T - lse) (0 for padded keys / queries); dS^T = P^T * (dP^T - Delta), kept in st / dpt.
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = i * 8 + 2 * t + (e & 1);
        const float pv = key_ok[e >> 1] ? exp2f(st[i][e] * scale_log2 - lse_s[qc]) : 0.f;
        st[i][e] = pv;
        dpt[i][e] = pv * (dpt[i][e] - delta_s[qc]);
      }
    }

    // dV += P^T dO,  dK += dS^T Q'  (queries are the k dimension)
#pragma unroll
    for (int j = 0; j < BM / 16; ++j) {
      uint32_t pa[4], dsa[4];
      c_to_a<T>(pa, st[2 * j], st[2 * j + 1]);
      c_to_a<T>(dsa, dpt[2 * j], dpt[2 * j + 1]);
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        uint32_t ob[4], qb[4];
        ldmatrix_x4_trans(ob, &do_s[(j * 16 + bkn_row(lane)) * LD + dt * 16 + bkn_col(lane)]);
        ldmatrix_x4_trans(qb, &q_s[(j * 16 + bkn_row(lane)) * LD + dt * 16 + bkn_col(lane)]);
        mma_16816<T>(dv[2 * dt], pa, ob[0], ob[1]);
        mma_16816<T>(dv[2 * dt + 1], pa, ob[2], ob[3]);
        mma_16816<T>(dk[2 * dt], dsa, qb[0], qb[1]);
        mma_16816<T>(dk[2 * dt + 1], dsa, qb[2], qb[3]);
      }
    }

    // dS^T (rounded like P) to shared, [key][query], for the dQ product across all 64 keys.
#pragma unroll
    for (int i = 0; i < BM / 8; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<uint32_t*>(&ds_s[(key_row + g + 8 * r) * LDS + i * 8 + 2 * t]) =
            pack2<T>(dpt[i][2 * r], dpt[i][2 * r + 1]);
    __syncthreads();

    // dQ (BM x D) += dS K' over this key tile: warp (wm, wd) owns 16 queries x DW dims; fp32 atomics to global.
    {
      const int wm = warp % WM, wd = warp / WM;
      float dq[DW / 8][4];
#pragma unroll
      for (int i = 0; i < DW / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t dsa[4];
        // A = dS [query][key] read from dS^T [key][query] with .trans
        ldmatrix_x4_trans(dsa, &ds_s[(kk * 16 + bnk_row(lane)) * LDS + wm * 16 + bnk_col(lane)]);
#pragma unroll
        for (int dt = 0; dt < DW / 16; ++dt) {
          uint32_t kb[4];
          ldmatrix_x4_trans(kb, &k_s[(kk * 16 + bkn_row(lane)) * LD + wd * DW + dt * 16 + bkn_col(lane)]);
          mma_16816<T>(dq[2 * dt], dsa, kb[0], kb[1]);
          mma_16816<T>(dq[2 * dt + 1], dsa, kb[2], kb[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + wm * 16 + g + 8 * r;
        if (row < N) {
          float* dst = dq_g + static_cast<int64_t>(row) * C + wd * DW + 2 * t;
#pragma unroll
          for (int i = 0; i < DW / 8; ++i) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            // One 2-wide reduction per pair (sm_90: float2 atomicAdd on global memory); the pair is 8-byte aligned
            // (C, DW and 2t even, and the fp32 workspace starts aligned).
            atomicAdd(reinterpret_cast<float2*>(dst + i * 8), make_float2(dq[i][2 * r], dq[i][2 * r + 1]));
#else
            atomicAdd(dst + i * 8, dq[i][2 * r]);
            atomicAdd(dst + i * 8 + 1, dq[i][2 * r + 1]);
#endif
          }
        }
      }
    }
    if (threadIdx.x < BM) {  // tile j + 1's stats: that stage was last read in step j - 1
      next_stats[threadIdx.x] = next_lse;
      next_stats[BM + threadIdx.x] = next_delta;
    }
    // No barrier here: this stage's Q'/dO/stats are last read before the dS^T barrier above, so step j + 1 may issue
    // tile j + 2 into it at once, and ds_s is rewritten only after step j + 1's first barrier, which every thread
    // reaches after its dQ product (the emulation test catches a read of an in-flight stage).
  }
  cp_async_wait<0>();  // the last (empty) group

  // dK = scale * dK' rotated back for patch tokens; dV as is. Pairs (d, d + Dh/2) are n-tiles i and i + D/16.
  T* dk_g = static_cast<T*>(p.dqkv) + static_cast<int64_t>(b) * N * 3 * C + C + h * D;
  T* dv_g = dk_g + C;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int n = n0 + key_row + g + 8 * r;
    if (n >= N) continue;
    const int64_t off = static_cast<int64_t>(n) * 3 * C;
    const bool rot = n >= p.num_prefix;
    const int64_t tab = static_cast<int64_t>(n - p.num_prefix) * p.tab_ld;
#pragma unroll
    for (int i = 0; i < D / 16; ++i) {
      float y[2][2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        y[0][e] = dk[i][2 * r + e] * p.scale;
        y[1][e] = dk[i + D / 16][2 * r + e] * p.scale;
        if (rot) rope_transpose(y[0][e], y[1][e], p.sin + tab, p.cos + tab, i * 8 + 2 * t + e, p.tab_hi);
      }
      *reinterpret_cast<uint32_t*>(dk_g + off + i * 8 + 2 * t) = pack2<T>(y[0][0], y[0][1]);
      *reinterpret_cast<uint32_t*>(dk_g + off + D / 2 + i * 8 + 2 * t) = pack2<T>(y[1][0], y[1][1]);
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(dv_g + off + i * 8 + 2 * t) = pack2<T>(dv[i][2 * r], dv[i][2 * r + 1]);
  }
}

// ---- fp32: SIMT path -------------------------------------------------------------------------------------------
// A warp owns RW rows (queries in the forward and dQ kernels, keys in the dK/dV kernel). Scores: lane j takes
// the j-th row of the other side (32 per tile; pitch D + 1 so lanes hit distinct banks). Outputs: lane owns
// dims d = lane + 32 i, so the RoPE pair (d, d + Dh/2) of a lane is (i, i + Dh/64).
constexpr int kSimtRows = 4;                  // rows per warp
constexpr int kSimtBlock = 4 * kSimtRows;     // rows per CTA
constexpr int kSimtTile = 32;                 // rows of the other side per step

// Rows [row0, row0 + R) of one head's q/k (ROTATE) or v, fp32, into a shared tile with pitch LD; zero past N.
template <int D, int LD, int R, bool ROTATE>
__device__ __forceinline__ void load_tile_f32(float* __restrict__ s, const float* __restrict__ g, int64_t stride_n,
                                              int row0, int N, int num_prefix, const float* __restrict__ sin_tab,
                                              const float* __restrict__ cos_tab, int tab_ld, int tab_hi) {
  constexpr int HALF = D / 2;
  for (int i = threadIdx.x; i < R * HALF; i += kThreads) {
    const int r = i / HALF, d = i % HALF;
    const int n = row0 + r;
    float x1 = 0.f, x2 = 0.f;
    if (n < N) {
      const float* src = g + static_cast<int64_t>(n) * stride_n;
      x1 = src[d];
      x2 = src[d + HALF];
      if (ROTATE && n >= num_prefix) {
        const int64_t row = static_cast<int64_t>(n - num_prefix) * tab_ld;
        const float y1 = x1 * cos_tab[row + d] - x2 * sin_tab[row + d];
        const float y2 = x2 * cos_tab[row + tab_hi + d] + x1 * sin_tab[row + tab_hi + d];
        x1 = y1;
        x2 = y2;
      }
    }
    s[r * LD + d] = x1;
    s[r * LD + d + HALF] = x2;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int D>
__global__ void __launch_bounds__(kThreads) _rope_attention_fwd_f32_kernel(const FwdParams p) {
  constexpr int LD = D + 1, DL = D / 32;
  __shared__ float q_s[kSimtBlock * D];
  __shared__ float k_s[kSimtTile * LD];
  __shared__ float v_s[kSimtTile * D];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * kSimtBlock, h = blockIdx.y, b = blockIdx.z;
  const int N = p.N;
  const int64_t C = static_cast<int64_t>(p.H) * D;
  const float* q_g = static_cast<const float*>(p.qkv) + b * p.stride_b + h * D;
  const float scale_log2 = p.scale * kLog2e;

  load_tile_f32<D, D, kSimtBlock, true>(q_s, q_g, p.stride_n, m0, N, p.num_prefix, p.sin, p.cos, p.tab_ld, p.tab_hi);
  float o[kSimtRows][DL], m_run[kSimtRows], l_run[kSimtRows];
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DL; ++i) o[r][i] = 0.f;
  }
  for (int n0 = 0; n0 < N; n0 += kSimtTile) {
    __syncthreads();  // q_s ready / previous tile consumed
    load_tile_f32<D, LD, kSimtTile, true>(k_s, q_g + C, p.stride_n, n0, N, p.num_prefix,
        p.sin, p.cos, p.tab_ld, p.tab_hi);
    load_tile_f32<D, D, kSimtTile, false>(v_s, q_g + 2 * C, p.stride_n, n0, N, 0, nullptr, nullptr, 0, 0);
    __syncthreads();
    const bool key_ok = n0 + lane < N;
#pragma unroll
    for (int r = 0; r < kSimtRows; ++r) {
      const float* q = q_s + (warp * kSimtRows + r) * D;
      float sc = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) sc = fmaf(q[d], k_s[lane * LD + d], sc);
      sc = key_ok ? sc * scale_log2 : -INFINITY;
      const float m_new = fmaxf(m_run[r], warp_max(sc));
      const float alpha = exp2f(m_run[r] - m_new);
      const float pr = exp2f(sc - m_new);
      m_run[r] = m_new;
      l_run[r] = l_run[r] * alpha + warp_sum(pr);
#pragma unroll
      for (int i = 0; i < DL; ++i) o[r][i] *= alpha;
      for (int j = 0; j < kSimtTile; ++j) {
        const float pj = __shfl_sync(0xffffffffu, pr, j);
#pragma unroll
        for (int i = 0; i < DL; ++i) o[r][i] = fmaf(pj, v_s[j * D + lane + 32 * i], o[r][i]);
      }
    }
  }
  float* out = static_cast<float*>(p.out);
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    const int row = m0 + warp * kSimtRows + r;
    if (row >= N) continue;
    const float inv = 1.f / l_run[r];
    float* dst = out + (static_cast<int64_t>(b) * N + row) * C + h * D;
#pragma unroll
    for (int i = 0; i < DL; ++i) dst[lane + 32 * i] = o[r][i] * inv;
    if (lane == 0) p.lse[(static_cast<int64_t>(b) * p.H + h) * N + row] = (m_run[r] + log2f(l_run[r])) * kLn2;
  }
}

// dK, dV: warps own keys, lanes take queries for the scores.
template <int D>
__global__ void __launch_bounds__(kThreads) _rope_attention_bwd_dkdv_f32_kernel(const BwdParams p) {
  constexpr int LD = D + 1, DL = D / 32, HL = DL / 2;
#if defined(DINOV3_HOST_EMULATION)
  unsigned char* smem_raw = emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  float* k_s = reinterpret_cast<float*>(smem_raw);   // [kSimtBlock][D]
  float* v_s = k_s + kSimtBlock * D;                  // [kSimtBlock][D]
  float* q_s = v_s + kSimtBlock * D;                  // [kSimtTile][LD]
  float* do_s = q_s + kSimtTile * LD;                 // [kSimtTile][LD]
  float* lse_s = do_s + kSimtTile * LD;               // [kSimtTile]
  float* delta_s = lse_s + kSimtTile;                 // [kSimtTile]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kSimtBlock, h = blockIdx.y, b = blockIdx.z;
  const int N = p.N;
  const int64_t C = static_cast<int64_t>(p.H) * D;
  const float* q_g = static_cast<const float*>(p.qkv) + b * p.stride_b + h * D;
  const float* do_g = static_cast<const float*>(p.dout) + static_cast<int64_t>(b) * N * C + h * D;
  const float* lse_g = p.lse + (static_cast<int64_t>(b) * p.H + h) * N;
  const float* delta_g = p.delta + (static_cast<int64_t>(b) * p.H + h) * N;
  const float scale_log2 = p.scale * kLog2e;

  load_tile_f32<D, D, kSimtBlock, true>(k_s, q_g + C, p.stride_n, n0, N, p.num_prefix,
      p.sin, p.cos, p.tab_ld, p.tab_hi);
  load_tile_f32<D, D, kSimtBlock, false>(v_s, q_g + 2 * C, p.stride_n, n0, N, 0, nullptr, nullptr, 0, 0);
  float dk[kSimtRows][DL], dv[kSimtRows][DL];
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r)
#pragma unroll
    for (int i = 0; i < DL; ++i) dk[r][i] = dv[r][i] = 0.f;

  for (int m0 = 0; m0 < N; m0 += kSimtTile) {
    __syncthreads();
    load_tile_f32<D, LD, kSimtTile, true>(q_s, q_g, p.stride_n, m0, N, p.num_prefix, p.sin, p.cos, p.tab_ld, p.tab_hi);
    load_tile_f32<D, LD, kSimtTile, false>(do_s, do_g, C, m0, N, 0, nullptr, nullptr, 0, 0);
    if (threadIdx.x < kSimtTile) {
      const bool ok = m0 + threadIdx.x < N;
      lse_s[threadIdx.x] = ok ? lse_g[m0 + threadIdx.x] * kLog2e : INFINITY;
      delta_s[threadIdx.x] = ok ? delta_g[m0 + threadIdx.x] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kSimtRows; ++r) {
      const int key = warp * kSimtRows + r;
      // padded keys: their rows are zero and never written, so no mask is needed here
      const float* k = k_s + key * D;
      const float* v = v_s + key * D;
      float sc = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        sc = fmaf(k[d], q_s[lane * LD + d], sc);
        dp = fmaf(v[d], do_s[lane * LD + d], dp);
      }
      const float pr = exp2f(sc * scale_log2 - lse_s[lane]);  // 0 for padded queries (lse = +inf)
      const float ds = pr * (dp - delta_s[lane]);
      for (int j = 0; j < kSimtTile; ++j) {
        const float pj = __shfl_sync(0xffffffffu, pr, j);
        const float dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
        for (int i = 0; i < DL; ++i) {
          dv[r][i] = fmaf(pj, do_s[j * LD + lane + 32 * i], dv[r][i]);
          dk[r][i] = fmaf(dsj, q_s[j * LD + lane + 32 * i], dk[r][i]);
        }
      }
    }
  }
  float* dk_g = static_cast<float*>(p.dqkv) + static_cast<int64_t>(b) * N * 3 * C + C + h * D;
  float* dv_g = dk_g + C;
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    const int n = n0 + warp * kSimtRows + r;
    if (n >= N) continue;
    const int64_t off = static_cast<int64_t>(n) * 3 * C;
    const int64_t tab = static_cast<int64_t>(n - p.num_prefix) * p.tab_ld;
#pragma unroll
    for (int i = 0; i < HL; ++i) {
      float y1 = dk[r][i] * p.scale, y2 = dk[r][i + HL] * p.scale;
      if (n >= p.num_prefix) rope_transpose(y1, y2, p.sin + tab, p.cos + tab, lane + 32 * i, p.tab_hi);
      dk_g[off + lane + 32 * i] = y1;
      dk_g[off + lane + 32 * i + D / 2] = y2;
    }
#pragma unroll
    for (int i = 0; i < DL; ++i) dv_g[off + lane + 32 * i] = dv[r][i];
  }
}

// dQ: warps own queries, lanes take keys (recomputes the scores; no atomics on this path).
template <int D>
__global__ void __launch_bounds__(kThreads) _rope_attention_bwd_dq_f32_kernel(const BwdParams p) {
  constexpr int LD = D + 1, DL = D / 32, HL = DL / 2;
#if defined(DINOV3_HOST_EMULATION)
  unsigned char* smem_raw = emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  float* q_s = reinterpret_cast<float*>(smem_raw);  // [kSimtBlock][D]
  float* do_s = q_s + kSimtBlock * D;               // [kSimtBlock][D]
  float* k_s = do_s + kSimtBlock * D;               // [kSimtTile][LD]
  float* v_s = k_s + kSimtTile * LD;                // [kSimtTile][LD]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * kSimtBlock, h = blockIdx.y, b = blockIdx.z;
  const int N = p.N;
  const int64_t C = static_cast<int64_t>(p.H) * D;
  const float* q_g = static_cast<const float*>(p.qkv) + b * p.stride_b + h * D;
  const float* do_g = static_cast<const float*>(p.dout) + static_cast<int64_t>(b) * N * C + h * D;
  const float* lse_g = p.lse + (static_cast<int64_t>(b) * p.H + h) * N;
  const float* delta_g = p.delta + (static_cast<int64_t>(b) * p.H + h) * N;
  const float scale_log2 = p.scale * kLog2e;

  load_tile_f32<D, D, kSimtBlock, true>(q_s, q_g, p.stride_n, m0, N, p.num_prefix, p.sin, p.cos, p.tab_ld, p.tab_hi);
  load_tile_f32<D, D, kSimtBlock, false>(do_s, do_g, C, m0, N, 0, nullptr, nullptr, 0, 0);
  float dq[kSimtRows][DL], lse_r[kSimtRows], delta_r[kSimtRows];
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    const int row = m0 + warp * kSimtRows + r;
    lse_r[r] = row < N ? lse_g[row] * kLog2e : INFINITY;
    delta_r[r] = row < N ? delta_g[row] : 0.f;
#pragma unroll
    for (int i = 0; i < DL; ++i) dq[r][i] = 0.f;
  }
  for (int n0 = 0; n0 < N; n0 += kSimtTile) {
    __syncthreads();
    load_tile_f32<D, LD, kSimtTile, true>(k_s, q_g + C, p.stride_n, n0, N, p.num_prefix,
        p.sin, p.cos, p.tab_ld, p.tab_hi);
    load_tile_f32<D, LD, kSimtTile, false>(v_s, q_g + 2 * C, p.stride_n, n0, N, 0, nullptr, nullptr, 0, 0);
    __syncthreads();
    const bool key_ok = n0 + lane < N;
#pragma unroll
    for (int r = 0; r < kSimtRows; ++r) {
      const float* q = q_s + (warp * kSimtRows + r) * D;
      const float* dO = do_s + (warp * kSimtRows + r) * D;
      float sc = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        sc = fmaf(q[d], k_s[lane * LD + d], sc);
        dp = fmaf(dO[d], v_s[lane * LD + d], dp);
      }
      const float pr = key_ok ? exp2f(sc * scale_log2 - lse_r[r]) : 0.f;
      const float ds = pr * (dp - delta_r[r]);
      for (int j = 0; j < kSimtTile; ++j) {
        const float dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
        for (int i = 0; i < DL; ++i) dq[r][i] = fmaf(dsj, k_s[j * LD + lane + 32 * i], dq[r][i]);
      }
    }
  }
  float* dq_g = static_cast<float*>(p.dqkv) + static_cast<int64_t>(b) * N * 3 * C + h * D;
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    const int n = m0 + warp * kSimtRows + r;
    if (n >= N) continue;
    const int64_t off = static_cast<int64_t>(n) * 3 * C;
    const int64_t tab = static_cast<int64_t>(n - p.num_prefix) * p.tab_ld;
#pragma unroll
    for (int i = 0; i < HL; ++i) {
      float y1 = dq[r][i] * p.scale, y2 = dq[r][i + HL] * p.scale;
      if (n >= p.num_prefix) rope_transpose(y1, y2, p.sin + tab, p.cos + tab, lane + 32 * i, p.tab_hi);
      dq_g[off + lane + 32 * i] = y1;
      dq_g[off + lane + 32 * i + D / 2] = y2;
    }
  }
}

// ---- launchers ---------------------------------------------------------------------------------------------------

// Opts a kernel into more than 48 KB of dynamic shared memory. The attribute belongs to the function on the current
// device and persists for the process, so it is set once per (kernel, device) (and again only for a larger size), not
// on every call: cudaFuncSetAttribute takes a driver lock on each call (issue 14 point 6).
template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
#if defined(DINOV3_HOST_EMULATION)
  (void)kernel;
  (void)bytes;
#else
  if (bytes <= 48 * 1024) return;
  int device = 0;
  DINOV3_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> opted_in;  // (kernel, device) -> bytes allowed
  std::lock_guard<std::mutex> lock(mutex);
  size_t& allowed = opted_in[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= allowed) return;
  DINOV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  allowed = bytes;
#endif
}

void check_args(const char* fn, int64_t B, int64_t N, int64_t H, int64_t Dh, int64_t num_prefix, int64_t tab_cols,
                int dtype) {
  const std::string where = std::string(fn) + ": ";
  if (Dh != 64 && Dh != 128)
    throw std::invalid_argument(where + "head_dim " + std::to_string(Dh) + " is not supported (64 or 128)");
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument(where + "dtype code " + std::to_string(dtype) +
                                " is not supported (float32, float16, bfloat16)");
  if (B < 1 || N < 1 || H < 1) throw std::invalid_argument(where + "B, N and num_heads must be positive");
  if (B > 65535 || H > 65535) throw std::invalid_argument(where + "B and num_heads must be at most 65535");
  if (N >= (int64_t(1) << 31) - 128) throw std::invalid_argument(where + "N is too large");
  if (num_prefix < 0 || num_prefix > N)
    throw std::invalid_argument(where + "num_prefix_tokens must be in [0, N]");
  if (tab_cols != Dh && tab_cols * 2 != Dh)
    throw std::invalid_argument(where + "sin/cos tables must have head_dim or head_dim/2 (tied) columns, got " +
                                std::to_string(tab_cols));
}

// (row pitch, second-half column offset) of a (H*W, tab_cols) table: full (Dh, Dh/2) or tied (Dh/2, 0).
template <typename Params>
void set_tables(Params& p, int64_t Dh, int64_t tab_cols) {
  p.tab_ld = static_cast<int>(tab_cols);
  p.tab_hi = tab_cols == Dh ? static_cast<int>(Dh / 2) : 0;
}

template <typename Params>
RotateArgs rotate_args(const Params& p, void* dst, int which) {
  RotateArgs a;
  a.qkv = p.qkv;
  a.sin = p.sin;
  a.cos = p.cos;
  a.dst = dst;
  a.N = p.N;
  a.H = p.H;
  a.num_prefix = p.num_prefix;
  a.which = which;
  a.tab_ld = p.tab_ld;
  a.tab_hi = p.tab_hi;
  a.stride_b = p.stride_b;
  a.stride_n = p.stride_n;
  return a;
}

template <typename T, int D>
void launch_rotate(const RotateArgs& a, int B, cudaStream_t stream) {
  const int64_t items = int64_t(B) * a.N * a.H * (D / 16);
  const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(items, 256), int64_t(1) << 20);
  DINOV3_LAUNCH(static_cast<unsigned>(blocks), 256, 0, stream, _rope_rotate_kernel<T, D>)(a, items);
  DINOV3_CHECK_LAUNCH();
}

template <typename T, int D>
void launch_fwd(const FwdParams& p, int B, cudaStream_t stream) {
  launch_rotate<T, D>(rotate_args(p, p.k_rot, 1), B, stream);
  const dim3 grid(ceil_div(p.N, FwdTile<D>::BM), p.H, B);
  const size_t smem = FwdTile<D>::template smem_bytes<T>();
  set_smem(_rope_attention_fwd_kernel<T, D>, smem);
  DINOV3_LAUNCH(grid, kThreads, smem, stream, _rope_attention_fwd_kernel<T, D>)(p);
  DINOV3_CHECK_LAUNCH();
}

template <int D>
void launch_fwd_f32(const FwdParams& p, int B, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.N, kSimtBlock), p.H, B);
  DINOV3_LAUNCH(grid, kThreads, 0, stream, _rope_attention_fwd_f32_kernel<D>)(p);
  DINOV3_CHECK_LAUNCH();
}

template <typename T, int D>
void launch_bwd(const BwdParams& p, int B, cudaStream_t stream) {
  const int64_t rows = int64_t(B) * p.N * p.H;
  DINOV3_LAUNCH(static_cast<unsigned>(ceil_div<int64_t>(rows, kThreads / 32)), kThreads, 0, stream,
                _rope_attention_bwd_delta_kernel<T, D>)(p, rows);
  DINOV3_CHECK_LAUNCH();
  launch_rotate<T, D>(rotate_args(p, p.q_rot, 0), B, stream);
  const dim3 grid(ceil_div(p.N, 64), p.H, B);
  const size_t smem = BwdTile<D>::template smem_bytes<T>();
  set_smem(_rope_attention_bwd_kernel<T, D>, smem);
  DINOV3_LAUNCH(grid, kThreads, smem, stream, _rope_attention_bwd_kernel<T, D>)(p);
  DINOV3_CHECK_LAUNCH();
  const int64_t pairs = rows * (D / 2);
  const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(pairs, 256), int64_t(1) << 20);
  DINOV3_LAUNCH(static_cast<unsigned>(blocks), 256, 0, stream, _rope_attention_bwd_dq_kernel<T, D>)(p, pairs);
  DINOV3_CHECK_LAUNCH();
}

template <int D>
void launch_bwd_f32(const BwdParams& p, int B, cudaStream_t stream) {
  const int64_t rows = int64_t(B) * p.N * p.H;
  DINOV3_LAUNCH(static_cast<unsigned>(ceil_div<int64_t>(rows, kThreads / 32)), kThreads, 0, stream,
                _rope_attention_bwd_delta_kernel<float, D>)(p, rows);
  DINOV3_CHECK_LAUNCH();
  const dim3 grid(ceil_div(p.N, kSimtBlock), p.H, B);
  const size_t smem = (size_t(2) * kSimtBlock * D + size_t(2) * kSimtTile * (D + 1) + 2 * kSimtTile) * sizeof(float);
  set_smem(_rope_attention_bwd_dkdv_f32_kernel<D>, smem);
  DINOV3_LAUNCH(grid, kThreads, smem, stream, _rope_attention_bwd_dkdv_f32_kernel<D>)(p);
  DINOV3_CHECK_LAUNCH();
  set_smem(_rope_attention_bwd_dq_f32_kernel<D>, smem);
  DINOV3_LAUNCH(grid, kThreads, smem, stream, _rope_attention_bwd_dq_f32_kernel<D>)(p);
  DINOV3_CHECK_LAUNCH();
}

}  // namespace

void rope_attention_fwd_cuda(std::uintptr_t qkv, std::uintptr_t sin, std::uintptr_t cos, std::uintptr_t k_rot,
                             std::uintptr_t out, std::uintptr_t lse, int64_t B, int64_t N, int64_t H, int64_t Dh,
                             int64_t num_prefix, int64_t tab_cols, int64_t stride_b, int64_t stride_n, int dtype,
                             float scale, std::uintptr_t stream) {
  check_args("rope_attention_fwd_cuda", B, N, H, Dh, num_prefix, tab_cols, dtype);
  if (dtype != kFloat32 && k_rot == 0)
    throw std::invalid_argument("rope_attention_fwd_cuda: bfloat16/float16 need the k_rot workspace (B, N, C)");
  FwdParams p;
  p.qkv = reinterpret_cast<const void*>(qkv);
  p.sin = reinterpret_cast<const float*>(sin);
  p.cos = reinterpret_cast<const float*>(cos);
  p.k_rot = reinterpret_cast<void*>(k_rot);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.N = static_cast<int>(N);
  p.H = static_cast<int>(H);
  p.num_prefix = static_cast<int>(num_prefix);
  set_tables(p, Dh, tab_cols);
  p.stride_b = stride_b;
  p.stride_n = stride_n;
  p.scale = scale;
  const cudaStream_t s = as_stream(stream);
  const int b = static_cast<int>(B);
  if (dtype == kBFloat16) {
    if (Dh == 64) launch_fwd<__nv_bfloat16, 64>(p, b, s); else launch_fwd<__nv_bfloat16, 128>(p, b, s);
  } else if (dtype == kFloat16) {
    if (Dh == 64) launch_fwd<__half, 64>(p, b, s); else launch_fwd<__half, 128>(p, b, s);
  } else {
    if (Dh == 64) launch_fwd_f32<64>(p, b, s); else launch_fwd_f32<128>(p, b, s);
  }
}

void rope_attention_bwd_cuda(std::uintptr_t qkv, std::uintptr_t sin, std::uintptr_t cos, std::uintptr_t out,
                             std::uintptr_t lse, std::uintptr_t dout, std::uintptr_t dqkv, std::uintptr_t dq_accum,
                             std::uintptr_t delta, std::uintptr_t q_rot, int64_t B, int64_t N, int64_t H, int64_t Dh,
                             int64_t num_prefix, int64_t tab_cols, int64_t stride_b, int64_t stride_n, int dtype,
                             float scale, std::uintptr_t stream) {
  check_args("rope_attention_bwd_cuda", B, N, H, Dh, num_prefix, tab_cols, dtype);
  if (dtype != kFloat32 && (q_rot == 0 || dq_accum == 0))
    throw std::invalid_argument("rope_attention_bwd_cuda: bfloat16/float16 need the q_rot (B, N, C) and dq_accum "
                                "(B, N, C) float32 workspaces");
  BwdParams p;
  p.q_rot = reinterpret_cast<void*>(q_rot);
  p.qkv = reinterpret_cast<const void*>(qkv);
  p.sin = reinterpret_cast<const float*>(sin);
  p.cos = reinterpret_cast<const float*>(cos);
  p.out = reinterpret_cast<const void*>(out);
  p.dout = reinterpret_cast<const void*>(dout);
  p.lse = reinterpret_cast<const float*>(lse);
  p.delta = reinterpret_cast<float*>(delta);
  p.dq_accum = reinterpret_cast<float*>(dq_accum);
  p.dqkv = reinterpret_cast<void*>(dqkv);
  p.N = static_cast<int>(N);
  p.H = static_cast<int>(H);
  p.num_prefix = static_cast<int>(num_prefix);
  set_tables(p, Dh, tab_cols);
  p.stride_b = stride_b;
  p.stride_n = stride_n;
  p.scale = scale;
  const cudaStream_t s = as_stream(stream);
  const int b = static_cast<int>(B);
  if (dtype == kFloat32) {
    if (Dh == 64) launch_bwd_f32<64>(p, b, s); else launch_bwd_f32<128>(p, b, s);
    return;
  }
  // dQ is accumulated with atomics across key blocks.
#if defined(DINOV3_HOST_EMULATION)
  std::memset(p.dq_accum, 0, sizeof(float) * B * N * H * Dh);
#else
  DINOV3_CUDA_CHECK(cudaMemsetAsync(p.dq_accum, 0, sizeof(float) * B * N * H * Dh, s));
#endif
  if (dtype == kBFloat16) {
    if (Dh == 64) launch_bwd<__nv_bfloat16, 64>(p, b, s); else launch_bwd<__nv_bfloat16, 128>(p, b, s);
  } else {
    if (Dh == 64) launch_bwd<__half, 64>(p, b, s); else launch_bwd<__half, 128>(p, b, s);
  }
}

}  // namespace dinov3
