"""The CUDA backend of the Gram loss (csrc/gram_loss.cu).

CPU part, no GPU needed:
- the kernel's index arithmetic (csrc/gram_tiling.cuh, compiled as plain C++, called through ctypes) and a numpy model
  of the algorithm built on it (tile pairs, fragment ownership, masks, diagonal factor, scatter into rows i and j);
- the real kernels of csrc/gram_loss.cu compiled for the host with tests/kernels/gram_cuda_emu.cpp (one OS thread per
  CUDA thread, barriers, warp shuffles, mma.sync emulated from the PTX fragment tables) and driven through the real
  Python glue (dinov3_kernels/_cuda/gram.py), against the float64 reference.
GPU part (`gpu` marker): the compiled kernels against the float64 reference for every option, dtype and odd shape.
"""

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import _cuda_emu
from dinov3_kernels import _backend
from dinov3_kernels.gram import NORM_EPS, gram_loss, gram_loss_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
TILE = 64  # gram::kTile
THREADS = 128  # gram::kThreads
# (COLS, VEC) of every staging map the kernels instantiate: Gram loop (16-bit, fp32), gradient (16-bit, fp32).
STAGE_MAPS = ((32, 8), (16, 4), (64, 8), (64, 4))

_SHIM = r"""
#include "gram_tiling.cuh"
using namespace dinov3::gram;
template <int C, int V>
static void fill(int* rows, int* cols, int* info) {
  using M = StageMap<C, V>;
  info[0] = M::kPasses; info[1] = M::kLanesPerRow;
  for (int t = 0; t < kThreads; ++t) {
    cols[t] = M::col(t);
    for (int p = 0; p < M::kPasses; ++p) rows[t * M::kPasses + p] = M::row(t, p);
  }
}
extern "C" {
void tile_pair_c(long long pid, int* i, int* j) { tile_pair(pid, *i, *j); }
long long num_tile_pairs_c(long long P) { return num_tile_pairs(P); }
long long pair_index_c(int i, int j) { return pair_index(i, j); }
int frag_row_c(int w, int l, int mi, int c) { return frag_row(w, l, mi, c); }
int frag_col_c(int w, int l, int ni, int c) { return frag_col(w, l, ni, c); }
int gram_chunk_c(int bytes) { return gram_chunk(bytes); }
int consts_c(int which) { return which == 0 ? kTile : which == 1 ? kThreads : kGradChunk; }
void stage_map_c(int which, int* rows, int* cols, int* info) {
  switch (which) {
    case 0: fill<32, 8>(rows, cols, info); break;
    case 1: fill<16, 4>(rows, cols, info); break;
    case 2: fill<64, 8>(rows, cols, info); break;
    default: fill<64, 4>(rows, cols, info); break;
  }
}
}
"""


