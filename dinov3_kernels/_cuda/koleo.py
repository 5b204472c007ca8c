"""Glue for csrc/koleo_loss.cu."""

import torch

from .. import _backend


def koleo_fwd_cuda(search, offset, n, topk, eps, pdist_eps):
    """Same contract as dinov3_kernels._triton.koleo.koleo_fwd_triton, on the compiled kernels."""
    C = _backend.cuda_ext()
    M, D = search.shape
    dev = search.device
    norm = torch.empty(M, device=dev, dtype=torch.float32)
    counter = torch.empty(1, device=dev, dtype=torch.int32)
    idx = torch.empty((n, topk), device=dev, dtype=torch.int64)
    dist = torch.empty((n, topk), device=dev, dtype=torch.float32)
    partial = torch.empty(C.koleo_num_partials(n), device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    C.koleo_fwd(
        search.data_ptr(), _backend.CUDA_DTYPE_CODES[search.dtype], M, D, search.stride(0), search.stride(1),
        offset, n, topk, eps, pdist_eps, norm.data_ptr(), counter.data_ptr(), idx.data_ptr(), dist.data_ptr(),
        partial.data_ptr(), loss.data_ptr(), torch.cuda.current_stream(dev).cuda_stream,
    )
    return loss, idx, dist, norm
