"""Tests of dinov3_kernels/koleo.py: the reference against the official formulation and float64, the Triton kernels
(interpreter) and the CUDA kernels (GPU) against the float64 reference, distributed search over two gloo processes,
the op registration, and the public boundary."""

import os

import pytest
import torch
import torch.nn.functional as F

from dinov3_kernels import BackendUnavailableError, KoLeoLoss, KoLeoLossDistributed, koleo_loss, koleo_loss_reference
from dinov3_kernels import _backend

from _dist import spawn_gloo

# Relative tolerances (against the largest reference entry) of loss and gradients vs the float64 reference.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, "tf32": 5e-3}
GRAD_RTOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, "tf32": 2e-2}


class OfficialKoLeo(torch.nn.Module):
    """The official DINOv3 KoLeoLossDistributed (world size 1) written out step by step, as an oracle."""

    def __init__(self, topk=1):
        super().__init__()
        self.topk = topk
        self.pdist = torch.nn.PairwiseDistance(2, eps=1e-8)

    def forward(self, x, eps=1e-8):
        x = F.normalize(x, eps=eps, p=2, dim=-1)
        with torch.no_grad():
            dots = torch.mm(x, x.t())
            dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
            idx = torch.topk(dots, dim=1, k=self.topk).indices
        xe = x.unsqueeze(1).repeat(1, self.topk, 1).flatten(0, 1)
        return -torch.log(self.pdist(xe, x[idx].flatten(0, 1)) + eps).mean()


def _assert_close(got, want, rtol, what, atol=1e-9):
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max()
    err = (got - want).abs().max()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3e} > {rtol:.1e} * max |ref| {scale:.3e} + {atol:.0e}"


def _run(fn, x):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def _check(x, backend, topk=1, rtol=RTOL[torch.float32], grad_rtol=GRAD_RTOL[torch.float32], grads=True):
    loss, g = _run(lambda a: koleo_loss(a, topk=topk, backend=backend), x)
    ref, rg = _run(lambda a: koleo_loss_reference(a, topk=topk), x.double())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    _assert_close(loss, ref, rtol, f"loss ({backend}, n={x.shape[0]}, d={x.shape[1]}, topk={topk})")
    if grads:
        _assert_close(g, rg, grad_rtol, f"grad ({backend}, n={x.shape[0]}, d={x.shape[1]}, topk={topk})")
    return loss, g