@pytest.fixture(scope="module")
def tiling(tmp_path_factory):
    """csrc/gram_tiling.cuh compiled for the host, as a ctypes library."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build csrc/gram_tiling.cuh")
    d = tmp_path_factory.mktemp("gram_tiling")
    src, lib = d / "shim.cpp", d / "libgram_tiling.so"
    src.write_text(_SHIM)
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{CSRC}", str(src), "-o", str(lib)], check=True)
    L = ctypes.CDLL(str(lib))
    L.num_tile_pairs_c.restype = ctypes.c_longlong
    L.num_tile_pairs_c.argtypes = [ctypes.c_longlong]
    L.tile_pair_c.argtypes = [ctypes.c_longlong, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    L.pair_index_c.restype = ctypes.c_longlong
    L.pair_index_c.argtypes = [ctypes.c_int, ctypes.c_int]
    assert (L.consts_c(0), L.consts_c(1)) == (TILE, THREADS), "update TILE/THREADS to match gram_tiling.cuh"
    return L


def _tile_pair(L, pid):
    i, j = ctypes.c_int(), ctypes.c_int()
    L.tile_pair_c(pid, ctypes.byref(i), ctypes.byref(j))
    return i.value, j.value


def _fragment_map(L):
    """(warp, lane, mi, ni, c) -> (row, col) of the 64x64 tile, as two int arrays of shape (4, 32, 2, 4, 4)."""
    rows = np.empty((4, 32, 2, 4, 4), dtype=np.int64)
    cols = np.empty_like(rows)
    for w in range(4):
        for lane in range(32):
            for mi in range(2):
                for ni in range(4):
                    for c in range(4):
                        rows[w, lane, mi, ni, c] = L.frag_row_c(w, lane, mi, c)
                        cols[w, lane, mi, ni, c] = L.frag_col_c(w, lane, ni, c)
    return rows, cols


# ---- CPU: index arithmetic -------------------------------------------------------------------------------------
def test_tile_pairs_enumerate_upper_triangle(tiling):
    for P in (1, 7, 64, 65, 196, 257, 1000, 4096):
        nb = -(-P // TILE)
        n = tiling.num_tile_pairs_c(P)
        assert n == nb * (nb + 1) // 2
        pairs = [_tile_pair(tiling, pid) for pid in range(n)]
        assert sorted(pairs) == sorted((i, j) for j in range(nb) for i in range(j + 1))
        # pair_index (where the gradient kernel finds a stored W tile) inverts tile_pair
        assert [tiling.pair_index_c(i, j) for i, j in pairs] == list(range(n))
    # Far beyond any real P: the square-root guess must still land on the right column.
    for nb in (46341, 65536, 200001):
        for i in (0, nb // 2, nb - 1):
            pid = nb * (nb - 1) // 2 + i
            assert _tile_pair(tiling, pid) == (i, nb - 1)


def test_fragments_cover_tile_once(tiling):
    rows, cols = _fragment_map(tiling)
    flat = rows * TILE + cols
    assert rows.min() == 0 and rows.max() == TILE - 1 and cols.min() == 0 and cols.max() == TILE - 1
    assert np.array_equal(np.sort(flat.ravel()), np.arange(TILE * TILE))
    # The mma.sync m16n8 C layout: lane/4 picks the row, 2*(lane%4) the column pair, c/2 adds 8 rows.
    lane = np.arange(32)[None, :, None, None, None]
    c = np.arange(4)[None, None, None, None, :]
    assert np.array_equal(rows % 16, (lane // 4 + 8 * (c // 2) + 0 * rows) % 16)
    assert np.array_equal(cols % 8, (2 * (lane % 4) + c % 2 + 0 * cols) % 8)


@pytest.mark.parametrize("which", range(len(STAGE_MAPS)))
def test_stage_maps_cover_tile_once(tiling, which):
    cols_n, vec = STAGE_MAPS[which]
    rows = (ctypes.c_int * (THREADS * 64))()
    cols = (ctypes.c_int * THREADS)()
    info = (ctypes.c_int * 2)()
    tiling.stage_map_c(which, rows, cols, info)
    passes, lanes_per_row = info[0], info[1]
    assert lanes_per_row == cols_n // vec and passes * THREADS * vec == TILE * cols_n
    r = np.array(rows[: THREADS * passes]).reshape(THREADS, passes)
    c = np.array(cols[:THREADS])
    cells = (r[:, :, None] * cols_n + c[:, None, None] + np.arange(vec)[None, None, :]).ravel()
    assert np.array_equal(np.sort(cells), np.arange(TILE * cols_n))
    assert np.all(c % vec == 0)  # 16-byte aligned vectors in shared memory and global memory
    # The row-norm reduction shuffles within aligned groups of lanes_per_row consecutive lanes of one warp.
    tid = np.arange(THREADS)
    group = tid // lanes_per_row
    assert lanes_per_row <= 32 and 32 % lanes_per_row == 0
    for p in range(passes):
        for gidx in np.unique(group):
            members = tid[group == gidx]
            assert len(set(r[members, p])) == 1 and len(set(members // 32)) == 1
    # Each thread's rows must be the same every chunk (it keeps their sums of squares in registers): the map
    # depends on tid and pass only, which the signature guarantees; and the chunk sizes match the kernels.
    assert tiling.gram_chunk_c(2) == 32 and tiling.gram_chunk_c(4) == 16


# ---- CPU: emulation of the kernel's algorithm ------------------------------------------------------------------
def _emulate_kernel(L, s, t, apply_norm, clamp_s, clamp_t, grad_s, grad_t, eps=NORM_EPS):
    """What gram_fwd + gram_norm_bwd compute, block by block, in float64: (loss, grad_s, grad_t)."""
    G, P, D = s.shape
    rows_map, cols_map = _fragment_map(L)
    num_pairs = L.num_tile_pairs_c(P)
    partial = np.full(G * num_pairs, np.nan)
    acc_s = np.full((G, P, D), np.nan)  # the gradient kernel writes every element once
    acc_t = np.full((G, P, D), np.nan)
    w_s, w_t = {}, {}
    M = G * P * P
    scale = 4.0 / M

    def tile(x, b):  # rows b*64.. of x, zero-padded like the masked loads
        out = np.zeros((TILE, D))
        rows = x[b * TILE:(b + 1) * TILE]
        out[: len(rows)] = rows
        return out

    def rinv(x):
        return 1.0 / np.maximum(np.sqrt((x * x).sum(1)), eps) if apply_norm else np.ones(len(x))

    for g in range(G):
        for pid in range(num_pairs):
            i, j = _tile_pair(L, pid)
            si, sj, ti, tj = tile(s[g], i), tile(s[g], j), tile(t[g], i), tile(t[g], j)
            r = [rinv(si), rinv(sj), rinv(ti), rinv(tj)]
            raw_s, raw_t = si @ sj.T, ti @ tj.T
            # The epilogue, element by element as the threads own them.
            gs = raw_s[rows_map, cols_map] * r[0][rows_map] * r[1][cols_map]
            gt = raw_t[rows_map, cols_map] * r[2][rows_map] * r[3][cols_map]
            neg_s = clamp_s & (gs < 0)
            neg_t = clamp_t & (gt < 0)
            valid = (i * TILE + rows_map < P) & (j * TILE + cols_map < P)
            e = np.where(valid, np.where(neg_s, 0.0, gs) - np.where(neg_t, 0.0, gt), 0.0)
            partial[g * num_pairs + pid] = (e * e).sum() * (1.0 if i == j else 2.0)
            for on, store, w in ((grad_s, w_s, np.where(neg_s, 0.0, e)), (grad_t, w_t, np.where(neg_t, 0.0, -e))):
                if on:  # the W tile the forward kernel writes for this pair
                    W = np.zeros((TILE, TILE))
                    W[rows_map, cols_map] = w
                    store[(g, i, j)] = W
        # The gradient kernel: row block i, every column at once (the column chunks are independent), tiles j in order.
        nb = (P + TILE - 1) // TILE
        for on, store, x, acc in ((grad_s, w_s, s[g], acc_s), (grad_t, w_t, t[g], acc_t)):
            if not on:
                continue
            for i in range(nb):
                out = np.zeros((TILE, D))
                for j in range(nb):
                    W = store[(g, i, j)] if i <= j else store[(g, j, i)].T
                    xj = tile(x, j)
                    out += W @ (xj * rinv(xj)[:, None])
                n = min(TILE, P - i * TILE)
                acc[g, i * TILE:i * TILE + n] = scale * out[:n]
    assert not np.isnan(partial).any(), "a tile pair was never visited"
    loss = partial.sum() / M

    def norm_bwd(x, gh):
        if not apply_norm:
            return gh
        norm = np.sqrt((x * x).sum(-1, keepdims=True))
        r = 1.0 / np.maximum(norm, eps)
        proj = np.where(norm > eps, (x * gh).sum(-1, keepdims=True) * r ** 3, 0.0)
        return gh * r - x * proj

    return loss, (norm_bwd(s, acc_s) if grad_s else None), (norm_bwd(t, acc_t) if grad_t else None)


OPTIONS = [
    dict(remove_neg=False, remove_only_teacher_neg=False),
    dict(remove_neg=True, remove_only_teacher_neg=False),
    dict(remove_neg=False, remove_only_teacher_neg=True),
]


@pytest.mark.parametrize("shape", [(2, 1, 3), (2, 7, 5), (1, 70, 4), (1, 130, 3)])
@pytest.mark.parametrize("apply_norm", [True, False])
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "remove_neg", "teacher_neg"])
def test_emulated_kernel_matches_reference(tiling, shape, apply_norm, opts):
    s = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref = gram_loss_reference(s, t, apply_norm=apply_norm, img_level=True, **opts)
    ref.backward()
    clamp_s = opts["remove_neg"]
    clamp_t = opts["remove_neg"] or opts["remove_only_teacher_neg"]
    loss, gs, gt = _emulate_kernel(tiling, s.detach().numpy(), t.detach().numpy(), apply_norm, clamp_s, clamp_t,
                                   True, True)
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(gs, s.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gt, t.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_emulated_kernel_zero_row_and_no_teacher_grad(tiling):
    """A zero row (norm below eps: the clamp branch of the norm backward) and grad_t off."""
    s = torch.randn(1, 9, 6, dtype=torch.float64)
    s[0, 4] = 0.0
    t = torch.randn(1, 9, 6, dtype=torch.float64)
    s.requires_grad_(True)
    ref = gram_loss_reference(s, t, apply_norm=True, remove_neg=True)
    ref.backward()
    loss, gs, gt = _emulate_kernel(tiling, s.detach().numpy(), t.numpy(), True, True, True, True, False)
    assert gt is None
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-10)
    np.testing.assert_allclose(gs, s.grad.numpy(), rtol=1e-8, atol=1e-12)


# ---- CPU: the real kernels, run by a CPU emulation of CUDA ------------------------------------------------------
class _EmulatedExtension:
    """gram_num_partials / gram_fwd / gram_norm_bwd with the signatures of dinov3_kernels._C, on CPU tensors."""

    def __init__(self, lib):
        self.lib = lib
        lib.emu_gram_num_partials.restype = ctypes.c_longlong
        lib.emu_gram_num_partials.argtypes = [ctypes.c_longlong] * 2 + [ctypes.c_char_p, ctypes.c_int]
        lib.emu_gram_fwd.argtypes = ([ctypes.c_size_t] * 9 + [ctypes.c_longlong] * 9 +
                                     [ctypes.c_int, ctypes.c_double, ctypes.c_double] + [ctypes.c_int] * 6 +
                                     [ctypes.c_char_p, ctypes.c_int])
        lib.emu_gram_norm_bwd.argtypes = ([ctypes.c_size_t] * 3 + [ctypes.c_longlong] * 4 +
                                          [ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_char_p, ctypes.c_int])

    def gram_num_partials(self, G, P):
        err = ctypes.create_string_buffer(1024)
        n = self.lib.emu_gram_num_partials(G, P, err, 1024)
        if n < 0:
            raise ValueError(err.value.decode())
        return n

    def gram_fwd(self, *args):
        # Every buffer the kernels must write starts as NaN (all bits set: NaN in fp32, fp16 and bf16), so an element
        # the gradient kernel misses, or a W tile / row norm the forward kernel does not store, shows in the result.
        G, P, D, code, grad_s, grad_t = args[9], args[10], args[11], args[18], args[24], args[25]
        if G >= 1 and P >= 1 and D >= 1 and code in (0, 1, 2):
            n_w = self.gram_num_partials(G, P) * 64 * 64 * (4 if code == 0 else 2)
            for on, acc, w, rinv in ((grad_s, args[2], args[4], args[6]), (grad_t, args[3], args[5], args[7])):
                if on:
                    ctypes.memset(acc, 0xFF, G * P * D * 4)
                    ctypes.memset(w, 0xFF, n_w)
                    ctypes.memset(rinv, 0xFF, G * (-(-P // 64)) * 64 * 4)
        _cuda_emu.call(self.lib.emu_gram_fwd, *args[:-1])  # the last argument is the stream

    def gram_norm_bwd(self, *args):
        _cuda_emu.call(self.lib.emu_gram_norm_bwd, *args[:-1])


@pytest.fixture(scope="module")
def emulated_ext(tmp_path_factory):
    """csrc/gram_loss.cu compiled for the host with tests/kernels/gram_cuda_emu.cpp (threads, barriers, mma.sync)."""
    return _EmulatedExtension(_cuda_emu.build(tmp_path_factory, "gram_cuda_emu.cpp"))


@pytest.fixture
def emulated_glue(emulated_ext, monkeypatch):
    """dinov3_kernels._cuda.gram.gram_fwd_cuda running on CPU tensors through the emulated kernels."""
    from types import SimpleNamespace

    from dinov3_kernels._cuda import gram as cuda_gram

    monkeypatch.setattr(_backend, "cuda_ext", lambda: emulated_ext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    return cuda_gram.gram_fwd_cuda


# Emulation error budget: fp32 runs the same float32 operations as the GPU; fp16/bf16 round W and the staged rows.
EMU_TOL = {torch.float32: 1e-5, "tf32": 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _emulated_case(glue, s, t, apply_norm, clamp_s, clamp_t, grad_t, tol_key):
    s_ref = s.double().requires_grad_(True)
    t_ref = t.double().requires_grad_(grad_t)
    opts = dict(remove_neg=clamp_s, remove_only_teacher_neg=clamp_t and not clamp_s)
    ref = gram_loss_reference(s_ref, t_ref, apply_norm=apply_norm, img_level=True, **opts)
    ref.backward()
    s_copy, t_copy = s.clone(), t.clone()
    loss, gs, gt = glue(s, t, apply_norm=apply_norm, clamp_s=clamp_s, clamp_t=clamp_t, grad_s=True, grad_t=grad_t,
                        eps=NORM_EPS)
    assert loss.dtype == torch.float32 and gs.dtype == s.dtype and gs.shape == s.shape and gs.is_contiguous()
    assert abs(loss.item() - ref.item()) <= EMU_TOL[tol_key] * abs(ref.item()) + 1e-12, (loss.item(), ref.item())
    assert _rel_err(gs, s_ref.grad) <= EMU_TOL[tol_key]
    if grad_t:
        assert _rel_err(gt, t_ref.grad) <= EMU_TOL[tol_key]
    else:
        assert gt.numel() == 0
    assert torch.equal(s, s_copy) and torch.equal(t, t_copy)


# (G, P, D): one ragged tile; three tiles (off-diagonal pairs, both scatter terms); D over several chunks.
EMU_SHAPES = [(2, 7, 5), (1, 130, 24), (1, 65, 100)]


@pytest.mark.parametrize("shape", EMU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_cuda_kernels(emulated_glue, shape, dtype):
    s = torch.randn(shape).to(dtype)
    t = torch.randn(shape).to(dtype)
    _emulated_case(emulated_glue, s, t, True, True, True, True, dtype)


@pytest.mark.parametrize("apply_norm", [True, False])
@pytest.mark.parametrize("clamp", ["none", "teacher"])
def test_emulated_cuda_options(emulated_glue, apply_norm, clamp):
    s = (0.3 * torch.randn(3, 20, 12)).to(torch.float16)
    t = (0.3 * torch.randn(3, 20, 12)).to(torch.float16)
    _emulated_case(emulated_glue, s, t, apply_norm, False, clamp == "teacher", clamp == "none", torch.float16)


@pytest.mark.parametrize("kind", ["transposed", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_strided(emulated_glue, kind, dtype):
    """stride_d != 1 and rows that are not 16-byte aligned take the element-wise load path."""
    G, P, D = 2, 70, 20
    if kind == "transposed":
        s = torch.randn(G, D, P).to(dtype).transpose(1, 2)
        t = torch.randn(G, D, P).to(dtype).transpose(1, 2)
    else:
        s = torch.randn(G * P * (D + 1) + 1).to(dtype)[1:].view(G, P, D + 1)[:, :, :D]
        t = torch.randn(G * P * (D + 1) + 1).to(dtype)[1:].view(G, P, D + 1)[:, :, :D]
    _emulated_case(emulated_glue, s, t, True, True, True, True, dtype)


def test_emulated_cuda_tf32(emulated_glue):
    # Not monkeypatch.setattr: the flag is a property of torch's cuBLAS module, which monkeypatch cannot restore.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        s, t = torch.randn(1, 70, 40), torch.randn(1, 70, 40)
        _emulated_case(emulated_glue, s, t, True, True, True, True, "tf32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_emulated_cuda_zero_rows_and_nan(emulated_glue):
    s, t = torch.randn(1, 20, 16), torch.randn(1, 20, 16)
    s[0, ::5] = 0.0
    _emulated_case(emulated_glue, s, t, True, True, True, True, torch.float32)
    s[0, 3, 2] = float("nan")
    loss, gs, _ = emulated_glue(s, t, apply_norm=True, clamp_s=True, clamp_t=True, grad_s=True, grad_t=False)
    assert torch.isnan(loss) and torch.isnan(gs).any()


def test_emulated_cuda_bad_dtype(emulated_ext):
    with pytest.raises(ValueError, match="dtype code 9"):
        emulated_ext.gram_fwd(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 9, 1.0, 1e-12, True, False, False, False,
                              False, False, 0)
    with pytest.raises(ValueError, match=">= 1"):
        emulated_ext.gram_num_partials(1, 0)


# ---- the compiled module (no GPU needed) -----------------------------------------------------------------------
def test_bindings_validate_arguments():
    C = _backend.CUDA_EXT
    if C is None:
        pytest.skip(f"CUDA extension not built: {_backend.CUDA_EXT_UNAVAILABLE}")
    assert C.gram_num_partials(2, 100) == 2 * 3
    assert C.gram_num_partials(1, 4096) == 64 * 65 // 2
    with pytest.raises(ValueError, match="dtype code 7"):
        C.gram_fwd(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 7, 1.0, 1e-12, True, False, False, False, False, False, 0)
    with pytest.raises(ValueError, match="dtype code 5"):
        C.gram_norm_bwd(0, 0, 0, 1, 1, 0, 0, 5, 1e-12, True, 0)
    with pytest.raises(ValueError, match=">= 1"):
        C.gram_num_partials(0, 3)


# ---- GPU: the kernels against the float64 reference ------------------------------------------------------------
# Errors are relative to the largest reference value (loss) or the largest reference gradient entry.
TOL_LOSS = {torch.float32: 1e-4, "tf32": 1e-2, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TOL_GRAD = {torch.float32: 1e-4, "tf32": 2e-2, torch.float16: 2e-2, torch.bfloat16: 6e-2}
SHAPES = [(2, 1, 3), (2, 7, 64), (1, 196, 384), (2, 257, 64), (1, 70, 1024), (1, 33, 4096)]
LARGE_SHAPE = (1, 4096, 64)

needs_cuda_ext = pytest.mark.skipif(
    not torch.cuda.is_available() or _backend.CUDA_EXT is None, reason="needs a CUDA GPU and the built extension"
)


def _rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check(shape, dtype, apply_norm, img_level, opts, teacher_grad, tol_key=None, make_input=None):
    tol_key = dtype if tol_key is None else tol_key
    gen = torch.Generator(device="cuda").manual_seed(0)
    if make_input is None:
        s = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        t = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    else:
        s, t = make_input(shape, dtype, gen)
    s_ref = s.detach().double().requires_grad_(True)
    t_ref = t.detach().double().requires_grad_(teacher_grad)
    ref = gram_loss_reference(s_ref, t_ref, apply_norm=apply_norm, img_level=img_level, **opts)
    ref.backward()
    # detach() keeps the strides (clone() would make the padded-pitch inputs contiguous).
    s_in, t_in = s.detach().requires_grad_(True), t.detach().requires_grad_(teacher_grad)
    s_copy, t_copy = s.detach().clone(), t.detach().clone()
    loss = gram_loss(s_in, t_in, apply_norm=apply_norm, img_level=img_level, backend="cuda", method="tiled", **opts)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= TOL_LOSS[tol_key] * max(abs(ref.item()), 1e-30), (loss.item(), ref.item())
    assert _rel_err(s_in.grad, s_ref.grad) <= TOL_GRAD[tol_key]
    if teacher_grad:
        assert _rel_err(t_in.grad, t_ref.grad) <= TOL_GRAD[tol_key]
    else:
        assert t_in.grad is None
    assert torch.equal(s_in.detach(), s_copy) and torch.equal(t_in.detach(), t_copy)  # inputs not mutated


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "remove_neg", "teacher_neg"])
def test_cuda_matches_reference(shape, dtype, opts):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check(shape, dtype, True, True, opts, teacher_grad=True)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("apply_norm", [True, False])
@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("teacher_grad", [True, False])
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "remove_neg", "teacher_neg"])
def test_cuda_options(dtype, apply_norm, img_level, teacher_grad, opts):
    # Without apply_norm the raw Gram entries are ~D: small features keep fp16 in range.
    def small(shape, dt, gen):
        return [(0.2 * torch.randn(shape, device="cuda", generator=gen)).to(dt) for _ in range(2)]

    torch.backends.cuda.matmul.allow_tf32 = False
    _check((3, 45, 80), dtype, apply_norm, img_level, opts, teacher_grad, make_input=None if apply_norm else small)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_p(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check(LARGE_SHAPE, dtype, True, True, OPTIONS[1], teacher_grad=False)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "remove_neg", "teacher_neg"])
def test_cuda_tf32(opts):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check((2, 257, 96), torch.float32, True, True, opts, teacher_grad=True, tol_key="tf32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _strided(kind):
    """Inputs that take the kernel's element-wise load path (stride_d != 1, or rows not 16-byte aligned)."""

    def make(shape, dtype, gen):
        G, P, D = shape
        out = []
        for _ in range(2):
            if kind == "transposed":  # stride_d = P
                x = torch.randn(G, D, P, device="cuda", generator=gen).to(dtype).transpose(1, 2)
            else:  # storage offset by one element and an odd row pitch
                buf = torch.randn(G * P * (D + 1) + 1, device="cuda", generator=gen).to(dtype)
                x = buf[1:].view(G, P, D + 1)[:, :, :D]
            out.append(x)
        return out

    return make


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("kind", ["transposed", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_strided_inputs(kind, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check((2, 100, 72), dtype, True, True, OPTIONS[1], teacher_grad=True, make_input=_strided(kind))


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_nan_propagates():
    s = torch.randn(1, 20, 32, device="cuda")
    t = torch.randn(1, 20, 32, device="cuda")
    s[0, 3, 5] = float("nan")
    s.requires_grad_(True)
    loss = gram_loss(s, t, remove_neg=True, backend="cuda", method="tiled")
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(s.grad).any()


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_zero_rows():
    """Rows with norm below eps (padding tokens): the clamp branch of the normalisation."""

    def make(shape, dtype, gen):
        s = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        t = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        s[:, ::5] = 0
        t[:, 1::7] = 0
        return s, t

    _check((2, 37, 40), torch.float32, True, True, OPTIONS[0], teacher_grad=True, make_input=make)
