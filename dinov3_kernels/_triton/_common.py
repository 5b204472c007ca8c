"""Pieces every Triton kernel module shares."""

import torch
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; fp32 operands in PRECISION ("ieee" or "tf32"), 16-bit ones as they are."""
    if IS_FP32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc)


def dot_precision(x: torch.Tensor) -> tuple[bool, str]:
    """(is_fp32, precision) for `mma`: fp32 input uses TF32 exactly when torch's own matmul would
    (torch.backends.cuda.matmul.allow_tf32 on a CUDA tensor), IEEE fp32 otherwise."""
    fp32 = x.dtype == torch.float32
    return fp32, ("tf32" if (fp32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee")
