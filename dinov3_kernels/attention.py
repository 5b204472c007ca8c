"""RoPE-box attention (DINOv3 SelfAttention.compute_attention) fused over the packed qkv, and a fused apply_rope.

reference (the spec) -> input checks -> kernels and autograd -> public functions.

The official path: split the qkv linear's output (B, N, 3C) into q, k, v (B, heads, N, Dh); cast q and k to the RoPE
dtype (sin.dtype), rotate the patch tokens (all but the first num_prefix_tokens = N - H·W: CLS and registers) with
x·cos + rotate_half(x)·sin, cast back; scaled_dot_product_attention (scale Dh^-0.5, no mask); back to (B, N, C).
The kernels read qkv in place, never write the N×N scores, and write the gradient straight into the packed (B, N, 3C)
layout; the Triton kernels rotate the tensor they re-read (K forward, Q backward) once into a scratch and the other
as they load it, the CUDA kernels rotate both as they load them. They compute RoPE in float32 whatever sin.dtype is
(the official default); sin and cos are treated as constants (no gradient), as the official module's buffers are.

The "composed" backend is the yardstick built from PyTorch: one pass (Triton on CUDA) from the packed qkv to rotated
q, k and v in (B, heads, N, Dh), torch's scaled_dot_product_attention (flash / cuDNN / memory-efficient, PyTorch's
choice) with its own backward, and one pass applying the inverse rotation while assembling the packed gradient.

sin/cos may also be given as (H·W, head_dim/2) tables, meaning both halves of the head dim share their angles, which
is how the DINOv3 RoPE module builds them (its (H·W, head_dim) tables are two copies side by side): the kernels then
read half the bytes for every k tile they rotate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend, _library  # noqa: F401  (_library defines the op schemas)

__all__ = ["rope_attention", "rope_attention_reference", "apply_rope", "apply_rope_reference",
           "rope_qkv_split_reference", "rope_qkv_merge_reference"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)
TRITON_MAX_HEAD_DIM = 256


# ---- 1. reference ------------------------------------------------------------------------------------------------
def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _full_table(t, head_dim):
    """(H·W, Dh/2) tied table -> the (H·W, Dh) table it stands for."""
    return torch.cat((t, t), dim=-1) if t.shape[-1] * 2 == head_dim else t


def apply_rope_reference(q, k, sin, cos, num_prefix_tokens=None):
    """The official SelfAttention.apply_rope: q, k (B, heads, N, Dh); sin, cos (H·W, Dh) (or tied (H·W, Dh/2)).

    q and k are cast to sin.dtype, their last H·W tokens rotated by x·cos + rotate_half(x)·sin, the first
    num_prefix_tokens (default N - H·W) kept, and the results cast back to the input dtypes.
    """
    sin, cos = _full_table(sin, q.shape[-1]), _full_table(cos, q.shape[-1])
    N = q.shape[-2]
    prefix = N - sin.shape[-2] if num_prefix_tokens is None else num_prefix_tokens

    def rotate(x):
        y = x.to(sin.dtype)
        patches = y[..., prefix:, :]
        y = torch.cat((y[..., :prefix, :], patches * cos + _rotate_half(patches) * sin), dim=-2)
        return y.to(x.dtype)

    return rotate(q), rotate(k)


def rope_attention_reference(qkv, sin, cos, *, num_heads, num_prefix_tokens=None):
    """The official eager path on the packed qkv (B, N, 3C) -> (B, N, C): RoPE on q and k, then SDPA."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope_reference(q, k, sin, cos, num_prefix_tokens)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).reshape(B, N, C)


