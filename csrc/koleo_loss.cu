// Fused KoLeo loss: nearest-neighbour search over the search set without an n×M matrix, then the distances and the
// loss, in three launches.
//
// Search set S (M, D) of raw features (any strides), query rows S[offset + i], i < n, u = s / max(|s|, eps):
//   nn_k(i) = k-th largest u_i·u_j over j != offset + i (ties to the lowest j), k < topk
//   d_ik    = |u_i - u_nn_k(i) + pdist_eps|,   loss = -1/(n topk) Σ log(d_ik + eps)
//
// koleo_norm_kernel: |s| per row (one warp per row), and zeroes the arrival counter; for fp32 input it also writes
// u = s / max(|s|, eps) rounded to fp16 (M, D): the copy the search runs on (fp16 keeps TF32's 10 mantissa bits).
// koleo_search_kernel: grid (query blocks, splits): one block per 64 query rows and one contiguous range of the search
// set (the search set split across blocks so that small n still fills the GPU). It sweeps the 64-column tiles of its
// range: the 64×64 tile of dots is built in shared memory on the tensor cores (WMMA on 16-bit rows: the input's, or
// fp32 input's fp16 copy of u), scaled by the inverse norms (1 for the copy), and merged into each row's sorted
// top-KMAX kept in registers by two threads per row; the two lists of a row are merged and written as the block's
// partial list.
// koleo_finish_kernel: one block per 64 query rows merges the rows' partial lists of every split (a strict total
// order: similarity, then index, so the result does not depend on the split); for fp32 input each warp re-ranks its
// rows' kc best candidates by their exact fp32 similarity from the input rows (kc = topk + spares: the fp16 search
// only has to keep the true neighbours among them); each warp then computes d_ik from the rows themselves (2 - 2cos
// would cancel for close pairs), and the last block to arrive sums the per-block partials in a fixed order
// (deterministic loss).
#include "common.cuh"

#include <mma.h>  // host emulation (tests/kernels/koleo_cuda_emu.cpp): wmma comes from the harness

#include <cmath>
#include <algorithm>
#include <climits>
#include <type_traits>

