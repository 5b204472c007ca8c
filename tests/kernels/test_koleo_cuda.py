"""The CUDA backend of the KoLeo loss (csrc/koleo_loss.cu), run on the CPU.

The real kernels (row norms, fused top-k search, distances, last-block loss reduction) are compiled for the host
with tests/kernels/koleo_cuda_emu.cpp (one OS thread per CUDA thread, barriers, warp shuffles, WMMA as whole-tile
operations; see tests/kernels/cuda_emu.h) and driven through the real Python glue (dinov3_kernels/_cuda/koleo.py) and
the registered op (so the backward runs on the emulated forward's indices, distances and norms). Oracle: float64.
The same kernels on a GPU are checked by the `gpu` tests of tests/kernels/test_koleo.py.

Tolerances: the kernels compute in fp32 from exactly representable inputs (fp16/bf16 values are exact in fp32; the
emulated tensor cores multiply them exactly and accumulate in fp32), so the loss, distances and norms are within
fp32 rounding of float64: LOSS_RTOL / DIST_RTOL. The gradient (torch ops in fp32) is rounded to the input dtype at the
end: GRAD_RTOL is a few units of that dtype's rounding, against the largest reference entry. Neighbour indices must
be exactly the float64 ones (ties to the lowest index); random cases assert first that no two of a row's top-(k+1)
float64 similarities are closer than MARGIN (far above the fp32 error of a cosine), so that the order is defined.
"""

import ctypes
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import _cuda_emu
from dinov3_kernels import _backend
from dinov3_kernels.koleo import PDIST_EPS, _koleo_reference_on_set

EPS = 1e-8
MARGIN = 1e-5
LOSS_RTOL = 1e-5
DIST_RTOL = 1e-5
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class _EmulatedExtension:
    """koleo_num_partials / koleo_fwd with the signatures of dinov3_kernels._C, on CPU tensors."""

    def __init__(self, lib):
        self.lib = lib
        lib.emu_koleo_num_partials.restype = ctypes.c_longlong
        lib.emu_koleo_num_partials.argtypes = [ctypes.c_longlong]
        lib.emu_koleo_kmax.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.emu_koleo_candidates.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_int,
                                             ctypes.c_char_p, ctypes.c_int]
        lib.emu_koleo_fwd.argtypes = ([ctypes.c_size_t, ctypes.c_int] + [ctypes.c_longlong] * 6 +
                                      [ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_longlong] +
                                      [ctypes.c_size_t] * 9 + [ctypes.c_char_p, ctypes.c_int])
        self.calls = 0

    def koleo_num_partials(self, n):
        return self.lib.emu_koleo_num_partials(n)

    def koleo_kmax(self, topk):
        err = ctypes.create_string_buffer(1024)
        out = self.lib.emu_koleo_kmax(topk, err, 1024)
        if out < 0:
            raise ValueError(err.value.decode())
        return out

    def koleo_candidates(self, topk, dtype_code, M, spares):
        err = ctypes.create_string_buffer(1024)
        out = self.lib.emu_koleo_candidates(topk, dtype_code, M, spares, err, 1024)
        if out < 0:
            raise ValueError(err.value.decode())
        return out

    def koleo_fwd(self, *args):
        self.calls += 1
        # The partial lists start as NaN / -1 (never a valid list entry): a list the search does not write shows up.
        n, kc, splits, part_val, part_idx = args[7], args[9], args[12], args[13], args[14]
        if part_val and n >= 1 and splits >= 1 and 1 <= kc <= 16:
            size = n * splits * self.koleo_kmax(kc) * 4
            ctypes.memset(part_val, 0xFF, size)
            ctypes.memset(part_idx, 0xFF, size)
        _cuda_emu.call(self.lib.emu_koleo_fwd, *args[:-1])  # the last argument is the stream


@pytest.fixture(scope="module")
def emulated_ext(tmp_path_factory):
    """csrc/koleo_loss.cu compiled for the host with tests/kernels/koleo_cuda_emu.cpp."""
    return _EmulatedExtension(_cuda_emu.build(tmp_path_factory, "koleo_cuda_emu.cpp"))


