"""Tests of dinov3_kernels/gram.py: the reference against the official formulation, every kernel backend against
the float64 reference (forward and backward), the op registration, and the public boundary."""

import os

import pytest
import torch
import torch.nn.functional as F

from dinov3_kernels import BackendUnavailableError, GramLoss, gram_loss, gram_loss_reference
from dinov3_kernels import _backend

# Relative tolerances of loss and gradients against the float64 reference, per input precision.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2, "tf32": 5e-3}
OPTIONS = [
    dict(),
    dict(remove_neg=True),
    dict(remove_only_teacher_neg=True),
    dict(apply_norm=False),
    dict(img_level=False),
    dict(img_level=False, remove_neg=True),
]


class OfficialGramLoss(torch.nn.Module):
    """The official DINOv3 GramLoss written out step by step (in-place masking, as upstream), as an oracle."""

    def __init__(self, apply_norm=True, remove_neg=True, remove_only_teacher_neg=False):
        super().__init__()
        self.apply_norm, self.remove_neg, self.remove_only_teacher_neg = apply_norm, remove_neg, remove_only_teacher_neg

    def forward(self, out, tgt, img_level=True):
        dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
        out, tgt = out.to(dtype), tgt.to(dtype)
        if self.apply_norm:
            tgt = F.normalize(tgt, dim=-1)
        if not img_level and tgt.dim() == 3:
            tgt = tgt.flatten(0, 1)
        tsim = torch.matmul(tgt, tgt.transpose(-1, -2))
        if self.apply_norm:
            out = F.normalize(out, dim=-1)
        if not img_level and out.dim() == 3:
            out = out.flatten(0, 1)
        ssim = torch.matmul(out, out.transpose(-1, -2))
        if self.remove_neg:
            tsim[tsim < 0] = 0.0
            ssim[ssim < 0] = 0.0
        elif self.remove_only_teacher_neg:
            tsim[tsim < 0] = 0.0
            ssim[(ssim < 0) & (tsim < 0)] = 0.0
        return torch.nn.MSELoss()(ssim, tsim)


def _features(B, N, D, dtype=torch.float32, device="cpu", related=True):
    """Student and teacher with realistic structure: correlated, mixed-sign similarities."""
    base = torch.randn(B, N, D, dtype=torch.float64)
    s = base + 0.5 * torch.randn(B, N, D, dtype=torch.float64) + 0.3
    t = (base if related else torch.randn(B, N, D, dtype=torch.float64)) + 0.3
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def _run(fn, s, t, teacher_grad=True, **opts):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t, **opts)
    loss.backward()
    return loss.detach(), s.grad, t.grad


def _assert_close(got, want, rtol, what, atol=1e-9):
    # Relative to the largest reference entry; atol covers references that are exactly 0 (e.g. N = 1).
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max()
    err = (got - want).abs().max()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3e} > {rtol:.1e} * max |ref| {scale:.3e} + {atol:.0e}"


def _check_against_reference(s, t, backend, rtol, teacher_grad=True, method="auto", **opts):
    loss, gs, gt = _run(lambda a, b, **o: gram_loss(a, b, backend=backend, method=method, **o), s, t,
                        teacher_grad, **opts)
    ref, rs, rt = _run(gram_loss_reference, s.double(), t.double(), teacher_grad, **opts)
    _assert_close(loss, ref, rtol, "loss")
    _assert_close(gs, rs, rtol, "student grad")
    if teacher_grad:
        _assert_close(gt, rt, rtol, "teacher grad")
    else:
        assert gt is None


# ---- the reference is the spec --------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_reference_matches_official_formulation(opts):
    s, t = _features(3, 9, 5, torch.float64)
    official = OfficialGramLoss(apply_norm=opts.get("apply_norm", True), remove_neg=opts.get("remove_neg", False),
                                remove_only_teacher_neg=opts.get("remove_only_teacher_neg", False))
    img_level = opts.get("img_level", True)
    got = _run(lambda a, b: gram_loss_reference(a, b, **opts), s, t)
    want = _run(lambda a, b: official(a, b, img_level=img_level), s, t)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)