namespace dinov3 {
namespace koleo {

constexpr int kBlockM = 64;  // query rows per block
constexpr int kBlockN = 64;  // search rows per tile
constexpr int kBK = 32;      // feature chunk staged in shared memory
constexpr int kThreads = 128;
constexpr int kLdc = kBlockN + 4;  // fp32 dot tile; WMMA wants a multiple of 4

// Row pitch of the staged (16-bit) tiles: +8 halves keep WMMA's 32-byte alignment of every 16-row fragment.
template <typename T>
struct Pitch {
  static_assert(sizeof(T) == 2, "the search stages 16-bit rows only");
  static constexpr int value = kBK + 8;
};

__device__ __forceinline__ bool better(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// An empty list: (-inf, INT_MAX) everywhere. INT_MAX ("no neighbour") stays only if every similarity offered was NaN
// (or there was none).
template <int K>
__device__ __forceinline__ void clear_list(float (&vals)[K], int (&idx)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    vals[k] = -INFINITY;
    idx[k] = INT_MAX;
  }
}

// Sorted (best first) insertion; every index is a compile-time constant after unrolling, so the list stays in
// registers.
template <int K>
__device__ __forceinline__ void insert(float (&vals)[K], int (&idx)[K], float v, int c) {
  if (!better(v, c, vals[K - 1], idx[K - 1])) return;
  vals[K - 1] = v;
  idx[K - 1] = c;
#pragma unroll
  for (int s = K - 1; s > 0; --s) {
    if (better(vals[s], idx[s], vals[s - 1], idx[s - 1])) {
      const float tv = vals[s];
      vals[s] = vals[s - 1];
      vals[s - 1] = tv;
      const int ti = idx[s];
      idx[s] = idx[s - 1];
      idx[s - 1] = ti;
    }
  }
}

// The two threads of a row (lanes 2r, 2r + 1) end with the same top-KMAX of the union of their lists (a strict total
// order: value, then index).
template <int K>
__device__ __forceinline__ void merge_with_partner(float (&vals)[K], int (&idx)[K]) {
  float ov[K];
  int oi[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    ov[k] = __shfl_xor_sync(0xffffffffu, vals[k], 1);
    oi[k] = __shfl_xor_sync(0xffffffffu, idx[k], 1);
  }
#pragma unroll
  for (int k = 0; k < K; ++k) insert<K>(vals, idx, ov[k], oi[k]);
}

// Stages of the (sA, sB) chunk buffers: two (16-bit rows of kBK + 8 elements = 80 bytes, so every 16-byte vector of a
// staged row is aligned for cp.async).
constexpr int kStages = 2;

// Stages rows [first, first + valid) ∩ 64 rows, features [k0, k0 + kBK) into dst (64 × Pitch), zero-padded. ASYNC:
// the vector path copies with cp.async (the caller commits and waits); the strided path stays synchronous (its stores
// are visible after the same barrier).
template <typename T, bool ASYNC = false>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ s, int64_t first, int64_t valid, int64_t k0,
                                          int64_t D, int64_t sm, int64_t sd, bool vec) {
  static_assert(!ASYNC || Pitch<T>::value * sizeof(T) % 16 == 0, "16-byte aligned staged rows");
  constexpr int P = Pitch<T>::value;
  if (vec) {  // sd == 1, D and sm multiples of the vector, 16-byte aligned base: a vector is wholly in or out
    constexpr int V = 16 / sizeof(T);
    constexpr int per_row = kBK / V;
    for (int e = threadIdx.x; e < kBlockM * per_row; e += kThreads) {
      const int r = e / per_row;
      const int kv = (e % per_row) * V;
      const int64_t k = k0 + kv;
      const bool ok = r < valid && k < D;
      if constexpr (ASYNC) {
        cp_async16(dst + r * P + kv, ok ? s + (first + r) * sm + k : s, ok);
      } else {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (ok) v = *reinterpret_cast<const uint4*>(s + (first + r) * sm + k);
        *reinterpret_cast<uint4*>(dst + r * P + kv) = v;
      }
    }
  } else {
    for (int e = threadIdx.x; e < kBlockM * kBK; e += kThreads) {
      const int r = e / kBK;
      const int kk = e % kBK;
      const int64_t k = k0 + kk;
      dst[r * P + kk] = (r < valid && k < D) ? s[(first + r) * sm + k * sd] : from_float<T>(0.f);
    }
  }
}

// sC (64 × kLdc fp32) = dots of the 64 (16-bit) query rows starting at q0 with the 64 search rows starting at c0.
template <typename T>
__device__ __forceinline__ void dot_tile(T* sA, T* sB, float* sC, const T* __restrict__ s, int64_t q0, int64_t q_valid,
                                         int64_t c0, int64_t c_valid, int64_t D, int64_t sm, int64_t sd, bool vec) {
  using namespace nvcuda;
  constexpr int P = Pitch<T>::value;
  const int warp = threadIdx.x / 32;
  const int wr = (warp >> 1) * 32;  // each warp owns a 32×32 quarter of the tile
  const int wc = (warp & 1) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  // Two stages: chunk c + 1 is copied (cp.async) while chunk c is multiplied.
  constexpr int kTile = kBlockM * P;
  load_tile<T, true>(sA, s, q0, q_valid, 0, D, sm, sd, vec);
  load_tile<T, true>(sB, s, c0, c_valid, 0, D, sm, sd, vec);
  cp_async_commit();
  for (int64_t k0 = 0, c = 0; k0 < D; k0 += kBK, ++c) {
    if (k0 + kBK < D) {
      const int nxt = static_cast<int>((c + 1) & 1) * kTile;
      load_tile<T, true>(sA + nxt, s, q0, q_valid, k0 + kBK, D, sm, sd, vec);
      load_tile<T, true>(sB + nxt, s, c0, c_valid, k0 + kBK, D, sm, sd, vec);
    }
    cp_async_commit();  // possibly empty: one group per chunk
    cp_async_wait<1>();
    __syncthreads();  // chunk c has landed for every thread
    const T* a_s = sA + static_cast<int>(c & 1) * kTile;
    const T* b_s = sB + static_cast<int>(c & 1) * kTile;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];  // Bᵀ = rows of sB
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], a_s + (wr + 16 * i) * P + kk, P);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], b_s + (wc + 16 * j) * P + kk, P);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // every read of this stage is done before chunk c + 2 is copied into it
  }
  cp_async_wait<0>();  // the last (empty) group
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wr + 16 * i) * kLdc + wc + 16 * j, acc[i][j], kLdc, wmma::mem_row_major);
}