def _clustered(n, d, per, dtype=torch.float32, device="cpu", spread=0.05):
    """Clusters of `per` tight points on well separated centres: each row's per-1 nearest neighbours are its
    cluster-mates with a wide margin, so low-precision search cannot pick a different set."""
    g = torch.Generator().manual_seed(n * 131 + d)
    centres = F.normalize(torch.randn((n + per - 1) // per, d, generator=g, dtype=torch.float64), dim=-1)
    x = centres.repeat_interleave(per, 0)[:n] + spread * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    x = x * (1 + torch.rand(n, 1, generator=g, dtype=torch.float64))  # norms differ from 1
    return x.to(device=device, dtype=dtype)


# ---- the reference is the spec --------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_reference_matches_official(topk):
    x = torch.randn(23, 7, dtype=torch.float64)
    got = _run(lambda a: koleo_loss_reference(a, topk=topk), x)
    want = _run(OfficialKoLeo(topk), x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(KoLeoLoss()(x), OfficialKoLeo(1)(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(KoLeoLossDistributed(topk=topk)(x), OfficialKoLeo(topk)(x), rtol=1e-12, atol=0)


def test_reference_by_hand():
    # Unit vectors at 0, 90 and 100 degrees (norms 2, 1, 3): nearest neighbours 0->1, 1->2, 2->1.
    import math

    a = math.radians(100)
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3 * math.cos(a), 3 * math.sin(a)]], dtype=torch.float64)
    d01 = math.sqrt(2.0)
    d12 = 2 * math.sin(math.radians(10) / 2)
    want = -(math.log(d01 + 1e-8) + 2 * math.log(d12 + 1e-8)) / 3
    assert koleo_loss_reference(x).item() == pytest.approx(want, rel=1e-7)


def test_reference_gradcheck():
    for topk in (1, 3):
        x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: koleo_loss_reference(a, topk=topk), (x,))


@pytest.mark.parametrize("n", [2, 3, 17, 300])
@pytest.mark.parametrize("d", [1, 5, 64, 384])
def test_reference_float32_against_float64(n, d):
    x = torch.randn(n, d)
    for topk in range(1, min(4, n - 1) + 1):
        _check(x, "reference", topk, grads=d > 1)


def test_autocast_is_off():
    x = torch.randn(40, 16)
    want = koleo_loss(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = koleo_loss(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- Triton kernels under the interpreter (CPU) --------------------------------------------------------------
@pytest.mark.parametrize("n,d,topk", [(2, 5, 1), (3, 1, 2), (17, 64, 3), (17, 384, 4), (300, 64, 1), (300, 5, 2),
                                      (70, 33, 4), (40, 8, 16), (2, 1, 1), (2, 384, 1), (3, 64, 2),
                                      (300, 384, 1)])
def test_triton_against_reference(triton_cpu, n, d, topk):
    _check(torch.randn(n, d), "triton", topk, grads=d > 1)


def test_triton_indices_and_distances(triton_cpu):
    # The op's neighbours, in order, and distances against the reference's dense search.
    x = torch.randn(70, 12)
    loss, idx, dist, norm = torch.ops.dinov3_kernels.koleo_loss_fwd(x, 0, 70, 3, 1e-8, "triton")
    u = F.normalize(x.double(), dim=-1, eps=1e-8)
    dots = u @ u.T
    dots.fill_diagonal_(float("-inf"))
    want = torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(idx, want)
    want_d = F.pairwise_distance(u.unsqueeze(1).expand(-1, 3, -1), u[want], eps=1e-8)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(norm.double(), x.double().norm(dim=1), rtol=1e-6, atol=0)


def test_triton_ties_go_to_the_lowest_index(triton_cpu):
    # All rows identical: row 0's neighbours are 1, 2, 3; every other row's are the lowest indices but itself.
    n, k = 37, 3
    x = torch.randn(1, 6).repeat(n, 1)
    _, idx, dist, _ = torch.ops.dinov3_kernels.koleo_loss_fwd(x, 0, n, k, 1e-8, "triton")
    want = torch.stack([torch.tensor([j for j in range(n) if j != i][:k]) for i in range(n)])
    assert torch.equal(idx, want)
    assert torch.isfinite(dist).all()
    _check(x, "triton", k, grads=False)
    _check(x, "reference", k, grads=False)


def test_duplicate_rows_finite(triton_cpu):
    # Exact duplicates: distance |0 + 1e-8·1| is tiny but the loss stays finite. The gradients of a mutually nearest
    # duplicate pair cancel (ill-conditioned), so only values are compared.
    x = torch.randn(30, 16)
    x[7] = x[3]
    x[20] = x[3]
    for backend in ("reference", "triton"):
        loss, g = _run(lambda a: koleo_loss(a, topk=2, backend=backend), x)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # u_i - u_j is exactly 0 in every precision, so even the values agree.
    _check(x, "triton", 2, grads=False)
    # Same direction, other norm: equal only up to rounding after normalisation, so log(distance) depends on the
    # last bits; finite is all that can be asked.
    x[11] = 2.5 * x[4]
    for backend in ("reference", "triton"):
        loss, g = _run(lambda a: koleo_loss(a, topk=2, backend=backend), x)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def _triton_fwd(x, topk, offset=0, n=None, splits=None, resident=None):
    from dinov3_kernels._triton.koleo import RERANK_EXTRA, koleo_fwd_triton

    # The search keeps topk + 8 candidates per split for fp32 input (its default, forced here), topk for 16-bit.
    return koleo_fwd_triton(x, offset, x.shape[0] - offset if n is None else n, topk, 1e-8, 1e-8, splits=splits,
                            extra=RERANK_EXTRA, resident=resident)


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("M,offset,n,d,topk,splits", [(2, 0, 2, 5, 1, None), (40, 20, 1, 33, 3, None),
                                                      (7, 0, 7, 150, 2, None), (197, 0, 197, 40, 3, 2),
                                                      (150, 60, 16, 17, 2, 3)])
def test_triton_resident_and_chunked_search(triton_cpu, resident, M, offset, n, d, topk, splits):
    # Both search kernels (query tile resident across the search tiles, or streamed in chunks with every search
    # tile) forced, whatever the launcher would pick: the same neighbours in order, ties to the lowest index, as the
    # float64 reference's dense search; distances and loss as the reference's. d = 150 spans three 64-wide chunks
    # (the interpreter's), the last one ragged; the others one padded chunk.
    x = torch.randn(M, d)
    x[M // 2] = x[0]  # a tie: the lower index wins
    loss, idx, dist, _ = _triton_fwd(x, topk, offset=offset, n=n, splits=splits, resident=resident)
    want = _reference_neighbors(x, topk, offset, n)
    assert torch.equal(idx, want)
    u = F.normalize(x.double(), dim=-1, eps=1e-8)
    want_d = F.pairwise_distance(u[offset:offset + n].unsqueeze(1).expand(-1, topk, -1), u[want], eps=1e-8)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-5, atol=1e-7)
    _assert_close(loss, -torch.log(want_d + 1e-8).mean(), RTOL[torch.float32], f"loss (resident={resident})")


def test_triton_search_kernel_choice():
    # The resident search wherever its GPU tiles (128-row query tile + 2 x 64-row search tiles, 16-bit: the input's
    # or, for fp32 input, the fp16 copy) fit shared memory, d <= 384 for every dtype, below 4096 query rows (from
    # there its unrolled top-k rounds cost more than the other searches save); the chunked one beyond (ViT-B/L/7B
    # widths); forcing overrides. Spare candidates for fp32 input only, on the CPU as on the GPU.
    from dinov3_kernels._triton.koleo import (RERANK_EXTRA, RESIDENT_MAX_ROWS, RESIDENT_SMEM, _block_sizes,
                                              _resident_smem, _use_symmetric)

    def pick(d, fp32, n=4095, on_cpu=False, resident=None):
        return _block_sizes(n, d, on_cpu, fp32, resident)

    assert RESIDENT_MAX_ROWS == 4096
    for fp32 in (False, True):
        for d in (1, 100, 160, 384):
            assert pick(d, fp32)[6] and pick(d, fp32)[:2] == (128, 64)
            assert not pick(d, fp32, n=4096)[6] and pick(d, fp32, n=4096)[1] == 128
            assert not pick(d, fp32, n=4096, on_cpu=True)[6]  # the interpreter follows
            # From 4096 rows 16-bit input takes the symmetric search (lists of 1), fp32 the chunked one (lists of 9).
            kc = 1 + (RERANK_EXTRA if fp32 else 0)
            assert _use_symmetric(4096, 4096, 0, False, kc, d) == (not fp32)
        for d in (385, 768, 1024, 4096):
            assert not pick(d, fp32)[6] and pick(d, fp32)[1] == 128
        assert pick(384, fp32, on_cpu=True)[6] and not pick(1024, fp32, on_cpu=True)[6]  # the interpreter follows
        assert pick(d, fp32)[5] == pick(d, fp32, on_cpu=True)[5] == (RERANK_EXTRA if fp32 else 0)
    assert not pick(384, False, resident=False)[6] and pick(1024, True, on_cpu=True, resident=True)[6]
    assert _resident_smem(384, 128, 64, 128, 2) == 196608 <= RESIDENT_SMEM < 227 * 1024
    assert pick(384, False)[2] == pick(384, True)[2] == 128 and pick(1024, False)[2] == pick(1024, True)[2] == 64
    assert pick(160, False)[2] == 64  # 3 x 64 columns, not 2 x 128
    # Chunked search: 128-row query tiles where the grid keeps 2 programs per SM with them (18 tiles x 15 splits at
    # n = 2304), 64-row ones below (n = 2048: 16 x 16 = 256 < 264 programs).
    assert pick(1024, False, n=2304)[0] == 128 and pick(1024, True, n=8192)[0] == 128
    assert pick(1024, False, n=2048)[0] == 64 and pick(768, True, n=256)[0] == 64


@pytest.mark.parametrize("d", [5, 33, 100])
def test_triton_norm_pass_writes_a_zero_padded_copy(triton_cpu, d):
    # The fp32 search runs on an fp16 copy of u padded to a multiple of 16 columns (aligned, unsplit 16-byte loads)
    # and reads every column of it: the norm pass must write u rounded to fp16 in the first d and zeros after, over
    # whatever the buffer held (NaN here), for rows that are not contiguous either.
    from dinov3_kernels._triton.koleo import _koleo_norm_kernel

    x = torch.randn(d, 37).T  # (37, d), column-major
    width = -(-d // 16) * 16
    u = torch.full((37, width), float("nan"), dtype=torch.float16)
    norm = torch.empty(37)
    _koleo_norm_kernel[(3,)](x, norm, u, 37, d, x.stride(0), x.stride(1), width, 1e-8, WRITE_U=True, BLOCK_R=16,
                             BLOCK_D=max(16, min(128, 1 << (d - 1).bit_length())))
    torch.testing.assert_close(norm, x.norm(dim=1))
    assert torch.equal(u[:, :d], (x / norm[:, None]).half())  # the pass's own norms (its sum order)
    assert (u[:, d:] == 0).all()


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("d", [20, 100])
def test_triton_16bit_rows_of_unaligned_width(triton_cpu, resident, d):
    # 16-bit rows whose width is not a multiple of 16 are searched on a zero-padded copy (aligned 16-byte loads):
    # neighbours in order (ties to the lowest index), distances and loss as the float64 reference's, on both search
    # kernels (the public op takes fp32 only under the interpreter; the backward reads the input rows, not the copy).
    from dinov3_kernels._triton.koleo import koleo_fwd_triton

    x = torch.randn(90, d).half()
    x[45] = x[0]  # a tie: the lower index wins
    loss, idx, dist, _ = koleo_fwd_triton(x, 0, 90, 2, 1e-8, 1e-8, resident=resident)
    want = _reference_neighbors(x, 2)
    assert torch.equal(idx, want)
    u = F.normalize(x.double(), dim=-1, eps=1e-8)
    want_d = F.pairwise_distance(u.unsqueeze(1).expand(-1, 2, -1), u[want], eps=1e-8)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-3, atol=1e-4)
    _assert_close(loss, koleo_loss_reference(x.double(), topk=2), RTOL[torch.bfloat16], f"loss (d={d})")


@pytest.mark.parametrize("resident", [True, False])
def test_triton_fp32_search_runs_on_fp16_copy_and_reranks(triton_cpu, resident):
    # fp32 input is searched on an fp16 copy of u, then re-ranked from the fp32 rows. Rows 1 and 2 are both within
    # fp16's resolution of row 0's direction (cos 1 - 4.5e-6 and 1 - 2e-6: u's first component rounds to 1.0 in
    # fp16 for both, the others to ~0), so the copy scores them equal and its tie goes to the lower index, 1; the
    # true nearest is 2. With no spare candidates the search's pick stands (this fails if the search ran on the
    # fp32 rows); with the spares the exact re-ranking returns 2, as the float64 reference does.
    from dinov3_kernels._triton.koleo import koleo_fwd_triton

    x = torch.zeros(5, 20)
    x[0, 0] = 1.0
    x[1, 0], x[1, 1] = 1.0, 3e-3
    x[2, 0], x[2, 2] = 1.0, 2e-3
    x[3, 3] = x[4, 4] = 1.0  # far from the others
    want = _reference_neighbors(x, 1)
    assert want[0, 0] == 2
    _, idx, _, _ = koleo_fwd_triton(x, 0, 5, 1, 1e-8, 1e-8, extra=0, resident=resident)
    assert idx[0, 0] == 1
    loss, idx, dist, _ = koleo_fwd_triton(x, 0, 5, 1, 1e-8, 1e-8, resident=resident)
    assert torch.equal(idx, want)
    _assert_close(loss, koleo_loss_reference(x.double(), topk=1), RTOL[torch.float32], "loss")


def test_triton_search_splits_and_merge(triton_cpu):
    # The search set split over programs (64-column tiles, so 150 rows make 3), each split's candidates merged: the
    # neighbours in order, distances and loss are the reference's, with and without an offset; identical rows in
    # every split keep the lowest indices, as one search does.
    x = torch.randn(150, 12)
    loss, idx, dist, _ = _triton_fwd(x, 2, splits=3)
    assert torch.equal(idx, _reference_neighbors(x, 2))
    u = F.normalize(x.double(), dim=-1, eps=1e-8)
    torch.testing.assert_close(dist.double(), F.pairwise_distance(u.unsqueeze(1).expand(-1, 2, -1), u[idx], eps=1e-8),
                               rtol=1e-5, atol=1e-7)
    _assert_close(loss, koleo_loss_reference(x.double(), topk=2), RTOL[torch.float32], "loss (3 splits)")
    _, idx, _, _ = _triton_fwd(x, 1, offset=70, n=16, splits=2)
    assert torch.equal(idx, _reference_neighbors(x, 1, 70, 16))
    x = torch.randn(1, 5).repeat(130, 1)
    _, idx, dist, _ = _triton_fwd(x, 3, offset=60, n=16, splits=3)
    assert torch.equal(idx, _reference_neighbors(x, 3, 60, 16)) and torch.isfinite(dist).all()


@pytest.mark.parametrize("n,d,topk,dtype,max_slabs", [(2, 5, 1, torch.float32, 64), (37, 12, 3, torch.float32, 64),
                                                      (200, 33, 4, torch.float32, 3), (150, 20, 2, torch.float16, 2),
                                                      (97, 70, 1, torch.float32, 2), (120, 24, 9, torch.float32, 2)])
def test_triton_symmetric_search(triton_cpu, monkeypatch, n, d, topk, dtype, max_slabs):
    # The symmetric search (query rows = the whole set: each score computed once, for i < j, and offered to both rows;
    # the interpreter's 16 x 16 tiles for lists of <= 16 slots, 32 x 16 for 32 (fp32, topk > 8), as the GPU's
    # 128 x 128 and 128 x 64) against the float64 reference's dense search: neighbours in order, ties to the lowest
    # index, distances, loss. Few slabs allowed, so that slabs hold several row tiles (the columns' state read back and
    # updated across row tiles) and the last one is ragged; fp16 input takes the unnormalised search (the norms
    # applied per tile), fp32 the fp16 copy with exact re-ranking.
    from dinov3_kernels._triton import koleo as tk

    monkeypatch.setattr(tk, "SYMMETRIC_MAX_SLABS", max_slabs)
    x = torch.randn(n, d).to(dtype)
    x[n // 2] = x[0]  # ties: the lower index wins
    x[n - 1] = x[n // 3]
    loss, idx, dist, _ = tk.koleo_fwd_triton(x, 0, n, topk, 1e-8, 1e-8, symmetric=True)
    want = _reference_neighbors(x, topk)
    assert torch.equal(idx, want)
    u = F.normalize(x.double(), dim=-1, eps=1e-8)
    want_d = F.pairwise_distance(u.unsqueeze(1).expand(-1, topk, -1), u[want], eps=1e-8)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-5, atol=1e-7)
    _assert_close(loss, koleo_loss_reference(x.double(), topk=topk), RTOL[torch.float32], "loss (symmetric)")
    kc = min(topk + tk.RERANK_EXTRA, n - 1) if dtype == torch.float32 else topk
    kcp = max(2, 1 << (kc - 1).bit_length())
    block_m, block_n, _, group, nsb, programs = tk._symmetric_sizes(n, kcp, True)
    assert (block_m, block_n) == ((16, 16) if kcp <= 16 else (32, 16)) and programs == nsb * (nsb + 1) // 2
    assert (group > 1) == (n > block_m * max_slabs)  # the cases above do make multi-tile slabs


def test_triton_symmetric_search_through_the_public_op(triton_cpu, monkeypatch):
    # koleo_loss(backend="triton") choosing the symmetric search by default (thresholds lowered so a small set takes
    # it; d = 401 is past the resident kernel) matches the float64 reference in loss and gradient, fp32 and top-2.
    from dinov3_kernels._triton import koleo as tk

    monkeypatch.setattr(tk, "SYMMETRIC_MIN_ROWS", 2)
    monkeypatch.setattr(tk, "SYMMETRIC_LONG_LIST_D", 1)
    monkeypatch.setattr(tk, "SYMMETRIC_MAX_SLABS", 2)
    chosen = []
    pick = tk._use_symmetric
    monkeypatch.setattr(tk, "_use_symmetric", lambda *a: chosen.append(pick(*a)) or chosen[-1])
    _check(torch.randn(45, 401), "triton", 2)
    assert chosen == [True]


def test_triton_symmetric_search_identical_rows(triton_cpu, monkeypatch):
    # Every score equal: each row's neighbours are the lowest indices but itself, although its lower candidates come
    # from other programs' column lists and its higher ones from its own row lists.
    from dinov3_kernels._triton import koleo as tk

    monkeypatch.setattr(tk, "SYMMETRIC_MAX_SLABS", 2)
    n, k = 70, 3
    x = torch.randn(1, 6).repeat(n, 1)
    _, idx, dist, _ = tk.koleo_fwd_triton(x, 0, n, k, 1e-8, 1e-8, symmetric=True)
    assert torch.equal(idx, torch.stack([torch.tensor([j for j in range(n) if j != i][:k]) for i in range(n)]))
    assert torch.isfinite(dist).all()


def test_triton_symmetric_pair_order(triton_cpu, monkeypatch):
    # The program -> (row slab, column slab) map covers the upper triangle once, for every program count the launcher
    # can make (SYMMETRIC_MAX_SLABS slabs: 2080 programs) and beyond.
    import triton
    import triton.language as tl

    from dinov3_kernels._triton.koleo import SYMMETRIC_MAX_SLABS, _triangle_pair

    monkeypatch.setitem(globals(), "_triangle_pair", _triangle_pair)  # a jit function resolves names as globals

    @triton.jit
    def pairs(A, B, N: tl.constexpr):
        p = tl.arange(0, N)
        a, b = _triangle_pair(p)
        tl.store(A + p, a)
        tl.store(B + p, b)

    N = 8192
    a, b = torch.empty(N, dtype=torch.int32), torch.empty(N, dtype=torch.int32)
    pairs[(1,)](a, b, N=N)
    want = [(i, j) for j in range(200) for i in range(j + 1)][:N]
    assert list(zip(a.tolist(), b.tolist())) == want
    assert SYMMETRIC_MAX_SLABS * (SYMMETRIC_MAX_SLABS + 1) // 2 <= N


def test_triton_symmetric_grouped_pair_order(triton_cpu, monkeypatch):
    # The order the programs take the slab pairs in: a bijection onto a <= b < NSB for every slab count and super-
    # column width (ragged last super-columns included), the order the roofline model counts, and local: 132
    # consecutive programs (one per SM of an H100/H200) read 26 of 64 slabs on average, 32 at most (the column-by-
    # column order: 45 on average, all 64 at the end).
    import triton
    import triton.language as tl

    from dinov3_kernels._triton import koleo as tk

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "benchmarks"))
    roofline = pytest.importorskip("roofline")
    for name in ("_triangle_pair", "_grouped_pair"):
        monkeypatch.setitem(globals(), name, getattr(tk, name))  # a jit function resolves names as globals

    @triton.jit
    def pairs(A, B, nsb, sup, N: tl.constexpr):
        p = tl.arange(0, N)
        a, b = _grouped_pair(p, nsb, sup)
        tl.store(A + p, a)
        tl.store(B + p, b)

    for nsb, sup in ((1, 2), (2, 2), (5, 2), (7, 3), (13, 8), (64, 8), (63, 8), (64, 5)):
        total = nsb * (nsb + 1) // 2
        N = triton.next_power_of_2(total)
        a, b = torch.empty(N, dtype=torch.int32), torch.empty(N, dtype=torch.int32)
        pairs[(1,)](a, b, nsb, sup, N=N)
        got = list(zip(a.tolist()[:total], b.tolist()[:total]))
        assert sorted(got) == sorted((i, j) for j in range(nsb) for i in range(j + 1)), (nsb, sup)
        assert got == roofline.koleo_symmetric_order(nsb, sup), (nsb, sup)
        if nsb == 64 and sup == 8:
            counts = [len({x for pair in got[w:w + 132] for x in pair}) for w in range(total - 131)]
            assert max(counts) <= 32 and sum(counts) / len(counts) < 27
            assert roofline.koleo_symmetric_slabs_in_flight(64, 8, 132) < 27
            assert roofline.koleo_symmetric_slabs_in_flight(64, None, 132) > 40  # column by column


def test_triton_symmetric_search_choice():
    # Symmetric only when the query rows are the whole set; by default from SYMMETRIC_MIN_ROWS rows where the resident
    # search does not fit, for short lists (16-bit input, topk <= 4) at any d and long ones (fp32: topk + 8) from
    # SYMMETRIC_LONG_LIST_D columns; forcing it for query rows at an offset is refused.
    from dinov3_kernels._triton.koleo import (SYMMETRIC_LONG_LIST_D, SYMMETRIC_MIN_ROWS, _symmetric_sizes,
                                              _use_symmetric)

    big, wide = SYMMETRIC_MIN_ROWS, SYMMETRIC_LONG_LIST_D
    assert _use_symmetric(big, big, 0, False, 1, 768) and not _use_symmetric(big - 1, big - 1, 0, False, 1, 768)
    assert not _use_symmetric(big, big, 0, True, 1, 384) and _use_symmetric(big, big, 0, True, 1, 384, True)
    assert not _use_symmetric(big, big, 0, False, 9, 1024) and _use_symmetric(big, big, 0, False, 9, wide)
    assert _use_symmetric(big, big, 0, False, 4, 1024) and not _use_symmetric(big, big, 0, False, 5, 1024)
    assert not _use_symmetric(big, big + 5, 5, False, 1, 768) and not _use_symmetric(10, 10, 0, False, 1, 768, False)
    with pytest.raises(ValueError, match="whole set"):
        _use_symmetric(10, 20, 10, False, 1, 768, symmetric=True)
    # GPU tiles: 128 x 128 (K chunks of 32) for lists of <= 16 slots, 128 x 64 for 32 (fp32, topk > 8); slabs bounded
    # by the merge's width (1024 candidates per row: with KCP 16, 63 slab lists + the own slab's) and the cap of 64;
    # from n = 4096 at least 528 programs (4 per SM) for top-k <= 8.
    assert _symmetric_sizes(16384, 16, False) == (128, 128, 32, 3, 43, 946)
    assert _symmetric_sizes(16384, 2, False) == (128, 128, 32, 2, 64, 2080)
    assert _symmetric_sizes(4096, 16, False)[3:] == _symmetric_sizes(4096, 2, False)[3:] == (1, 32, 528)
    assert _symmetric_sizes(4096, 32, False)[:3] == (128, 64, None)


def test_triton_merge_reranks_exactly(triton_cpu):
    # The merge kernel fed candidates whose search scores rank them backwards (as the fp16 search can for near ties,
    # test_triton_fp32_search_runs_on_fp16_copy_and_reranks): re-ranking recovers the reference's order; without it the
    # merge follows the scores.
    from dinov3_kernels._triton.koleo import koleo_merge_triton

    x = torch.randn(40, 12)
    n, topk, kc = 40, 2, 10
    true = _reference_neighbors(x, kc)
    cand_i = torch.full((n, 1, 16), 40, dtype=torch.int32)
    cand_v = torch.full((n, 1, 16), float("-inf"))
    cand_i[:, 0, :kc] = true.int()
    cand_v[:, 0, :kc] = torch.linspace(0.1, 0.9, kc)  # best last
    norm = x.norm(dim=1)
    loss, idx, dist = koleo_merge_triton(x, norm, cand_v, cand_i, 0, n, topk, kc, True, 1e-8, 1e-8)
    assert torch.equal(idx, true[:, :topk])
    _assert_close(loss, koleo_loss_reference(x.double(), topk=topk), RTOL[torch.float32], "merge loss")
    _, idx, _ = koleo_merge_triton(x, norm, cand_v, cand_i, 0, n, topk, kc, False, 1e-8, 1e-8)
    assert torch.equal(idx, true[:, [kc - 1, kc - 2]])


def test_search_grid_limits():
    # Splits go on grid axis 1 (limit 65535) and are capped by the merge's tile; none is empty; small n is spread
    # over about `programs` programs; query tiles (axis 0) past 2^31 - 1 are refused.
    from dinov3_kernels._triton.koleo import MAX_GRID_YZ, MAX_MERGE_WIDTH, _search_grid

    for n, M, kcp, programs, splits in ((1, 10**9, 2, 10**7, None), (1, 10**9, 2, None, 10**6), (5, 300, 16, 264, None),
                                       (1024, 1024, 16, 264, None), (10**6, 10**6, 2, 264, None)):
        tiles, got, per = _search_grid(n, M, 128, 64, kcp, programs or 1, splits)
        assert 1 <= got <= min(MAX_GRID_YZ, MAX_MERGE_WIDTH // kcp)
        assert per % 64 == 0 and (got - 1) * per < M <= got * per
        assert tiles == -(-n // 128)
    assert _search_grid(1024, 1024, 128, 64, 16, 264)[:2] == (8, 16)  # 128 programs for n = 1024
    with pytest.raises(ValueError, match="grid limit"):
        _search_grid(2**39, 2**39, 128, 64, 2, 264)


def test_triton_zero_row(triton_cpu):
    # A zero row takes F.normalize's eps branch: u = 0, gradient g / eps.
    x = torch.randn(20, 8)
    x[5] = 0.0
    _check(x, "triton", 2)


def test_triton_non_contiguous(triton_cpu):
    x = torch.randn(45, 24)
    x_t = x.T.contiguous().T  # column-major storage
    x_s = torch.stack([x, -x], dim=-1)[..., 0]  # feature stride 2
    x_r = torch.randn(90, 24)[::2]  # row stride 48
    for xi in (x_t, x_s, x_r):
        assert not xi.is_contiguous()
        _check(xi, "triton", 2)


def _check_offset(search, offset, n, topk, backend, rtol, grad_rtol):
    """The op on a search set whose query rows start at `offset` (a rank's rows in the gathered batch)."""
    from dinov3_kernels.koleo import _koleo_composed_on_set, _koleo_reference_on_set

    def op(a):
        if backend == "composed":
            return _koleo_composed_on_set(a, offset, n, topk, 1e-8)
        return torch.ops.dinov3_kernels.koleo_loss_fwd(a, offset, n, topk, 1e-8, backend)[0]

    loss, g = _run(op, search)
    ref, rg = _run(lambda a: _koleo_reference_on_set(a, offset, n, topk, 1e-8), search.double())
    _assert_close(loss, ref, rtol, f"loss with offset ({backend})")
    _assert_close(g, rg, grad_rtol, f"grad with offset ({backend})")


def test_triton_query_rows_at_an_offset(triton_cpu):
    search = torch.randn(40, 12)
    for offset, n, topk in ((0, 10, 2), (13, 10, 1), (30, 10, 3)):
        _check_offset(search, offset, n, topk, "triton", RTOL[torch.float32], GRAD_RTOL[torch.float32])


def test_triton_inputs_not_modified(triton_cpu):
    x = torch.randn(33, 10)
    x0 = x.clone()
    _run(lambda a: koleo_loss(a, topk=2, backend="triton"), x)
    koleo_loss(x, backend="triton")
    assert torch.equal(x, x0)


def test_triton_loss_scales_gradient(triton_cpu):
    x = torch.randn(19, 8)
    _, g = _run(lambda a: 3.5 * koleo_loss(a, topk=2, backend="triton"), x)
    _, rg = _run(lambda a: 3.5 * koleo_loss_reference(a, topk=2), x.double())
    _assert_close(g, rg, GRAD_RTOL[torch.float32], "scaled grad")


def test_triton_nan_propagates(triton_cpu):
    x = torch.randn(20, 8)
    x[4, 2] = float("nan")
    assert torch.isnan(koleo_loss_reference(x))
    assert torch.isnan(koleo_loss(x, backend="triton"))


# ---- composed backend (cuBLAS-style GEMM search, exact re-ranking) --------------------------------------------
def _reference_neighbors(x, topk, offset=0, n=None):
    u = F.normalize(x.double(), dim=-1, eps=1e-8)
    n = x.shape[0] - offset if n is None else n
    dots = u[offset:offset + n] @ u.T
    dots[torch.arange(n), offset + torch.arange(n)] = float("-inf")
    return torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :topk]


@pytest.mark.parametrize("n,d,topk", [(2, 5, 1), (3, 1, 2), (7, 64, 3), (197, 33, 1), (257, 384, 2), (40, 8, 16),
                                      (70, 33, 4)])
def test_composed_against_reference(n, d, topk):
    x = torch.randn(n, d)
    _check(x, "composed", topk, grads=d > 1)
    assert torch.equal(torch.ops.dinov3_kernels.nearest_neighbors(x, 0, n, topk, 1e-8), _reference_neighbors(x, topk))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_composed_other_dtypes(dtype):
    # 16-bit rows: computed in fp32 from the exact input values, like the reference; float64 in float64.
    x = _clustered(61, 24, 3, dtype)
    loss, g = _run(lambda a: koleo_loss(a, topk=2, backend="composed"), x)
    ref, rg = _run(lambda a: koleo_loss_reference(a, topk=2), x.double())
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and g.dtype == dtype
    _assert_close(loss, ref, 1e-12 if dtype == torch.float64 else RTOL[torch.float32], f"loss ({dtype})")
    _assert_close(g, rg, 1e-10 if dtype == torch.float64 else GRAD_RTOL[torch.bfloat16], f"grad ({dtype})")
    assert torch.equal(torch.ops.dinov3_kernels.nearest_neighbors(x, 0, 61, 4, 1e-8), _reference_neighbors(x, 4))


def _near_tie_groups(groups=8, d=16, gap=2e-4, seed=0):
    """Groups of three rows: a query and two neighbours about 0.1 rad away whose similarities to it differ by ~gap,
    far below bf16's rounding of the rows (~4e-3): a bf16 search often puts the wrong one first."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for q in F.normalize(torch.randn(groups, d, generator=g, dtype=torch.float64), dim=-1):
        o = torch.randn(2, d, generator=g, dtype=torch.float64)
        o = F.normalize(o - (o @ q)[:, None] * q, dim=-1)
        angle = torch.tensor([0.1, 0.1 - gap / 0.1], dtype=torch.float64)
        rows += [q, *(torch.cos(angle)[:, None] * q + torch.sin(angle)[:, None] * o)]
    return (torch.stack(rows) * (1 + torch.rand(3 * groups, 1, generator=g, dtype=torch.float64))).float()


def _bf16_search(err):
    """A stand-in search operand: the normalised rows rounded to bf16 (what a bf16 GEMM sees), error bound `err`."""
    def operand(search, s, eps):
        return s.bfloat16().float(), None, err, torch.mm
    return operand


BF16_ERR = 2 * (2 * 2.0**-8 + 2.0**-16 + 20 * 2.0**-24)  # the bound _search_operand states for bf16-rounded rows


def test_composed_reranking_fixes_the_search_order(monkeypatch):
    from dinov3_kernels import koleo

    x = _near_tie_groups()
    s = F.normalize(x, dim=-1).bfloat16().float()
    approx = (s @ s.T).fill_diagonal_(float("-inf")).argmax(1)
    want = _reference_neighbors(x, 1)
    assert (approx != want[:, 0]).sum() >= 3  # the constructed case: the bf16 search's first choice is wrong
    exact_rows = []
    real_exact = koleo._exact_neighbors
    monkeypatch.setattr(koleo, "_exact_neighbors", lambda s, g, k, b: exact_rows.append(g) or real_exact(s, g, k, b))
    # A bound of 0 claims the search exact, so any fix is the re-ranking's (no row is searched again).
    monkeypatch.setattr(koleo, "_search_operand", _bf16_search(0.0))
    assert torch.equal(torch.ops.dinov3_kernels.nearest_neighbors(x, 0, x.shape[0], 1, 1e-8), want)
    assert not exact_rows
    _check(x, "composed", 1)


def test_composed_unsettled_rows_are_searched_again(monkeypatch):
    # No spare candidates: the bf16 search's one candidate is wrong for some rows. With the honest bf16 bound those
    # rows cannot be settled and are searched exactly; with a bound of 0 they would keep the wrong neighbour.
    from dinov3_kernels import koleo

    x = _near_tie_groups(seed=1)
    want = _reference_neighbors(x, 1)
    monkeypatch.setattr(koleo, "COMPOSED_EXTRA", 0)
    monkeypatch.setattr(koleo, "_search_operand", _bf16_search(0.0))
    assert not torch.equal(torch.ops.dinov3_kernels.nearest_neighbors(x, 0, x.shape[0], 1, 1e-8), want)
    exact_rows = []
    real_exact = koleo._exact_neighbors
    monkeypatch.setattr(koleo, "_exact_neighbors", lambda s, g, k, b: exact_rows.append(g) or real_exact(s, g, k, b))
    monkeypatch.setattr(koleo, "_search_operand", _bf16_search(BF16_ERR))
    assert torch.equal(torch.ops.dinov3_kernels.nearest_neighbors(x, 0, x.shape[0], 1, 1e-8), want)
    assert exact_rows  # (with one candidate per row, no row has a margin: all are searched again)


def test_composed_ties_and_duplicates():
    n, k = 37, 3
    x = torch.randn(1, 6).repeat(n, 1)
    want = torch.stack([torch.tensor([j for j in range(n) if j != i][:k]) for i in range(n)])
    assert torch.equal(torch.ops.dinov3_kernels.nearest_neighbors(x, 0, n, k, 1e-8), want)
    _check(x, "composed", k, grads=False)
    x = torch.randn(30, 16)
    x[7] = x[3]
    x[20] = x[3]
    x[5] = 0.0  # F.normalize's eps branch
    assert torch.equal(torch.ops.dinov3_kernels.nearest_neighbors(x, 0, 30, 2, 1e-8), _reference_neighbors(x, 2))
    _check(x, "composed", 2, grads=False)


def test_composed_blocks_offsets_and_strides(monkeypatch):
    # Tiny GEMM blocks: several query-row blocks and column blocks, so the running top-k merges.
    from dinov3_kernels import koleo

    monkeypatch.setattr(koleo, "COMPOSED_BLOCK", 150)
    search = torch.randn(90, 24)[::2]  # row stride 48
    for offset, n, topk in ((0, 45, 1), (13, 20, 3), (30, 15, 2)):
        got = torch.ops.dinov3_kernels.nearest_neighbors(search, offset, n, topk, 1e-8)
        assert torch.equal(got, _reference_neighbors(search, topk, offset, n)), (offset, n, topk)
        _check_offset(search, offset, n, topk, "composed", RTOL[torch.float32], GRAD_RTOL[torch.float32])
    x = torch.randn(40, 24).T.contiguous().T  # column-major
    _check(x, "composed", 2)


def test_composed_inputs_not_modified_and_nan():
    x = torch.randn(33, 10)
    x0 = x.clone()
    _run(lambda a: koleo_loss(a, topk=2, backend="composed"), x)
    assert torch.equal(x, x0)
    x[4, 2] = float("nan")
    assert torch.isnan(koleo_loss(x, backend="composed"))


def test_composed_triton_candidate_dots(triton_cpu, monkeypatch):
    # The CUDA re-ranking helper (interpreter): the candidates' fp32 similarities, then the whole search through it.
    from dinov3_kernels import koleo
    from dinov3_kernels._triton.koleo import candidate_dots_triton

    s = F.normalize(torch.randn(50, 37), dim=-1)
    cand = torch.randint(0, 50, (20, 11))
    got = candidate_dots_triton(s, 7, 20, cand)
    want = (s[7:27].double().unsqueeze(1) * s[cand].double()).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    monkeypatch.setattr(koleo, "_use_triton_dots", lambda s: True)
    x = _near_tie_groups(groups=6)
    monkeypatch.setattr(koleo, "_search_operand", _bf16_search(0.0))
    assert torch.equal(torch.ops.dinov3_kernels.nearest_neighbors(x, 0, 18, 2, 1e-8), _reference_neighbors(x, 2))


def test_composed_opcheck_and_compile():
    s = torch.randn(24, 12)
    for offset, n, topk in ((0, 24, 1), (8, 8, 3)):
        torch.library.opcheck(torch.ops.dinov3_kernels.nearest_neighbors.default, (s, offset, n, topk, 1e-8))

    def f(a):
        return koleo_loss(a, topk=2, backend="composed") * 2.0

    x = torch.randn(21, 16)
    loss, g = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), x)
    ref, rg = _run(lambda a: 2.0 * koleo_loss_reference(a, topk=2), x.double())
    _assert_close(loss, ref, RTOL[torch.float32], "compiled loss")
    _assert_close(g, rg, GRAD_RTOL[torch.float32], "compiled grad")


# ---- registration: opcheck and torch.compile -----------------------------------------------------------------
@pytest.mark.parametrize("offset,n,topk", [(0, 24, 1), (8, 8, 3)])
def test_opcheck(triton_cpu, offset, n, topk):
    s = torch.randn(24, 12, requires_grad=True)
    torch.library.opcheck(torch.ops.dinov3_kernels.koleo_loss_fwd.default, (s, offset, n, topk, 1e-8, "triton"))


@pytest.mark.parametrize("bwd_backend", ["triton", "cuda"])
def test_backward_op(triton_cpu, bwd_backend):
    # The cuda backend's backward is plain torch ops (it runs on CPU tensors too); both must give the reference
    # gradient, and the op must pass opcheck.
    from dinov3_kernels.koleo import _koleo_reference_on_set

    search = torch.randn(30, 10)
    offset, n, topk = 5, 20, 3
    _, idx, dist, norm = torch.ops.dinov3_kernels.koleo_loss_fwd(search, offset, n, topk, 1e-8, "triton")
    grad = torch.tensor(1.7)
    args = (grad, search, idx, dist, norm, offset, n, 1e-8, bwd_backend)
    g = torch.ops.dinov3_kernels.koleo_loss_bwd(*args)
    _, rg = _run(lambda a: 1.7 * _koleo_reference_on_set(a, offset, n, topk, 1e-8), search.double())
    _assert_close(g, rg, GRAD_RTOL[torch.float32], f"backward op ({bwd_backend})")
    torch.library.opcheck(torch.ops.dinov3_kernels.koleo_loss_bwd.default, args)


def test_torch_compile_fullgraph(triton_cpu):
    x = torch.randn(21, 16)

    def f(a):
        return koleo_loss(a, topk=2, backend="triton") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, g = _run(compiled, x)
    ref, rg = _run(lambda a: 2.0 * koleo_loss_reference(a, topk=2), x.double())
    _assert_close(loss, ref, RTOL[torch.float32], "compiled loss")
    _assert_close(g, rg, GRAD_RTOL[torch.float32], "compiled grad")


# ---- backend choice ------------------------------------------------------------------------------------------
def test_auto_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.refresh_env()
    x = torch.randn(6, 3)
    assert _backend.choose_backend("auto", (x,)) == "reference"
    torch.testing.assert_close(koleo_loss(x), koleo_loss_reference(x))


def test_explicit_backend_errors(monkeypatch, triton_cpu):
    x = torch.randn(20, 3)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            koleo_loss(x, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="topk=17"):
        koleo_loss(x, topk=17, backend="triton")
    with pytest.raises(BackendUnavailableError, match="float32"):
        koleo_loss(x.double(), backend="triton")
    assert torch.isfinite(koleo_loss(x, topk=17, backend="reference"))
    assert torch.isfinite(koleo_loss(x, topk=17, backend="composed"))
    assert torch.isfinite(koleo_loss(x.double(), backend="composed"))


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,kwargs,err,match", [
    (lambda: torch.randn(1, 4), {}, ValueError, "neighbour"),
    (lambda: torch.randn(3, 4), dict(topk=3), ValueError, "neighbour"),
    (lambda: torch.randn(5), {}, ValueError, r"\(n, d\)"),
    (lambda: torch.randn(2, 5, 3), {}, ValueError, r"\(n, d\)"),
    (lambda: torch.randn(0, 3), {}, ValueError, "empty"),
    (lambda: torch.ones(5, 3, dtype=torch.int64), {}, TypeError, "floating"),
    (lambda: [[1.0, 2.0]], {}, TypeError, "Tensor"),
    (lambda: torch.randn(5, 3), dict(topk=0), ValueError, "topk"),
    (lambda: torch.randn(5, 3), dict(topk=1.5), ValueError, "topk"),
    (lambda: torch.randn(4, 3), dict(loss_group_size=3), ValueError, "multiple of the local batch"),
    (lambda: torch.randn(4, 3), dict(loss_group_size=8), ValueError, "divisible by the loss group"),
    (lambda: torch.randn(5, 3), dict(eps=0.0), ValueError, "eps"),
    (lambda: torch.randn(5, 3), dict(backend="magic"), ValueError, "unknown backend"),
])
def test_bad_input(make, kwargs, err, match):
    with pytest.raises(err, match=match):
        koleo_loss(make(), **kwargs)


# ---- two processes on gloo -----------------------------------------------------------------------------------
WORLD, LOCAL_N, DIM = 2, 6, 8
# (backend, loss_group_size, topk); the interpreter is slow to start, so Triton gets a representative subset.
CONFIGS = [(b, g, k) for b in ("reference", "composed", "triton") for g in (None, LOCAL_N, WORLD * LOCAL_N)
           for k in (1, 3) if b != "triton" or (g, k) in ((None, 3), (LOCAL_N, 1))]


def _dist_worker(rank, out_dir, backends):
    x_all = torch.randn(WORLD * LOCAL_N, DIM, generator=torch.Generator().manual_seed(1))
    x = x_all[rank * LOCAL_N:(rank + 1) * LOCAL_N]
    torch.set_num_threads(1)
    results = {}
    for backend, group, topk in CONFIGS:
        if backend in backends:
            xr = x.clone().requires_grad_(True)
            loss = KoLeoLossDistributed(topk=topk, loss_group_size=group, backend=backend)(xr)
            loss.backward()
            results[(backend, group, topk)] = (loss.detach(), xr.grad)
    try:
        koleo_loss(x, distributed=True, loss_group_size=4)
    except ValueError as exc:
        results["bad_group"] = str(exc)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_distributed_two_processes_gloo(tmp_path):
    backends = ["reference", "composed"]
    if _backend.why_not("triton", (torch.empty(1),)) is None:
        backends.append("triton")
    spawn_gloo(_dist_worker, WORLD, tmp_path, str(tmp_path), backends)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x_all = torch.randn(WORLD * LOCAL_N, DIM, generator=torch.Generator().manual_seed(1)).double()
    checked = 0
    for backend, group, topk in CONFIGS:
        if backend not in backends:
            continue
        checked += 1
        what = f"{backend}, loss_group_size={group}, topk={topk}"
        if group != LOCAL_N:
            # Whole world: the mean of the ranks' losses is the loss of the concatenated batch; each rank's gradient
            # is that of the sum of the ranks' losses (DDP's averaging then gives the gradient of their mean).
            want_loss, want_g = _run(lambda a: koleo_loss_reference(a, topk=topk), x_all)
            losses = torch.stack([res[r][(backend, group, topk)][0] for r in range(WORLD)])
            _assert_close(losses.mean(), want_loss, RTOL[torch.float32], f"world loss ({what})")
            g = torch.cat([res[r][(backend, group, topk)][1] for r in range(WORLD)])
            _assert_close(g, WORLD * want_g, GRAD_RTOL[torch.float32], f"world grad ({what})")
        else:
            # loss_group_size = one rank's batch: each rank is its own group, exactly the single-process loss.
            for r in range(WORLD):
                rows = x_all[r * LOCAL_N:(r + 1) * LOCAL_N]
                want_loss, want_g = _run(lambda a: koleo_loss_reference(a, topk=topk), rows)
                loss, g = res[r][(backend, group, topk)]
                _assert_close(loss, want_loss, RTOL[torch.float32], f"group loss ({what})")
                _assert_close(g, want_g, GRAD_RTOL[torch.float32], f"group grad ({what})")
    assert checked == len([c for c in CONFIGS if c[0] in backends])
    for r in range(WORLD):
        assert "multiple of the local batch size" in res[r]["bad_group"]


# ---- GPU -----------------------------------------------------------------------------------------------------
def _gpu_backends():
    return ["triton", "composed"] + (["cuda"] if _backend.CUDA_EXT is not None else [])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "composed"])
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("n,d,topk", [(2, 5, 1), (17, 64, 3), (257, 384, 1), (300, 1024, 4), (4099, 384, 2),
                                      (1000, 33, 16), (4500, 1024, 2)])
def test_gpu_against_reference(backend, dtype, n, d, topk):
    if backend not in _gpu_backends():
        pytest.fail("the CUDA extension is not built on this GPU machine")
    torch_dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    key = dtype if dtype == "tf32" else (torch.bfloat16 if torch_dtype != torch.float32 else torch.float32)
    x = _clustered(n, d, topk + 1, torch_dtype, "cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        _check(x, backend, topk, RTOL[key], GRAD_RTOL[key])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "composed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_offset_and_strides(backend, dtype):
    if backend not in _gpu_backends():
        pytest.fail("the CUDA extension is not built on this GPU machine")
    key = torch.float32 if dtype == torch.float32 else torch.bfloat16
    search = _clustered(600, 64, 3, dtype, "cuda")
    _check_offset(search, 200, 200, 2, backend, RTOL[key], GRAD_RTOL[key])
    x = _clustered(300, 72, 2, dtype, "cuda")
    for xi in (torch.stack([x, -x], dim=-1)[..., 0], x.T.contiguous().T, x[:, :65]):  # strided, unaligned rows
        assert not xi.is_contiguous() or xi.shape[1] == 65
        _check(xi, backend, 1, RTOL[key], GRAD_RTOL[key])


@pytest.mark.gpu
def test_gpu_random_fp32_indices_match():
    # Random data has almost no near ties at this size: the kernels' fp32 (IEEE) search finds the float64
    # neighbours, in order, for all but a handful of the 8000 (row, k) slots.
    x = torch.randn(2000, 128, device="cuda")
    u = F.normalize(x.double(), dim=-1, eps=1e-8)
    dots = u @ u.T
    dots.fill_diagonal_(float("-inf"))
    want = torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :4]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for backend in _gpu_backends():
            if backend == "composed":
                continue
            _, idx, _, _ = torch.ops.dinov3_kernels.koleo_loss_fwd(x, 0, 2000, 4, 1e-8, backend)
            assert (idx == want).float().mean() > 0.999, backend
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_fp32_search_is_reranked(backend):
    # fp32 input is searched on its fp16 copy of u whatever the TF32 flag, then re-ranked exactly (both kernels): the
    # float64 neighbours, in order, on clustered data (many near ties).
    if backend not in _gpu_backends():
        pytest.fail("the CUDA extension is not built on this GPU machine")
    x = _clustered(3000, 256, 6, torch.float32, "cuda", spread=0.02)
    _, idx, _, _ = torch.ops.dinov3_kernels.koleo_loss_fwd(x, 0, 3000, 4, 1e-8, backend)
    assert (idx == _reference_neighbors(x.cpu(), 4).cuda()).float().mean() > 0.9999


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_symmetric_search(dtype):
    # The symmetric search (the default from SYMMETRIC_MIN_ROWS rows at d > 384 for 16-bit input) and the chunked one,
    # both forced, on the same rows: the float64 neighbours, in order (random data: 16-bit input searched as given,
    # exact products; fp32 on its fp16 copy, re-ranked), and the same loss; n spans many slabs, the last tile ragged.
    from dinov3_kernels._triton.koleo import SYMMETRIC_MIN_ROWS, koleo_fwd_triton

    n = SYMMETRIC_MIN_ROWS + 1000
    x = torch.randn(n, 768, device="cuda").to(dtype)
    want = _reference_neighbors(x.cpu(), 2).cuda()
    got = {}
    for symmetric in (True, False):
        loss, idx, _, _ = koleo_fwd_triton(x, 0, n, 2, 1e-8, 1e-8, symmetric=symmetric)
        assert (idx == want).float().mean() > 0.999, (dtype, symmetric)
        got[symmetric] = loss
    torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["tf32", "bf16", "fp16"])
def test_gpu_composed_neighbors_are_exact(dtype):
    # The TF32/16-bit GEMM search plus exact re-ranking gives the float64 neighbours, in order, on clustered data
    # (many near ties inside the clusters) and on random data.
    torch_dtype = {"tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        for x in (_clustered(3000, 256, 6, torch_dtype, "cuda", spread=0.02),
                  torch.randn(2000, 128, device="cuda").to(torch_dtype)):
            idx = torch.ops.dinov3_kernels.nearest_neighbors(x, 0, x.shape[0], 4, 1e-8)
            want = _reference_neighbors(x.cpu(), 4).cuda()
            assert (idx == want).float().mean() > 0.9999, dtype
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_gpu_deterministic_and_auto():
    x = _clustered(8192, 384, 2, torch.bfloat16, "cuda")
    assert _backend.choose_backend("auto", (x,), None) in ("cuda", "triton")
    for backend in _gpu_backends():
        vals = {koleo_loss(x, backend=backend).item() for _ in range(5)}
        assert len(vals) == 1, f"{backend}: loss changed between runs: {vals}"


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_n():
    # No n×n matrix: the peak extra memory of forward + backward stays a small multiple of n·d (composed: plus its
    # fixed score block of COMPOSED_BLOCK fp32 entries and the top-k's workspace on it).
    from dinov3_kernels.koleo import COMPOSED_BLOCK

    n, d = 32768, 256
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for backend in _gpu_backends():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        koleo_loss(x, backend=backend).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        limit = 40 * n * d + (2 * 4 * COMPOSED_BLOCK if backend == "composed" else 0)
        assert extra < limit, f"{backend}: {extra / 2**20:.1f} MiB extra (an n×n fp32 matrix is 4 GiB)"
        x.grad = None


@pytest.mark.gpu
def test_gpu_forward_is_two_launches():
    # CUDA: row norms, then one search launch that also produces the distances and the loss. Triton: row norms, the
    # split search, the merge (neighbours, distances, partial losses) and the fixed-order sum.
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 384, device="cuda", dtype=torch.bfloat16)
    for backend in _gpu_backends():
        if backend == "composed":  # torch ops: many launches by design
            continue
        koleo_loss(x, backend=backend)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            koleo_loss(x, backend=backend)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()]
        assert len(kernels) == (4 if backend == "triton" else 2), f"{backend}: {kernels}"
