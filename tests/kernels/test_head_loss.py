"""Tests of dinov3_kernels/head_loss.py: the reference against the official DINOv3 formulation (float64), the composed
backend and the Triton kernels (interpreter) against the float64 reference, forward and backward, on odd shapes (rows
not multiples of the tiles, K not a power of two); overflow safety; the op registration; the public boundary; and
Sinkhorn-Knopp across two gloo processes against the official result on the concatenated batch."""

import datetime
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dinov3_kernels import (BackendUnavailableError, dino_head_loss, dino_head_loss_reference, ibot_head_loss,
                            ibot_head_loss_reference, sinkhorn_knopp_reference)
from dinov3_kernels import _backend, head_loss

# Relative tolerances (against the largest reference entry) of loss and gradients vs the float64 reference.
RTOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, "tf32": 5e-3}
GRAD_RTOL = {torch.float32: 2e-4, torch.bfloat16: 8e-2, "tf32": 3e-2}


# ---- the official formulation, written out as an oracle (world size 1, float64 kept) -------------------------------
def official_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    Q = torch.exp(teacher_output / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def official_softmax_center(teacher_output, teacher_temp, center, momentum):
    probs = F.softmax((teacher_output - center) / teacher_temp, dim=-1)
    batch_center = teacher_output.sum(0, keepdim=True) / len(teacher_output)
    return probs, center * momentum + batch_center * (1 - momentum)


def official_dino_forward(student_logits, teacher_probs, student_temp, ignore_diagonal):
    S, B, K = student_logits.shape
    T = teacher_probs.shape[0]
    log_p = F.log_softmax(student_logits / student_temp, dim=-1)
    if not ignore_diagonal:
        return -torch.einsum("sbk,tbk->", log_p, teacher_probs) / (B * S * T)
    loss = -torch.einsum("sbk,tbk->st", log_p, teacher_probs)
    m = min(S, T)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(m))
    return loss.sum() / (B * S * T - B * m)


def official_ibot_forward_masked(student_logits, teacher_probs, student_temp, masks_weight, n_images):
    loss = torch.sum(teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1)
    return -(loss * masks_weight).sum() / n_images


def official_dino(zs, zt, Ws, Wt, S, T, ts, tt, ignore_diagonal=True, iters=3, center=None, momentum=0.9):
    """(loss, new center or None) from the official pieces on logits z @ Wᵀ (no max subtraction)."""
    s_logits = zs @ Ws.T
    with torch.no_grad():
        t_logits = zt @ Wt.T
        if center is None:
            probs, new_center = official_sinkhorn_knopp(t_logits, tt, iters), None
        else:
            probs, new_center = official_softmax_center(t_logits, tt, center, momentum)
    B = zs.shape[0] // S
    loss = official_dino_forward(s_logits.view(S, B, -1), probs.view(T, B, -1), ts, ignore_diagonal)
    return loss, new_center


def official_ibot(zs, zt, Ws, Wt, ts, tt, mw, n_images, iters=3, center=None, momentum=0.9, probs=None):
    s_logits = zs @ Ws.T
    with torch.no_grad():
        t_logits = zt @ Wt.T
        new_center = None
        if probs is None:
            if center is None:
                probs = official_sinkhorn_knopp(t_logits, tt, iters)
            else:
                probs, new_center = official_softmax_center(t_logits, tt, center, momentum)
    return official_ibot_forward_masked(s_logits, probs, ts, mw, n_images), new_center


# ---- helpers -----------------------------------------------------------------------------------------------------
def _assert_close(got, want, rtol, what, atol=1e-12):
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max()
    err = (got - want).abs().max()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3e} > {rtol:.1e} * max |ref| {scale:.3e} + {atol:.0e}"