def test_reference_by_hand():
    # Two unit rows at 90 degrees vs identical rows: Gs = I, Gt = all ones -> two off-diagonal errors of 1 out of 4.
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    t = torch.tensor([[[3.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    assert gram_loss_reference(s, t).item() == pytest.approx(0.5)
    # Anti-parallel teacher rows give Gt = -1 off the diagonal; clamping it leaves Gs = Gt = I.
    t2 = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], dtype=torch.float64)
    assert gram_loss_reference(s, t2, remove_neg=True).item() == pytest.approx(0.0)
    assert gram_loss_reference(s, t2).item() == pytest.approx(0.5)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_reference_gradcheck(opts):
    s, t = _features(2, 5, 4, torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: gram_loss_reference(a, b, **opts), (s, t))


def test_reference_float64_and_float32_dtypes():
    s, t = _features(1, 4, 3, torch.float64)
    assert gram_loss_reference(s, t).dtype == torch.float64
    assert gram_loss_reference(s.half(), t.bfloat16()).dtype == torch.float32


# ---- Triton kernels under the interpreter (CPU) --------------------------------------------------------------
@pytest.mark.parametrize("B,N,D", [(1, 1, 3), (3, 7, 3), (3, 7, 64), (1, 196, 64), (3, 196, 3), (1, 257, 384),
                                   (3, 257, 64), (1, 7, 384)])
def test_triton_tiled_shapes(triton_cpu, B, N, D):
    s, t = _features(B, N, D)
    _check_against_reference(s, t, "triton", RTOL[torch.float32], method="tiled", remove_neg=True)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("teacher_grad", [True, False])
def test_triton_tiled_options(triton_cpu, opts, teacher_grad):
    s, t = _features(3, 37, 20)
    _check_against_reference(s, t, "triton", RTOL[torch.float32], teacher_grad=teacher_grad, method="tiled", **opts)


def test_triton_tiled_unrelated_features(triton_cpu):
    # Many negative similarities on both sides exercise both clamps.
    s, t = _features(2, 150, 16, related=False)
    for opts in OPTIONS[:3]:
        _check_against_reference(s, t, "triton", RTOL[torch.float32], method="tiled", **opts)


def test_triton_tiled_zero_rows(triton_cpu):
    # A zero row takes F.normalize's eps branch: x / eps, gradient g / eps.
    s, t = _features(1, 20, 8)
    s[0, 3] = 0.0
    t[0, 5] = 0.0
    _check_against_reference(s, t, "triton", RTOL[torch.float32], method="tiled")


def test_triton_non_contiguous_inputs(triton_cpu):
    s, t = _features(3, 40, 24)
    s_nc = s.transpose(0, 1).contiguous().transpose(0, 1)  # same values, group stride != P*D
    t_nc = torch.stack([t, -t], dim=-1)[..., 0]  # feature stride 2
    assert not s_nc.is_contiguous() and not t_nc.is_contiguous()
    torch.testing.assert_close(t_nc, t)
    _check_against_reference(s_nc, t_nc, "triton", RTOL[torch.float32], method="tiled")
    _check_against_reference(s_nc, t_nc, "triton", RTOL[torch.float32], method="tiled", img_level=False)


def test_triton_two_dimensional_input(triton_cpu):
    s, t = _features(1, 50, 16)
    _check_against_reference(s[0], t[0], "triton", RTOL[torch.float32], method="tiled", img_level=False)


def test_triton_inputs_not_modified(triton_cpu):
    s, t = _features(2, 30, 10)
    s0, t0 = s.clone(), t.clone()
    for method in ("tiled", "factored"):
        _run(lambda a, b: gram_loss(a, b, backend="triton", method=method), s, t)
    gram_loss(s, t, backend="triton", remove_neg=True)
    assert torch.equal(s, s0) and torch.equal(t, t0)


def test_triton_nan_propagates(triton_cpu):
    s, t = _features(1, 20, 8)
    s[0, 2, 1] = float("nan")
    for opts in (dict(), dict(remove_neg=True)):
        assert torch.isnan(gram_loss_reference(s, t, **opts))
        assert torch.isnan(gram_loss(s, t, backend="triton", method="tiled", **opts))


def test_triton_loss_scales_gradient(triton_cpu):
    s, t = _features(2, 19, 8)
    s1 = s.clone().requires_grad_(True)
    (3.5 * gram_loss(s1, t, backend="triton", method="tiled")).backward()
    s2 = s.clone().requires_grad_(True)
    (3.5 * gram_loss_reference(s2, t)).backward()
    _assert_close(s1.grad, s2.grad, RTOL[torch.float32], "scaled grad")


# ---- the Triton design: prologue, persistent tile pairs, deterministic gradient ----------------------------------
def _small_tiles(monkeypatch):
    # 16-wide tiles everywhere, so small inputs take many tiles, pairs and column chunks.
    from dinov3_kernels._triton import gram as tg

    cfg = dict(BLOCK=16, BLOCK_K=16, BLOCK_N=16, BLOCK_D=16, ROW_BLOCKS=2, fwd=(4, 1), bwd=(4, 1))
    monkeypatch.setattr(tg, "_block_sizes", lambda *a, **k: cfg)
    return tg


def _kernel_vs_reference(tg, s, t, opts, grad_t, programs, rtol):
    clamp_s = opts.get("remove_neg", False)
    clamp_t = clamp_s or opts.get("remove_only_teacher_neg", False)
    apply_norm = opts.get("apply_norm", True)
    loss, gs, gt = tg.gram_fwd_triton(s, t, apply_norm=apply_norm, clamp_s=clamp_s, clamp_t=clamp_t, grad_s=True,
                                      grad_t=grad_t, programs=programs)
    ref, rs, rt = _run(gram_loss_reference, s.double(), t.double(), **opts)
    _assert_close(loss, ref, rtol, "loss")
    _assert_close(gs, rs, rtol, "student grad")
    if grad_t:
        _assert_close(gt, rt, rtol, "teacher grad")
    else:
        assert gt.numel() == 0


@pytest.mark.parametrize("opts", OPTIONS[:4], ids=str)
def test_triton_many_tiles_persistent_loop(triton_cpu, monkeypatch, opts):
    # P = 40 -> 3 row blocks (the last ragged), 6 tile pairs (3 diagonal) per group, 12 over 2 groups, run by 5
    # programs (each loops over 2-3 pairs); D = 20 -> 2 column chunks per side, the last one padded. The prologue
    # takes its two-pass path (rows wider than PROLOGUE_ONE_PASS_MAX) here, its one-pass path everywhere else.
    tg = _small_tiles(monkeypatch)
    monkeypatch.setattr(tg, "PROLOGUE_ONE_PASS_MAX", 16)
    s, t = _features(2, 40, 20, related=False)
    _kernel_vs_reference(tg, s, t, opts, grad_t=True, programs=5, rtol=RTOL[torch.float32])


@pytest.mark.parametrize("opts", OPTIONS[:4], ids=str)
def test_triton_many_tiles_gradient_from_the_inputs(triton_cpu, monkeypatch, opts):
    # P = 20 < D = 40 (padded 32 < 48): the backward rebuilds x̂ from the inputs and the norms instead of reading the
    # forward's Y (P > D, the test above); 2 row blocks (the second ragged), 3 column chunks, the last padded.
    tg = _small_tiles(monkeypatch)
    s, t = _features(2, 20, 40, related=False)
    assert not tg._layout(s, True, False, False, True, True)["keep_y"]
    assert tg._layout(s.transpose(1, 2), True, False, False, True, True)["keep_y"]
    _kernel_vs_reference(tg, s, t, opts, grad_t=True, programs=3, rtol=RTOL[torch.float32])


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[2]], ids=str)
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_triton_gradient_row_block_pairs(triton_cpu, monkeypatch, opts, tf32):
    # The gradient takes two row blocks per program: P = 70 -> 5 row blocks, programs on (0, 1), (2, 3) and (4, 4)
    # (the odd last block paired with itself, stored once). Block pair (2, 3) reads transposed tiles for both blocks
    # left of block 2, stored tiles for block 2 and transposed ones for block 3 in column block 2, stored ones for
    # both from column block 3 on: every branch of the loops. With TF32 (fp16 storage, the tensor-core path) the
    # forward's diagonal tiles load Y once for both operands (5 of the 15 tiles per group). There the features are
    # related (teacher Gram entries mostly positive): where an entry of Gt is within fp16 rounding of 0 the clamp's
    # mask flips, a discrete change that fp16 storage, like TF32 products in the official path, can make (checked:
    # the kernel then matches an fp16-storage emulation of the formula within 1e-7, gradients up to 2.6e-4).
    tg = _small_tiles(monkeypatch)
    if tf32:
        monkeypatch.setattr(tg, "dot_precision", lambda x: (x.dtype == torch.float32, "tf32"))
    s, t = _features(2, 70, 20, related=tf32)
    lay = tg._layout(s, True, False, False, True, True)
    assert lay["nb"] == 5 and lay["grids"]["bwd"][0] == 2 * 3 * lay["n_chunks"]
    assert lay["cdtype"] == (torch.float16 if tf32 else torch.float32)
    _kernel_vs_reference(tg, s, t, opts, grad_t=True, programs=4, rtol=RTOL["tf32" if tf32 else torch.float32])


