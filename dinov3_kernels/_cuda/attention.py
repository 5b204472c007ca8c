"""Glue for csrc/rope_attention.cu: fused rotate-half RoPE + softmax attention read from the packed qkv.

Contract (shared with the Triton backend and the op in dinov3_kernels/attention.py):
  rope_attention_fwd_cuda(qkv, sin, cos, num_heads, num_prefix_tokens, scale) -> (out (B, N, C), lse (B, H, N) fp32)
  rope_attention_bwd_cuda(qkv, sin, cos, out, lse, dout, num_heads, num_prefix_tokens, scale) -> dqkv (B, N, 3C)
qkv is read in place (any batch/token strides, last stride 1); nothing the caller passes is written.
sin, cos: float32 (N - num_prefix_tokens, head_dim), or tied (N - num_prefix_tokens, head_dim/2) tables when both halves
of the head dim share their angles (what the DINOv3 model passes): the kernels read a tied table as it is (row pitch
head_dim/2, column d mod head_dim/2), so each rotated token reads half the table bytes; nothing is expanded here.
bfloat16/float16 run on tensor cores (fp32 accumulation); float32 runs an exact-fp32 SIMT path (no TF32).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_reason(qkv: torch.Tensor, num_heads: int) -> Optional[str]:
    """Why these kernels cannot run this input (dtype / head dim), or None. No device or extension needed."""
    if qkv.dtype not in SUPPORTED_DTYPES:
        return f"dtype {qkv.dtype} is not supported by the CUDA attention kernels (float32, float16, bfloat16)"
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads) != 0:
        return f"qkv must be (B, N, 3 * num_heads * head_dim), got {tuple(qkv.shape)} with num_heads={num_heads}"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not supported by the CUDA attention kernels ({SUPPORTED_HEAD_DIMS})"
    return None


def _check(qkv, sin, cos, num_heads, num_prefix_tokens):
    """Validates before touching the GPU; returns (B, N, H, Dh)."""
    reason = unsupported_reason(qkv, num_heads)
    if reason is not None:
        raise ValueError(f"rope_attention (cuda): {reason}")
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    if B == 0 or N == 0:
        raise ValueError(f"rope_attention (cuda): empty qkv of shape {tuple(qkv.shape)}")
    if not 0 <= num_prefix_tokens <= N:
        raise ValueError(f"rope_attention (cuda): num_prefix_tokens={num_prefix_tokens} not in [0, N={N}]")
    for name, t in (("sin", sin), ("cos", cos)):
        if t.dtype != torch.float32:
            raise ValueError(f"rope_attention (cuda): {name} must be float32, got {t.dtype}")
        if tuple(t.shape) not in ((N - num_prefix_tokens, head_dim), (N - num_prefix_tokens, head_dim // 2)):
            raise ValueError(
                f"rope_attention (cuda): {name} must be (N - num_prefix_tokens, head_dim) = "
                f"{(N - num_prefix_tokens, head_dim)} or, tied, {(N - num_prefix_tokens, head_dim // 2)}, "
                f"got {tuple(t.shape)}"
            )
    if sin.shape != cos.shape:
        raise ValueError(f"rope_attention (cuda): sin {tuple(sin.shape)} and cos {tuple(cos.shape)} differ in shape")
    _check_device(qkv, sin, cos)
    return B, N, num_heads, head_dim


def _check_device(qkv, sin, cos):
    # Separate so that the CPU emulation test (tests/kernels/test_attention_cuda.py) can run this glue on CPU tensors.
    if any(t.device.type != "cuda" for t in (qkv, sin, cos)) or len({qkv.device, sin.device, cos.device}) != 1:
        raise ValueError(
            f"rope_attention (cuda): qkv, sin, cos must be on one CUDA device, got {qkv.device}, {sin.device}, {cos.device}"
        )


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _packed_view(qkv: torch.Tensor) -> torch.Tensor:
    """qkv as the kernels read it: last stride 1 and, for 16-bit types, 16-byte aligned rows (else one copy)."""
    ok = qkv.stride(-1) == 1
    if ok and qkv.element_size() == 2:
        ok = _aligned(qkv) and qkv.stride(0) % 8 == 0 and qkv.stride(1) % 8 == 0
    return qkv if ok else qkv.contiguous()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels read 16-byte vectors)."""
    t = t.contiguous()
    return t if _aligned(t) else t.clone()