# ---- 1b. the composed backend: one pass to rotated q, k, v, then SDPA, then one pass back ---------------------------
def rope_qkv_split_reference(qkv, sin, cos, num_heads, num_prefix_tokens):
    """Packed qkv (B, N, 3C) -> (q, k, v), each (B, heads, N, Dh) contiguous, q and k rotated as the reference does
    (in sin.dtype, cast back). The plain-PyTorch form of the composed backend's first pass (Triton on CUDA)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    q, k = apply_rope_reference(q, k, sin, cos, num_prefix_tokens)
    return q.contiguous(), k.contiguous(), v.contiguous()


def rope_qkv_merge_reference(dq, dk, dv, sin, cos, num_prefix_tokens):
    """The split's backward: dq, dk, dv (B, heads, N, Dh) -> d qkv (B, N, 3C) contiguous. rope(x) = x·cos +
    rotate_half(x)·sin is linear, so its gradient is g·cos + rotate_halfᵀ(g·sin), rotate_halfᵀ(y₁, y₂) = (y₂, -y₁)."""
    B, H, N, Dh = dq.shape
    sin, cos = _full_table(sin, Dh), _full_table(cos, Dh)

    def unrotate(g):
        y = g.to(sin.dtype)
        p = y[..., num_prefix_tokens:, :]
        ps1, ps2 = (p * sin).chunk(2, dim=-1)
        y = torch.cat((y[..., :num_prefix_tokens, :], p * cos + torch.cat((ps2, -ps1), dim=-1)), dim=-2)
        return y.to(g.dtype)

    # (3, B, H, N, Dh) -> (B, N, 3, H, Dh): the packed layout of the qkv linear's output.
    return torch.stack((unrotate(dq), unrotate(dk), dv)).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * Dh)


def _rotate_with_triton(qkv):
    """The composed backend rotates with its Triton pass wherever the triton backend could run on qkv."""
    return qkv.dtype in KERNEL_DTYPES and _backend.why_not("triton", (qkv,)) is None


def _rope_attention_composed(qkv, sin, cos, num_heads, num_prefix_tokens):
    """One pass qkv -> rotated q, k and v (B, heads, N, Dh); torch's SDPA (it picks flash, cuDNN, memory-efficient
    or math for the shape and dtype) with its own backward; one pass assembling d qkv with the inverse rotation."""
    B, N, C3 = qkv.shape
    rotate = "triton" if _rotate_with_triton(qkv) else "reference"
    if rotate == "triton":
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        sin, cos = _kernel_rope(sin, cos)
    q, k, v = torch.ops.dinov3_kernels.rope_qkv_split(qkv, sin, cos, num_heads, num_prefix_tokens, rotate)
    out = F.scaled_dot_product_attention(q, k, v)  # scale Dh^-0.5, as the official path
    return out.transpose(1, 2).reshape(B, N, C3 // 3)


# ---- 2. input checks (public boundary) ---------------------------------------------------------------------------
def _check_tensor(op, name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


def _check_rope(op, sin, cos, N, head_dim, num_prefix_tokens, device):
    """Checks sin/cos against N tokens of head_dim; returns the number of prefix tokens."""
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even for rotate-half RoPE, got {head_dim}")
    _check_tensor(op, "sin", sin)
    _check_tensor(op, "cos", cos)
    if sin.shape != cos.shape:
        raise ValueError(f"{op}: sin {tuple(sin.shape)} and cos {tuple(cos.shape)} differ in shape")
    if sin.dtype != cos.dtype:
        raise TypeError(f"{op}: sin ({sin.dtype}) and cos ({cos.dtype}) differ in dtype")
    if sin.dim() != 2 or sin.shape[1] not in (head_dim, head_dim // 2):
        raise ValueError(f"{op}: sin/cos must be (H*W, head_dim={head_dim}) or, with tied halves, "
                         f"(H*W, head_dim/2={head_dim // 2}), got {tuple(sin.shape)}")
    if sin.device != device or cos.device != device:
        raise ValueError(f"{op}: sin ({sin.device}) and cos ({cos.device}) must be on the device of q/k ({device})")
    num_patches = sin.shape[0]
    if num_patches > N:
        raise ValueError(f"{op}: sin/cos have {num_patches} positions but there are only {N} tokens")
    if num_prefix_tokens is None:
        return N - num_patches
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool):
        raise TypeError(f"{op}: num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if not 0 <= num_prefix_tokens <= N:
        raise ValueError(f"{op}: num_prefix_tokens={num_prefix_tokens} must lie in [0, N={N}]")
    if num_prefix_tokens + num_patches != N:
        raise ValueError(f"{op}: num_prefix_tokens={num_prefix_tokens} + {num_patches} sin/cos positions "
                         f"!= {N} tokens")
    return num_prefix_tokens


def _check_attention_inputs(qkv, sin, cos, num_heads, num_prefix_tokens):
    op = "rope_attention"
    _check_tensor(op, "qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must be the packed (B, N, 3*C) qkv, got shape {tuple(qkv.shape)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    if qkv.numel() == 0:
        raise ValueError(f"{op}: empty qkv of shape {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"{op}: packed width {C3} is not 3*num_heads*head_dim for num_heads={num_heads}")
    head_dim = C3 // (3 * num_heads)
    return _check_rope(op, sin, cos, N, head_dim, num_prefix_tokens, qkv.device)


def _check_apply_rope_inputs(q, k, sin, cos, num_prefix_tokens):
    op = "apply_rope"
    _check_tensor(op, "q", q)
    _check_tensor(op, "k", k)
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"{op}: q and k must both be (B, heads, N, head_dim), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"{op}: q ({q.dtype}) and k ({k.dtype}) differ in dtype")
    if q.device != k.device:
        raise ValueError(f"{op}: q is on {q.device} and k on {k.device}")
    if q.numel() == 0:
        raise ValueError(f"{op}: empty q/k of shape {tuple(q.shape)}")
    return _check_rope(op, sin, cos, q.shape[2], q.shape[3], num_prefix_tokens, q.device)


def _op_check(x, sin, cos, head_dim, cuda_kernel, composed=False):
    # head_dim None: the kernel takes any even head dim (no tl.dot on it).
    def check(backend):
        if backend == "composed":
            if not composed:
                return "there is no composed backend for this op (rope_attention has one)"
            if torch.is_grad_enabled() and (sin.requires_grad or cos.requires_grad):
                return "sin/cos require grad, but the composed backend's rotation passes treat them as constants"
            return None  # any dtype and head dim: plain PyTorch rotation where the Triton pass cannot run, and SDPA
        if x.dtype not in KERNEL_DTYPES:
            return f"dtype {x.dtype} is not supported by the {backend} kernels (float32, float16, bfloat16)"
        if torch.is_grad_enabled() and (sin.requires_grad or cos.requires_grad):
            return "sin/cos require grad, but the kernels treat them as constants"
        if backend == "triton" and head_dim is not None and (head_dim % 16 or head_dim > TRITON_MAX_HEAD_DIM):
            return f"head_dim {head_dim}: the triton kernels take multiples of 16 up to {TRITON_MAX_HEAD_DIM}"
        if backend == "cuda":
            if not cuda_kernel:
                return "there is no CUDA kernel for this op (the triton backend has one)"
            if head_dim not in CUDA_HEAD_DIMS:
                return f"head_dim {head_dim}: the cuda kernels are built for head_dim {CUDA_HEAD_DIMS}"
        return None

    return check


# ---- 3. kernels and autograd -------------------------------------------------------------------------------------
def _attention_kernels(backend):
    if backend == "triton":
        from ._triton.attention import rope_attention_bwd_triton, rope_attention_fwd_triton

        return rope_attention_fwd_triton, rope_attention_bwd_triton
    if backend == "cuda":
        from ._cuda.attention import rope_attention_bwd_cuda, rope_attention_fwd_cuda

        # Like the Triton kernels, they read tied (H·W, Dh/2) tables as they are and full (H·W, Dh) ones too.
        return rope_attention_fwd_cuda, rope_attention_bwd_cuda
    raise ValueError(f"rope_attention: unknown kernel backend {backend!r}")


def _rope_attention_fwd_impl(qkv, sin, cos, num_heads, num_prefix_tokens, scale, backend):
    fwd, _ = _attention_kernels(backend)
    return fwd(qkv, sin, cos, num_heads, num_prefix_tokens, scale)


def _rope_attention_bwd_impl(qkv, sin, cos, out, lse, dout, num_heads, num_prefix_tokens, scale, backend):
    _, bwd = _attention_kernels(backend)
    return bwd(qkv, sin, cos, out, lse, dout, num_heads, num_prefix_tokens, scale)


torch.library.register_kernel("dinov3_kernels::rope_attention_fwd", ("cpu", "cuda"), _rope_attention_fwd_impl)
torch.library.register_kernel("dinov3_kernels::rope_attention_bwd", ("cpu", "cuda"), _rope_attention_bwd_impl)


def _rope_attention_setup_context(ctx, inputs, output):
    qkv, sin, cos, num_heads, num_prefix_tokens, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, sin, cos, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.args = (num_heads, num_prefix_tokens, scale, backend)


def _rope_attention_backward(ctx, dout, _dlse):
    qkv, sin, cos, out, lse = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dqkv = torch.ops.dinov3_kernels.rope_attention_bwd(qkv, sin, cos, out, lse, dout, *ctx.args)
    return dqkv, None, None, None, None, None, None


torch.library.register_autograd("dinov3_kernels::rope_attention_fwd", _rope_attention_backward,
                                setup_context=_rope_attention_setup_context)


def _apply_rope_impl(q, k, sin, cos, num_prefix_tokens, inverse, backend):
    if backend != "triton":
        raise ValueError(f"apply_rope: no {backend!r} kernel (only triton)")
    from ._triton.attention import apply_rope_triton

    return apply_rope_triton(q, k, sin, cos, num_prefix_tokens, inverse)


torch.library.register_kernel("dinov3_kernels::apply_rope", ("cpu", "cuda"), _apply_rope_impl)


def _apply_rope_setup_context(ctx, inputs, output):
    _, _, sin, cos, num_prefix_tokens, inverse, backend = inputs
    ctx.save_for_backward(sin, cos)
    ctx.args = (num_prefix_tokens, inverse, backend)


def _apply_rope_backward(ctx, dq, dk):
    # The rotation is linear in q and k: its backward is the transposed rotation, i.e. the same op with
    # inverse flipped (which also makes it twice differentiable).
    sin, cos = ctx.saved_tensors
    num_prefix_tokens, inverse, backend = ctx.args
    gq, gk = torch.ops.dinov3_kernels.apply_rope(dq, dk, sin, cos, num_prefix_tokens, not inverse, backend)
    return gq, gk, None, None, None, None, None


torch.library.register_autograd("dinov3_kernels::apply_rope", _apply_rope_backward,
                                setup_context=_apply_rope_setup_context)


def _rope_qkv_split_impl(qkv, sin, cos, num_heads, num_prefix_tokens, backend):
    if backend == "triton":
        from ._triton.attention import rope_qkv_split_triton

        return rope_qkv_split_triton(qkv, sin, cos, num_heads, num_prefix_tokens)
    return rope_qkv_split_reference(qkv, sin, cos, num_heads, num_prefix_tokens)


def _rope_qkv_merge_impl(dq, dk, dv, sin, cos, num_prefix_tokens, backend):
    if backend == "triton":
        from ._triton.attention import rope_qkv_merge_triton

        dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
        return rope_qkv_merge_triton(dq, dk, dv, sin, cos, num_prefix_tokens)
    return rope_qkv_merge_reference(dq, dk, dv, sin, cos, num_prefix_tokens)


torch.library.register_kernel("dinov3_kernels::rope_qkv_split", ("cpu", "cuda"), _rope_qkv_split_impl)
torch.library.register_kernel("dinov3_kernels::rope_qkv_merge", ("cpu", "cuda"), _rope_qkv_merge_impl)


def _rope_qkv_split_setup_context(ctx, inputs, output):
    _, sin, cos, _, num_prefix_tokens, backend = inputs
    ctx.save_for_backward(sin, cos)
    ctx.args = (num_prefix_tokens, backend)


def _rope_qkv_split_backward(ctx, dq, dk, dv):
    sin, cos = ctx.saved_tensors
    q_like = dq if dq is not None else dk if dk is not None else dv
    dq, dk, dv = (g if g is not None else torch.zeros_like(q_like) for g in (dq, dk, dv))
    dqkv = torch.ops.dinov3_kernels.rope_qkv_merge(dq, dk, dv, sin, cos, *ctx.args)
    return dqkv, None, None, None, None, None


torch.library.register_autograd("dinov3_kernels::rope_qkv_split", _rope_qkv_split_backward,
                                setup_context=_rope_qkv_split_setup_context)


def _kernel_rope(sin, cos):
    return sin.to(torch.float32).contiguous(), cos.to(torch.float32).contiguous()


# ---- 4. public functions -----------------------------------------------------------------------------------------
def rope_attention(qkv, sin, cos, *, num_heads, num_prefix_tokens=None, backend="auto"):
    """Fused RoPE + softmax attention on the packed qkv; same values and gradients as :func:`rope_attention_reference`.

    qkv: (B, N, 3C), the qkv linear's output, C = num_heads·head_dim, read in place (only a last-dim stride other
    than 1 costs a copy). sin, cos: (H·W, head_dim) from the RoPE module, or (H·W, head_dim/2) when both halves
    share their angles (what the DINOv3 model passes, from RopePositionEmbedding.tables: half the table traffic);
    the last H·W tokens are rotated, the first num_prefix_tokens (default N - H·W; must agree) are not. Returns
    (B, N, C) in qkv.dtype, the layout the output projection takes; the gradient flows to qkv in the same packed
    layout. backend: "auto" | "reference" | "composed" | "triton" | "cuda". "composed": one pass (Triton on CUDA,
    PyTorch elsewhere) from qkv to rotated q, k, v, then torch's scaled_dot_product_attention, and one pass back to
    the packed gradient; any dtype and head dim. Kernels: float32/float16/bfloat16; head_dim a multiple of 16 up to
    256 (triton), 64 or 128 (cuda).
    """
    if not torch.compiler.is_compiling():
        num_prefix_tokens = _check_attention_inputs(qkv, sin, cos, num_heads, num_prefix_tokens)
    elif num_prefix_tokens is None:
        num_prefix_tokens = qkv.shape[1] - sin.shape[0]
    head_dim = qkv.shape[-1] // (3 * num_heads)
    chosen = _backend.choose_backend(backend, (qkv,), _op_check(qkv, sin, cos, head_dim, True, composed=True),
                                     "rope_attention", atomics=("cuda", "triton"), size=qkv.shape[1])  # dQ atomics
    if chosen == "reference":
        return rope_attention_reference(qkv, sin, cos, num_heads=num_heads, num_prefix_tokens=num_prefix_tokens)
    if chosen == "composed":
        return _rope_attention_composed(qkv, sin, cos, num_heads, num_prefix_tokens)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    sin32, cos32 = _kernel_rope(sin, cos)
    out, _ = torch.ops.dinov3_kernels.rope_attention_fwd(qkv, sin32, cos32, num_heads, num_prefix_tokens,
                                                         head_dim ** -0.5, chosen)
    return out


def apply_rope(q, k, sin, cos, num_prefix_tokens=None, *, backend="auto"):
    """RoPE on the patch tokens of q and k (B, heads, N, head_dim), as :func:`apply_rope_reference`, in one kernel.

    Returns new tensors (q and k are never modified), differentiable w.r.t. q and k. backend: "auto" | "reference" |
    "triton" (there is no CUDA-extension kernel for this op).
    """
    if not torch.compiler.is_compiling():
        num_prefix_tokens = _check_apply_rope_inputs(q, k, sin, cos, num_prefix_tokens)
    elif num_prefix_tokens is None:
        num_prefix_tokens = q.shape[2] - sin.shape[0]
    chosen = _backend.choose_backend(backend, (q, k), _op_check(q, sin, cos, None, False), "apply_rope",
                                     size=q.shape[2])
    if chosen == "reference":
        return apply_rope_reference(q, k, sin, cos, num_prefix_tokens)
    sin32, cos32 = _kernel_rope(sin, cos)
    return torch.ops.dinov3_kernels.apply_rope(q, k, sin32, cos32, num_prefix_tokens, False, chosen)