def _inputs(n_s, n_t, K, D, dtype=torch.float32, w_scale=1.0, seed=0, device="cpu"):
    """Normalised bottleneck features (as the heads give them) and prototypes of std w_scale."""
    g = torch.Generator().manual_seed(seed)
    zs = F.normalize(torch.randn(n_s, D, generator=g, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(n_t, D, generator=g, dtype=torch.float64), dim=-1)
    Ws = torch.randn(K, D, generator=g, dtype=torch.float64) * w_scale
    Wt = Ws + 0.1 * w_scale * torch.randn(K, D, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (zs, zt, Ws, Wt)]


def _run(fn, zs, zt, Ws, Wt):
    """(loss, d zs, d Ws, extra) with fresh leaves; extra is the updated center for softmax centering."""
    a = zs.detach().clone().requires_grad_(True)
    w = Ws.detach().clone().requires_grad_(True)
    out = fn(a, zt, w, Wt)
    extra = None
    if isinstance(out, tuple):
        out, extra = out
    out.backward()
    return out.detach(), a.grad, w.grad, extra


def _dino(backend, S, T, ignore_diagonal=True, iters=3, center=None, ts=0.1, tt=0.05, reduction="mean"):
    kw = dict(n_student_crops=S, n_teacher_crops=T, student_temp=ts, teacher_temp=tt, ignore_diagonal=ignore_diagonal,
              sk_iterations=iters, reduction=reduction, backend=backend)
    if center is not None:
        kw.update(centering="softmax", center=center, center_momentum=0.8)
    return lambda zs, zt, Ws, Wt: dino_head_loss(zs, zt, Ws, Wt, **kw)


def _ibot(backend, mw, n_images, iters=3, center=None, ts=0.1, tt=0.05):
    kw = dict(student_temp=ts, teacher_temp=tt, masks_weight=mw, n_images=n_images, sk_iterations=iters,
              backend=backend)
    if center is not None:
        kw.update(centering="softmax", center=center, center_momentum=0.8)
    return lambda zs, zt, Ws, Wt: ibot_head_loss(zs, zt, Ws, Wt, **kw)


def _check(fn_of_backend, backend, inputs, rtol=RTOL[torch.float32], grad_rtol=GRAD_RTOL[torch.float32], what=""):
    got = _run(fn_of_backend(backend), *inputs)
    want = _run(fn_of_backend("reference"), *(x.double() for x in inputs))
    assert got[0].dtype == torch.float32 and torch.isfinite(got[0])
    _assert_close(got[0], want[0], rtol, f"loss ({backend}{what})")
    _assert_close(got[1], want[1], grad_rtol, f"d student_z ({backend}{what})")
    _assert_close(got[2], want[2], grad_rtol, f"d student_prototypes ({backend}{what})")
    if want[3] is not None:
        _assert_close(got[3], want[3], rtol, f"center ({backend}{what})")
    return got


# ---- the reference is the spec -------------------------------------------------------------------------------
@pytest.mark.parametrize("S,T,ignore_diagonal,iters", [(2, 2, True, 3), (8, 2, False, 3), (10, 2, True, 1),
                                                       (3, 2, True, 5), (1, 1, False, 2)])
def test_dino_reference_matches_official(S, T, ignore_diagonal, iters):
    B, K, D = 4, 37, 12
    zs, zt, Ws, Wt = _inputs(S * B, T * B, K, D, torch.float64)
    got = _run(_dino("reference", S, T, ignore_diagonal, iters), zs, zt, Ws, Wt)
    want = _run(lambda a, b, c, d: official_dino(a, b, c, d, S, T, 0.1, 0.05, ignore_diagonal, iters)[0],
                zs, zt, Ws, Wt)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_dino_softmax_centering_reference_matches_official():
    S, T, B, K, D = 3, 2, 4, 29, 10
    zs, zt, Ws, Wt = _inputs(S * B, T * B, K, D, torch.float64)
    center = 0.1 * torch.randn(1, K, dtype=torch.float64)
    got = _run(_dino("reference", S, T, center=center), zs, zt, Ws, Wt)
    want = _run(lambda a, b, c, d: official_dino(a, b, c, d, S, T, 0.1, 0.05, center=center, momentum=0.8),
                zs, zt, Ws, Wt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("iters", [1, 3])
def test_ibot_reference_matches_official(iters):
    M, K, D = 19, 41, 9
    zs, zt, Ws, Wt = _inputs(M, M, K, D, torch.float64)
    mw = torch.rand(M, dtype=torch.float64)
    got = _run(_ibot("reference", mw, 3, iters), zs, zt, Ws, Wt)
    want = _run(lambda a, b, c, d: official_ibot(a, b, c, d, 0.1, 0.05, mw, 3, iters)[0], zs, zt, Ws, Wt)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_sinkhorn_knopp_reference_is_official_with_max_shift():
    logits = torch.randn(13, 21, dtype=torch.float64) * 3
    for iters in (1, 2, 3):
        torch.testing.assert_close(sinkhorn_knopp_reference(logits, 0.07, iters),
                                   official_sinkhorn_knopp(logits, 0.07, iters), rtol=1e-12, atol=1e-15)
    p = sinkhorn_knopp_reference(logits, 0.07, 3)
    torch.testing.assert_close(p.sum(1), torch.ones(13, dtype=torch.float64))


def test_reference_gradcheck():
    S, T, B, K, D = 3, 2, 2, 7, 4
    zs, zt, Ws, Wt = _inputs(S * B, T * B, K, D, torch.float64)
    zs.requires_grad_(True)
    Ws.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: dino_head_loss_reference(
        a, zt, w, Wt, n_student_crops=S, n_teacher_crops=T, student_temp=0.1, teacher_temp=0.05), (zs, Ws))
    mw = torch.rand(4, dtype=torch.float64)
    zs5, zt5 = zs[:4].detach().clone().requires_grad_(True), zt[:4]
    assert torch.autograd.gradcheck(lambda a, w: ibot_head_loss_reference(
        a, zt5, w, Wt, student_temp=0.1, teacher_temp=0.05, masks_weight=mw, n_images=2), (zs5, Ws))


# ---- the composed backend (chunked PyTorch) --------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("S,T,B,K,D,ignore_diagonal,iters", [(2, 2, 5, 37, 16, True, 3), (10, 2, 3, 100, 24, True, 3),
                                                             (8, 2, 4, 65, 7, False, 1), (3, 3, 1, 1, 5, True, 2)])