template <typename T>
__global__ void __launch_bounds__(256) koleo_norm_kernel(const T* __restrict__ s, int64_t M, int64_t D, int64_t sm,
                                                         int64_t sd, float eps, float* __restrict__ norm,
                                                         __half* __restrict__ u, int* __restrict__ counter) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (blockIdx.x == 0 && threadIdx.x == 0) *counter = 0;
  if (row >= M) return;
  const T* p = s + row * sm;
  float acc = 0.f;
  for (int64_t k = lane; k < D; k += 32) {
    const float v = to_float<T>(p[k * sd]);
    acc = fmaf(v, v, acc);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) norm[row] = sqrtf(acc);
  if (u != nullptr) {  // fp32 input: the fp16 copy of u = s / max(|s|, eps), (M, D) contiguous (every lane has acc)
    const float den = fmaxf(sqrtf(acc), eps);
    __half* ur = u + row * D;
    for (int64_t k = lane; k < D; k += 32) ur[k] = from_float<__half>(to_float<T>(p[k * sd]) / den);
  }
}

template <typename T, int KMAX>
__global__ void __launch_bounds__(kThreads) koleo_search_kernel(
    const T* __restrict__ s, const float* __restrict__ norm, int64_t M, int64_t D, int64_t sm, int64_t sd,
    int64_t offset, int64_t n, float eps, bool vec, bool normalized, int64_t cols_per_split,
    float* __restrict__ part_val, int* __restrict__ part_idx) {
  constexpr int P = Pitch<T>::value;
  __shared__ __align__(32) T sA[kStages * kBlockM * P];
  __shared__ __align__(32) T sB[kStages * kBlockN * P];
  __shared__ __align__(32) float sC[kBlockM * kLdc];
  // Double-buffered by tile parity: a fast thread may fill the next tile's inverse norms while a slow one still merges
  // the current tile (the barriers inside dot_tile order everything two tiles apart).
  __shared__ float sRj[2][kBlockN];

  const int tid = threadIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t q_valid = n - q0;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t c_end = c_begin + cols_per_split < M ? c_begin + cols_per_split : M;
  // Merge role: two threads per query row, each scanning every other column of a tile.
  const int my_row = tid >> 1;
  const int half = tid & 1;
  const int64_t q = q0 + my_row;
  const bool q_ok = q < n;
  const int64_t self = offset + q;
  // normalized: the rows are fp32 input's fp16 copy of u, already unit (scales 1).
  const float r_i = q_ok ? (normalized ? 1.f : 1.f / fmaxf(norm[self], eps)) : 0.f;

  float vals[KMAX];
  int idx[KMAX];
  clear_list<KMAX>(vals, idx);

  for (int64_t c0 = c_begin; c0 < c_end; c0 += kBlockN) {
    float* rj = sRj[((c0 - c_begin) / kBlockN) & 1];
    if (tid < kBlockN) {
      const int64_t c = c0 + tid;
      rj[tid] = c < c_end ? (normalized ? 1.f : 1.f / fmaxf(norm[c], eps)) : 0.f;
    }
    dot_tile<T>(sA, sB, sC, s, offset + q0, q_valid, c0, c_end - c0, D, sm, sd, vec);
    __syncthreads();
    if (q_ok) {
      const float* crow = sC + my_row * kLdc;
      for (int cc = half; cc < kBlockN; cc += 2) {
        const int64_t c = c0 + cc;
        if (c >= c_end || c == self) continue;
        insert<KMAX>(vals, idx, crow[cc] * r_i * rj[cc], static_cast<int>(c));
      }
    }
    // The next tile's first __syncthreads (inside dot_tile) orders these reads before sC is overwritten.
  }

  merge_with_partner<KMAX>(vals, idx);
  if (q_ok && half == 0) {
    const int64_t base = (q * static_cast<int64_t>(gridDim.y) + blockIdx.y) * KMAX;
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      part_val[base + k] = vals[k];
      part_idx[base + k] = idx[k];
    }
  }
}

