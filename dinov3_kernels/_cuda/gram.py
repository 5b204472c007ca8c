"""Glue for csrc/gram_loss.cu."""

import torch

from .. import _backend


def gram_fwd_cuda(s, t, *, apply_norm, clamp_s, clamp_t, grad_s, grad_t, eps=1e-12):
    """Same contract as dinov3_kernels._triton.gram.gram_fwd_triton, on the compiled kernels (csrc/gram_loss.cu).

    Any strides: the kernels load 16-byte vectors when stride_d == 1 and rows are 16-byte aligned, element by element
    otherwise, so no copy is made here. fp32 runs IEEE SIMT FMAs, or TF32 tensor cores when
    torch.backends.cuda.matmul.allow_tf32 is set; fp16/bf16 run tensor cores with fp32 accumulation.

    Deterministic: the forward kernel stores the gradient weights W of every upper-triangle 64x64 tile pair (input
    dtype) and the inverse row norms; a second kernel writes each element of the gradient w.r.t. the normalised rows
    once, summing the row block's tiles in a fixed order (no atomics).
    """
    C = _backend.cuda_ext()
    G, P, D = s.shape
    stream = torch.cuda.current_stream(s.device).cuda_stream
    n_partial = C.gram_num_partials(G, P)
    partial = torch.empty(n_partial, device=s.device, dtype=torch.float32)

    def buffers(on):  # gradient w.r.t. x̂ (every element written), W tiles, inverse row norms (padded to 64 rows)
        if not on:
            return partial, partial, partial
        return (torch.empty((G, P, D), device=s.device, dtype=torch.float32),
                torch.empty(n_partial * 64 * 64, device=s.device, dtype=s.dtype),
                torch.empty(G * ((P + 63) // 64) * 64, device=s.device, dtype=torch.float32))

    acc_s, w_s, rinv_s = buffers(grad_s)
    acc_t, w_t, rinv_t = buffers(grad_t)
    M = G * P * P
    C.gram_fwd(
        s.data_ptr(), t.data_ptr(), acc_s.data_ptr(), acc_t.data_ptr(), w_s.data_ptr(), w_t.data_ptr(),
        rinv_s.data_ptr(), rinv_t.data_ptr(), partial.data_ptr(),
        G, P, D, *s.stride(), *t.stride(), _backend.CUDA_DTYPE_CODES[s.dtype], 4.0 / M, eps,
        apply_norm, clamp_s, clamp_t, grad_s, grad_t, bool(torch.backends.cuda.matmul.allow_tf32), stream,
    )
    loss = (partial.sum(dtype=torch.float64) / M).to(torch.float32)

    def finish(x, acc):
        out = torch.empty((G, P, D), device=x.device, dtype=x.dtype)
        x2 = x.reshape(G * P, D)
        C.gram_norm_bwd(x2.data_ptr(), acc.data_ptr(), out.data_ptr(), G * P, D, x2.stride(0), x2.stride(1),
                        _backend.CUDA_DTYPE_CODES[x.dtype], eps, apply_norm, stream)
        return out

    del w_s, w_t, rinv_s, rinv_t
    gs = finish(s, acc_s) if grad_s else s.new_empty(0)
    gt = finish(t, acc_t) if grad_t else t.new_empty(0)
    return loss, gs, gt
