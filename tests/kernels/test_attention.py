"""Tests of dinov3_kernels/attention.py: the reference against an independent formulation, the Triton kernels
(interpreter on CPU, fp32) and the CUDA kernels (GPU) against the float64 reference, forward and backward, the op
registration, and the public boundary.

Tolerance rule for the kernels: max |kernel - ref64| <= 2 * max |ref_in_dtype - ref64| + ATOL[dtype], where
ref_in_dtype is the official eager path (RoPE, SDPA) run in the input precision, as flash-attention tests do.
"""

import math

import pytest
import torch

from dinov3_kernels import (BackendUnavailableError, apply_rope, apply_rope_reference, rope_attention,
                            rope_attention_reference)
from dinov3_kernels import _backend

ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3, "tf32": 5e-3}
PREFIX = 5  # CLS + 4 registers, as DINOv3 ViTs have


def _rope(hw, head_dim, dtype=torch.float32, device="cpu", tied=True):
    """sin/cos (H·W, Dh). tied: both halves share their angles, as the DINOv3 RoPE module makes them; untied
    angles (and rows that are no rotation) exercise the general formula x·cos + rotate_half(x)·sin."""
    if tied:
        a = torch.rand(hw, head_dim // 2, dtype=torch.float64) * 2 * math.pi
        a = torch.cat((a, a), dim=-1)
        sin, cos = a.sin(), a.cos()
    else:
        sin, cos = torch.randn(hw, head_dim, dtype=torch.float64), torch.randn(hw, head_dim, dtype=torch.float64)
    return sin.to(device=device, dtype=dtype), cos.to(device=device, dtype=dtype)


def _qkv(B, N, H, Dh, dtype=torch.float32, device="cpu"):
    return torch.randn(B, N, 3 * H * Dh, dtype=torch.float64).to(device=device, dtype=dtype)


def _out_and_grad(fn, qkv, dout):
    x = qkv.detach().clone().requires_grad_(True)
    out = fn(x)
    (dqkv,) = torch.autograd.grad(out, x, dout)
    return out.detach(), dqkv


def _assert_within_twice(got, ref64, ref_lp, atol, what):
    err = (got.double() - ref64.double()).abs().max().item()
    base = (ref_lp.double() - ref64.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: max error {err:.3e} > 2 * {base:.3e} (PyTorch in input dtype) + {atol:.0e}"


def _check_attention(qkv, sin, cos, H, backend, dtype_key=None, prefix=None):
    """Kernel forward and backward against the float64 reference, with the 2x rule."""
    dtype_key = dtype_key or qkv.dtype
    B, N, C3 = qkv.shape
    dout = torch.randn(B, N, C3 // 3, dtype=torch.float64).to(device=qkv.device, dtype=qkv.dtype)

    def run(backend_, dt, sin_, cos_):
        return _out_and_grad(lambda x: (rope_attention(x, sin_, cos_, num_heads=H, num_prefix_tokens=prefix,
                                                       backend=backend_)), qkv.to(dt), dout.to(dt))

    out, dqkv = run(backend, qkv.dtype, sin, cos)
    ref, dref = run("reference", torch.float64, sin.double(), cos.double())
    lp, dlp = run("reference", qkv.dtype, sin, cos)
    assert out.dtype == qkv.dtype and out.shape == (B, N, C3 // 3)
    assert dqkv.dtype == qkv.dtype and dqkv.shape == qkv.shape
    _assert_within_twice(out, ref, lp, ATOL[dtype_key], "out")
    _assert_within_twice(dqkv, dref, dlp, ATOL[dtype_key], "dqkv")


# ---- the reference is the spec --------------------------------------------------------------------------------
def _rotation_matrices(sin, cos):
    """(H·W, Dh, Dh) matrices R with rope(x) = R x, built entry by entry from the rotate-half definition."""
    hw, d = sin.shape
    half = d // 2
    R = torch.zeros(hw, d, d, dtype=sin.dtype)
    for i in range(d):
        R[:, i, i] = cos[:, i]
        if i < half:
            R[:, i, i + half] = -sin[:, i]  # rotate_half(x)_i = -x_{i+half}
        else:
            R[:, i, i - half] = sin[:, i]  # rotate_half(x)_i = x_{i-half}
    return R


@pytest.mark.parametrize("prefix,tied", [(PREFIX, True), (0, True), (1, False)])
def test_reference_matches_explicit_formula(prefix, tied):
    B, H, Dh, hw = 2, 3, 8, 6
    N = prefix + hw
    qkv = _qkv(B, N, H, Dh, torch.float64)
    sin, cos = _rope(hw, Dh, torch.float64, tied=tied)
    q, k, v = qkv.view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh) each
    R = _rotation_matrices(sin, cos)
    eye = torch.eye(Dh, dtype=torch.float64).expand(prefix, Dh, Dh)
    R = torch.cat((eye, R))  # (N, Dh, Dh): prefix tokens are not rotated
    q = torch.einsum("nij,bhnj->bhni", R, q)
    k = torch.einsum("nij,bhnj->bhni", R, k)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)
    want = (attn @ v).permute(0, 2, 1, 3).reshape(B, N, H * Dh)
    got = rope_attention_reference(qkv, sin, cos, num_heads=H)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_auto = rope_attention(qkv, sin, cos, num_heads=H, num_prefix_tokens=prefix)  # CPU "auto" = reference
    torch.testing.assert_close(got_auto, want, rtol=1e-12, atol=1e-12)


def test_reference_rotates_in_rope_dtype_and_casts_back():
    # bf16 q with fp32 sin/cos: rotation in fp32, one rounding to bf16 at the end (as the official code).
    q = torch.randn(1, 1, 7, 8).bfloat16()
    k = torch.randn(1, 1, 7, 8).bfloat16()
    sin, cos = _rope(5, 8)
    rq, rk = apply_rope_reference(q, k, sin, cos)
    assert rq.dtype == torch.bfloat16 and rk.dtype == torch.bfloat16
    R = _rotation_matrices(sin.double(), cos.double())
    want = torch.einsum("nij,bhnj->bhni", R, q[:, :, 2:].double()).bfloat16()
    assert torch.equal(rq[:, :, 2:], want)
    assert torch.equal(rq[:, :, :2], q[:, :, :2])
    assert rope_attention_reference(_qkv(1, 7, 1, 8).bfloat16(), sin, cos, num_heads=1).dtype == torch.bfloat16


def test_reference_gradcheck():
    B, H, Dh, hw = 1, 2, 4, 3
    qkv = _qkv(B, 2 + hw, H, Dh, torch.float64).requires_grad_(True)
    sin, cos = _rope(hw, Dh, torch.float64, tied=False)
    assert torch.autograd.gradcheck(lambda x: rope_attention_reference(x, sin, cos, num_heads=H), (qkv,))
    q, k = torch.randn(2, B, H, 2 + hw, Dh, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: apply_rope_reference(a, b, sin, cos), (q, k))


# ---- Triton kernels under the interpreter (CPU, fp32) ---------------------------------------------------------
@pytest.mark.parametrize("B,H,Dh,prefix,grid", [
    (2, 2, 32, PREFIX, (3, 5)),
    (1, 1, 16, 0, (4, 5)),
    (1, 2, 64, PREFIX, (3, 5)),
    (2, 1, 48, 1, (3, 5)),  # head dim not a power of two
    (1, 1, 32, PREFIX, (14, 14)),  # N = 201: several tiles with a ragged edge
    (2, 3, 32, PREFIX, (3, 5)),  # 3 heads: the row-wise passes' groups of 2 heads end with a group of 1
])
def test_triton_against_reference(triton_cpu, B, H, Dh, prefix, grid):
    hw = grid[0] * grid[1]
    qkv = _qkv(B, prefix + hw, H, Dh)
    sin, cos = _rope(hw, Dh)
    _check_attention(qkv, sin, cos, H, "triton", prefix=prefix)


@pytest.mark.parametrize("B,H,Dh,prefix,grid,tied", [
    (2, 2, 32, PREFIX, (3, 5), True),
    (1, 1, 16, 0, (1, 1), True),  # N = 1
    (1, 2, 48, 1, (2, 3), False),  # N = 7, head dim not a power of two, untied sin/cos
    (1, 1, 128, PREFIX, (3, 5), True),
    (1, 1, 64, PREFIX, (14, 14), True),  # N = 201: several tiles of both kernels with ragged edges
])
def test_triton_split_backward(triton_cpu, monkeypatch, B, H, Dh, prefix, grid, tied):
    # The split backward (dK/dV kernel + dQ kernel) runs on the GPU for TF32 at 512-byte rows only; forced here.
    from dinov3_kernels._triton import attention as tri

    launched = []
    launch = tri._launch

    def spy(tuned, raw, *args, **kwargs):
        launched.append(raw.fn.__name__)
        return launch(tuned, raw, *args, **kwargs)

    monkeypatch.setattr(tri, "_split_bwd", lambda *a: True)
    monkeypatch.setattr(tri, "_launch", spy)
    hw = grid[0] * grid[1]
    qkv = _qkv(B, prefix + hw, H, Dh)
    sin, cos = _rope(hw, Dh, tied=tied)
    _check_attention(qkv, sin, cos, H, "triton", prefix=prefix)
    assert "_rope_attention_bwd_dkdv_kernel" in launched and "_rope_attention_bwd_dq_tile_kernel" in launched
    assert "_rope_attention_bwd_kernel" not in launched


def test_triton_untied_sin_cos(triton_cpu):
    # Halves with different angles and non-unit coefficients: the backward's transposed rotation must use the
    # sin of the other half.
    qkv = _qkv(1, PREFIX + 15, 2, 32)
    sin, cos = _rope(15, 32, tied=False)
    _check_attention(qkv, sin, cos, 2, "triton")


def test_triton_tied_half_tables(triton_cpu):
    # (H·W, Dh/2) tables stand for both halves: the same results as the full tables, bit for bit, and as the reference.
    H, Dh, hw = 2, 32, 15
    qkv = _qkv(2, PREFIX + hw, H, Dh)
    sin, cos = _rope(hw, Dh)
    half_sin, half_cos = sin[:, :Dh // 2].contiguous(), cos[:, :Dh // 2].contiguous()
    dout = torch.randn(2, PREFIX + hw, H * Dh)
    full = _out_and_grad(lambda x: rope_attention(x, sin, cos, num_heads=H, backend="triton"), qkv, dout)
    half = _out_and_grad(lambda x: rope_attention(x, half_sin, half_cos, num_heads=H, backend="triton"), qkv, dout)
    for f, h in zip(full, half):
        assert torch.equal(f, h)
    torch.testing.assert_close(rope_attention_reference(qkv, half_sin, half_cos, num_heads=H),
                               rope_attention_reference(qkv, sin, cos, num_heads=H), rtol=0, atol=0)
    _check_attention(qkv, half_sin, half_cos, H, "triton")
    q, k = torch.randn(2, 1, H, PREFIX + hw, Dh)
    for f, h in zip(apply_rope(q, k, sin, cos, backend="triton"), apply_rope(q, k, half_sin, half_cos, backend="triton")):
        assert torch.equal(f, h)


def test_triton_lse(triton_cpu):
    B, H, Dh, hw = 1, 2, 32, 15
    N = PREFIX + hw
    qkv = _qkv(B, N, H, Dh)
    sin, cos = _rope(hw, Dh)
    scale = Dh ** -0.5
    out, lse = torch.ops.dinov3_kernels.rope_attention_fwd(qkv, sin, cos, H, PREFIX, scale, "triton")
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    q, k, _ = qkv.double().view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    q, k = apply_rope_reference(q, k, sin.double(), cos.double())
    want = torch.logsumexp(q @ k.transpose(-1, -2) * scale, dim=-1)
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=1e-5)


def test_triton_strided_inputs(triton_cpu):
    B, H, Dh, hw = 2, 2, 16, 15
    N, C = PREFIX + hw, H * Dh
    sin, cos = _rope(hw, Dh)
    # Row stride > 3C (qkv sliced out of a wider buffer) and batch stride != N*3C (token-major storage).
    wide = _qkv(B, N, H, Dh + 4)[..., :3 * C]
    token_major = _qkv(N, B, H, Dh).transpose(0, 1)
    # Last-dim stride 2: the one layout the kernels copy.
    strided_last = _qkv(B, N, 2 * H, Dh)[..., ::2]
    for qkv in (wide, token_major, strided_last):
        assert not qkv.is_contiguous()
        _check_attention(qkv, sin, cos, H, "triton")


def test_triton_strided_output_gradient(triton_cpu):
    B, H, Dh, hw = 1, 2, 16, 15
    N, C = PREFIX + hw, H * Dh
    qkv = _qkv(B, N, H, Dh)
    sin, cos = _rope(hw, Dh)
    dout = torch.randn(B, N, C + 8)[..., :C]
    _, got = _out_and_grad(lambda x: rope_attention(x, sin, cos, num_heads=H, backend="triton"), qkv, dout)
    _, want = _out_and_grad(lambda x: rope_attention_reference(x, sin, cos, num_heads=H), qkv, dout)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_triton_inputs_not_modified(triton_cpu):
    qkv = _qkv(1, PREFIX + 15, 2, 16)
    sin, cos = _rope(15, 16)
    dout = torch.randn(1, PREFIX + 15, 32)
    saved = [t.clone() for t in (qkv, sin, cos, dout)]
    _out_and_grad(lambda x: rope_attention(x, sin, cos, num_heads=2, backend="triton"), qkv, dout)
    q, k = qkv[..., :32].view(1, -1, 2, 16).transpose(1, 2), qkv[..., 32:64].view(1, -1, 2, 16).transpose(1, 2)
    rq, rk = apply_rope(q, k, sin, cos, backend="triton")
    assert rq.data_ptr() != q.data_ptr() and rk.data_ptr() != k.data_ptr()
    for t, s in zip((qkv, sin, cos, dout), saved):
        assert torch.equal(t, s)


@pytest.mark.parametrize("prefix", [0, PREFIX])
@pytest.mark.parametrize("tied", [True, False])
def test_triton_apply_rope(triton_cpu, prefix, tied):
    B, H, Dh, hw = 2, 3, 48, 15
    N = prefix + hw
    sin, cos = _rope(hw, Dh, tied=tied)
    # q and k as the strided views of a packed qkv that users of their own attention have.
    q, k, _ = _qkv(B, N, H, Dh).view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    dq, dk = torch.randn(2, B, H, N, Dh)

    def run(fn, dtype):
        a = q.to(dtype).detach().requires_grad_(True)
        b = k.to(dtype).detach().requires_grad_(True)
        ra, rb = fn(a, b, sin.to(dtype), cos.to(dtype))
        ga, gb = torch.autograd.grad((ra, rb), (a, b), (dq.to(dtype), dk.to(dtype)))
        return ra.detach(), rb.detach(), ga, gb

    got = run(lambda a, b, s, c: apply_rope(a, b, s, c, prefix, backend="triton"), torch.float32)
    want = run(lambda a, b, s, c: apply_rope_reference(a, b, s, c, prefix), torch.float64)
    for g, w, what in zip(got, want, ("q", "k", "dq", "dk")):
        assert g.dtype == torch.float32 and g.shape == (B, H, N, Dh)
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6, msg=what)
    # Prefix tokens pass through bit for bit.
    assert torch.equal(got[0][:, :, :prefix], q[:, :, :prefix])


def test_triton_apply_rope_double_backward(triton_cpu):
    q, k = torch.randn(2, 1, 2, PREFIX + 6, 16, dtype=torch.float32)
    sin, cos = _rope(6, 16, tied=False)
    q.requires_grad_(True)
    k.requires_grad_(True)
    rq, rk = apply_rope(q, k, sin, cos, backend="triton")
    gq, gk = torch.autograd.grad((rq.square().sum() + rk.sum()), (q, k), create_graph=True)
    (hq,) = torch.autograd.grad(gq.sum(), q)
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    rq, rk = apply_rope_reference(q64, k64, sin.double(), cos.double())
    gq64, _ = torch.autograd.grad((rq.square().sum() + rk.sum()), (q64, k64), create_graph=True)
    (hq64,) = torch.autograd.grad(gq64.sum(), q64)
    torch.testing.assert_close(hq.double(), hq64, rtol=1e-5, atol=1e-5)


# ---- composed backend: one pass to rotated q, k, v; SDPA; one pass back ---------------------------------------
@pytest.mark.parametrize("prefix,hw,Dh,tied", [
    (0, 1, 64, True), (1, 0, 64, False), (PREFIX, 2, 80, True), (PREFIX, 2, 128, False),
    (1, 196, 80, False), (1, 196, 64, True), (1, 256, 128, True), (PREFIX, 256, 64, False), (PREFIX, 256, 80, True),
])
def test_composed_against_float64_reference(prefix, hw, Dh, tied):
    # N = 1, 1, 7, 197, 257, 261 tokens; float64 runs the plain-PyTorch passes around SDPA (and its backward).
    B, H = (2, 2) if hw < 100 else (1, 1)
    N = prefix + hw
    qkv = _qkv(B, N, H, Dh, torch.float64)
    sin, cos = _rope(hw, Dh, torch.float64, tied=tied)
    if tied and hw:  # the (H·W, Dh/2) half tables the model passes
        sin, cos = sin[:, :Dh // 2].contiguous(), cos[:, :Dh // 2].contiguous()
    dout = torch.randn(B, N, H * Dh, dtype=torch.float64)
    got = _out_and_grad(lambda x: rope_attention(x, sin, cos, num_heads=H, backend="composed"), qkv, dout)
    want = _out_and_grad(lambda x: rope_attention_reference(x, sin, cos, num_heads=H), qkv, dout)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_composed_merge_is_the_transposed_split():
    # <split(x), g> = <x, merge(g)> for the linear map split (float64): the backward pass is the exact adjoint.
    from dinov3_kernels.attention import rope_qkv_merge_reference, rope_qkv_split_reference

    B, N, H, Dh, prefix = 2, PREFIX + 6, 3, 16, PREFIX
    x = _qkv(B, N, H, Dh, torch.float64)
    sin, cos = _rope(6, Dh, torch.float64, tied=False)
    gs = torch.randn(3, B, H, N, Dh, dtype=torch.float64)
    lhs = sum((a * b).sum() for a, b in zip(rope_qkv_split_reference(x, sin, cos, H, prefix), gs))
    rhs = (x * rope_qkv_merge_reference(*gs, sin, cos, prefix)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Dh,tied,prefix", [(48, True, PREFIX), (64, False, 1), (16, False, 0)])
def test_triton_split_and_merge_passes(triton_cpu, Dh, tied, prefix):
    # The Triton passes of the composed backend (interpreter, fp32) against the plain-PyTorch ones in float64, on a
    # strided qkv (rows of a wider buffer) and strided gradients; 35 tokens = several 16-row tiles, a ragged edge.
    from dinov3_kernels._triton.attention import rope_qkv_merge_triton, rope_qkv_split_triton
    from dinov3_kernels.attention import rope_qkv_merge_reference, rope_qkv_split_reference

    B, H, hw = 2, 3, 35 - prefix  # 3 heads: groups of 2 heads per program and a group of 1
    N = prefix + hw
    qkv = _qkv(B, N, H, Dh + 8)[..., :3 * H * Dh]
    sin, cos = _rope(hw, Dh, tied=tied)
    if tied:
        sin, cos = sin[:, :Dh // 2].contiguous(), cos[:, :Dh // 2].contiguous()
    got = rope_qkv_split_triton(qkv, sin, cos, H, prefix)
    want = rope_qkv_split_reference(qkv.double(), sin.double(), cos.double(), H, prefix)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.is_contiguous() and g.shape == (B, H, N, Dh)
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-6)
    assert torch.equal(got[2], qkv.view(B, N, 3, H, Dh)[:, :, 2].transpose(1, 2))  # v: a copy, bit for bit
    gs = [torch.randn(B, N, H, Dh).transpose(1, 2) for _ in range(3)]  # SDPA-like (B, H, N, Dh) strided views
    merged = rope_qkv_merge_triton(*gs, sin, cos, prefix)
    want = rope_qkv_merge_reference(*(g.double() for g in gs), sin.double(), cos.double(), prefix)
    assert merged.shape == qkv.shape and merged.is_contiguous()
    torch.testing.assert_close(merged.double(), want, rtol=0, atol=1e-6)


def test_composed_triton_end_to_end(triton_cpu, monkeypatch):
    # fp32 on CPU under the interpreter: the Triton passes around SDPA, with the 2x rule; tied and untied tables.
    from dinov3_kernels._triton import attention as tri

    calls = []
    for name in ("rope_qkv_split_triton", "rope_qkv_merge_triton"):
        fn = getattr(tri, name)
        monkeypatch.setattr(tri, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    H, Dh, hw = 2, 32, 15
    qkv = _qkv(2, PREFIX + hw, H, Dh)
    sin, cos = _rope(hw, Dh)
    _check_attention(qkv, sin[:, :Dh // 2].contiguous(), cos[:, :Dh // 2].contiguous(), H, "composed")
    _check_attention(qkv, *_rope(hw, Dh, tied=False), H, "composed")
    assert calls == ["rope_qkv_split_triton", "rope_qkv_merge_triton"] * 2


def test_triton_grids_fold_batch_and_heads():
    # No grid puts B on an axis limited to 65535 programs: the attention kernels use one axis (tiles·B·H, up to
    # 2^31 - 1), the row-wise passes (B·head groups, tiles); beyond either limit the launcher raises a clear error.
    from dinov3_kernels._triton.attention import MAX_PROGRAMS, _grid, _row_pass

    assert _row_pass(70000, 16, 261, 64, False) == ((70000, 5), 64, 16)
    assert _grid(261, 70000, 16, 128) == (3 * 70000 * 16,)
    with pytest.raises(ValueError, match="65535"):
        _row_pass(1, 1, 65536 * 64 + 1, 64, False)
    with pytest.raises(ValueError, match="exceed"):
        _row_pass(MAX_PROGRAMS, 3, 16, 64, True)  # groups of 2 heads: 2 per batch entry
    with pytest.raises(ValueError, match="exceed"):
        _grid(1029, MAX_PROGRAMS // 16, 16, 64)


def test_triton_row_passes_group_heads():
    # The row-wise passes load a token tile's sin/cos rows once per group of heads: all the heads where the grid
    # keeps ROW_PASS_MIN_PROGRAMS programs, fewer (halving) where it would not; tiles of 4096 elements at most.
    from dinov3_kernels._triton.attention import ROW_PASS_MIN_PROGRAMS, _row_pass

    assert ROW_PASS_MIN_PROGRAMS == 1024
    assert _row_pass(502, 16, 261, 64, False) == ((502, 5), 64, 16)  # ViT-L, 2 global + 10 local crops of 41 images
    assert _row_pass(125, 32, 261, 128, False) == ((125, 9), 32, 32)  # ViT-7B at 32 tokens per tile
    assert _row_pass(64, 16, 261, 64, False) == ((256, 5), 64, 4)  # 320 and 640 programs < 1024: 16 -> 8 -> 4
    assert _row_pass(1, 12, 197, 64, False) == ((12, 4), 64, 1)  # too few tokens to group: one head per program
    assert _row_pass(2, 6, 261, 256, False)[1] == 16
    assert _row_pass(2, 3, 40, 48, True) == ((4, 3), 16, 2)


# ---- registration: opcheck and torch.compile -----------------------------------------------------------------
def test_opcheck(triton_cpu):
    B, H, Dh, hw = 1, 1, 16, 6
    N = PREFIX + hw
    qkv = _qkv(B, N, H, Dh).requires_grad_(True)
    sin, cos = _rope(hw, Dh)
    ops = torch.ops.dinov3_kernels
    torch.library.opcheck(ops.rope_attention_fwd.default, (qkv, sin, cos, H, PREFIX, Dh ** -0.5, "triton"))
    with torch.no_grad():
        out, lse = ops.rope_attention_fwd(qkv, sin, cos, H, PREFIX, Dh ** -0.5, "triton")
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.rope_attention_bwd.default,
                          (qkv.detach(), sin, cos, out, lse, dout, H, PREFIX, Dh ** -0.5, "triton"))
    q, k = torch.randn(2, B, H, N, Dh, requires_grad=True)
    torch.library.opcheck(ops.apply_rope.default, (q, k, sin, cos, PREFIX, False, "triton"))
    # The composed backend's passes: Triton split (its autograd runs the merge), plain-PyTorch merge.
    torch.library.opcheck(ops.rope_qkv_split.default, (qkv, sin, cos, H, PREFIX, "triton"))
    torch.library.opcheck(ops.rope_qkv_merge.default, (q.detach(), k.detach(), q.detach(), sin, cos, PREFIX,
                                                       "reference"))


def test_torch_compile_fullgraph(triton_cpu):
    B, H, Dh, hw = 1, 2, 16, 15
    N = PREFIX + hw
    qkv = _qkv(B, N, H, Dh)
    sin, cos = _rope(hw, Dh)
    dout = torch.randn(B, N, H * Dh)

    want = _out_and_grad(lambda x: 2.0 * rope_attention_reference(x, sin.double(), cos.double(), num_heads=H),
                         qkv.double(), dout.double())
    for backend in ("triton", "composed"):
        def f(x, backend=backend):
            return rope_attention(x, sin, cos, num_heads=H, backend=backend) * 2.0

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = _out_and_grad(compiled, qkv, dout)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=0, atol=2e-5)


# ---- backend choice ------------------------------------------------------------------------------------------
def test_backend_choice(monkeypatch, triton_cpu):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.refresh_env()
    qkv = _qkv(1, PREFIX + 6, 1, 40)
    sin, cos = _rope(6, 40)
    # head_dim 40 is no multiple of 16: explicit triton raises, auto (CPU) is the reference.
    with pytest.raises(BackendUnavailableError, match="multiples of 16"):
        rope_attention(qkv, sin, cos, num_heads=1, backend="triton")
    torch.testing.assert_close(rope_attention(qkv, sin, cos, num_heads=1),
                               rope_attention_reference(qkv, sin, cos, num_heads=1))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            rope_attention(qkv, sin, cos, num_heads=1, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="float32"):
        rope_attention(qkv.double(), sin, cos, num_heads=1, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        rope_attention(qkv, sin, cos, num_heads=1, backend="magic")
    q, k = torch.randn(2, 1, 1, PREFIX + 6, 40)
    with pytest.raises(BackendUnavailableError, match="no CUDA kernel|not built|CUDA tensors"):
        apply_rope(q, k, sin, cos, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="no composed backend"):
        apply_rope(q, k, sin, cos, backend="composed")
    # composed takes any head dim and dtype (head_dim 40 and float64 here).
    torch.testing.assert_close(rope_attention(qkv.double(), sin.double(), cos.double(), num_heads=1,
                                              backend="composed"),
                               rope_attention_reference(qkv.double(), sin.double(), cos.double(), num_heads=1))


def test_deterministic_mode_refuses_the_atomic_backward(monkeypatch, triton_cpu):
    # The triton (and cuda) backward adds dQ with fp32 atomics: refused under deterministic algorithms; composed runs.
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.refresh_env()
    qkv = _qkv(1, PREFIX + 6, 1, 16)
    sin, cos = _rope(6, 16)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(BackendUnavailableError, match="atomics"):
            rope_attention(qkv, sin, cos, num_heads=1, backend="triton")
        torch.testing.assert_close(rope_attention(qkv, sin, cos, num_heads=1, backend="composed"),
                                   rope_attention_reference(qkv, sin, cos, num_heads=1), rtol=0, atol=1e-5)
    finally:
        torch.use_deterministic_algorithms(False)


def test_sin_cos_requiring_grad(monkeypatch, triton_cpu):
    # The kernels treat sin/cos as constants: an explicit kernel request refuses, auto keeps their gradient.
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    _backend.refresh_env()
    qkv = _qkv(1, PREFIX + 6, 1, 16)
    sin, cos = _rope(6, 16)
    sin.requires_grad_(True)
    for backend in ("triton", "composed"):
        with pytest.raises(BackendUnavailableError, match="sin/cos"):
            rope_attention(qkv, sin, cos, num_heads=1, backend=backend)
    rope_attention(qkv, sin, cos, num_heads=1).sum().backward()
    assert sin.grad is not None and sin.grad.abs().sum() > 0
    with torch.no_grad():
        out = rope_attention(qkv, sin, cos, num_heads=1, backend="triton")
    torch.testing.assert_close(out, rope_attention_reference(qkv, sin.detach(), cos, num_heads=1), rtol=0, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------------------
def _good(B=1, N=PREFIX + 6, H=2, Dh=16, hw=6):
    sin, cos = _rope(hw, Dh)
    return dict(qkv=_qkv(B, N, H, Dh), sin=sin, cos=cos, num_heads=H)


@pytest.mark.parametrize("change,err,match", [
    (dict(qkv=torch.randn(1, 11, 95)), ValueError, "packed width"),
    (dict(qkv=torch.randn(11, 96)), ValueError, "packed"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(qkv=torch.randn(1, 11, 3 * 2 * 15)), ValueError, "even"),
    (dict(num_prefix_tokens=12), ValueError, "num_prefix_tokens"),
    (dict(num_prefix_tokens=4), ValueError, "num_prefix_tokens"),
    (dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    (dict(sin=torch.randn(12, 16), cos=torch.randn(12, 16)), ValueError, "positions"),
    (dict(sin=torch.randn(6, 16), cos=torch.randn(6, 8)), ValueError, "shape"),
    (dict(sin=torch.randn(6, 12), cos=torch.randn(6, 12)), ValueError, "head_dim"),
    (dict(sin=torch.randn(1, 6, 16), cos=torch.randn(1, 6, 16)), ValueError, "H\\*W"),
    (dict(sin=torch.randn(6, 16).double()), TypeError, "dtype"),
    (dict(qkv=torch.ones(1, 11, 96, dtype=torch.int32)), TypeError, "floating"),
    (dict(sin=torch.randn(6, 16, device="meta")), ValueError, "device"),
    (dict(qkv=torch.randn(0, 11, 96)), ValueError, "empty"),
    (dict(qkv=torch.randn(1, 0, 96), sin=torch.randn(0, 16), cos=torch.randn(0, 16)), ValueError, "empty"),
    (dict(qkv=[[1.0]]), TypeError, "Tensor"),
])
def test_bad_input(change, err, match):
    args = _good()
    args.update(change)
    with pytest.raises(err, match=match):
        rope_attention(args.pop("qkv"), args.pop("sin"), args.pop("cos"), **args)


@pytest.mark.parametrize("change,err,match", [
    (dict(k=torch.randn(1, 2, 11, 8)), ValueError, "q and k"),
    (dict(q=torch.randn(2, 11, 16), k=torch.randn(2, 11, 16)), ValueError, "q and k"),
    (dict(k=torch.randn(1, 2, 11, 16).double()), TypeError, "dtype"),
    (dict(num_prefix_tokens=3), ValueError, "num_prefix_tokens"),
    (dict(sin=torch.randn(6, 12), cos=torch.randn(6, 12)), ValueError, "head_dim"),
    (dict(q=torch.randn(1, 2, 0, 16), k=torch.randn(1, 2, 0, 16)), ValueError, "empty|positions"),
])
def test_apply_rope_bad_input(change, err, match):
    sin, cos = _rope(6, 16)
    args = dict(q=torch.randn(1, 2, 11, 16), k=torch.randn(1, 2, 11, 16), sin=sin, cos=cos, num_prefix_tokens=None)
    args.update(change)
    with pytest.raises(err, match=match):
        apply_rope(**args)


# ---- GPU -----------------------------------------------------------------------------------------------------
GPU_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _require_backend(backend):
    if backend == "cuda" and _backend.CUDA_EXT is None:
        pytest.fail("the CUDA extension is not built on this GPU machine")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "composed"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "tf32"])
@pytest.mark.parametrize("Dh,H", [(64, 6), (128, 2)])
@pytest.mark.parametrize("N", [201, 261, 1029, 4101])
def test_gpu_against_reference(backend, dtype, Dh, H, N):
    _require_backend(backend)
    qkv = _qkv(2, N, H, Dh, GPU_DTYPES[dtype], "cuda")
    sin, cos = _rope(N - PREFIX, Dh, device="cuda")  # 14x14, 16x16, 32x32 patches
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        _check_attention(qkv, sin, cos, H, backend, "tf32" if dtype == "tf32" else None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("Dh", [16, 32, 48, 96, 256])
def test_gpu_triton_other_head_dims(Dh):
    qkv = _qkv(2, 261, 3, Dh, torch.bfloat16, "cuda")
    sin, cos = _rope(256, Dh, device="cuda")
    _check_attention(qkv, sin, cos, 3, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_apply_rope(dtype):
    q, k = _qkv(2, 261, 4, 64, dtype, "cuda").view(2, 261, 3, 4, 64).permute(2, 0, 3, 1, 4)[:2]
    sin, cos = _rope(256, 64, device="cuda", tied=False)
    got = apply_rope(q, k, sin, cos, backend="triton")
    want = apply_rope_reference(q, k, sin, cos)
    for g, w in zip(got, want):
        # Both round one fp32 result to the input dtype; fp32 evaluation order may flip the last bit.
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_auto_and_deterministic():
    qkv = _qkv(4, 1029, 6, 64, torch.bfloat16, "cuda").requires_grad_(True)
    sin, cos = _rope(1024, 64, device="cuda")
    assert _backend.choose_backend("auto", (qkv,), None) in ("cuda", "triton")
    dout = torch.randn(4, 1029, 384, device="cuda", dtype=torch.bfloat16)
    for backend in ["triton"] + (["cuda"] if _backend.CUDA_EXT is not None else []):
        runs = [_out_and_grad(lambda x: rope_attention(x, sin, cos, num_heads=6, backend=backend), qkv, dout)
                for _ in range(3)]
        C = 384
        for out, dqkv in runs[1:]:
            assert torch.equal(out, runs[0][0]), backend
            # dQ is summed over key tiles with fp32 atomics (order not fixed); dK and dV have one owner each.
            assert torch.equal(dqkv[..., C:], runs[0][1][..., C:]), backend
            torch.testing.assert_close(dqkv[..., :C], runs[0][1][..., :C], rtol=1e-2, atol=1e-2)
    torch.use_deterministic_algorithms(True)
    try:  # auto passes over the atomic backends, to composed (or the reference)
        assert _backend.choose_backend("auto", (qkv,), None, "rope_attention", atomics=("cuda", "triton"),
                                       size=1029) in ("composed", "reference")
    finally:
        torch.use_deterministic_algorithms(False)


def test_triton_autotune_candidates_by_row_width():
    # Every head dim the triton backend takes, in every dtype, gets a non-empty candidate list, and wider rows get
    # candidates no larger (in tile area x stages) than narrower rows: the shared memory a block needs grows with the
    # row width, so the lists must shrink (tests/kernels/triton_compile.py checks the actual bytes on a compile).
    pytest.importorskip("triton")
    from dinov3_kernels._triton import attention as tri

    def biggest(prune, configs, block_d, is_fp32, precision="tf32"):
        kept = prune(configs, {}, BLOCK_D=block_d, IS_FP32=is_fp32, HEAD_DIM=block_d, PRECISION=precision)
        assert kept and all(c in configs for c in kept)
        return max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages for c in kept)

    for prune, configs in ((tri._fwd_prune, tri._FWD_CONFIGS), (tri._bwd_prune, tri._BWD_CONFIGS)):
        sizes = []
        for head_dim in range(16, 257, 16):
            block_d = max(16, 1 << (head_dim - 1).bit_length())
            for is_fp32 in (False, True):
                sizes.append((block_d * (4 if is_fp32 else 2), biggest(prune, configs, block_d, is_fp32)))
            # IEEE fp32 (FMA dots, more registers) never gets larger tiles than TF32 at the same width.
            assert biggest(prune, configs, block_d, True, "ieee") <= biggest(prune, configs, block_d, True)
        sizes.sort()
        assert all(a[1] >= b[1] for a, b in zip(sizes, sizes[1:]) if a[0] < b[0])
    # The split backward serves TF32 at the widths its lists cover (fp32 Dh 128), and only TF32.
    for head_dim in range(16, 257, 16):
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        assert not tri._split_bwd(False, "ieee", block_d) and not tri._split_bwd(True, "ieee", block_d)
        if tri._split_bwd(True, "tf32", block_d):
            for prune, configs in ((tri._bwd_kv_prune, tri._BWD_KV_CONFIGS), (tri._bwd_q_prune, tri._BWD_Q_CONFIGS)):
                biggest(prune, configs, block_d, True)
    assert tri._split_bwd(True, "tf32", 128)