// minBlocks 4: with the plain bound ptxas (nvcc 13.0) settles at 64 registers and spills 28 bytes at KMAX = 4; asking
// for 4 CTAs per SM (up to 128 registers) gives 61-82 registers and no spills at every KMAX.
template <typename T, int KMAX>
__global__ void __launch_bounds__(kThreads, 4) koleo_finish_kernel(
    const T* __restrict__ s, const float* __restrict__ norm, int64_t M, int64_t D, int64_t sm, int64_t sd,
    int64_t offset, int64_t n, int topk, int kc, float eps, float pdist_eps, float scale, int splits,
    const float* __restrict__ part_val, const int* __restrict__ part_idx, int64_t* __restrict__ out_idx,
    float* __restrict__ out_dist, float* __restrict__ partial, int* __restrict__ counter, float* __restrict__ loss) {
  __shared__ float sWarp[kThreads / 32];
  __shared__ double sTot[kThreads];
  __shared__ bool sLast;

  const int tid = threadIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  // Merge role: two threads per query row, each merging every other split's list.
  const int my_row = tid >> 1;
  const int half = tid & 1;
  const int64_t q = q0 + my_row;

  float vals[KMAX];
  int idx[KMAX];
  clear_list<KMAX>(vals, idx);
  if (q < n) {
    for (int sp = half; sp < splits; sp += 2) {
      const int64_t base = (q * splits + sp) * KMAX;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) insert<KMAX>(vals, idx, part_val[base + k], part_idx[base + k]);
    }
  }
  merge_with_partner<KMAX>(vals, idx);
  // Distances: warp w handles rows 16w .. 16w + 15, whose lists live in lanes 0, 2, .., 30.
  const int warp = tid / 32;
  const int lane = tid % 32;
  float warp_sum = 0.f;
  for (int rr = 0; rr < 16; ++rr) {
    const int64_t qr = q0 + warp * 16 + rr;
    const bool row_ok = qr < n;  // uniform over the warp
    int sel[KMAX];  // the row's neighbours, best first, in every lane
#pragma unroll
    for (int k = 0; k < KMAX; ++k) sel[k] = __shfl_sync(0xffffffffu, idx[k], 2 * rr);
    const float di = row_ok ? fmaxf(norm[offset + qr], eps) : 1.f;
    const T* xi = s + (row_ok ? offset + qr : 0) * sm;
    if constexpr (sizeof(T) == 4) {
      // fp32 input was searched on its fp16 copy: the kc best candidates re-ranked by their exact fp32 similarity
      // (x_i·x_j / (|x_i| |x_j|), as the reference's normalised dot), ties to the lowest index. Every lane holds the
      // reduced sums, so every lane keeps the same list.
      float rv[KMAX];
      int ri[KMAX];
      clear_list<KMAX>(rv, ri);
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        const int j = sel[k];
        if (k >= kc || !row_ok || j >= M) continue;  // uniform over the warp
        const T* xj = s + static_cast<int64_t>(j) * sm;
        float acc = 0.f;
        for (int64_t f = lane; f < D; f += 32) acc = fmaf(to_float<T>(xi[f * sd]), to_float<T>(xj[f * sd]), acc);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        insert<KMAX>(rv, ri, acc / di / fmaxf(norm[j], eps), j);
      }
#pragma unroll
      for (int k = 0; k < KMAX; ++k) sel[k] = ri[k];
    }
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if (k >= topk || !row_ok) continue;  // uniform over the warp
      const int j = sel[k];
      const bool found = j < M;
      const int64_t jj = found ? j : 0;
      const float dj = fmaxf(norm[jj], eps);
      const T* xj = s + jj * sm;
      float acc = 0.f;
      for (int64_t f = lane; f < D; f += 32) {
        // Division, as F.normalize does: duplicate rows give exactly u_i - u_j = 0.
        const float d = to_float<T>(xi[f * sd]) / di - to_float<T>(xj[f * sd]) / dj + pdist_eps;
        acc = fmaf(d, d, acc);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) {
        const float dist = found ? sqrtf(acc) : NAN;
        out_idx[qr * topk + k] = jj;
        out_dist[qr * topk + k] = dist;
        warp_sum += logf(dist + eps);
      }
    }
  }
  if (lane == 0) sWarp[warp] = warp_sum;
  __syncthreads();
  if (tid == 0) {
    float b = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) b += sWarp[w];
    partial[blockIdx.x] = b;
    __threadfence();  // the partial is visible to every block before this block is counted
    sLast = atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!sLast) return;
  double t = 0.0;
  for (int p = tid; p < static_cast<int>(gridDim.x); p += kThreads) t += static_cast<double>(__ldcg(partial + p));
  sTot[tid] = t;
  __syncthreads();
