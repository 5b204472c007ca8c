"""The build: the compiled extension imports and its kernels neither spill registers nor use a local-memory stack."""

import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from dinov3_kernels import _backend

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or os.environ.get("DINOV3_SKIP_CUDA_BUILD", "0") not in ("", "0"),
                                reason="nvcc not found, or the CUDA build was skipped on purpose")


def _installed_report():
    spec = importlib.util.find_spec("dinov3_kernels")
    path = os.path.join(os.path.dirname(spec.origin), "_ptxas_report.txt")
    return open(path).read() if os.path.exists(path) else None


def _check_ptxas(report):
    # ptxas -v prints, per kernel and arch: "Compiling entry function 'X' for 'sm_90a'" followed by
    # "N bytes stack frame, N bytes spill stores, N bytes spill loads".
    kernels = re.findall(r"Compiling entry function '([^']+)' for '(sm_\w+)'", report)
    usage = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert kernels, "no kernel found in the ptxas report"
    assert len(usage) == len(kernels), "could not pair every kernel with its resource usage"
    bad = [f"{k} ({arch}): stack {st} B, spill stores {ss} B, spill loads {sl} B"
           for (k, arch), (st, ss, sl) in zip(kernels, usage) if (int(st), int(ss), int(sl)) != (0, 0, 0)]
    assert not bad, "kernels with spills or a stack frame:\n" + "\n".join(bad)
    return kernels


@needs_nvcc
def test_extension_built_and_imports():
    assert _backend.CUDA_EXT is not None, f"nvcc is present but the extension is missing: {_backend.CUDA_EXT_UNAVAILABLE}"
    assert _backend.CUDA_EXT.cuda_runtime_version() > 0


@needs_nvcc
def test_no_register_spills_or_stack():
    report = _installed_report()
    if report is None:
        # Not an installed build (e.g. a source checkout): compile the sources the same way, once, for sm_90a.
        root = os.path.join(os.path.dirname(__file__), "..", "csrc")
        sources = sorted(glob.glob(os.path.join(root, "*.cu")))
        if not sources:
            pytest.skip("no CUDA sources")
        outs = []
        for src in sources:
            r = subprocess.run([NVCC, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v",
                                "-gencode=arch=compute_90a,code=sm_90a", f"-I{root}", "-c", src, "-o", os.devnull],
                               capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stderr[-3000:]
            outs.append(r.stderr)
        report = "\n".join(outs)
    elif "Compiling entry function" not in report:
        pytest.skip("the installed extension has no kernels yet")
    kernels = _check_ptxas(report)
    assert any(arch == "sm_90a" for _, arch in kernels)


def test_ptxas_parser_catches_spills():
    good = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
            "ptxas info    : Function properties for _Z1kv\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert _check_ptxas(good) == [("_Z1kv", "sm_90a")]
    with pytest.raises(AssertionError, match="spill"):
        _check_ptxas(good.replace("0 bytes spill stores", "8 bytes spill stores"))
    with pytest.raises(AssertionError, match="stack"):
        _check_ptxas(good.replace("0 bytes stack frame", "16 bytes stack frame"))