def test_triton_off_diagonal_tiles_only(triton_cpu, monkeypatch):
    # Student = teacher except in rows 16..31: E is non-zero only in tile row/column 1 (pairs (0,1), (1,1), (1,2)),
    # so a wrong weight for off-diagonal pairs or a missing transposed E' store shows in the loss and the gradient.
    tg = _small_tiles(monkeypatch)
    s, t = _features(1, 48, 20)
    s[:, :16] = t[:, :16]
    s[:, 32:] = t[:, 32:]
    _kernel_vs_reference(tg, s, t, dict(), grad_t=False, programs=1, rtol=RTOL[torch.float32])


def test_triton_fp16_zero_row_has_finite_gradients(triton_cpu):
    # fp16 input with a zero row: 1/max(|x|, eps) = 1e12 there. The weights of the gradient GEMM are E' in the
    # compute dtype (|E'| <= 2 after normalisation); scaling them by 1/|x| before a cast to fp16 (the old design)
    # overflowed to inf, and inf x 0 made every gradient NaN.
    from dinov3_kernels._triton import gram as tg

    s, t = _features(2, 20, 8, torch.float16)
    s[0, 3] = 0.0
    loss, gs, gt = tg.gram_fwd_triton(s, t, apply_norm=True, clamp_s=False, clamp_t=False, grad_s=True, grad_t=True)
    ref, rs, rt = _run(gram_loss_reference, s.double(), t.double())
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[0, 3] = False  # its own gradient is g / eps, past fp16's range in the reference too
    assert torch.isfinite(gs[keep]).all() and torch.isfinite(gt).all()
    _assert_close(loss, ref, RTOL[torch.float16], "loss")
    _assert_close(gs[keep], rs[keep], RTOL[torch.float16], "student grad")
    _assert_close(gt, rt, RTOL[torch.float16], "teacher grad")


def test_triton_fp16_without_norm_computes_in_fp32(triton_cpu):
    # Raw fp16 features, one row of norm 300: E_00 = 9e4 is past fp16's 65504, so E' cannot be stored in fp16
    # (the old design cast it to fp16: inf), while every gradient entry still fits.
    from dinov3_kernels._triton import gram as tg

    assert tg._compute_dtype(torch.float16, apply_norm=False) == torch.float32
    assert tg._compute_dtype(torch.float16, apply_norm=True) == torch.float16
    assert tg._compute_dtype(torch.bfloat16, apply_norm=False) == torch.bfloat16
    s, t = _features(1, 64, 8, torch.float64, related=False)
    s[0, 0] = 300 * s[0, 0] / s[0, 0].norm()
    s, t = s.half(), t.half()
    loss, gs, gt = tg.gram_fwd_triton(s, t, apply_norm=False, clamp_s=False, clamp_t=False, grad_s=True, grad_t=True)
    ref, rs, rt = _run(gram_loss_reference, s.double(), t.double(), apply_norm=False)
    assert rs.abs().max() < 65504 / 2
    _assert_close(loss, ref, RTOL[torch.float16], "loss")
    _assert_close(gs, rs, RTOL[torch.float16], "student grad")
    _assert_close(gt, rt, RTOL[torch.float16], "teacher grad")


def test_triton_fp32_under_tf32_computes_in_fp16(triton_cpu, monkeypatch):
    # Where torch would run fp32 products in TF32, Ŝ, T̂ and E' are stored in fp16: TF32's 10-bit mantissa, so the
    # error is TF32's (its tolerance), at twice the rate and half the bytes.
    from dinov3_kernels._triton import gram as tg

    assert tg._compute_dtype(torch.float32, apply_norm=True, tf32=True) == torch.float16
    assert tg._compute_dtype(torch.float32, apply_norm=False, tf32=True) == torch.float32
    assert tg._compute_dtype(torch.float32, apply_norm=True, tf32=False) == torch.float32
    monkeypatch.setattr(tg, "dot_precision", lambda x: (x.dtype == torch.float32, "tf32"))
    s, t = _features(2, 30, 16)
    for opts in (dict(), dict(remove_neg=True)):
        _kernel_vs_reference(tg, s, t, opts, grad_t=True, programs=None, rtol=RTOL["tf32"])


