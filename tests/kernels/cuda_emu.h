// A CPU emulation of the CUDA execution model, enough to run the kernels in csrc/ unchanged (compiled with
// DINOV3_HOST_EMULATION): every CUDA thread of a block is an OS thread, __syncthreads is a block barrier, warp
// shuffles, ldmatrix and mma.sync go through per-warp exchange buffers. The ldmatrix and mma.sync fragment layouts
// are written from the PTX ISA tables, independently of the kernels, so a kernel's fragment indexing is checked
// against them. One block runs at a time, so a function-local static serves as the block's shared memory.
// Included by the per-kernel harnesses (gram_cuda_emu.cpp, attention_cuda_emu.cpp, koleo_cuda_emu.cpp) before the
// .cu file.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
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
  std::atomic<int> live{32};  // lanes that have not returned yet
  uint32_t u[32];  // shuffles (any 32-bit type)
  uint32_t a[32][4];
  uint32_t b[32][2];
  const unsigned char* addr[32];
};
thread_local uint3 t_thread;
thread_local uint3 t_block;
dim3 g_grid, g_block;
std::barrier<>* g_block_bar = nullptr;
std::vector<std::unique_ptr<Warp>> g_warps;
std::vector<unsigned char> g_dyn_smem;  // dynamic shared memory of the running block
std::mutex g_err_mu;
std::string g_err;  // first misuse seen during a launch (reported by the launcher after the block)

inline int lane() { return static_cast<int>(t_thread.x & 31u); }
inline Warp& warp() { return *g_warps[t_thread.x >> 5]; }
inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_err_mu);
  if (g_err.empty()) g_err = what;
}
// Every warp-collective below is reached by all 32 lanes (else the exchange barrier would not complete); a lane that
// returned early drops out of the barrier, which this reports as the undefined behaviour it is on the GPU.
inline void check_converged(Warp& w, const char* op) {
  if (w.live.load() != 32) fail(std::string(op) + " with lanes that have exited (not all 32 lanes converged)");
}
// Dynamic shared memory of the running block, 16-byte aligned, poisoned (0x7f bytes: NaN in fp16, huge in bf16/fp32)
// so that reading what the block never wrote shows up in the result.
inline unsigned char* dynamic_smem() {
  const std::uintptr_t p = reinterpret_cast<std::uintptr_t>(g_dyn_smem.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~std::uintptr_t(15));
}
}  // namespace emu

#define threadIdx (::emu::t_thread)
#define blockIdx (::emu::t_block)
#define gridDim (::emu::g_grid)
#define blockDim (::emu::g_block)

inline void __syncthreads() { emu::g_block_bar->arrive_and_wait(); }

namespace emu {
// cp.async.cg.shared.global [dst], [src], 16, src_bytes (the bytes past src_bytes zero-filled), cp.async.commit_group
// and cp.async.wait_group N, per thread as in the PTX ISA. While a copy is in flight its 16 destination bytes are
// undefined: the issue poisons them (0x7f bytes: NaN in fp16, huge in bf16/fp32) and the data lands only when the
// thread waits for the group (the latest point the hardware allows). So a kernel that reads a tile before waiting
// for it, reads another thread's part before the __syncthreads after the wait, or issues a copy into a stage other
// threads are still reading, sees poisoned bytes and fails its test.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes;
};
thread_local std::vector<AsyncCopy> t_async_open;                 // issued, not yet committed
thread_local std::vector<std::vector<AsyncCopy>> t_async_groups;  // committed, oldest first
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 != 0) fail("cp.async shared address not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async src-size outside [0, 16]");
  if (src_bytes > 0 && reinterpret_cast<std::uintptr_t>(src) % 16 != 0)
    fail("cp.async global address not 16-byte aligned");
  std::memset(dst, 0x7f, 16);
  t_async_open.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes});
}
inline void cp_async_commit() {
  t_async_groups.push_back(std::move(t_async_open));
  t_async_open.clear();
}
inline void cp_async_wait(int pending) {
  while (static_cast<int>(t_async_groups.size()) > pending) {
    for (const AsyncCopy& c : t_async_groups.front()) {
      std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(c.dst + c.src_bytes, 0, 16 - c.src_bytes);
    }
    t_async_groups.erase(t_async_groups.begin());
  }
}
// At thread exit: a copy never waited for is a kernel bug here (its bytes were never read).
inline void check_async_drained() {
  bool pending = !t_async_open.empty();
  for (const auto& g : t_async_groups) pending = pending || !g.empty();
  if (pending) fail("cp.async copies issued and never waited for");
  t_async_open.clear();
  t_async_groups.clear();
}
}  // namespace emu