#pragma unroll
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (tid < w) sTot[tid] += sTot[tid + w];
    __syncthreads();
  }
  if (tid == 0) *loss = static_cast<float>(-sTot[0] * static_cast<double>(scale));
}

// Search on TS rows (ss: the input, or fp32 input's fp16 copy of u), finish on the input's T rows (s).
template <typename T, typename TS, int KMAX>
void launch_search(const void* s, const TS* ss, const float* norm, int64_t M, int64_t D, int64_t sm, int64_t sd,
                   int64_t ssm, int64_t ssd, bool svec, int64_t offset, int64_t n, int topk, int kc, float eps,
                   float pdist_eps, int splits, float* part_val, int* part_idx, int64_t* out_idx, float* out_dist,
                   float* partial, int* counter, float* loss, cudaStream_t stream) {
  const unsigned qblocks = static_cast<unsigned>(ceil_div<int64_t>(n, kBlockM));
  const int64_t cols_per_split = ceil_div<int64_t>(ceil_div<int64_t>(M, kBlockN), splits) * kBlockN;
  const float scale = static_cast<float>(1.0 / (static_cast<double>(n) * topk));
  const dim3 grid(qblocks, static_cast<unsigned>(splits));
  const bool normalized = sizeof(T) == 4;  // fp32 input: the search rows are the unit copy
#if defined(DINOV3_HOST_EMULATION)
  emu_launch(koleo_search_kernel<TS, KMAX>, grid, dim3(kThreads), ss, norm, M, D, ssm, ssd, offset, n, eps, svec,
             normalized, cols_per_split, part_val, part_idx);
  emu_launch(koleo_finish_kernel<T, KMAX>, dim3(qblocks), dim3(kThreads), static_cast<const T*>(s), norm, M, D, sm,
             sd, offset, n, topk, kc, eps, pdist_eps, scale, splits, static_cast<const float*>(part_val),
             static_cast<const int*>(part_idx), out_idx, out_dist, partial, counter, loss);
#else
  koleo_search_kernel<TS, KMAX><<<grid, kThreads, 0, stream>>>(ss, norm, M, D, ssm, ssd, offset, n, eps, svec,
                                                                normalized, cols_per_split, part_val, part_idx);
  DINOV3_CHECK_LAUNCH();
  koleo_finish_kernel<T, KMAX><<<qblocks, kThreads, 0, stream>>>(
      static_cast<const T*>(s), norm, M, D, sm, sd, offset, n, topk, kc, eps, pdist_eps, scale, splits, part_val,
      part_idx, out_idx, out_dist, partial, counter, loss);
  DINOV3_CHECK_LAUNCH();
#endif
}

template <typename T>
void launch_all(const void* s, int64_t M, int64_t D, int64_t sm, int64_t sd, int64_t offset, int64_t n, int topk,
                int kc, float eps, float pdist_eps, int splits, float* part_val, int* part_idx, float* norm, void* u_ws,
                int* counter, int64_t* out_idx, float* out_dist, float* partial, float* loss, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 8;
  // fp32 input: searched on the fp16 copy of u the norm kernel writes into u_ws ((M, D) contiguous).
  using TS = typename std::conditional<sizeof(T) == 4, __half, T>::type;
  __half* u = sizeof(T) == 4 ? static_cast<__half*>(u_ws) : nullptr;
#if defined(DINOV3_HOST_EMULATION)
  emu_launch(koleo_norm_kernel<T>, dim3(static_cast<unsigned>(ceil_div<int64_t>(M, kRowsPerBlock))),
             dim3(32 * kRowsPerBlock), static_cast<const T*>(s), M, D, sm, sd, eps, norm, u, counter);
#else
  koleo_norm_kernel<T><<<static_cast<unsigned>(ceil_div<int64_t>(M, kRowsPerBlock)), 32 * kRowsPerBlock, 0, stream>>>(
      static_cast<const T*>(s), M, D, sm, sd, eps, norm, u, counter);
  DINOV3_CHECK_LAUNCH();
#endif
  const TS* ss = sizeof(T) == 4 ? reinterpret_cast<const TS*>(u) : static_cast<const TS*>(s);
  const int64_t ssm = sizeof(T) == 4 ? D : sm, ssd = sizeof(T) == 4 ? 1 : sd;
  constexpr int64_t V = 16 / sizeof(TS);
  const bool svec = ssd == 1 && D % V == 0 && ssm % V == 0 && reinterpret_cast<std::uintptr_t>(ss) % 16 == 0;
  auto run = [&](auto kmax) {
    launch_search<T, TS, decltype(kmax)::value>(s, ss, norm, M, D, sm, sd, ssm, ssd, svec, offset, n, topk, kc, eps,
                                                pdist_eps, splits, part_val, part_idx, out_idx, out_dist, partial,
                                                counter, loss, stream);
  };
  if (kc <= 1)
    run(std::integral_constant<int, 1>{});
  else if (kc <= 2)
    run(std::integral_constant<int, 2>{});
  else if (kc <= 4)
    run(std::integral_constant<int, 4>{});
  else if (kc <= 8)
    run(std::integral_constant<int, 8>{});
  else
    run(std::integral_constant<int, 16>{});
}

}  // namespace koleo