def test_composed_dino(monkeypatch, chunk, S, T, B, K, D, ignore_diagonal, iters):
    if chunk is not None:  # a few rows per chunk: every loop of the chunked passes runs more than once
        monkeypatch.setattr(head_loss, "COMPOSED_CHUNK_ELEMENTS", chunk * K)
    inputs = _inputs(S * B, T * B, K, D)
    _check(lambda b: _dino(b, S, T, ignore_diagonal, iters), "composed", inputs)


@pytest.mark.parametrize("chunk", [None, 4])
def test_composed_ibot_and_softmax_centering(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(head_loss, "COMPOSED_CHUNK_ELEMENTS", chunk * 53)
    M, K, D = 23, 53, 12
    inputs = _inputs(M, M, K, D)
    mw = torch.rand(M)
    _check(lambda b: _ibot(b, mw, 3), "composed", inputs)
    center = 0.2 * torch.randn(1, 1, K)
    _check(lambda b: _ibot(b, mw, 3, center=center), "composed", inputs, what=", softmax")
    S, T, B = 3, 2, 4
    inputs = _inputs(S * B, T * B, K, D)
    _check(lambda b: _dino(b, S, T, center=center[0]), "composed", inputs, what=", softmax")


# ---- Triton kernels under the interpreter (CPU) ------------------------------------------------------------------
@pytest.mark.parametrize("S,T,B,K,D,ignore_diagonal,iters", [(3, 2, 5, 50, 20, True, 3), (2, 2, 3, 33, 40, False, 1),
                                                             (10, 2, 2, 17, 16, True, 2)])
def test_triton_dino(triton_cpu, S, T, B, K, D, ignore_diagonal, iters):
    _check(lambda b: _dino(b, S, T, ignore_diagonal, iters), "triton", _inputs(S * B, T * B, K, D))


@pytest.mark.parametrize("M,K,D", [(23, 37, 24), (1, 70, 9)])
def test_triton_ibot(triton_cpu, M, K, D):
    mw = torch.rand(M)
    _check(lambda b: _ibot(b, mw, 2), "triton", _inputs(M, M, K, D))


def test_triton_softmax_centering(triton_cpu):
    M, K, D = 20, 45, 16
    mw, center = torch.rand(M), 0.3 * torch.randn(1, 1, K)
    _check(lambda b: _ibot(b, mw, 2, center=center), "triton", _inputs(M, M, K, D))


def test_triton_ops_against_composed(triton_cpu):
    # Each pass on its own (non-contiguous inputs, biases on and off), the split combinations included.
    ops = torch.ops.dinov3_kernels
    zs, zt, Ws, Wt = _inputs(37, 37, 51, 20)
    z_nc = torch.stack([zt, -zt], dim=-1)[..., 0]  # feature stride 2
    W_nc = Wt.T.contiguous().T  # column-major
    assert not z_nc.is_contiguous() and not W_nc.is_contiguous()
    cb, rb, none = torch.randn(51), torch.randn(37), torch.empty(0)
    for z, W in ((zt, Wt), (z_nc, W_nc)):
        for c, r in ((none, none), (cb, rb)):
            got = ops.head_loss_col_lse(z, W, c, r, 7.0, "triton")
            want = ops.head_loss_col_lse(z, W, c, r, 7.0, "composed")
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(ops.head_loss_row_lse(z, W, c, 7.0, "triton"),
                                       ops.head_loss_row_lse(z, W, c, 7.0, "composed"), rtol=1e-5, atol=1e-5)


# ---- overflow: the official exp(logits / τ) overflows in float32, these do not --------------------------------------
@pytest.mark.parametrize("backend", ["reference", "composed", "triton"])
def test_no_overflow_where_official_overflows(backend):
    if backend == "triton" and _backend.why_not("triton", (torch.empty(1),)) is not None:
        pytest.skip("triton cannot run here")
    S, T, B, K, D = 3, 2, 4, 40, 16
    zs, zt, Ws, Wt = _inputs(S * B, T * B, K, D, w_scale=8.0)  # |logits| up to ~25: |logits| / 0.04 > 88
    tt = 0.04
    with torch.no_grad():
        assert (zt @ Wt.T).abs().max() / tt > 200
        assert not torch.isfinite(official_sinkhorn_knopp(zt @ Wt.T, tt)).all()  # the official float32 result
    fn = _dino(backend, S, T, tt=tt)
    got = _run(fn, zs, zt, Ws, Wt)
    assert all(torch.isfinite(x).all() for x in got[:3])
    # Float64 does not overflow here (exp(709) is its limit): there the official result is the truth.
    want = _run(lambda a, b, c, d: official_dino(a, b, c, d, S, T, 0.1, tt)[0], *(x.double() for x in (zs, zt, Ws, Wt)))
    _assert_close(got[0], want[0], 1e-4, f"loss ({backend})")
    _assert_close(got[1], want[1], 1e-3, f"d student_z ({backend})")
    _assert_close(got[2], want[2], 1e-3, f"d student_prototypes ({backend})")


def test_fused_extreme_logits_stay_finite(triton_cpu):
    # A sample whose every logit is far below each prototype's batch maximum: exp((L - max) / τ) underflows for the
    # whole row, which breaks a linear-domain Sinkhorn-Knopp; the log-domain passes stay finite.
    M, K, D = 20, 30, 16
    zs, zt, Ws, Wt = _inputs(M, M, K, D, w_scale=30.0)
    mw = torch.ones(M)
    for backend in ("composed", "triton"):
        got = _run(_ibot(backend, mw, 2, tt=0.02), zs, zt, Ws, Wt)
        assert all(torch.isfinite(x).all() for x in got[:3]), backend


# ---- reductions, teacher gradients, inputs -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "composed"])
def test_reduction_none_sums_to_the_loss(backend):
    S, T, B, K, D = 10, 2, 3, 31, 8
    zs, zt, Ws, Wt = _inputs(S * B, T * B, K, D)
    rows = _dino(backend, S, T, reduction="none")(zs, zt, Ws, Wt)
    assert rows.shape == (S, B)
    torch.testing.assert_close(rows.sum(), _dino(backend, S, T)(zs, zt, Ws, Wt))
    # Global crops (with the diagonal ignored) and local crops from one call, as the trainer splits them.
    g_terms, l_terms = 2 * 1, 2 * 8
    want_local = _dino("reference", 8, 2, ignore_diagonal=False)(zs[2 * B:], zt, Ws, Wt)
    want_global = _dino("reference", 2, 2)(zs[:2 * B], zt, Ws, Wt)
    total = g_terms + l_terms
    torch.testing.assert_close(rows[2:].sum() * total / l_terms, want_local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[:2].sum() * total / g_terms, want_global, rtol=1e-5, atol=1e-6)
    # Per-row weights reach the gradient.
    a = zs.clone().requires_grad_(True)
    weights = torch.rand(S, B)
    (_dino(backend, S, T, reduction="none")(a, zt, Ws, Wt) * weights).sum().backward()
    b = zs.double().clone().requires_grad_(True)
    (_dino("reference", S, T, reduction="none")(b, zt.double(), Ws.double(), Wt.double()) * weights).sum().backward()
    _assert_close(a.grad, b.grad, GRAD_RTOL[torch.float32], "weighted rows")


@pytest.mark.parametrize("backend", ["reference", "composed"])
def test_teacher_gets_no_gradient_and_inputs_are_kept(backend):
    S, T, B, K, D = 3, 2, 2, 20, 8
    zs, zt, Ws, Wt = _inputs(S * B, T * B, K, D)
    copies = [x.clone() for x in (zs, zt, Ws, Wt)]
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    Wt.requires_grad_(True)
    loss = _dino(backend, S, T)(zs, zt, Ws, Wt)
    loss.backward()
    assert zt.grad is None and Wt.grad is None and zs.grad is not None
    for x, c in zip((zs, zt, Ws, Wt), copies):
        assert torch.equal(x.detach(), c)


def test_autocast_is_off():
    S, T, B, K, D = 2, 2, 3, 20, 8
    zs, zt, Ws, Wt = _inputs(S * B, T * B, K, D)
    want = _dino("composed", S, T)(zs, zt, Ws, Wt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _dino("composed", S, T)(zs, zt, Ws, Wt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- registration: opcheck and torch.compile -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["composed", "triton"])
def test_opcheck(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_cpu")
    ops = torch.ops.dinov3_kernels
    zs, zt, Ws, Wt = _inputs(6, 4, 19, 16)
    none = torch.empty(0)
    torch.library.opcheck(ops.head_loss_col_lse.default, (zt, Wt, torch.randn(19), torch.randn(4), 3.0, backend))
    torch.library.opcheck(ops.head_loss_col_lse.default, (zt, Wt, none, none, 3.0, backend))
    torch.library.opcheck(ops.head_loss_row_lse.default, (zt, Wt, torch.randn(19), 3.0, backend))
    bias = torch.randn(19)
    lse = ops.head_loss_row_lse(zt, Wt, bias, 20.0, backend)
    pw = torch.rand(6, 2)
    zs.requires_grad_(True)
    Ws.requires_grad_(True)
    torch.library.opcheck(ops.head_loss_ce.default, (zs, Ws, zt, Wt, bias, lse, pw, 10.0, 20.0, backend))
    rows, slse = ops.head_loss_ce(zs, Ws, zt, Wt, bias, lse, pw, 10.0, 20.0, backend)
    torch.library.opcheck(ops.head_loss_ce_bwd.default, (torch.rand(6), zs.detach(), Ws.detach(), zt, Wt, bias, lse,
                                                         pw, slse.detach(), 10.0, 20.0, True, True, backend))


def test_torch_compile_fullgraph(triton_cpu):
    S, T, B, K, D = 3, 2, 2, 24, 16
    inputs = _inputs(S * B, T * B, K, D)

    def f(zs, zt, Ws, Wt):
        return 2.0 * dino_head_loss(zs, zt, Ws, Wt, n_student_crops=S, n_teacher_crops=T, student_temp=0.1,
                                    teacher_temp=0.05, backend="triton")

    got = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), *inputs)
    want = _run(lambda *a: 2.0 * _dino("reference", S, T)(*a), *(x.double() for x in inputs))
    for g, w, tol in zip(got[:3], want[:3], (RTOL[torch.float32], GRAD_RTOL[torch.float32], GRAD_RTOL[torch.float32])):
        _assert_close(g, w, tol, "compiled")


# ---- backend choice and bad input --------------------------------------------------------------------------------
def test_backend_choice(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.refresh_env()
    x = torch.randn(3, 4)
    assert head_loss._choose_backend("auto", (x,), torch.float32, "op") == "composed"
    assert head_loss._choose_backend("auto", (x,), torch.float64, "op") == "reference"
    with pytest.raises(BackendUnavailableError, match="no CUDA C kernels|not built"):
        head_loss._choose_backend("cuda", (x,), torch.float32, "op")
    with pytest.raises(BackendUnavailableError, match="float64"):
        head_loss._choose_backend("composed", (x,), torch.float64, "op")
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    _backend.refresh_env()
    assert head_loss._choose_backend("auto", (x,), torch.float32, "op") == "reference"


def _dino_call(zs, zt, Ws, Wt, **kw):
    args = dict(n_student_crops=2, n_teacher_crops=2, student_temp=0.1, teacher_temp=0.05)
    args.update(kw)
    return dino_head_loss(zs, zt, Ws, Wt, **args)


@pytest.mark.parametrize("change,err,match", [
    (dict(zs=torch.randn(7, 4)), ValueError, "multiple of n_student_crops"),
    (dict(zt=torch.randn(6, 4)), ValueError, "n_teacher_crops"),
    (dict(Ws=torch.randn(5, 4)), ValueError, r"\(K, d\)"),
    (dict(zs=torch.randn(8, 3)), ValueError, "features"),
    (dict(zs=torch.randn(8)), ValueError, "2-D"),
    (dict(zs=torch.ones(8, 4, dtype=torch.int64)), TypeError, "floating"),
    (dict(zs=[[1.0]]), TypeError, "Tensor"),
    (dict(student_temp=0.0), ValueError, "student_temp"),
    (dict(teacher_temp=-1.0), ValueError, "teacher_temp"),
    (dict(centering="mean"), ValueError, "centering"),
    (dict(centering="softmax"), ValueError, "center="),
    (dict(sk_iterations=0), ValueError, "sk_iterations"),
    (dict(reduction="sum"), ValueError, "reduction"),
    (dict(n_student_crops=0), ValueError, "n_student_crops"),
    (dict(backend="magic"), ValueError, "unknown backend"),
])
def test_bad_input(change, err, match):
    t = dict(zs=torch.randn(8, 4), zt=torch.randn(8, 4), Ws=torch.randn(6, 4), Wt=torch.randn(6, 4))
    kw = {k: v for k, v in change.items() if k not in t}
    t.update({k: v for k, v in change.items() if k in t})
    with pytest.raises(err, match=match):
        _dino_call(t["zs"], t["zt"], t["Ws"], t["Wt"], **kw)


def test_bad_ibot_input():
    z, W = torch.randn(5, 4), torch.randn(6, 4)
    kw = dict(student_temp=0.1, teacher_temp=0.05)
    with pytest.raises(ValueError, match="masks_weight"):
        ibot_head_loss(z, z, W, W, masks_weight=torch.ones(4), n_images=2, **kw)
    with pytest.raises(ValueError, match="same masked tokens"):
        ibot_head_loss(z, z[:4], W, W, masks_weight=torch.ones(5), n_images=2, **kw)
    with pytest.raises(ValueError, match="n_images"):
        ibot_head_loss(z, z, W, W, masks_weight=torch.ones(5), n_images=0, **kw)


# ---- two processes on gloo: Sinkhorn-Knopp sums across ranks ---------------------------------------------------
WORLD, B_LOCAL, S_CROPS, T_CROPS, K_DIST, D_DIST = 2, 3, 4, 2, 29, 12
M_LOCAL = (7, 4)  # masked tokens per rank: unequal on purpose


def _dist_data():
    """The concatenated batch: DINO crop-major per rank, iBOT tokens, prototypes; float64 (cast per backend)."""
    g = torch.Generator().manual_seed(5)
    zs = [F.normalize(torch.randn(S_CROPS * B_LOCAL, D_DIST, generator=g, dtype=torch.float64), dim=-1)
          for _ in range(WORLD)]
    zt = [F.normalize(torch.randn(T_CROPS * B_LOCAL, D_DIST, generator=g, dtype=torch.float64), dim=-1)
          for _ in range(WORLD)]
    ms = [F.normalize(torch.randn(m, D_DIST, generator=g, dtype=torch.float64), dim=-1) for m in M_LOCAL]
    mt = [F.normalize(torch.randn(m, D_DIST, generator=g, dtype=torch.float64), dim=-1) for m in M_LOCAL]
    mw = [torch.rand(m, generator=g, dtype=torch.float64) for m in M_LOCAL]
    Ws = torch.randn(K_DIST, D_DIST, generator=g, dtype=torch.float64) * 2
    Wt = Ws + 0.2 * torch.randn(K_DIST, D_DIST, generator=g, dtype=torch.float64)
    center = 0.3 * torch.randn(1, K_DIST, generator=g, dtype=torch.float64)
    return zs, zt, ms, mt, mw, Ws, Wt, center


def _dist_worker(rank, store_path, out_dir, backends):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        zs, zt, ms, mt, mw, Ws, Wt, center = _dist_data()
        results = {}
        for backend in backends:
            dt = torch.float64 if backend == "reference" else torch.float32
            c = lambda x: x.to(dt)  # noqa: E731
            results[("dino", backend)] = _run(_dino(backend, S_CROPS, T_CROPS), c(zs[rank]), c(zt[rank]), c(Ws), c(Wt))
            results[("ibot", backend)] = _run(_ibot(backend, c(mw[rank]), 2), c(ms[rank]), c(mt[rank]), c(Ws), c(Wt))
            results[("dino_softmax", backend)] = _run(_dino(backend, S_CROPS, T_CROPS, center=c(center)),
                                                      c(zs[rank]), c(zt[rank]), c(Ws), c(Wt))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp

    backends = ["reference", "composed"]
    if _backend.why_not("triton", (torch.empty(1),)) is None:
        backends.append("triton")
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path), backends), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    zs, zt, ms, mt, mw, Ws, Wt, center = _dist_data()
    # The official losses on the concatenated batch: Sinkhorn-Knopp over every rank's teacher rows, then each rank's
    # loss on its own rows with its slice of the teacher probabilities.
    zt_all = torch.cat([z.view(T_CROPS, B_LOCAL, -1) for z in zt], dim=1).flatten(0, 1)  # crop-major, all images
    p_dino = official_sinkhorn_knopp(zt_all @ Wt.T, 0.05).view(T_CROPS, WORLD, B_LOCAL, -1)
    p_ibot = official_sinkhorn_knopp(torch.cat(mt) @ Wt.T, 0.05).split(M_LOCAL)
    p_soft, want_center = official_softmax_center(zt_all @ Wt.T, 0.05, center, 0.8)
    p_soft = p_soft.view(T_CROPS, WORLD, B_LOCAL, -1)
    for r in range(WORLD):
        def dino_with(p):
            return lambda a, b, c, d: official_dino_forward((a @ c.T).view(S_CROPS, B_LOCAL, -1), p[:, r], 0.1, True)

        wants = {
            "dino": _run(dino_with(p_dino), zs[r], zt[r], Ws, Wt),
            "ibot": _run(lambda a, b, c, d: official_ibot(a, b, c, d, 0.1, 0.05, mw[r], 2, probs=p_ibot[r])[0],
                         ms[r], mt[r], Ws, Wt),
            "dino_softmax": _run(dino_with(p_soft), zs[r], zt[r], Ws, Wt),
        }
        for backend in backends:
            tol = (1e-10, 1e-10) if backend == "reference" else (RTOL[torch.float32], GRAD_RTOL[torch.float32])
            for name, want in wants.items():
                got = res[r][(name, backend)]
                what = f"{name}, {backend}, rank {r}"
                _assert_close(got[0], want[0], tol[0], f"loss ({what})")
                _assert_close(got[1], want[1], tol[1], f"d student_z ({what})")
                _assert_close(got[2], want[2], tol[1], f"d student_prototypes ({what})")
            _assert_close(res[r][("dino_softmax", backend)][3], want_center, tol[0], f"center ({backend}, rank {r})")