// Value of v in lane src_lane(lane) of this warp; every lane of the warp must take part (full-warp shuffles only).
template <typename V, typename F>
inline V emu_shuffle(unsigned mask, V v, int width, F src_lane) {
  static_assert(sizeof(V) == 4 && std::is_trivially_copyable_v<V>, "32-bit shuffles only");
  if (mask != 0xffffffffu) emu::fail("only full-warp shuffles are emulated");
  if (width != 32) emu::fail("only width-32 shuffles are emulated");
  emu::Warp& w = emu::warp();
  std::memcpy(&w.u[emu::lane()], &v, 4);
  w.bar.arrive_and_wait();  // everyone has written u[]
  emu::check_converged(w, "warp shuffle");
  V r;
  std::memcpy(&r, &w.u[src_lane(emu::lane()) & 31], 4);
  w.bar.arrive_and_wait();  // everyone has read before u[] is reused
  return r;
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  return emu_shuffle(mask, v, width, [lane_mask](int l) { return l ^ lane_mask; });
}
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
  return emu_shuffle(mask, v, width, [src](int) { return src; });
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }  // blocks run in order: earlier blocks' writes are visible
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// kernel<<<grid, block, smem_bytes>>>(args...): blocks in order, each with block.x threads (1-D blocks only).
template <typename K, typename... Args>
void emu_launch_smem(K* kernel, dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  const unsigned n = block.x;
  if (block.y != 1 || block.z != 1 || n % 32 != 0 || n == 0 || n > 1024)
    throw std::runtime_error("emu_launch: only 1-D blocks of whole warps (<= 1024 threads) are emulated");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("emu_launch: invalid grid");
  if (smem_bytes > 227 * 1024) throw std::runtime_error("emu_launch: more dynamic shared memory than a CTA may have");
  emu::g_grid = grid;
  emu::g_block = block;
  emu::g_err.clear();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(n);
        emu::g_block_bar = &bar;
        emu::g_warps.clear();
        for (unsigned w = 0; w < n / 32; ++w) emu::g_warps.push_back(std::make_unique<emu::Warp>());
        emu::g_dyn_smem.assign(smem_bytes + 16, 0x7f);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([=, &bar] {
            emu::t_thread = make_uint3(t, 0, 0);
            emu::t_block = make_uint3(bx, by, bz);
            kernel(args...);
            emu::check_async_drained();
            // A returned thread no longer takes part in barriers (as on the GPU).
            emu::Warp& w = emu::warp();
            w.live.fetch_sub(1);
            w.bar.arrive_and_drop();
            bar.arrive_and_drop();
          });
        for (auto& th : threads) th.join();
        if (!emu::g_err.empty())
          throw std::runtime_error("emulated block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " +
                                   std::to_string(bz) + "): " + emu::g_err);
      }
}
template <typename K, typename... Args>
void emu_launch(K* kernel, dim3 grid, dim3 block, Args... args) {
  emu_launch_smem(kernel, grid, block, 0, args...);
}

namespace emu {
// launch(kernel, grid, block, smem)(args...): the form the DINOV3_LAUNCH macro of a .cu file expands to.
template <typename K>
struct Launch {
  K* kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const { emu_launch_smem(kernel, grid, block, smem, args...); }
};
template <typename K>
Launch<K> launch(K* kernel, dim3 grid, dim3 block, size_t smem) { return Launch<K>{kernel, grid, block, smem}; }
}  // namespace emu

namespace emu {
// ---- tensor-core primitives from the PTX ISA (groupID = lane / 4, threadID_in_group = lane % 4) -------------------
template <typename T>
float dec16(uint32_t reg, int half) {
  const unsigned short bits = static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffffu);
  if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(bits));
  else return __bfloat162float(__ushort_as_bfloat16(bits));
}

// Publishes this lane's mma.sync operand registers to the warp and waits until every lane has done so.
inline void stage_mma_operands(Warp& w, int l, const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  std::memcpy(w.a[l], a, sizeof(a));
  w.b[l][0] = b0;
  w.b[l][1] = b1;
  w.bar.arrive_and_wait();
  check_converged(w, "mma.sync");
}

// mma.sync.m16n8k16.row.col.f32.{f16,bf16}: A element (m, k) lives in lane (m%8)*4 + (k%8)/2, register
// (m/8) + 2*(k/8), half k%2; B element (k, n) in lane n*4 + (k%8)/2, register k/8, half k%2; C/D element (m, n) in
// lane (m%8)*4 + n/2, register 2*(m/8) + n%2. The products of 16-bit inputs are exact; the 16-term sum is taken in
// double and added to the fp32 accumulator with one rounding (the hardware's internal order is unspecified).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = warp();
  const int l = lane();
  stage_mma_operands(w, l, a, b0, b1);
  for (int r = 0; r < 4; ++r) {
    // Which (m, n) this lane's register r holds, found by searching the table rather than inverting it.
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
inline uint32_t to_tf32(float x) {
  uint32_t u = __float_as_uint(x);
  if (std::isfinite(x)) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}

// mma.sync.m16n8k8.row.col.f32.tf32: A (m, k) in lane (m%8)*4 + k%4, register (m/8) + 2*(k/4); B (k, n) in lane
// n*4 + k%4, register k/4; C/D as for m16n8k16.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = warp();
  const int l = lane();
  stage_mma_operands(w, l, a, b0, b1);
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

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i
// (8 contiguous b16 each, 16-byte aligned). Destination register i of lane l holds, of matrix i, row l/4,
// elements 2(l%4) and 2(l%4)+1 (lower column in the low half); with .trans the matrix is read column-major, so
// the two halves are rows 2(l%4) and 2(l%4)+1 of column l/4.
inline void ldmatrix_m8n8_x4(uint32_t (&r)[4], const void* p, bool trans) {
  Warp& w = warp();
  const int l = lane();
  w.addr[l] = static_cast<const unsigned char*>(p);
  w.bar.arrive_and_wait();
  check_converged(w, "ldmatrix");
  if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t h[2];
    for (int e = 0; e < 2; ++e) {
      const int row = trans ? 2 * t + e : g;  // row of matrix i (whose address lane 8i + row gave)
      const int col = trans ? g : 2 * t + e;
      std::memcpy(&h[e], w.addr[8 * i + row] + 2 * col, 2);
    }
    r[i] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
  }
  w.bar.arrive_and_wait();
}
}  // namespace emu

// Entry points return 0, 1 (std::invalid_argument: a ValueError in Python) or 2 (anything else), message in err.
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
