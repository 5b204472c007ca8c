"""The CUDA backend of rope_attention (csrc/rope_attention.cu, dinov3_kernels/_cuda/attention.py).

CPU tests: the glue and the launchers reject unsupported head dims / dtypes before touching a GPU, and a lane-level
emulator of the tensor-core kernels (ldmatrix + mma.sync m16n8k16 fragments as the PTX ISA defines them, the same
per-lane address formulas and the same loop structure as the .cu file) reproduces the float64 reference, forward and
backward. The real kernels also run on the CPU: csrc/rope_attention.cu compiled for the host with
DINOV3_HOST_EMULATION (tests/kernels/attention_cuda_emu.cpp on tests/kernels/cuda_emu.h), driven through the real
glue, every dtype, both head dims, forward and backward. GPU tests (`gpu` marker): the compiled kernels against the
float64 reference, every dtype and head dim.
"""

from __future__ import annotations

import ctypes
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import _cuda_emu
from dinov3_kernels import _backend
from dinov3_kernels._cuda import attention as glue

# ---- shared helpers ----------------------------------------------------------------------------------------------


def _rope_tables(num_patches, head_dim, seed=0):
    """Arbitrary sin/cos tables (the kernels take any; unequal halves catch a half-swapped table). head_dim here is
    the table's width: pass Dh / 2 for tied tables (both halves of the head dim share their angles)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(num_patches, head_dim, generator=g, dtype=torch.float64) * 6.0
    return torch.sin(angles).float(), torch.cos(angles).float()


def _reference64(qkv, sin, cos, num_heads, num_prefix):
    """float64 spec: out (B, N, C), lse (B, H, N), and a closure for dqkv given dout."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    x = qkv.detach().double().requires_grad_(True)
    q, k, v = x.reshape(B, N, 3, num_heads, Dh).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
    s64, c64 = sin.double(), cos.double()
    if s64.shape[-1] * 2 == Dh:  # tied (H·W, Dh/2) tables stand for both halves
        s64, c64 = torch.cat((s64, s64), dim=-1), torch.cat((c64, c64), dim=-1)

    def rot(t):
        p = t[..., num_prefix:, :]
        half = p.shape[-1] // 2
        rh = torch.cat((-p[..., half:], p[..., :half]), dim=-1)
        return torch.cat((t[..., :num_prefix, :], p * c64 + rh * s64), dim=-2)

    q, k = rot(q), rot(k)
    scores = (q @ k.transpose(-1, -2)) * Dh**-0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, N, C)

    def grad(dout):
        (g,) = torch.autograd.grad(out, x, dout.double(), retain_graph=True)
        return g

    return out.detach(), lse.detach(), grad