def test_triton_grids_stay_within_cuda_limits():
    # Every launch is 1-D on grid axis 0 (up to 2^31 - 1), so G never lands on axes 1/2 (65535).
    from dinov3_kernels._triton import gram as tg

    cfg = tg._block_sizes(1024, 1024, False, False, "ieee", 90)  # bf16 on sm_90
    lay = tg._grids(100_000, 1024, 1024, cfg, programs=264, grad_sides=True)
    assert all(len(g) == 1 for g in lay["grids"].values())
    assert lay["grids"]["fwd"] == (264,) and lay["n_items"] == 100_000 * lay["pairs"]
    assert lay["grids"]["bwd"][0] == 100_000 * (lay["nb"] // 2) * lay["n_chunks"] > 65535  # 2 row blocks each
    assert lay["grids"]["prologue"][0] * lay["prologue"][0] >= 100_000 * lay["Pp"]
    with pytest.raises(ValueError, match="grid limit"):
        tg._grids(2**20, 2**16, 64, cfg, programs=264, grad_sides=True)


def test_triton_block_sizes_use_wide_tiles_on_sm90():
    from dinov3_kernels._triton import gram as tg

    for is_fp32, precision in ((False, "ieee"), (True, "tf32")):
        cfg = tg._block_sizes(1024, 1024, False, is_fp32, precision, 90)
        assert cfg["BLOCK"] == 128 and cfg["BLOCK_D"] == 128
        # The padded sizes are whole tiles of every kernel.
        lay = tg._grids(2, 1000, 1000, cfg, 8, True)
        assert lay["Pp"] % cfg["BLOCK"] == 0 and lay["Pp"] % cfg["BLOCK_N"] == 0
        assert lay["Dp"] % cfg["BLOCK_K"] == 0 and lay["Dp"] % cfg["BLOCK_D"] == 0
    assert tg._block_sizes(261, 1024, False, False, "ieee", 90)["BLOCK"] == 64  # 320 padded rows, not 384


def _saved_bytes(fn, *inputs):
    """(bytes that autograd holds between forward and backward for fn(*inputs), the inputs themselves excluded;
    which inputs it holds; the output)."""
    held, inputs_held = [], set()

    def pack(x):
        hit = [k for k, i in enumerate(inputs) if x is i]
        if hit:
            inputs_held.update(hit)
        else:
            held.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(*inputs)
    return sum(held), inputs_held, loss


def test_triton_holds_only_e_upper_triangle_between_forward_and_backward(triton_cpu, monkeypatch):
    # The tiled Triton form keeps, for the backward, E' as its upper-triangle tiles in the compute dtype (fp16 where
    # torch runs fp32 products in TF32, emulated here), the row sums and the norms: not the gradient (G·P·D fp32),
    # which the old design computed in the forward and held. P = 512 on the CPU's 128-wide tiles: 10 of 16 tiles.
    from dinov3_kernels._triton import gram as tg

    monkeypatch.setattr(tg, "dot_precision", lambda x: (x.dtype == torch.float32, "tf32"))
    G, P, D = 2, 512, 512
    s, t = _features(G, P, D)
    s.requires_grad_(True)
    grad_bytes = G * P * D * 4
    held, inputs_held, loss = _saved_bytes(lambda a, b: gram_loss(a, b, backend="triton", method="tiled"), s, t)
    e_bytes = G * 10 * 128 * 128 * 2
    assert e_bytes <= held <= e_bytes + G * (2 * 4 * P + 2 * P) * 4  # + row-sum slots and norms
    assert held < 0.35 * grad_bytes
    assert inputs_held == {0}  # the student (x̂ is rebuilt from it); not the teacher, which gets no gradient
    ref_held, _, _ = _saved_bytes(lambda a, b: gram_loss_reference(a, b), s, t)
    assert ref_held >= 3 * grad_bytes  # the official formulation: Ŝ and both P x P Gram matrices in fp32 (at P = D)
    loss.backward()
    want = _run(gram_loss_reference, s.double(), t.double(), teacher_grad=False)[1]
    _assert_close(s.grad, want, RTOL["tf32"], "student grad")


def test_triton_backward_twice_with_retain_graph(triton_cpu):
    # The saved E' is read, never modified, by the backward: a second backward through the same graph adds the same
    # gradient again (a gradient computed in the forward and scaled in place would not).
    s, t = _features(2, 40, 12)
    s.requires_grad_(True)
    loss = 1.5 * gram_loss(s, t, backend="triton", method="tiled")
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    want = _run(lambda a, b: 1.5 * gram_loss_reference(a, b), s.double(), t.double(), teacher_grad=False)[1]
    _assert_close(first, want, RTOL[torch.float32], "first backward")
    _assert_close(s.grad, 2 * want, RTOL[torch.float32], "accumulated backward")


def test_triton_gradient_for_the_teacher_alone(triton_cpu):
    # Only the teacher requires grad: the student is then neither saved nor read by the backward.
    s, t = _features(2, 30, 12)
    t1 = t.clone().requires_grad_(True)
    held, inputs_held, loss = _saved_bytes(lambda a, b: gram_loss(a, b, backend="triton", method="tiled",
                                                                  remove_only_teacher_neg=True), s, t1)
    assert inputs_held == {1}
    loss.backward()
    t2 = t.double().requires_grad_(True)
    gram_loss_reference(s.double(), t2, remove_only_teacher_neg=True).backward()
    _assert_close(t1.grad, t2.grad, RTOL[torch.float32], "teacher grad")


def test_triton_saved_shapes_match_the_forward(triton_cpu, monkeypatch):
    # What the fake implementation allocates (torch.compile, opcheck) is what the kernels return, for every
    # combination of gradients and clamps (two E' slots when both gradients are asked for and a clamp splits them).
    tg = _small_tiles(monkeypatch)
    s, t = _features(2, 40, 20)
    flag_sets = [(True, False, False, True, False), (True, True, True, True, True), (False, False, True, False, True),
                 (True, False, False, False, False)]
    for apply_norm, clamp_s, clamp_t, grad_s, grad_t in flag_sets:
        out = tg.gram_triton_forward(s, t, apply_norm=apply_norm, clamp_s=clamp_s, clamp_t=clamp_t, grad_s=grad_s,
                                     grad_t=grad_t)
        want = tg.saved_shapes(s, apply_norm, clamp_s, clamp_t, grad_s, grad_t)
        assert [(tuple(x.shape), x.dtype) for x in out[1:]] == [(tuple(sh), dt) for sh, dt in want]
        if grad_s or grad_t:
            # 40 rows on 16-wide tiles: 3 row blocks, 6 upper-triangle tiles, not 9
            assert out[1].shape[2:] == (6, 16, 16)
            assert out[1].shape[1] == (2 if (clamp_s or clamp_t) and grad_s and grad_t else 1)
            assert out[4].shape == (2, 48, 64)  # P > D: Y = [Ŝ | T̂] kept for the backward
        else:
            assert out[4].numel() == 0


# ---- the factored form, in the sum and difference of the rows ----------------------------------------------------
FACTORED_RTOL = {torch.float32: RTOL[torch.float32], torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("backend,dtype", [("composed", torch.float32), ("triton", torch.float32),
                                           ("composed", torch.float16), ("composed", torch.bfloat16)], ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(apply_norm=False), dict(img_level=False)], ids=str)
def test_factored_matches_reference(triton_cpu, backend, dtype, opts):
    # fp32 on the CPU computes in IEEE fp32; 16-bit input in fp16 (normalised) or its own dtype (raw features), the
    # products accumulated in fp32, as on the GPU. (The Triton interpreter takes fp32 input only: its row passes
    # writing fp16 are checked by the forced-fp16 tests below.)
    s, t = _features(2, 50, 7, dtype)
    _check_against_reference(s, t, backend, FACTORED_RTOL[dtype], method="factored", **opts)
    _check_against_reference(s, t, backend, FACTORED_RTOL[dtype], method="factored", teacher_grad=False, **opts)


@pytest.mark.parametrize("backend", ["composed", "triton"])
def test_factored_in_fp16_stays_accurate_when_student_is_close_to_teacher(triton_cpu, backend):
    # fp32 features under TF32 on the GPU compute the factored form from Σ = Ŝ + T̂ and Δ = Ŝ - T̂ rounded to fp16
    # (forced here on the CPU), products accumulated in fp32. The older form |ŜᵀŜ|² - 2|ŜᵀT̂|² + |T̂ᵀT̂|² from the
    # same 16-bit rows and fp32 products loses the loss to cancellation in this regime (tall groups, a student close
    # to its teacher: three terms ~1e5 times the result); every term of the sum-and-difference form is of the order
    # of the result.
    from dinov3_kernels.gram import _gram_fwd_factored

    t = torch.randn(2, 1024, 8, dtype=torch.float64)
    s = t + 1e-3 * torch.randn_like(t)
    ref, rs, rt = _run(gram_loss_reference, s, t)
    sh, th = (F.normalize(x, dim=-1).half().float() for x in (s, t))
    plain = ((sh.mT @ sh).square().sum() - 2 * (sh.mT @ th).square().sum() + (th.mT @ th).square().sum()) / (2 * 1024**2)
    assert abs(plain.double() - ref) / ref > 0.1  # the regime is one where the older form fails
    loss, gs, gt = _gram_fwd_factored(s.float(), t.float(), True, True, True, backend, torch.float16)
    assert abs(loss.double() - ref) / ref < 1e-4
    _assert_close(gs, rs, 2e-3, "student gradient")
    _assert_close(gt, rt, 2e-3, "teacher gradient")


def test_factored_gradient_operand_in_fp16_range(triton_cpu):
    # The gradient GEMM's (2D x D) operand is stored in fp16; its entries grow with P (K11 = ΣᵀΣ reaches 4·P·|x|² on
    # rows that all point one way: 4·300·100 = 120000 here, past fp16's 65504), so it is rescaled by a power of two
    # (undone in the normalize backward) before the cast. (Raw features in fp16, forced, keep the reference small;
    # normalised ones reach the same at P > 16384.)
    from dinov3_kernels.gram import _gram_fwd_factored

    t = torch.zeros(1, 300, 2, dtype=torch.float64)
    t[..., 0] = 10.0
    s = t.clone()
    s[..., 1] = 0.1 * torch.randn(300, dtype=torch.float64)
    ref, rs, _ = _run(gram_loss_reference, s, t, apply_norm=False)
    loss, gs, _ = _gram_fwd_factored(s.float(), t.float(), False, True, False, "composed", torch.float16)
    assert torch.isfinite(gs).all()
    assert abs(loss.double() - ref) / ref < 1e-3
    _assert_close(gs, rs, 5e-3, "student gradient")


def test_factored_row_passes_over_column_chunks(triton_cpu, monkeypatch):
    # Rows wider than the one-pass limit take the chunked path of both Triton row passes.
    from dinov3_kernels._triton import gram as tg

    monkeypatch.setattr(tg, "ROW_PASS_ONE_PASS_MAX", 16)
    assert tg._row_pass_blocks(40)[2] is False
    s, t = _features(2, 90, 40)
    for opts in (dict(), dict(apply_norm=False)):
        _check_against_reference(s, t, "triton", RTOL[torch.float32], method="factored", **opts)
    s[0, 1] = 0.0  # a zero row: norm below eps, x̂ = x / eps (the normalize backward's linear branch)
    _check_against_reference(s, t, "triton", RTOL[torch.float32], method="factored")


def test_factored_products_fall_back_where_torch_has_no_fp32_output_bmm(monkeypatch):
    # On CUDA the 16-bit products ask torch.bmm for an fp32 result (out_dtype, torch >= 2.8). A torch without it
    # (here: the CPU build, which has no kernel for it, posing as CUDA) gets the upcast products instead, once probed;
    # running out of memory is not taken for a missing feature.
    import dinov3_kernels.gram as gram_mod

    a, b = torch.randn(2, 8, 5).half(), torch.randn(2, 5, 3).half()
    want = torch.bmm(a.float(), b.float())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setitem(gram_mod._OUT_DTYPE, "cuda", None)
    got = gram_mod._bmm_acc(a, b, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want) and gram_mod._OUT_DTYPE["cuda"] is False
    monkeypatch.setitem(gram_mod._OUT_DTYPE, "cuda", None)
    real = torch.bmm

    def oom(x, y, **kw):
        if "out_dtype" in kw:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(x, y, **kw)

    monkeypatch.setattr(torch, "bmm", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gram_mod._bmm_acc(a, b, torch.float32)
    assert gram_mod._OUT_DTYPE["cuda"] is None


def test_factored_compute_dtype():
    from dinov3_kernels.gram import _factored_cdtype

    x = torch.empty(1, 8, 4)
    assert _factored_cdtype(x, True) == torch.float32  # CPU: IEEE fp32 whatever allow_tf32 says
    assert _factored_cdtype(x.double(), True) == torch.float64
    assert _factored_cdtype(x.bfloat16(), True) == torch.float16  # normalised: |Ŝ ± T̂| <= 2
    assert _factored_cdtype(x.half(), True) == torch.float16
    assert _factored_cdtype(x.bfloat16(), False) == torch.bfloat16  # raw features: range first
    assert _factored_cdtype(x.half(), False) == torch.float32


def test_factored_nan_propagates(triton_cpu):
    s, t = _features(1, 20, 8)
    s[0, 2, 1] = float("nan")
    for backend in ("composed", "triton"):
        loss, gs, _ = _run(lambda a, b: gram_loss(a, b, backend=backend, method="factored"), s, t)
        assert torch.isnan(loss) and torch.isnan(gs).any()


def test_factored_rejects_clamping(triton_cpu):
    s, t = _features(1, 8, 4)
    with pytest.raises(ValueError, match="factored"):
        gram_loss(s, t, backend="triton", method="factored", remove_neg=True)


def test_auto_method_choice():
    from dinov3_kernels.gram import _choose_method

    wide = torch.empty(1, 64, 256)
    tall = torch.empty(1, 1024, 64)
    assert _choose_method("auto", wide, clamp=False) == "tiled"
    assert _choose_method("auto", tall, clamp=False) == "factored"
    assert _choose_method("auto", tall, clamp=True) == "tiled"
    assert _choose_method("auto", tall.bfloat16(), clamp=False) == "factored"  # accurate in 16 bits too
    assert _choose_method("auto", torch.empty(1, 2047, 1024), clamp=False) == "tiled"
    assert _choose_method("auto", torch.empty(1, 2048, 1024), clamp=False) == "factored"


def test_factored_choice_on_tensor_cores_follows_the_roofline_model(monkeypatch):
    # On a GPU (16-bit products) the rule is the model's: at every shape where it takes the factored form the model
    # predicts that form faster than the tiled Triton kernels, and where the model puts it ahead by more than 1.5x
    # the rule takes it (groups of ViT-S/B/L/7B widths, 1 to 64 groups, P from D to 32·D).
    from dinov3_kernels.gram import _factored_wins

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "benchmarks"))
    import roofline

    for D in (256, 384, 768, 1024, 2048, 4096):
        for G in (1, 8, 64):
            for ratio in (1, 2, 3, 4, 6, 8, 12, 16, 32):
                P = ratio * D
                ms = {b: roofline.predict(roofline.gram(G, P, D, "float32", b, "fwd+bwd"), roofline.H200)["ms"]
                      for b in ("triton", "factored")}
                if _factored_wins(G, P, D, True):
                    assert ms["factored"] < ms["triton"], (G, P, D, ms)
                elif ms["factored"] * 1.5 < ms["triton"]:
                    raise AssertionError(f"the tiled form is kept where the model predicts the factored one "
                                         f"1.5x faster: {(G, P, D, ms)}")


