"""Glue for csrc/gram_loss.cu."""

import torch

from .. import _backend


def gram_fwd_cuda(s, t, *, apply_norm, clamp_s, clamp_t, grad_s, grad_t, eps=1e-12):
    """Same contract as dinov3_kernels._triton.gram.gram_fwd_triton, on the compiled kernels (csrc/gram_loss.cu)."""
    C = _backend.cuda_ext()
    G, P, D = s.shape
    stream = torch.cuda.current_stream(s.device).cuda_stream
    partial = torch.empty(C.gram_num_partials(G, P), device=s.device, dtype=torch.float32)
    acc_s = torch.zeros((G, P, D), device=s.device, dtype=torch.float32) if grad_s else partial
    acc_t = torch.zeros((G, P, D), device=s.device, dtype=torch.float32) if grad_t else partial
    M = G * P * P
    C.gram_fwd(
        s.data_ptr(), t.data_ptr(), acc_s.data_ptr(), acc_t.data_ptr(), partial.data_ptr(),
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

    gs = finish(s, acc_s) if grad_s else s.new_empty(0)
    gt = finish(t, acc_t) if grad_t else t.new_empty(0)
    return loss, gs, gt