# ---- CPU: validation before the GPU ------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [32, 80, 256])
def test_glue_rejects_unsupported_head_dim(head_dim):
    H, N = 2, 7
    qkv = torch.zeros(1, N, 3 * H * head_dim)
    sin, cos = _rope_tables(N - 1, head_dim)
    with pytest.raises(ValueError, match=f"head_dim {head_dim} is not supported"):
        glue.rope_attention_fwd_cuda(qkv, sin, cos, H, 1, head_dim**-0.5)
    out, lse = torch.zeros(1, N, H * head_dim), torch.zeros(1, H, N)
    with pytest.raises(ValueError, match=f"head_dim {head_dim} is not supported"):
        glue.rope_attention_bwd_cuda(qkv, sin, cos, out, lse, out, H, 1, head_dim**-0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_glue_rejects_unsupported_dtype(dtype):
    H, N, Dh = 2, 7, 64
    qkv = torch.zeros(1, N, 3 * H * Dh, dtype=dtype)
    sin, cos = _rope_tables(N, Dh)
    with pytest.raises(ValueError, match=f"dtype {dtype} is not supported"):
        glue.rope_attention_fwd_cuda(qkv, sin, cos, H, 0, Dh**-0.5)


def test_glue_rejects_bad_shapes_and_cpu_tensors():
    H, N, Dh = 2, 7, 64
    qkv = torch.zeros(1, N, 3 * H * Dh)
    sin, cos = _rope_tables(N - 2, Dh)
    with pytest.raises(ValueError, match="sin must be"):
        glue.rope_attention_fwd_cuda(qkv, sin, cos, H, 1, 0.125)  # 1 + 5 != 7
    with pytest.raises(ValueError, match="qkv must be"):
        glue.rope_attention_fwd_cuda(qkv[..., :-1], sin, cos, H, 2, 0.125)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        glue.rope_attention_fwd_cuda(qkv, sin, cos, H, 9, 0.125)
    with pytest.raises(ValueError, match="CUDA device"):
        glue.rope_attention_fwd_cuda(qkv, sin, cos, H, 2, 0.125)
    tied_sin, tied_cos = _rope_tables(N - 2, Dh // 2)
    with pytest.raises(ValueError, match="CUDA device"):  # tied (N - prefix, Dh/2) tables pass the shape checks
        glue.rope_attention_fwd_cuda(qkv, tied_sin, tied_cos, H, 2, 0.125)
    with pytest.raises(ValueError, match="or, tied"):
        glue.rope_attention_fwd_cuda(qkv, sin[:, :Dh // 2 + 1], cos[:, :Dh // 2 + 1], H, 2, 0.125)
    with pytest.raises(ValueError, match="differ in shape"):
        glue.rope_attention_fwd_cuda(qkv, tied_sin, cos, H, 2, 0.125)
    assert glue.unsupported_reason(qkv, H) is None
    assert "head_dim 48" in glue.unsupported_reason(torch.zeros(1, N, 3 * H * 48), H)


def test_packed_view_reads_in_place_only_when_vector_aligned():
    # 16-bit kernels read 16-byte vectors: an aligned strided view is used as is, a misaligned one is copied.
    base = torch.zeros(2, 9, 3 * 128 + 64, dtype=torch.bfloat16)
    aligned = base[:, :, 32:32 + 3 * 128]
    assert glue._packed_view(aligned).data_ptr() == aligned.data_ptr()
    shifted = base[:, :, 1:1 + 3 * 128]
    copy = glue._packed_view(shifted)
    assert copy.data_ptr() != shifted.data_ptr() and copy.is_contiguous() and torch.equal(copy, shifted)
    f32 = torch.zeros(2, 9, 3 * 64 + 1)[:, :, 1:]  # fp32 path: scalar loads, any token stride
    assert glue._packed_view(f32).data_ptr() == f32.data_ptr()
    cols = torch.zeros(2, 3 * 64, 9).transpose(1, 2)  # last stride != 1: copied
    assert glue._packed_view(cols).stride(-1) == 1


needs_ext = pytest.mark.skipif(_backend.CUDA_EXT is None, reason="the CUDA extension is not built")


@needs_ext
@pytest.mark.parametrize("fn", ["rope_attention_fwd_cuda", "rope_attention_bwd_cuda"])
@pytest.mark.parametrize("head_dim, dtype_code, match", [(32, 2, "head_dim 32"), (96, 1, "head_dim 96"),
                                                          (64, 7, "dtype code 7")])
def test_launchers_reject_before_launch(fn, head_dim, dtype_code, match):
    # Null pointers: the launcher must raise before any CUDA call (there is no GPU here).
    C = _backend.CUDA_EXT
    n_ptrs = 6 if fn.endswith("fwd_cuda") else 10
    with pytest.raises(ValueError, match=match):
        getattr(C, fn)(*([0] * n_ptrs), 1, 8, 1, head_dim, 0, head_dim, 0, 0, dtype_code, 1.0, 0)


# ---- CPU: lane-level emulator of the tensor-core kernels ---------------------------------------------------------
# Semantics from the PTX ISA (mma.m16n8k16 .f16/.bf16 fragments, ldmatrix .m8n8 .x4 [.trans]); lane l, g = l // 4,
# t = l % 4. A register is modelled as the pair of values it packs (low half first).
LANE = np.arange(32)
G, T = LANE // 4, LANE % 4


def _round(x, dtype):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype).double().numpy()


def ldmatrix_x4(tile, rows, cols, trans=False):
    """tile[row, col]; lanes 8i..8i+7 give the row addresses (rows[l], cols[l]) of matrix i -> (32, 4, 2)."""
    regs = np.empty((32, 4, 2))
    for i in range(4):
        m = np.stack([tile[rows[8 * i + j], cols[8 * i + j]:cols[8 * i + j] + 8] for j in range(8)])
        assert m.shape == (8, 8)
        if trans:
            regs[:, i, 0], regs[:, i, 1] = m[2 * T, G], m[2 * T + 1, G]
        else:
            regs[:, i, 0], regs[:, i, 1] = m[G, 2 * T], m[G, 2 * T + 1]
    return regs


def mma(c, a, b0, b1):
    """D = A (16x16) B (16x8) + C from per-lane fragments; c (32, 4), a (32, 4, 2), b0/b1 (32, 2)."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    A[G, 2 * T], A[G, 2 * T + 1] = a[:, 0, 0], a[:, 0, 1]
    A[G + 8, 2 * T], A[G + 8, 2 * T + 1] = a[:, 1, 0], a[:, 1, 1]
    A[G, 2 * T + 8], A[G, 2 * T + 9] = a[:, 2, 0], a[:, 2, 1]
    A[G + 8, 2 * T + 8], A[G + 8, 2 * T + 9] = a[:, 3, 0], a[:, 3, 1]
    B[2 * T, G], B[2 * T + 1, G] = b0[:, 0], b0[:, 1]
    B[2 * T + 8, G], B[2 * T + 9, G] = b1[:, 0], b1[:, 1]
    Cm = np.full((16, 8), np.nan)
    Cm[G, 2 * T], Cm[G, 2 * T + 1], Cm[G + 8, 2 * T], Cm[G + 8, 2 * T + 1] = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    D = A @ B + Cm
    return np.stack([D[G, 2 * T], D[G, 2 * T + 1], D[G + 8, 2 * T], D[G + 8, 2 * T + 1]], axis=1)


# The per-lane ldmatrix offsets, written exactly as in csrc/rope_attention.cu.
A_ROW = (LANE & 7) + ((LANE >> 3) & 1) * 8
A_COL = (LANE >> 4) * 8
BNK_ROW = (LANE & 7) + (LANE >> 4) * 8
BNK_COL = ((LANE >> 3) & 1) * 8
BKN_ROW, BKN_COL = A_ROW, A_COL


def c_to_a(c0, c1, dtype):
    a = np.empty((32, 4, 2))
    a[:, 0], a[:, 1], a[:, 2], a[:, 3] = c0[:, 0:2], c0[:, 2:4], c1[:, 0:2], c1[:, 2:4]
    return _round(a, dtype)


def load_tile(src, row0, R, N, LD, rotate, num_prefix, sin, cos, dtype):
    """src (N, D) one head's rows; returns the shared tile (R, LD): rotated in fp32 then rounded, zero past N,
    NaN in the pad columns (a read there would poison the result)."""
    D = src.shape[1]
    half = D // 2
    tile = np.full((R, LD), np.nan)
    tile[:, :D] = 0.0
    for r in range(R):
        n = row0 + r
        if n >= N:
            continue
        x = src[n].astype(np.float32)
        if rotate and n >= num_prefix:
            c, s = cos[n - num_prefix], sin[n - num_prefix]
            x = np.concatenate([x[:half] * c[:half] - x[half:] * s[:half], x[half:] * c[half:] + x[:half] * s[half:]])
        tile[r, :D] = _round(x, dtype)
    return tile


def emulate_fwd(q, k, v, sin, cos, num_prefix, scale, dtype):
    """One (batch, head): q, k, v (N, D) -> out (N, D), lse (N,), following _rope_attention_fwd_kernel."""
    N, D = q.shape
    BM = BN = 64
    LD = D + 8
    out, lse = np.zeros((N, D)), np.zeros(N)
    log2e = 1.0 / np.log(2.0)
    for m0 in range(0, N, BM):
        q_s = load_tile(q, m0, BM, N, LD, True, num_prefix, sin, cos, dtype)
        for warp in range(4):
            q_frag = [ldmatrix_x4(q_s, warp * 16 + A_ROW, ks * 16 + A_COL) for ks in range(D // 16)]
            o = np.zeros((D // 8, 32, 4))
            m_run, l_run = np.full((32, 2), -np.inf), np.zeros((32, 2))
            for n0 in range(0, N, BN):
                k_s = load_tile(k, n0, BN, N, LD, True, num_prefix, sin, cos, dtype)
                v_s = load_tile(v, n0, BN, N, LD, False, 0, None, None, dtype)
                s = np.zeros((BN // 8, 32, 4))
                for ks in range(D // 16):
                    for j in range(BN // 16):
                        kb = ldmatrix_x4(k_s, j * 16 + BNK_ROW, ks * 16 + BNK_COL)
                        s[2 * j] = mma(s[2 * j], q_frag[ks], kb[:, 0], kb[:, 1])
                        s[2 * j + 1] = mma(s[2 * j + 1], q_frag[ks], kb[:, 2], kb[:, 3])
                key = n0 + np.arange(BN // 8)[:, None, None] * 8 + 2 * T[None, :, None] + np.array([0, 1, 0, 1])
                s = np.where(key < N, s * scale * log2e, -np.inf)
                rows = np.array([0, 0, 1, 1])
                m_new = m_run.copy()
                for r in range(2):
                    m_new[:, r] = np.maximum(m_new[:, r], s[:, :, rows == r].max(axis=(0, 2)))
                    # the two xor-shuffles: max over the 4 lanes of a group
                    m_new[:, r] = m_new[:, r].reshape(8, 4).max(axis=1).repeat(4)
                alpha = np.exp2(m_run - m_new)
                m_run = m_new
                l_run *= alpha
                p = np.exp2(s - m_new[None, :, rows])
                for r in range(2):
                    l_run[:, r] += p[:, :, rows == r].sum(axis=(0, 2))
                o *= alpha[None, :, rows]
                for j in range(BN // 16):
                    pa = c_to_a(p[2 * j], p[2 * j + 1], dtype)
                    for dt in range(D // 16):
                        vb = ldmatrix_x4(v_s, j * 16 + BKN_ROW, dt * 16 + BKN_COL, trans=True)
                        o[2 * dt] = mma(o[2 * dt], pa, vb[:, 0], vb[:, 1])
                        o[2 * dt + 1] = mma(o[2 * dt + 1], pa, vb[:, 2], vb[:, 3])
            for r in range(2):
                l_tot = l_run[:, r].reshape(8, 4).sum(axis=1).repeat(4)
                row = m0 + warp * 16 + G + 8 * r
                for lane in range(32):
                    if row[lane] >= N:
                        continue
                    for i in range(D // 8):
                        for e in range(2):
                            out[row[lane], i * 8 + 2 * T[lane] + e] = o[i, lane, 2 * r + e] / l_tot[lane]
                    lse[row[lane]] = (m_run[lane, r] + np.log2(l_tot[lane])) * np.log(2.0)
    return _round(out, dtype), lse


def emulate_bwd(q, k, v, out, dout, lse, sin, cos, num_prefix, scale, dtype):
    """One (batch, head) -> dq, dk, dv (N, D), following the delta, main and dq kernels of the backward."""
    N, D = q.shape
    BN, BM = 64, (64 if D == 64 else 32)
    LD, LDS = D + 8, BM + 8
    WM = BM // 16
    DW = D // (4 // WM)
    log2e = 1.0 / np.log(2.0)
    delta = (out.astype(np.float64) * dout).sum(axis=1)
    dq_acc = np.zeros((N, D))
    dk_out, dv_out = np.zeros((N, D)), np.zeros((N, D))
    half = D // 2
    for n0 in range(0, N, BN):
        k_s = load_tile(k, n0, BN, N, LD, True, num_prefix, sin, cos, dtype)
        v_s = load_tile(v, n0, BN, N, LD, False, 0, None, None, dtype)
        dk = np.zeros((4, D // 8, 32, 4))
        dv = np.zeros((4, D // 8, 32, 4))
        for m0 in range(0, N, BM):
            q_s = load_tile(q, m0, BM, N, LD, True, num_prefix, sin, cos, dtype)
            do_s = load_tile(dout, m0, BM, N, LD, False, 0, None, None, dtype)
            qi = m0 + np.arange(BM)
            lse_s = np.where(qi < N, lse[np.minimum(qi, N - 1)] * log2e, np.inf)
            delta_s = np.where(qi < N, delta[np.minimum(qi, N - 1)], 0.0)
            ds_s = np.full((BN, LDS), np.nan)
            for warp in range(4):
                key_row = warp * 16
                st = np.zeros((BM // 8, 32, 4))
                dpt = np.zeros((BM // 8, 32, 4))
                for ks in range(D // 16):
                    ka = ldmatrix_x4(k_s, key_row + A_ROW, ks * 16 + A_COL)
                    va = ldmatrix_x4(v_s, key_row + A_ROW, ks * 16 + A_COL)
                    for j in range(BM // 16):
                        qb = ldmatrix_x4(q_s, j * 16 + BNK_ROW, ks * 16 + BNK_COL)
                        db = ldmatrix_x4(do_s, j * 16 + BNK_ROW, ks * 16 + BNK_COL)
                        st[2 * j] = mma(st[2 * j], ka, qb[:, 0], qb[:, 1])
                        st[2 * j + 1] = mma(st[2 * j + 1], ka, qb[:, 2], qb[:, 3])
                        dpt[2 * j] = mma(dpt[2 * j], va, db[:, 0], db[:, 1])
                        dpt[2 * j + 1] = mma(dpt[2 * j + 1], va, db[:, 2], db[:, 3])
                qc = np.arange(BM // 8)[:, None, None] * 8 + 2 * T[None, :, None] + np.array([0, 1, 0, 1])
                key_ok = (n0 + key_row + G[:, None] + 8 * np.array([0, 0, 1, 1])) < N  # (32, 4)
                p = np.where(key_ok[None], np.exp2(st * scale * log2e - lse_s[qc]), 0.0)
                ds = p * (dpt - delta_s[qc])
                for j in range(BM // 16):
                    pa = c_to_a(p[2 * j], p[2 * j + 1], dtype)
                    dsa = c_to_a(ds[2 * j], ds[2 * j + 1], dtype)
                    for dt in range(D // 16):
                        ob = ldmatrix_x4(do_s, j * 16 + BKN_ROW, dt * 16 + BKN_COL, trans=True)
                        qb = ldmatrix_x4(q_s, j * 16 + BKN_ROW, dt * 16 + BKN_COL, trans=True)
                        dv[warp, 2 * dt] = mma(dv[warp, 2 * dt], pa, ob[:, 0], ob[:, 1])
                        dv[warp, 2 * dt + 1] = mma(dv[warp, 2 * dt + 1], pa, ob[:, 2], ob[:, 3])
                        dk[warp, 2 * dt] = mma(dk[warp, 2 * dt], dsa, qb[:, 0], qb[:, 1])
                        dk[warp, 2 * dt + 1] = mma(dk[warp, 2 * dt + 1], dsa, qb[:, 2], qb[:, 3])
                for i in range(BM // 8):
                    for r in range(2):
                        for e in range(2):
                            ds_s[key_row + G + 8 * r, i * 8 + 2 * T + e] = _round(ds[i, :, 2 * r + e], dtype)
            for warp in range(4):
                wm, wd = warp % WM, warp // WM
                dqf = np.zeros((DW // 8, 32, 4))
                for kk in range(BN // 16):
                    dsa = ldmatrix_x4(ds_s, kk * 16 + BNK_ROW, wm * 16 + BNK_COL, trans=True)
                    for dt in range(DW // 16):
                        kb = ldmatrix_x4(k_s, kk * 16 + BKN_ROW, wd * DW + dt * 16 + BKN_COL, trans=True)
                        dqf[2 * dt] = mma(dqf[2 * dt], dsa, kb[:, 0], kb[:, 1])
                        dqf[2 * dt + 1] = mma(dqf[2 * dt + 1], dsa, kb[:, 2], kb[:, 3])
                for r in range(2):
                    row = m0 + wm * 16 + G + 8 * r
                    for lane in range(32):
                        if row[lane] < N:
                            for i in range(DW // 8):
                                for e in range(2):
                                    dq_acc[row[lane], wd * DW + i * 8 + 2 * T[lane] + e] += dqf[i, lane, 2 * r + e]
        for warp in range(4):
            for r in range(2):
                for lane in range(32):
                    n = n0 + warp * 16 + G[lane] + 8 * r
                    if n >= N:
                        continue
                    for i in range(D // 8):
                        for e in range(2):
                            dk_out[n, i * 8 + 2 * T[lane] + e] = dk[warp, i, lane, 2 * r + e] * scale
                            dv_out[n, i * 8 + 2 * T[lane] + e] = dv[warp, i, lane, 2 * r + e]

    def rope_t(y):
        y = y.copy()
        s, c = sin.astype(np.float64), cos.astype(np.float64)
        y1, y2 = y[num_prefix:, :half].copy(), y[num_prefix:, half:].copy()
        y[num_prefix:, :half] = y1 * c[:, :half] + y2 * s[:, half:]
        y[num_prefix:, half:] = y2 * c[:, half:] - y1 * s[:, :half]
        return y

    return (_round(rope_t(dq_acc * scale), dtype), _round(rope_t(dk_out), dtype), _round(dv_out, dtype))


@pytest.mark.parametrize("D, N", [(64, 70), (128, 37)])
def test_emulated_tensor_core_kernels_match_reference(D, N):
    """The fragment bookkeeping (who holds which element, which ldmatrix address each lane gives, how C fragments
    become A fragments, how dQ is split across warps) reproduces attention, forward and backward."""
    dtype, num_prefix, H, h = torch.float16, 5, 2, 1
    qkv = torch.randn(1, N, 3 * H * D, dtype=torch.float64).to(dtype)
    sin, cos = _rope_tables(N - num_prefix, D, seed=1)
    ref_out, ref_lse, ref_grad = _reference64(qkv, sin, cos, H, num_prefix)
    dout = torch.randn(1, N, H * D, dtype=torch.float64).to(dtype)
    ref_d = ref_grad(dout)
    C = H * D
    x = qkv[0].double().numpy()
    q, k, v = (x[:, w * C + h * D: w * C + (h + 1) * D] for w in range(3))
    scale = D**-0.5
    s_np, c_np = sin.numpy(), cos.numpy()
    out, lse = emulate_fwd(q, k, v, s_np, c_np, num_prefix, scale, dtype)
    np.testing.assert_allclose(out, ref_out[0, :, h * D:(h + 1) * D].numpy(), atol=3e-3, rtol=0)
    np.testing.assert_allclose(lse, ref_lse[0, h].numpy(), atol=2e-3, rtol=0)
    do = dout[0, :, h * D:(h + 1) * D].double().numpy()
    # the kernels get O rounded to the input dtype and the fp32 lse, as from the forward
    dq, dk, dv = emulate_bwd(q, k, v, out, do, lse.astype(np.float32), s_np, c_np, num_prefix, scale, dtype)
    for w, got in enumerate((dq, dk, dv)):
        want = ref_d[0, :, w * C + h * D: w * C + (h + 1) * D].numpy()
        np.testing.assert_allclose(got, want, atol=5e-3 * np.abs(want).max(), rtol=0, err_msg="qkv"[w])


def test_emulator_detects_a_wrong_fragment_mapping():
    """Guards the emulator itself: a swapped ldmatrix address formula must break the product."""
    rng = np.random.default_rng(0)
    a_tile, b_tile = rng.standard_normal((16, 16)), rng.standard_normal((8 * 2, 16))
    a = ldmatrix_x4(a_tile, A_ROW, A_COL)
    b = ldmatrix_x4(b_tile, BNK_ROW, BNK_COL)
    good = mma(np.zeros((32, 4)), a, b[:, 0], b[:, 1])
    want = a_tile @ b_tile[:8].T
    got = np.zeros((16, 8))
    got[G, 2 * T], got[G, 2 * T + 1], got[G + 8, 2 * T], got[G + 8, 2 * T + 1] = good.T
    np.testing.assert_allclose(got, want, atol=1e-12)
    bad = ldmatrix_x4(b_tile, BNK_ROW, A_COL)  # k halves taken from the wrong lanes
    wrong = mma(np.zeros((32, 4)), a, bad[:, 0], bad[:, 1])
    assert not np.allclose(wrong, good)


# ---- CPU: the real kernels, run by a CPU emulation of CUDA -------------------------------------------------------
# csrc/rope_attention.cu compiled for the host with DINOV3_HOST_EMULATION by tests/kernels/attention_cuda_emu.cpp
# (on tests/kernels/cuda_emu.h: each CUDA thread an OS thread, __syncthreads a barrier, shuffles, ldmatrix and
# mma.sync through per-warp exchange buffers, fragment layouts from the PTX ISA tables) and driven through the real
# glue, dinov3_kernels/_cuda/attention.py, on CPU tensors. Every launcher, kernel and rounding point runs as on the
# GPU: fp16/bf16 conversions are the cuda_fp16.h / cuda_bf16.h round-to-nearest-even ones, P and dS are rounded to
# the input dtype before their products, the outputs are rounded once. Only the order of the fp32 sums differs:
# within one mma.sync the emulation sums the 16 exact products in double, and the dQ atomics land in thread order.
class _EmulatedAttentionExtension:
    """rope_attention_fwd_cuda / rope_attention_bwd_cuda with the signatures of dinov3_kernels._C, on CPU memory."""

    def __init__(self, lib):
        self.lib = lib
        P, L, I, D, S = ctypes.c_size_t, ctypes.c_longlong, ctypes.c_int, ctypes.c_double, ctypes.c_char_p
        lib.emu_rope_attention_fwd.argtypes = [P] * 6 + [L] * 8 + [I, D, S, I]
        lib.emu_rope_attention_bwd.argtypes = [P] * 10 + [L] * 8 + [I, D, S, I]

    def rope_attention_fwd_cuda(self, *args):
        _cuda_emu.call(self.lib.emu_rope_attention_fwd, *args[:-1])  # the last argument is the stream

    def rope_attention_bwd_cuda(self, *args):
        _cuda_emu.call(self.lib.emu_rope_attention_bwd, *args[:-1])


@pytest.fixture(scope="module")
def emulated_attention_ext(tmp_path_factory):
    return _EmulatedAttentionExtension(_cuda_emu.build(tmp_path_factory, "attention_cuda_emu.cpp"))


@pytest.fixture
def emulated_glue(emulated_attention_ext, monkeypatch):
    """dinov3_kernels._cuda.attention on CPU tensors, its launches running the emulated kernels."""
    monkeypatch.setattr(_backend, "cuda_ext", lambda: emulated_attention_ext)
    monkeypatch.setattr(glue, "_check_device", lambda *tensors: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    return glue


# Pass criterion (the GPU tests' one): error vs the float64 spec at most twice that of the official eager path run in
# the input dtype, plus ATOL (relative to the gradient's magnitude for dqkv). fp32 is exact fp32 arithmetic, so its
# own bound is tight: EMU_F32_RTOL of the largest magnitude.
EMU_F32_RTOL = 2e-6


def _emulated_case(glue_mod, dtype, D, N, num_prefix, H=1, token_pad=0, seed=0, tied=False, batch=1):
    gen = torch.Generator().manual_seed(seed)
    C = H * D
    base = torch.randn(batch, N, 3 * C + token_pad, generator=gen, dtype=torch.float64).to(dtype)
    qkv = base[:, :, :3 * C]  # token_pad > 0: a strided view, read in place
    sin, cos = _rope_tables(N - num_prefix, D // 2 if tied else D, seed=seed + 1)
    dout = torch.randn(batch, N, C, generator=gen, dtype=torch.float64).to(dtype)
    before = qkv.clone()
    scale = D**-0.5
    out, lse = glue_mod.rope_attention_fwd_cuda(qkv, sin, cos, H, num_prefix, scale)
    dqkv = glue_mod.rope_attention_bwd_cuda(qkv, sin, cos, out, lse, dout, H, num_prefix, scale)
    assert torch.equal(qkv, before)
    assert out.shape == (batch, N, C) and out.dtype == dtype and lse.shape == (batch, H, N)
    assert lse.dtype == torch.float32
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype
    for t in (out, lse, dqkv):
        assert torch.isfinite(t).all()
    if tied:  # same products in the same order as with the full tables they stand for
        full_sin, full_cos = torch.cat((sin, sin), dim=-1), torch.cat((cos, cos), dim=-1)
        full_out, full_lse = glue_mod.rope_attention_fwd_cuda(qkv, full_sin, full_cos, H, num_prefix, scale)
        full_dqkv = glue_mod.rope_attention_bwd_cuda(qkv, full_sin, full_cos, out, lse, dout, H, num_prefix, scale)
        assert torch.equal(out, full_out) and torch.equal(lse, full_lse)
        exact = slice(0, 3 * C) if dtype == torch.float32 else slice(C, 3 * C)  # 16-bit dQ: fp32 atomics, any order
        assert torch.equal(dqkv[..., exact], full_dqkv[..., exact])

    ref_out, ref_lse, ref_grad = _reference64(qkv, sin, cos, H, num_prefix)
    ref_d = ref_grad(dout)
    if dtype == torch.float32:
        assert _err(out, ref_out) <= EMU_F32_RTOL * ref_out.abs().max().item()
        assert _err(lse, ref_lse) <= EMU_F32_RTOL * ref_lse.abs().max().item()
        for w, name in enumerate("qkv"):
            got, want = dqkv[..., w * C:(w + 1) * C], ref_d[..., w * C:(w + 1) * C]
            assert _err(got, want) <= EMU_F32_RTOL * want.abs().max().item(), name
        return
    lp_out, lp_d = _low_precision_reference(qkv, sin, cos, H, num_prefix, dout)
    assert _err(out, ref_out) <= 2 * _err(lp_out, ref_out) + ATOL[dtype]
    assert _err(lse, ref_lse) <= LSE_ATOL[dtype]
    for w, name in enumerate("qkv"):
        sl = slice(w * C, (w + 1) * C)
        got, want, lp = dqkv[..., sl], ref_d[..., sl], lp_d[..., sl]
        assert _err(got, want) <= 2 * _err(lp, want) + ATOL[dtype] * want.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D, N, H", [(64, 20, 2), (64, 70, 1), (128, 37, 1)])
def test_emulated_cuda_kernels_match_float64(emulated_glue, dtype, D, N, H):
    """N = 5 + 15 (one ragged tile, two heads), 5 + 65 (a second, 6-row key and query tile), Dh 128 (the BM = 32
    backward configuration)."""
    _emulated_case(emulated_glue, dtype, D, N, num_prefix=5, H=H)


@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 64), (torch.float16, 128)])
def test_emulated_cuda_pipelines_reuse_their_stages(emulated_glue, dtype, D):
    """N = 140: three key tiles in the forward and three (Dh 64) or five (Dh 128, 32-row) query tiles in the
    backward, so each cp.async pipeline loads a tile into the stage two tiles back used; a missing wait or barrier
    reads unlanded (poisoned) or overwritten bytes (the emulation lands a cp.async batch only at its wait, poisoned
    until then). Two batches: the rotated-Q and -K workspaces are indexed per batch."""
    _emulated_case(emulated_glue, dtype, D, 140, num_prefix=3, seed=11, batch=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_cuda_strided_and_prefix_edges(emulated_glue, dtype):
    """qkv as a strided view (padded token stride), no prefix tokens, and only prefix tokens (no rotation)."""
    _emulated_case(emulated_glue, dtype, 64, 20, num_prefix=5, token_pad=64, seed=3)
    _emulated_case(emulated_glue, dtype, 64, 9, num_prefix=0, seed=4)
    _emulated_case(emulated_glue, dtype, 64, 9, num_prefix=9, seed=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D, N", [(64, 21), (128, 37)])
def test_emulated_cuda_kernels_tied_tables(emulated_glue, dtype, D, N):
    """Tied (H·W, Dh/2) tables read as they are (row pitch Dh/2, column d mod Dh/2), forward and backward, at both
    head dims and odd N: against the float64 spec, and bit for bit against the full tables they stand for."""
    _emulated_case(emulated_glue, dtype, D, N, num_prefix=4, H=1, seed=6, tied=True)


def test_op_passes_tied_tables_to_the_cuda_kernels_unchanged(emulated_glue, emulated_attention_ext, monkeypatch):
    """The op's CUDA glue hands the model's tied tables to the kernels as they are: no expansion, no copy."""
    seen = []

    def spy(*args):
        seen.append(args)
        return _EmulatedAttentionExtension.rope_attention_fwd_cuda(emulated_attention_ext, *args)

    monkeypatch.setattr(emulated_attention_ext, "rope_attention_fwd_cuda", spy)
    H, D, N, prefix = 1, 64, 9, 1
    qkv = torch.randn(1, N, 3 * H * D)
    sin, cos = _rope_tables(N - prefix, D // 2)
    out, _ = torch.ops.dinov3_kernels.rope_attention_fwd(qkv, sin, cos, H, prefix, D**-0.5, "cuda")
    (args,) = seen
    assert args[1] == sin.data_ptr() and args[2] == cos.data_ptr()
    assert args[11] == D // 2  # tab_cols
    ref_out, _, _ = _reference64(qkv, sin, cos, H, prefix)
    assert _err(out, ref_out) <= EMU_F32_RTOL * ref_out.abs().max().item()


def test_emulated_launcher_rejects_bad_arguments(emulated_attention_ext):
    with pytest.raises(ValueError, match="head_dim 96"):
        emulated_attention_ext.rope_attention_fwd_cuda(*([0] * 6), 1, 8, 1, 96, 0, 96, 0, 0, 2, 1.0, 0)
    with pytest.raises(ValueError, match="dtype code 7"):
        emulated_attention_ext.rope_attention_bwd_cuda(*([0] * 10), 1, 8, 1, 64, 0, 64, 0, 0, 7, 1.0, 0)
    with pytest.raises(ValueError, match="head_dim/2 \\(tied\\) columns, got 48"):
        emulated_attention_ext.rope_attention_fwd_cuda(*([0] * 6), 1, 8, 1, 64, 0, 48, 0, 0, 2, 1.0, 0)
    with pytest.raises(ValueError, match="k_rot workspace"):
        emulated_attention_ext.rope_attention_fwd_cuda(*([0] * 6), 1, 8, 1, 64, 0, 64, 0, 0, 2, 1.0, 0)
    with pytest.raises(ValueError, match="q_rot"):
        emulated_attention_ext.rope_attention_bwd_cuda(*([0] * 10), 1, 8, 1, 64, 0, 64, 0, 0, 1, 1.0, 0)


# ---- GPU: the compiled kernels -----------------------------------------------------------------------------------
@pytest.fixture
def cuda_ext_built():
    if _backend.CUDA_EXT is None:  # on a GPU machine a missing build is a failure, not a skip
        pytest.fail(f"the CUDA extension is not built: {_backend.CUDA_EXT_UNAVAILABLE}")


ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
# lse from q', k' rounded to the input dtype (as the official path rounds them) vs the unrounded float64 spec
LSE_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _gpu_case(dtype, D, N, num_prefix=5, B=2, H=3, qkv_view=False, tied=False):
    dev = "cuda"
    C = H * D
    if qkv_view:  # a (B, N, 3C) view with padded token stride, as a slice of a wider projection
        base = torch.randn(B, N, 3 * C + 64, device=dev, dtype=torch.float64).to(dtype)
        qkv = base[:, :, 32:32 + 3 * C]
    else:
        qkv = torch.randn(B, N, 3 * C, device=dev, dtype=torch.float64).to(dtype)
    sin, cos = (t.to(dev) for t in _rope_tables(N - num_prefix, D // 2 if tied else D))
    return qkv, sin, cos


def _low_precision_reference(qkv, sin, cos, H, num_prefix, dout):
    from dinov3_kernels.attention import rope_attention_reference

    x = qkv.detach().clone().requires_grad_(True)
    out = rope_attention_reference(x, sin, cos, num_heads=H, num_prefix_tokens=num_prefix)
    (g,) = torch.autograd.grad(out, x, dout)
    return out.detach(), g


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext_built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [201, 261, 1029])
@pytest.mark.parametrize("tied", [False, True])
def test_gpu_forward_backward_against_float64(dtype, D, N, tied):
    H, num_prefix = 3, 5
    qkv, sin, cos = _gpu_case(dtype, D, N, num_prefix, H=H, qkv_view=(N == 261), tied=tied)
    qkv_before = qkv.clone()
    scale = D**-0.5
    out, lse = glue.rope_attention_fwd_cuda(qkv, sin, cos, H, num_prefix, scale)
    torch.cuda.synchronize()
    dout = torch.randn_like(out)
    dqkv = glue.rope_attention_bwd_cuda(qkv, sin, cos, out, lse, dout, H, num_prefix, scale)
    torch.cuda.synchronize()
    assert torch.equal(qkv, qkv_before)
    assert out.shape == (2, N, H * D) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (2, H, N) and lse.dtype == torch.float32
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype

    ref_out, ref_lse, ref_grad = _reference64(qkv, sin, cos, H, num_prefix)
    ref_d = ref_grad(dout)
    lp_out, lp_d = _low_precision_reference(qkv, sin, cos, H, num_prefix, dout)
    atol = ATOL[dtype]
    assert _err(out, ref_out) <= 2 * _err(lp_out, ref_out) + atol
    assert _err(lse, ref_lse) <= LSE_ATOL[dtype]
    C = H * D
    for w, name in enumerate("qkv"):
        sl = slice(w * C, (w + 1) * C)
        got, want, lp = dqkv[..., sl], ref_d[..., sl], lp_d[..., sl]
        assert _err(got, want) <= 2 * _err(lp, want) + atol * want.abs().max().item(), name


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext_built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_prefix_edge_cases(dtype):
    """No prefix tokens, and every token a prefix token (no rotation at all), on a tiny ragged N."""
    H, D, N = 2, 64, 7
    for num_prefix in (0, N):
        qkv, sin, cos = _gpu_case(dtype, D, N, num_prefix, B=1, H=H)
        out, lse = glue.rope_attention_fwd_cuda(qkv, sin, cos, H, num_prefix, D**-0.5)
        dout = torch.randn_like(out)
        dqkv = glue.rope_attention_bwd_cuda(qkv, sin, cos, out, lse, dout, H, num_prefix, D**-0.5)
        ref_out, _, ref_grad = _reference64(qkv, sin, cos, H, num_prefix)
        lp_out, lp_d = _low_precision_reference(qkv, sin, cos, H, num_prefix, dout)
        assert _err(out, ref_out) <= 2 * _err(lp_out, ref_out) + ATOL[dtype]
        want = ref_grad(dout)
        assert _err(dqkv, want) <= 2 * _err(lp_d, want) + ATOL[dtype] * want.abs().max().item()


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext_built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_public_op_backend_cuda(dtype):
    from dinov3_kernels.attention import rope_attention

    H, D, N, num_prefix = 3, 64, 201, 5
    qkv, sin, cos = _gpu_case(dtype, D, N, num_prefix, B=2, H=H, tied=True)  # what the model passes
    x = qkv.clone().requires_grad_(True)
    out = rope_attention(x, sin, cos, num_heads=H, num_prefix_tokens=num_prefix, backend="cuda")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out, _, ref_grad = _reference64(qkv, sin, cos, H, num_prefix)
    lp_out, lp_d = _low_precision_reference(qkv, sin, cos, H, num_prefix, dout)
    assert _err(out, ref_out) <= 2 * _err(lp_out, ref_out) + ATOL[dtype]
    want = ref_grad(dout)
    assert _err(x.grad, want) <= 2 * _err(lp_d, want) + ATOL[dtype] * want.abs().max().item()