# ---- registration: opcheck and torch.compile -----------------------------------------------------------------
@pytest.mark.parametrize("flags", [(True, False, False, True, True), (False, True, True, True, False),
                                   (True, False, True, False, True)])
def test_opcheck(triton_cpu, flags):
    apply_norm, clamp_s, clamp_t, grad_s, grad_t = flags
    s, t = _features(2, 20, 8)
    s.requires_grad_(grad_s)
    t.requires_grad_(grad_t)
    torch.library.opcheck(torch.ops.dinov3_kernels.gram_loss_fwd.default,
                          (s, t, apply_norm, clamp_s, clamp_t, grad_s, grad_t, "triton", "tiled"))
    if not (clamp_s or clamp_t):  # the factored form (no clamping), with the Triton row passes and with torch ops
        for backend in ("triton", "composed"):
            torch.library.opcheck(torch.ops.dinov3_kernels.gram_loss_fwd.default,
                                  (s, t, apply_norm, False, False, grad_s, grad_t, backend, "factored"))
    # The Triton tiled form's own pair (what gram_loss runs for backend="triton"): forward, then backward.
    torch.library.opcheck(torch.ops.dinov3_kernels.gram_loss_tiled_fwd.default,
                          (s, t, apply_norm, clamp_s, clamp_t, grad_s, grad_t))
    saved = torch.ops.dinov3_kernels.gram_loss_tiled_fwd(s.detach(), t.detach(), apply_norm, clamp_s, clamp_t,
                                                         grad_s, grad_t)[1:]
    torch.library.opcheck(torch.ops.dinov3_kernels.gram_loss_tiled_bwd.default,
                          (torch.tensor(0.5), s.detach(), t.detach(), *saved, apply_norm, clamp_s, clamp_t, grad_s,
                           grad_t))


