"""The build: the compiled extension imports. (Its kernels' machine code, spills included, is checked by
tests/kernels/test_cuda_compile.py.)"""

import os
import shutil

import pytest

from dinov3_kernels import _backend

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or os.environ.get("DINOV3_SKIP_CUDA_BUILD", "0") not in ("", "0"),
                                reason="nvcc not found, or the CUDA build was skipped on purpose")


@needs_nvcc
def test_extension_built_and_imports():
    assert _backend.CUDA_EXT is not None, f"nvcc is present but the extension is missing: {_backend.CUDA_EXT_UNAVAILABLE}"
    assert _backend.CUDA_EXT.cuda_runtime_version() > 0