int64_t koleo_num_partials(int64_t n) { return ceil_div<int64_t>(n, koleo::kBlockM); }

int koleo_kmax(int topk) {
  if (topk < 1 || topk > 16) throw std::invalid_argument("koleo_kmax: need 1 <= topk <= 16");
  return topk <= 1 ? 1 : topk <= 2 ? 2 : topk <= 4 ? 4 : topk <= 8 ? 8 : 16;
}

int koleo_candidates(int topk, int dtype, int64_t M, int spares) {
  if (topk < 1 || topk > 16) throw std::invalid_argument("koleo_candidates: need 1 <= topk <= 16");
  if (spares < 0) throw std::invalid_argument("koleo_candidates: need spares >= 0");
  if (dtype != kFloat32) return topk;  // 16-bit rows: exact products, no re-ranking
  const int64_t kc = std::min<int64_t>(std::min<int64_t>(static_cast<int64_t>(topk) + spares, 16), M - 1);
  return static_cast<int>(std::max<int64_t>(kc, topk));
}

void koleo_fwd_cuda(const void* s, int dtype, int64_t M, int64_t D, int64_t stride_m, int64_t stride_d,
                    int64_t offset, int64_t n, int topk, int candidates, float eps, float pdist_eps, int64_t splits,
                    float* part_val, int* part_idx, float* norm, void* u_ws, int* counter, int64_t* out_idx,
                    float* out_dist, float* partial, float* loss, cudaStream_t stream) {
  if (n < 1 || M < 2 || D < 1 || offset < 0 || offset + n > M)
    throw std::invalid_argument("koleo_fwd_cuda: need 1 <= n, offset + n <= M, M >= 2, D >= 1");
  if (topk < 1 || topk > 16 || topk >= M)
    throw std::invalid_argument("koleo_fwd_cuda: need 1 <= topk <= 16 and topk < M");
  if (candidates < topk || candidates > 16 || candidates >= M)
    throw std::invalid_argument("koleo_fwd_cuda: need topk <= candidates <= 16 and candidates < M, got " +
                                std::to_string(candidates));
  if (dtype != kFloat32 && candidates != topk)
    throw std::invalid_argument("koleo_fwd_cuda: 16-bit input keeps candidates == topk (nothing to re-rank)");
  if (dtype == kFloat32 && u_ws == nullptr)
    throw std::invalid_argument("koleo_fwd_cuda: fp32 input needs the (M, D) fp16 workspace u_ws");
  if (M >= INT_MAX) throw std::invalid_argument("koleo_fwd_cuda: the search set must have fewer than 2^31 rows");
  if (splits < 1 || splits > 65535 || splits > ceil_div<int64_t>(M, koleo::kBlockN))
    throw std::invalid_argument("koleo_fwd_cuda: need 1 <= splits <= min(65535, ceil(M / 64)), got " +
                                std::to_string(splits));
  const int sp = static_cast<int>(splits);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    koleo::launch_all<T>(s, M, D, stride_m, stride_d, offset, n, topk, candidates, eps, pdist_eps, sp, part_val,
                         part_idx, norm, u_ws, counter, out_idx, out_dist, partial, loss, stream);
  };
  switch (dtype) {
    case kFloat32: run(float{}); break;
    case kFloat16: run(__half{}); break;
    case kBFloat16: run(__nv_bfloat16{}); break;
    default:
      throw std::invalid_argument("koleo_fwd_cuda: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace dinov3