def test_torch_compile_fullgraph(triton_cpu):
    s, t = _features(2, 20, 8)

    def f(a, b):
        return gram_loss(a, b, backend="triton", remove_neg=True) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = _run(lambda a, b: compiled(a, b), s, t)
    want = _run(lambda a, b: 2.0 * gram_loss_reference(a, b, remove_neg=True), s.double(), t.double())
    for g, w in zip(got, want):
        _assert_close(g, w, RTOL[torch.float32], "compiled")
    # The factored form (what "auto" takes on tall groups) through the same op.
    tall_s, tall_t = _features(2, 64, 8)
    compiled = torch.compile(lambda a, b: gram_loss(a, b, backend="triton", method="factored") * 2.0,
                             fullgraph=True, backend="aot_eager")
    got = _run(lambda a, b: compiled(a, b), tall_s, tall_t)
    want = _run(lambda a, b: 2.0 * gram_loss_reference(a, b), tall_s.double(), tall_t.double())
    for g, w in zip(got, want):
        _assert_close(g, w, RTOL[torch.float32], "compiled factored")


# ---- module drop-in ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(), dict(remove_neg=False), dict(remove_neg=False, remove_only_teacher_neg=True),
                                    dict(apply_norm=False)], ids=str)
@pytest.mark.parametrize("img_level", [True, False])
def test_module_matches_official(kwargs, img_level):
    s, t = _features(2, 11, 6, torch.float64)
    ours = GramLoss(**kwargs)
    official = OfficialGramLoss(**kwargs)
    torch.testing.assert_close(ours(s, t, img_level=img_level), official(s, t, img_level=img_level))


def test_module_rejects_both_clamps():
    with pytest.raises(ValueError, match="exclusive"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)


# ---- backend choice ------------------------------------------------------------------------------------------
def test_auto_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.refresh_env()
    s, t = _features(1, 5, 3)
    assert _backend.choose_backend("auto", (s, t)) == "reference"


def test_env_override(monkeypatch, triton_cpu):
    s, t = _features(1, 5, 3)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    _backend.refresh_env()
    assert _backend.choose_backend("auto", (s, t)) == "triton"
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    _backend.refresh_env()
    with pytest.raises(ValueError, match="DINOV3_KERNELS_BACKEND"):
        gram_loss(s, t)


