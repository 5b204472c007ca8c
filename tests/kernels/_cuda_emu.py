"""Builds the host emulations of the CUDA kernels (tests/kernels/*_cuda_emu.cpp on cuda_emu.h) for the tests.

Each harness includes one real csrc/*.cu compiled with DINOV3_HOST_EMULATION and exports extern "C" entry points that
return 0, 1 (bad argument: ValueError) or 2 (anything else: RuntimeError) with the message in a caller's buffer.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include directory (for cuda_fp16.h / cuda_bf16.h), or None."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    homes.append("/usr/local/cuda")
    for home in homes:
        if home and os.path.exists(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    return None


def build(tmp_path_factory, harness: str) -> ctypes.CDLL:
    """Compiles tests/kernels/<harness> into a shared library and loads it; skips where no C++20 host compiler, C++20
    library or CUDA headers exist (a compile error of any other kind fails the test)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("needs a host C++20 compiler and the CUDA headers (cuda_fp16.h) to emulate the kernels")
    stem = os.path.splitext(harness)[0]
    lib = tmp_path_factory.mktemp(stem) / f"lib{stem}.so"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas", f"-I{CSRC}",
                        f"-I{inc}", os.path.join(HERE, harness), "-o", str(lib)], capture_output=True, text=True)
    if r.returncode != 0 and any(w in r.stderr for w in ("<barrier>", "std::barrier", "atomic_ref", "c++20")):
        pytest.skip(f"{cxx} lacks the C++20 library the emulation uses: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def call(fn, *args) -> None:
    """fn(*args, err, errlen) of a harness entry point, its return code turned into the exception the real _C raises."""
    err = ctypes.create_string_buffer(1024)
    rc = fn(*[int(a) if isinstance(a, bool) else a for a in args], err, 1024)
    if rc == 1:
        raise ValueError(err.value.decode())
    if rc != 0:
        raise RuntimeError(err.value.decode())