# ---- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("kind,shape", [("dino", (10, 2, 16, 1000, 256)), ("dino", (2, 2, 7, 65536, 256)),
                                        ("ibot", (1000, 4099, 384)), ("ibot", (77, 300, 512))])
@pytest.mark.parametrize("backend", ["triton", "composed"])
def test_gpu_against_reference(backend, kind, shape, dtype):
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    key = dtype if dtype == "tf32" else torch_dtype
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        if kind == "dino":
            S, T, B, K, D = shape
            inputs = _inputs(S * B, T * B, K, D, torch_dtype, device="cuda")
            fn = lambda b: _dino(b, S, T)  # noqa: E731
        else:
            M, K, D = shape
            inputs = _inputs(M, M, K, D, torch_dtype, device="cuda")
            mw = torch.rand(M, device="cuda")
            fn = lambda b: _ibot(b, mw, 4)  # noqa: E731
        _check(fn, backend, inputs, RTOL[key], GRAD_RTOL[key])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_gpu_memory_is_linear():
    # No tokens × K matrix: the peak extra memory of forward + backward stays far below one fp32 logit matrix.
    M, K, D = 7500, 65536, 256
    zs, zt, Ws, Wt = _inputs(M, M, K, D, torch.bfloat16, device="cuda")
    zs.requires_grad_(True)
    Ws.requires_grad_(True)
    mw = torch.full((M,), 1 / 60.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ibot_head_loss(zs, zt, Ws, Wt, student_temp=0.1, teacher_temp=0.07, masks_weight=mw, n_images=128,
                   backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits = M * K * 4
    assert extra < logits / 8, f"{extra / 2**20:.0f} MiB extra, one fp32 logit matrix is {logits / 2**20:.0f} MiB"
    assert math.isfinite(extra)