def test_explicit_backend_errors(monkeypatch):
    s, t = _features(1, 5, 3)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            gram_loss(s, t, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _backend.refresh_env()
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        gram_loss(s, t, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.refresh_env()
    with pytest.raises(BackendUnavailableError, match="float32"):
        gram_loss(s.double(), t.double(), backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        gram_loss(s, t, backend="magic")


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,err,match", [
    (lambda: (torch.randn(2, 5, 3), torch.randn(2, 5, 4)), ValueError, "shape"),
    (lambda: (torch.randn(5, 3), torch.randn(5, 3)), ValueError, "img_level"),
    (lambda: (torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 3)), ValueError, "img_level"),
    (lambda: (torch.randn(2, 0, 3), torch.randn(2, 0, 3)), ValueError, "empty"),
    (lambda: (torch.ones(2, 5, 3, dtype=torch.int64), torch.ones(2, 5, 3, dtype=torch.int64)), TypeError, "floating"),
    (lambda: (torch.randn(2, 5, 3), torch.randn(2, 5, 3, device="meta")), ValueError, "meta"),
    (lambda: ([[1.0]], torch.randn(1, 1, 1)), TypeError, "Tensor"),
])
def test_bad_input(make, err, match):
    s, t = make()
    with pytest.raises(err, match=match):
        gram_loss(s, t)


def test_bad_input_not_img_level_ndim():
    with pytest.raises(ValueError, match="B, N, D"):
        gram_loss(torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 3), img_level=False)
    with pytest.raises(ValueError, match="method"):
        gram_loss(torch.randn(2, 5, 3), torch.randn(2, 5, 3), method="fast")


def test_mixed_dtypes_promote(triton_cpu):
    s, t = _features(1, 10, 4, torch.float64)
    ref = gram_loss_reference(s, t)
    got = gram_loss(s.float(), t, backend="reference")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref)


# ---- GPU -----------------------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 1, 3), (3, 7, 64), (2, 196, 384), (3, 257, 64), (2, 1024, 1024)]


