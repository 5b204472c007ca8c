"""Glue for csrc/koleo_loss.cu."""

import torch

from .. import _backend

_ROWS = 64  # koleo::kBlockM = kBlockN: query rows per block, search rows per tile
SPARES = 8  # candidates the fp32 search keeps beyond topk for the exact re-ranking (as the Triton kernel's)


def default_splits(n, M, sms):
    """How many contiguous ranges of the search set the search is split into: enough (query block, range) blocks for
    two per SM, each range at least two 64-row tiles (the merge then reads a few lists per row, against a 64-row tile
    of dot products per tile). One block per 64 query rows alone gives 16 blocks at n = 1024 on 132 SMs."""
    qblocks = -(-n // _ROWS)
    tiles = -(-M // _ROWS)
    return max(1, min(-(-tiles // 2), -(-2 * sms // qblocks), 65535))


def koleo_fwd_cuda(search, offset, n, topk, eps, pdist_eps, splits=None, spares=SPARES):
    """Same contract as dinov3_kernels._triton.koleo.koleo_fwd_triton, on the compiled kernels.

    splits: ranges of the search set searched by separate blocks (default: default_splits with the device's SM count;
    132 for tensors not on a GPU, i.e. the CPU emulation of the tests). The result does not depend on it: the partial
    top-k lists are merged under a strict total order (similarity, then index).
    fp32 input is searched on an fp16 copy of its unit rows (a transient (M, D) workspace) keeping
    min(topk + spares, 16) candidates per row, which the merge re-ranks by their exact fp32 similarity; `spares`
    (tests) forces how many."""
    C = _backend.cuda_ext()
    M, D = search.shape
    dev = search.device
    if splits is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
        splits = default_splits(n, M, sms)
    dtype_code = _backend.CUDA_DTYPE_CODES[search.dtype]
    kc = C.koleo_candidates(topk, dtype_code, M, spares)
    kmax = C.koleo_kmax(kc)
    part_val = torch.empty(n * splits * kmax, device=dev, dtype=torch.float32)
    part_idx = torch.empty(n * splits * kmax, device=dev, dtype=torch.int32)
    norm = torch.empty(M, device=dev, dtype=torch.float32)
    u = torch.empty((M, D), device=dev, dtype=torch.float16) if search.dtype == torch.float32 else None
    counter = torch.empty(1, device=dev, dtype=torch.int32)
    idx = torch.empty((n, topk), device=dev, dtype=torch.int64)
    dist = torch.empty((n, topk), device=dev, dtype=torch.float32)
    partial = torch.empty(C.koleo_num_partials(n), device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    C.koleo_fwd(
        search.data_ptr(), dtype_code, M, D, search.stride(0), search.stride(1),
        offset, n, topk, kc, eps, pdist_eps, splits, part_val.data_ptr(), part_idx.data_ptr(), norm.data_ptr(),
        0 if u is None else u.data_ptr(), counter.data_ptr(), idx.data_ptr(), dist.data_ptr(), partial.data_ptr(),
        loss.data_ptr(),
        torch.cuda.current_stream(dev).cuda_stream,
    )
    return loss, idx, dist, norm