@pytest.fixture
def emulated_op(emulated_ext, monkeypatch):
    """torch.ops.dinov3_kernels.koleo_loss_fwd with backend "cuda" on CPU tensors, through the real glue
    (dinov3_kernels/_cuda/koleo.py) and the emulated kernels."""
    monkeypatch.setattr(_backend, "cuda_ext", lambda: emulated_ext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    before = emulated_ext.calls

    def op(search, offset, n, topk):
        out = torch.ops.dinov3_kernels.koleo_loss_fwd(search, offset, n, topk, EPS, "cuda")
        assert emulated_ext.calls > before, "the op did not reach the emulated kernels"
        return out

    return op


def _rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _float64_search(search, offset, n):
    """Float64 unit rows and the (n, M) similarities with each row's own entry at -inf."""
    u = F.normalize(search.double(), dim=-1, eps=EPS)
    dots = u[offset:offset + n] @ u.T
    rows = torch.arange(n)
    dots[rows, offset + rows] = float("-inf")
    return u, dots


def _check(op, search, offset, n, topk, need_margin=True, grads=True):
    """Emulated forward (loss, indices, distances, norms) and backward against float64."""
    dtype = search.dtype
    s_in = search.detach().clone().requires_grad_(True)
    loss, idx, dist, norm = op(s_in, offset, n, topk)
    loss.backward()
    assert torch.equal(s_in.detach(), search), "the kernels wrote into the input"

    u, dots = _float64_search(search, offset, n)
    order = torch.sort(dots, dim=1, descending=True, stable=True)
    if need_margin:
        top = order.values[:, :topk + 1]
        gap = (top[:, :-1] - top[:, 1:]).min().item()
        assert gap > MARGIN, f"test data: float64 similarities {gap:.1e} apart, too close to define the order"
    want_idx = order.indices[:, :topk]
    assert idx.dtype == torch.int64 and idx.shape == (n, topk)
    mism = (idx != want_idx).nonzero()
    assert mism.numel() == 0, f"{len(mism)} neighbour indices differ, first (row, k) {mism[0].tolist()}: " \
                              f"{idx[tuple(mism[0])].item()} vs float64 {want_idx[tuple(mism[0])].item()}"

    torch.testing.assert_close(norm.double(), search.double().norm(dim=1), rtol=1e-6, atol=1e-30)
    want_dist = (u[offset:offset + n].unsqueeze(1) - u[want_idx] + PDIST_EPS).norm(dim=-1)
    assert dist.dtype == torch.float32 and dist.shape == (n, topk)
    torch.testing.assert_close(dist.double(), want_dist, rtol=DIST_RTOL, atol=1e-7)

    s_ref = search.double().requires_grad_(True)
    ref = _koleo_reference_on_set(s_ref, offset, n, topk, EPS)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL * abs(ref.item()) + 1e-7, (loss.item(), ref.item())
    assert s_in.grad.dtype == dtype and s_in.grad.shape == search.shape
    if not grads:
        return idx, dist
    err = _rel_err(s_in.grad, s_ref.grad)
    assert err <= GRAD_RTOL[dtype], f"grad: relative error {err:.2e} > {GRAD_RTOL[dtype]:.1e}"
    return idx, dist


def _randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# (M, D, offset, n, topk): the smallest search set (one query row, the last row); one ragged tile; three blocks of
# query rows (the last-block reduction sums three partials) over three column tiles with D over two feature chunks;
# query rows at an offset spanning two blocks; the deepest register list (KMAX = 16). KMAX = 1, 4, 8, 16 here, 2 in
# the other tests. Last: the data seed (one whose float64 top-(k+1) similarities are MARGIN apart in every dtype).
CASES = [
    (2, 3, 1, 1, 1, 2003),
    (7, 5, 0, 7, 1, 7005),
    (130, 40, 0, 130, 3, 130040),
    (150, 24, 70, 65, 6, 150025),
    (40, 9, 3, 20, 11, 40009),
    (70, 72, 0, 70, 2, 70072),  # three 32-wide feature chunks: the 16-bit cp.async stages are reused
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-D{}-off{}-n{}-k{}".format(*c[:5]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_forward_backward(emulated_op, case, dtype):
    M, D, offset, n, topk, seed = case
    _check(emulated_op, _randn((M, D), dtype, seed), offset, n, topk)


@pytest.mark.parametrize("kind", ["transposed", "unaligned", "odd_d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_element_loads(emulated_op, kind, dtype):
    """stride_d != 1, rows off the 16-byte grid, and D not a multiple of the vector take the element-wise loads."""
    M, D = 70, 16
    if kind == "transposed":
        s = _randn((D, M), dtype, 1).T
    elif kind == "unaligned":
        s = _randn((M * (D + 1) + 1,), dtype, 2)[1:].view(M, D + 1)[:, :D]
    else:
        s = _randn((M, 13), dtype, 3)
    _check(emulated_op, s, 0, M, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_ties_go_to_the_lowest_index(emulated_op, dtype):
    """Duplicate rows give bit-identical similarities; they sit in different column tiles, both merge halves (even
    and odd columns) and both query blocks, so every tie-break path of the kernel is taken."""
    M, D = 140, 12
    s = _randn((M, D), dtype, 4)
    # Row 5's copies: the nearest neighbours of row 5 and of each copy are the other copies, all equally close.
    for c in (6, 64, 67, 131):
        s[c] = s[5]
    s[20] = 0.0  # a zero row: every similarity with it is exactly 0
    # No gradient check: a duplicate pair is pdist_eps·√D apart, so its gradient terms are ~1e4, cancel between the
    # two rows only up to fp32 rounding, and overflow fp16 (the reference's float64 gradient is finite).
    idx, dist = _check(emulated_op, s, 0, M, 4, need_margin=False, grads=False)
    copies = [5, 6, 64, 67, 131]
    for r in copies:
        assert idx[r].tolist() == [c for c in copies if c != r], (r, idx[r].tolist())
        assert torch.all(dist[r] <= 1e-6)
    # The zero row ties with everything: its neighbours are the lowest indices (itself excluded).
    assert idx[20].tolist() == [0, 1, 2, 3]


def test_emulated_nan_propagates(emulated_op):
    s = _randn((20, 8), torch.float32, 5)
    s[4, 2] = float("nan")
    loss, idx, dist, _ = emulated_op(s, 0, 20, 2)
    assert torch.isnan(loss) and torch.isnan(dist[4]).all()
    assert ((idx >= 0) & (idx < 20)).all()  # never an out-of-range index, even with no valid neighbour


def test_emulated_fp32_search_runs_on_fp16_copy_and_reranks(emulated_ext, monkeypatch):
    """fp32 input is searched on an fp16 copy of its unit rows, then re-ranked exactly. Rows 1 and 2 are both within
    fp16's resolution of row 0's direction (cos 1 - 4.5e-6 and 1 - 2e-6: the first component of u rounds to 1.0 in
    fp16 for both, the others to ~0), so the copy scores them equal and the tie goes to the lower index, 1; the true
    nearest is 2. With no spare candidates the search's pick stands (this fails if the search ran on fp32 rows, as
    the FMA search before it did); with the default spares the exact re-ranking returns 2, as float64 does."""
    from dinov3_kernels._cuda.koleo import koleo_fwd_cuda

    monkeypatch.setattr(_backend, "cuda_ext", lambda: emulated_ext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    s = torch.zeros(5, 16)
    s[0, 0] = 1.0
    s[1, 0], s[1, 1] = 1.0, 3e-3
    s[2, 0], s[2, 2] = 1.0, 2e-3
    s[3, 3] = s[4, 4] = 1.0
    _, dots = _float64_search(s, 0, 5)
    want = torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :1]
    assert want[0, 0] == 2
    _, idx, _, _ = koleo_fwd_cuda(s, 0, 5, 1, EPS, PDIST_EPS, spares=0)
    assert idx[0, 0] == 1
    loss, idx, dist, _ = koleo_fwd_cuda(s, 0, 5, 1, EPS, PDIST_EPS)
    assert torch.equal(idx, want)
    ref = _koleo_reference_on_set(s.double(), 0, 5, 1, EPS)
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL * abs(ref.item()) + 1e-7, (loss.item(), ref.item())


def test_emulated_bad_arguments(emulated_ext):
    s = torch.zeros(4, 4)
    # u_ws: a real pointer, never written (every call below is refused before a launch); 0 where its absence is tested.
    args = lambda dtype, M, n, topk, splits=1, kc=None, u=s.data_ptr(): (
        s.data_ptr(), dtype, M, 4, 4, 1, 0, n, topk, topk if kc is None else kc, EPS, PDIST_EPS, splits,
        0, 0, 0, u, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="dtype code 9"):
        emulated_ext.koleo_fwd(*args(9, 4, 4, 1))
    with pytest.raises(ValueError, match="topk < M"):
        emulated_ext.koleo_fwd(*args(0, 4, 4, 4))
    with pytest.raises(ValueError, match="offset"):
        emulated_ext.koleo_fwd(*args(0, 4, 5, 1))
    with pytest.raises(ValueError, match="splits"):
        emulated_ext.koleo_fwd(*args(0, 4, 4, 1, splits=2))  # 4 rows are one 64-row tile: one range at most
    with pytest.raises(ValueError, match="splits"):
        emulated_ext.koleo_fwd(*args(0, 4, 4, 1, splits=0))
    with pytest.raises(ValueError, match="candidates"):
        emulated_ext.koleo_fwd(*args(0, 4, 4, 2, kc=1))  # fewer candidates than neighbours
    with pytest.raises(ValueError, match="candidates"):
        emulated_ext.koleo_fwd(*args(0, 4, 4, 1, kc=4))  # candidates < M
    with pytest.raises(ValueError, match="16-bit"):
        emulated_ext.koleo_fwd(*args(2, 4, 4, 1, kc=2))  # bf16: nothing to re-rank
    with pytest.raises(ValueError, match="workspace"):
        emulated_ext.koleo_fwd(*args(0, 4, 4, 1, u=0))  # fp32 needs the fp16 copy's workspace
    # fp32: topk + spares, at most 16 and below M, never below topk; 16-bit: topk.
    assert [emulated_ext.koleo_candidates(k, 0, M, 8) for k, M in ((1, 100), (9, 100), (1, 4), (3, 4), (2, 3))] == \
        [9, 16, 3, 3, 2]
    assert emulated_ext.koleo_candidates(1, 0, 100, 0) == 1 and emulated_ext.koleo_candidates(2, 2, 100, 8) == 2
    with pytest.raises(ValueError, match="spares"):
        emulated_ext.koleo_candidates(1, 0, 100, -1)
    assert emulated_ext.koleo_num_partials(65) == 2
    assert [emulated_ext.koleo_kmax(k) for k in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    with pytest.raises(ValueError, match="topk"):
        emulated_ext.koleo_kmax(17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_split_search_is_independent_of_the_split(emulated_ext, monkeypatch, dtype):
    """The search set cut into 1..5 ranges (5 column tiles; ties across ranges included): the same bits every time,
    and the float64 neighbours."""
    from dinov3_kernels._cuda.koleo import koleo_fwd_cuda

    monkeypatch.setattr(_backend, "cuda_ext", lambda: emulated_ext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    M, D, n, topk = 300, 20, 70, 3
    s = _randn((M, D), dtype, 300020)
    s[250] = s[10]  # a tie between ranges: row 10's copy sits in the last tile, resolved to the lower index
    outs = [koleo_fwd_cuda(s, 0, n, topk, EPS, PDIST_EPS, splits=k) for k in (1, 2, 3, 4, 5)]
    for loss, idx, dist, norm in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(idx, outs[0][1]) and torch.equal(dist, outs[0][2])
    assert outs[0][1][10, 0].item() == 250
    if dtype == torch.float32:  # bf16 rounding reorders near-equal similarities; the other tests check its order
        _, dots = _float64_search(s, 0, n)
        want = torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :topk]
        assert torch.equal(outs[0][1], want)


def test_default_splits_fill_the_gpu():
    from dinov3_kernels._cuda.koleo import default_splits

    assert default_splits(1024, 1024, 132) == 8  # 16 query blocks x 8 ranges of 2 tiles: every range >= 2 tiles
    assert default_splits(256, 4096, 132) == 32  # 4 query blocks x 66 wanted, 32 ranges of 2 tiles
    assert default_splits(8192, 8192, 132) == 3  # 128 query blocks: 3 ranges give 384 blocks, ~2.9 per SM
    assert default_splits(100, 100, 132) == 1  # 2 tiles: one range
    assert default_splits(65536 * 64, 65536 * 64, 132) == 1


def test_bindings_validate_arguments():
    """The compiled module (no GPU needed to call it): the same argument checks as the emulated one."""
    C = _backend.CUDA_EXT
    if C is None:
        pytest.skip(f"CUDA extension not built: {_backend.CUDA_EXT_UNAVAILABLE}")
    assert [C.koleo_kmax(k) for k in (1, 3, 9)] == [1, 4, 16]
    with pytest.raises(ValueError, match="topk"):
        C.koleo_kmax(0)
    args = lambda splits: (0, 0, 4, 4, 4, 1, 0, 4, 1, 1, EPS, PDIST_EPS, splits, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="splits"):
        C.koleo_fwd(*args(2))
    with pytest.raises(ValueError, match="splits"):
        C.koleo_fwd(*args(0))
    assert C.koleo_candidates(1, 0, 100, 8) == 9 and C.koleo_candidates(1, 2, 100, 8) == 1
    with pytest.raises(ValueError, match="workspace"):
        C.koleo_fwd(*(args(1)[:16] + (0,) + args(1)[17:]))