def _gpu_backends():
    out = ["triton"]
    if _backend.CUDA_EXT is not None:
        out.append("cuda")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("B,N,D", GPU_SHAPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_gpu_against_reference(backend, dtype, B, N, D, opts):
    if backend not in _gpu_backends():
        pytest.fail("the CUDA extension is not built on this GPU machine")
    torch_dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    s, t = _features(B, N, D, torch_dtype, "cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        _check_against_reference(s, t, backend, RTOL[dtype if dtype == "tf32" else torch_dtype], method="tiled",
                                 **opts)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["composed", "triton"])
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("B,N,D", [(2, 300, 64), (1, 2048, 1024), (3, 7, 2)])
@pytest.mark.parametrize("opts", [dict(), dict(apply_norm=False), dict(img_level=False)], ids=str)
def test_gpu_factored_against_reference(backend, dtype, B, N, D, opts):
    # Under TF32 (as official training runs) and for 16-bit input the factored form runs fp16 tensor-core GEMMs on
    # Σ = Ŝ + T̂ and Δ = Ŝ - T̂ with fp32 results (torch's out_dtype): the TF32 tolerance holds for fp32 input.
    torch_dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    s, t = _features(B, N, D, torch_dtype, "cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        rtol = RTOL["tf32"] if dtype == "tf32" else FACTORED_RTOL[torch_dtype]
        _check_against_reference(s, t, backend, rtol, method="factored", **opts)
        if dtype == "tf32" and not opts:  # close to the teacher, where 16-bit rounding of Ŝ and T̂ themselves fails
            t64 = torch.randn(B, N, D, dtype=torch.float64)
            s64 = t64 + 1e-2 * torch.randn_like(t64)
            ref, rs, _ = _run(gram_loss_reference, s64, t64)
            loss, gs, _ = _run(lambda a, b: gram_loss(a, b, backend=backend, method="factored"),
                               s64.float().cuda(), t64.float().cuda())
            assert abs(loss.double().cpu() - ref) / ref < 1e-3
            _assert_close(gs, rs, 5e-3, "student gradient")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_gpu_auto_picks_kernel():
    s, t = _features(2, 64, 32, torch.bfloat16, "cuda")
    assert _backend.choose_backend("auto", (s, t), None) in ("cuda", "triton")


@pytest.mark.gpu
def test_gpu_deterministic_loss():
    # Loss and gradient bit for bit the same on every run, for every backend and both forms (none uses atomics; the
    # factored form's partial sums are added in a fixed order, its GEMMs are cuBLAS's).
    s, t = _features(4, 1024, 256, torch.bfloat16, "cuda")
    for backend, method in [(b, "tiled") for b in _gpu_backends()] + [("triton", "factored")]:
        runs = []
        for _ in range(5):
            x = s.detach().clone().requires_grad_(True)
            loss = gram_loss(x, t, backend=backend, method=method)
            loss.backward()
            runs.append((loss.detach(), x.grad))
        for loss, grad in runs[1:]:
            assert torch.equal(loss, runs[0][0]), f"{backend} {method}: loss changed between runs"
            assert torch.equal(grad, runs[0][1]), f"{backend} {method}: gradient changed between runs"


@pytest.mark.gpu
def test_gpu_triton_memory_is_a_quarter_of_the_official_path():
    # The memory goal, measured: peak CUDA memory above the inputs during forward + backward, fp32 features
    # with TF32 on (as official training runs), P = D = 1024; the official formulation is the reference backend.
    s, t = _features(8, 1024, 1024, torch.float32, "cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        peaks = {}
        for backend in ("reference", "triton"):
            x = s.detach().clone().requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            gram_loss(x, t, backend=backend, method="tiled").backward()
            torch.cuda.synchronize()
            peaks[backend] = torch.cuda.max_memory_allocated() - base
            del x
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert peaks["triton"] <= 0.25 * peaks["reference"], peaks



def test_deterministic_mode_runs_the_triton_kernels(triton_cpu):
    # The Triton kernels have no atomics: deterministic mode accepts them, and the result is the same bits.
    s, t = _features(1, 20, 8)
    free = _run(lambda a, b: gram_loss(a, b, backend="triton", method="tiled"), s, t)
    torch.use_deterministic_algorithms(True)
    try:
        strict = _run(lambda a, b: gram_loss(a, b, backend="triton", method="tiled"), s, t)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(free, strict):
        assert torch.equal(a, b)


def test_gram_declares_no_atomic_backend(monkeypatch):
    # What gram_loss tells choose_backend: no backend accumulates with atomics (the CUDA gradient kernel writes each
    # element once, like the Triton one), so deterministic mode keeps "triton" and "cuda".
    seen = {}
    real = _backend.choose_backend

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_backend, "choose_backend", spy)
    s, t = _features(1, 4, 3)
    gram_loss(s, t, backend="reference")
    assert seen["atomics"] == ()
    monkeypatch.setattr(_backend, "why_not", lambda backend, tensors, op_check=None: None)  # as if on a GPU
    torch.use_deterministic_algorithms(True)
    try:
        assert real("triton", (s, t), atomics=seen["atomics"]) == "triton"
        assert real("cuda", (s, t), atomics=seen["atomics"]) == "cuda"
    finally:
        torch.use_deterministic_algorithms(False)


def test_auto_skips_atomic_backends_in_deterministic_mode(monkeypatch):
    from dinov3_kernels import _backend

    monkeypatch.setattr(_backend, "why_not", lambda backend, tensors, op_check=None: None)  # as if on a GPU
    x = torch.empty(2, 2, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    assert _backend.choose_backend("auto", (x,), atomics=("cuda",)) == "cuda"
    torch.use_deterministic_algorithms(True)
    try:
        assert _backend.choose_backend("auto", (x,), atomics=("cuda",)) == "triton"
        assert _backend.choose_backend("auto", (x,), atomics=("cuda", "triton")) == "reference"
    finally:
        torch.use_deterministic_algorithms(False)


# ---- the composed backend (batched GEMMs over [Ŝ | T̂]) --------------------------------------------------------------
@pytest.mark.parametrize("B,N,D", [(1, 1, 3), (3, 7, 5), (2, 197, 24), (1, 257, 13)])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_composed_float64_matches_reference(B, N, D, opts):
    s, t = _features(B, N, D, torch.float64)
    _check_against_reference(s, t, "composed", 1e-12, method="tiled", **opts)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("teacher_grad", [True, False])
def test_composed_float32(opts, teacher_grad):
    s, t = _features(3, 37, 20)
    _check_against_reference(s, t, "composed", RTOL[torch.float32], teacher_grad, method="tiled", **opts)


@pytest.mark.parametrize("opts", [dict(), dict(remove_neg=True)], ids=str)
def test_composed_zero_and_tiny_rows(opts):
    # |x| <= eps takes F.normalize's linear branch (x / eps, gradient g / eps): no projection there.
    s, t = _features(2, 20, 8, torch.float64)
    s[0, 3] = 0.0
    s[1, 4] = 1e-14
    t[0, 5] = 0.0
    _check_against_reference(s, t, "composed", 1e-12, method="tiled", **opts)


def test_composed_non_contiguous_inputs_not_modified():
    base_s, base_t = _features(2, 30, 16)
    s = base_s.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)  # row stride 1, column stride P
    t = base_t.repeat(1, 1, 2)[..., ::2]  # column stride 2
    before = (s.detach().clone(), t.clone())
    loss = gram_loss(s, t, backend="composed", method="tiled", remove_neg=True)
    loss.backward()
    assert torch.equal(s.detach(), before[0]) and torch.equal(t, before[1])
    ref, rs, _ = _run(gram_loss_reference, before[0].double(), before[1].double(), False, remove_neg=True)
    _assert_close(loss.detach(), ref, RTOL[torch.float32], "loss")
    _assert_close(s.grad, rs, RTOL[torch.float32], "student grad")


def test_composed_bfloat16_forms_the_difference_before_rounding():
    # Student close to the teacher: on unit rows the Gram matrices differ by ~3e-3, below bf16's resolution of entries
    # near 1. E = [Ŝ | T̂]·[Ŝ | -T̂]ᵀ forms the difference in the GEMM's fp32 accumulator and rounds once; subtracting
    # two bf16 Gram matrices loses it (checked below, so the test tells the two apart). The inputs are exactly
    # representable bf16 unit rows, so the only error left is the backend's own.
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 64, 32, generator=g, dtype=torch.float64)
    s = t + 0.003 * torch.randn(2, 64, 32, generator=g, dtype=torch.float64)
    sh, th = F.normalize(s, dim=-1).bfloat16(), F.normalize(t, dim=-1).bfloat16()
    ref = gram_loss_reference(sh.double(), th.double(), apply_norm=False)
    got = gram_loss(sh, th, backend="composed", method="tiled", apply_norm=False).double()
    naive = ((sh @ sh.transpose(1, 2)) - (th @ th.transpose(1, 2))).double().square().mean()
    assert abs(got - ref) <= 1e-3 * ref, (got, ref)
    assert abs(naive - ref) > 0.05 * ref, (naive, ref)  # the subtract-after-rounding form is far off here


def test_composed_opcheck_and_compile():
    s, t = _features(2, 20, 8)
    s.requires_grad_(True)
    for flags in ((True, False, False, True, True), (False, True, True, True, False)):
        apply_norm, clamp_s, clamp_t, grad_s, grad_t = flags
        torch.library.opcheck(torch.ops.dinov3_kernels.gram_loss_fwd.default,
                              (s, t, apply_norm, clamp_s, clamp_t, grad_s, grad_t, "composed", "tiled"))
    compiled = torch.compile(lambda a, b: gram_loss(a, b, backend="composed", remove_neg=True), fullgraph=True,
                             backend="aot_eager")
    got = _run(lambda a, b: compiled(a, b), s, t)
    want = _run(lambda a, b: gram_loss_reference(a, b, remove_neg=True), s.double(), t.double())
    for g_, w in zip(got, want):
        _assert_close(g_, w, RTOL[torch.float32], "compiled composed")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_gpu_composed_against_reference(dtype, opts):
    torch_dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    s, t = _features(4, 257, 384, torch_dtype, "cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        _check_against_reference(s, t, "composed", RTOL[dtype if dtype == "tf32" else torch_dtype], method="tiled",
                                 **opts)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
