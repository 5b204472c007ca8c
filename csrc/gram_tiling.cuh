// Index arithmetic of the Gram-loss kernels (csrc/gram_loss.cu), kept free of CUDA-only constructs so the same code
// also compiles as plain C++: tests/kernels/test_gram_cuda.py builds it on the CPU and checks it (tile-pair decoding,
// which thread owns which accumulator, which thread stages which elements).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DINOV3_HD __host__ __device__ __forceinline__
#else
#define DINOV3_HD inline
#endif

namespace dinov3 {
namespace gram {

constexpr int kTile = 64;       // rows and columns of one Gram tile
constexpr int kThreads = 128;   // 4 warps as 2x2 warp tiles of 32x32
// D columns staged per step of the Gram loop: 16-bit inputs 32, fp32 16 (keeps the fp32 kernel's staging registers,
// 4 tiles x 64 rows in flight, within budget).
DINOV3_HD constexpr int gram_chunk(int elem_bytes) { return elem_bytes == 2 ? 32 : 16; }
constexpr int kGradChunk = 64;  // D columns of one gradient CTA (a 64x64 output tile)

// Tile pairs of the upper triangle, column by column: pid = j(j+1)/2 + i, 0 <= i <= j.
DINOV3_HD int64_t num_tile_pairs(int64_t P) {
  const int64_t nb = (P + kTile - 1) / kTile;
  return nb * (nb + 1) / 2;
}

// The inverse of tile_pair: the index of pair (i, j), i <= j.
DINOV3_HD int64_t pair_index(int i, int j) { return static_cast<int64_t>(j) * (j + 1) / 2 + i; }

DINOV3_HD void tile_pair(int64_t pid, int& i, int& j) {
  int64_t jj = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(pid) + 1.0) - 1.0) * 0.5);
  while (jj * (jj + 1) / 2 > pid) --jj;         // guards against rounding of the square root
  while ((jj + 1) * (jj + 2) / 2 <= pid) ++jj;
  j = static_cast<int>(jj);
  i = static_cast<int>(pid - jj * (jj + 1) / 2);
}

// Accumulator element acc[mi][ni][c] (mi < 2, ni < 4, c < 4) of thread `lane` in warp `warp` sits at (row, col) of the
// 64x64 tile: the m16n8 C/D fragment of mma.sync (row = lane/4 (+8 for c >= 2), col = 2*(lane%4) + c%2) repeated over
// the warp's 32x32 sub-tile (2 x 4 fragments), warps arranged 2x2.
DINOV3_HD int frag_row(int warp, int lane, int mi, int c) { return (warp >> 1) * 32 + mi * 16 + (lane >> 2) + 8 * (c >> 1); }
DINOV3_HD int frag_col(int warp, int lane, int ni, int c) { return (warp & 1) * 32 + ni * 8 + 2 * (lane & 3) + (c & 1); }

// Staging a 64 x COLS tile from global memory: each thread moves VEC consecutive elements (16 bytes) of one row per
// pass; the column a thread handles never changes, so it can keep per-row sums of squares in registers.
template <int COLS, int VEC>
struct StageMap {
  static constexpr int kLanesPerRow = COLS / VEC;
  static constexpr int kRowsPerPass = kThreads / kLanesPerRow;
  static constexpr int kPasses = kTile / kRowsPerPass;
  static_assert(COLS % VEC == 0 && kThreads % kLanesPerRow == 0 && kTile % kRowsPerPass == 0, "bad stage map");
  static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "the lanes of one row must share a warp");
  DINOV3_HD static int row(int tid, int pass) { return tid / kLanesPerRow + pass * kRowsPerPass; }
  DINOV3_HD static int col(int tid) { return (tid % kLanesPerRow) * VEC; }
};

}  // namespace gram
}  // namespace dinov3
