"""Shared test setup.

Without a CUDA GPU, Triton kernels run on the CPU through the interpreter: TRITON_INTERPRET=1 must be set before
triton compiles anything, so it is set here, before the test modules import the package. Tests marked `gpu` skip.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_cpu():
    """For tests that run Triton kernels on CPU tensors (the interpreter)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set automatically when no GPU is present)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _backend_env():
    """dinov3_kernels reads DINOV3_KERNELS_BACKEND and TRITON_INTERPRET once (a test that changes them calls
    _backend.refresh_env()); re-read after every test, once monkeypatch has restored them, so no value leaks."""
    yield
    from dinov3_kernels import _backend

    _backend.refresh_env()