def rope_attention_fwd_cuda(qkv, sin, cos, num_heads, num_prefix_tokens, scale):
    B, N, H, Dh = _check(qkv, sin, cos, num_heads, num_prefix_tokens)
    C = _backend.cuda_ext()
    qkv = _packed_view(qkv)
    sin, cos = _dense(sin), _dense(cos)
    out = torch.empty((B, N, H * Dh), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, N), device=qkv.device, dtype=torch.float32)
    # K rotated once (tensor-core path): a transient (B, N, C) workspace in the input dtype, freed on return.
    k_rot = torch.empty((B, N, H * Dh) if qkv.element_size() == 2 else (0,), device=qkv.device, dtype=qkv.dtype)
    with torch.cuda.device(qkv.device):  # kernels launch on the current device
        C.rope_attention_fwd_cuda(
            qkv.data_ptr(), sin.data_ptr(), cos.data_ptr(), k_rot.data_ptr(), out.data_ptr(), lse.data_ptr(),
            B, N, H, Dh, num_prefix_tokens, sin.shape[1], qkv.stride(0), qkv.stride(1),
            _backend.CUDA_DTYPE_CODES[qkv.dtype], float(scale), torch.cuda.current_stream().cuda_stream,
        )
    return out, lse


def rope_attention_bwd_cuda(qkv, sin, cos, out, lse, dout, num_heads, num_prefix_tokens, scale):
    B, N, H, Dh = _check(qkv, sin, cos, num_heads, num_prefix_tokens)
    shape_c = (B, N, H * Dh)
    for name, t in (("out", out), ("dout", dout)):
        if tuple(t.shape) != shape_c:
            raise ValueError(f"rope_attention (cuda): {name} must be {shape_c}, got {tuple(t.shape)}")
    if tuple(lse.shape) != (B, H, N) or lse.dtype != torch.float32:
        raise ValueError(f"rope_attention (cuda): lse must be float32 {(B, H, N)}, got {lse.dtype} {tuple(lse.shape)}")
    C = _backend.cuda_ext()
    qkv = _packed_view(qkv)
    sin, cos = _dense(sin), _dense(cos)
    out, dout, lse = _dense(out.to(qkv.dtype)), _dense(dout.to(qkv.dtype)), lse.contiguous()
    dqkv = torch.empty((B, N, 3 * H * Dh), device=qkv.device, dtype=qkv.dtype)
    delta = torch.empty((B, H, N), device=qkv.device, dtype=torch.float32)
    # fp32 dQ accumulator of the tensor-core path (zeroed by the launcher); the fp32 SIMT path needs none.
    dq_accum = torch.empty(shape_c if qkv.element_size() == 2 else (0,), device=qkv.device, dtype=torch.float32)
    # Q rotated once (tensor-core path): a transient (B, N, C) workspace in the input dtype, freed on return.
    q_rot = torch.empty(shape_c if qkv.element_size() == 2 else (0,), device=qkv.device, dtype=qkv.dtype)
    with torch.cuda.device(qkv.device):
        C.rope_attention_bwd_cuda(
            qkv.data_ptr(), sin.data_ptr(), cos.data_ptr(), out.data_ptr(), lse.data_ptr(), dout.data_ptr(),
            dqkv.data_ptr(), dq_accum.data_ptr(), delta.data_ptr(), q_rot.data_ptr(),
            B, N, H, Dh, num_prefix_tokens, sin.shape[1], qkv.stride(0), qkv.stride(1),
            _backend.CUDA_DTYPE_CODES[qkv.dtype], float(scale), torch.cuda.current_stream().cuda_stream,
        )
    return dqkv
