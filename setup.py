"""Build script.

The CUDA kernels in csrc/ are compiled by nvcc (driven by ninja) into objects that are linked, together with the
pybind11 bindings, into one extension: ``dinov3_kernels._C``. No torch header is used and torch is never imported
here, so the extension does not depend on the torch version and ``pip install .`` works with ordinary build isolation.

Environment:
  DINOV3_SKIP_CUDA_BUILD=1   build the pure-Python package (Triton + reference backends only)
  DINOV3_CUDA_ARCHS          e.g. "8.0;9.0a" (default); PTX of the newest arch is always embedded
  CUDA_HOME / CUDA_PATH      where the CUDA toolkit lives (else nvcc on PATH)
  MAX_JOBS                   parallel nvcc jobs (default: capped by cores and memory)
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "8.0;9.0a"
# nvcc on a Hopper template-heavy file can take ~3 GB.
GB_PER_JOB = 3


def _say(msg):
    print(f"dinov3-kernels: {msg}", file=sys.stderr, flush=True)


def _truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def find_cuda_home():
    """Returns (cuda_home, nvcc) or (None, reason)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = os.path.join(home, "bin", "nvcc")
            if os.path.exists(nvcc):
                return home, nvcc
            return None, f"{var}={home} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    # nvcc on PATH may be a wrapper script: look for the toolkit headers near it, then in the usual places.
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home, nvcc
    return None, f"found {nvcc} but no CUDA headers next to it (set CUDA_HOME)"


def parse_archs(spec):
    """'8.0;9.0a' -> ['80', '90a'] (sorted by number, suffix kept)."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)(\+PTX)?", item, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"DINOV3_CUDA_ARCHS: cannot parse {item!r} (expected e.g. 8.0, 9.0a)")
        archs.append(f"{m.group(1)}{m.group(2)}{m.group(3).lower()}")
    if not archs:
        raise ValueError("DINOV3_CUDA_ARCHS is empty")
    return sorted(set(archs), key=lambda a: (int(re.match(r"\d+", a).group()), a))


def gencode_flags(archs):
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = archs[-1]
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def max_jobs():
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return max(1, min(cores, int(mem_gb // GB_PER_JOB)))


def ninja_binary():
    try:
        import ninja  # the build requirement; its binary need not be on PATH

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    path = shutil.which("ninja")
    if path is None:
        raise RuntimeError("ninja is required to build the CUDA extension (pip install ninja)")
    return path


class CUDABuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc through ninja, then links them into the pybind11 extension."""

    def build_extension(self, ext):
        cuda_home, nvcc = ext.cuda_home, ext.nvcc
        archs = parse_archs(os.environ.get("DINOV3_CUDA_ARCHS", DEFAULT_ARCHS))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cuda"))
        os.makedirs(build_dir, exist_ok=True)

        cu_files = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
        nvcc_flags = [
            "-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
            "-Xptxas", "-v", f"-I{CSRC}", *gencode_flags(archs),
        ]
        objects = [os.path.join(build_dir, os.path.basename(f) + ".o") for f in cu_files]
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {shlex.quote(nvcc)}",
            f"flags = {' '.join(shlex.quote(f) for f in nvcc_flags)}",
            # ptxas -v goes to stderr: keep it per object for the spill/stack report, show it on failure.
            "rule nvcc",
            "  command = $nvcc $flags -c $in -o $out > $out.ptxas 2>&1 || { cat $out.ptxas; exit 1; }",
            "  description = nvcc $in",
        ]
        for src, obj in zip(cu_files, objects):
            deps = " ".join(shlex.quote(h) for h in sorted(glob.glob(os.path.join(CSRC, "*.cuh"))))
            lines.append(f"build {obj}: nvcc {src} | {deps}")
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        jobs = max_jobs()
        _say(f"compiling {len(cu_files)} CUDA file(s) for sm_{', sm_'.join(archs)} (+PTX) with {jobs} job(s)")
        subprocess.run([ninja_binary(), "-C", build_dir, "-j", str(jobs)], check=True)

        ext.extra_objects = objects
        ext.include_dirs += [os.path.join(cuda_home, "include"), CSRC]
        lib_dirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
        ext.library_dirs += lib_dirs
        # Static cudart: the module imports on machines without a driver or a CUDA runtime library.
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        super().build_extension(ext)

        # The ptxas report ships beside the module, so a test can check the installed kernels for spills.
        report = "\n".join(open(o + ".ptxas").read() for o in objects)
        out_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
        with open(os.path.join(out_dir, "_ptxas_report.txt"), "w") as f:
            f.write(f"# archs: {' '.join(archs)}\n{report}")


def extensions():
    if _truthy("DINOV3_SKIP_CUDA_BUILD"):
        _say("DINOV3_SKIP_CUDA_BUILD is set: building the pure-Python package (triton + reference backends)")
        return []
    cuda_home, nvcc_or_reason = find_cuda_home()
    if cuda_home is None:
        _say(f"{nvcc_or_reason}: building the pure-Python package (triton + reference backends)")
        return []
    import pybind11  # build requirement

    ext = Extension(
        "dinov3_kernels._C",
        sources=[os.path.join("csrc", "bindings.cpp")],
        include_dirs=[pybind11.get_include()],
        language="c++",
        extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
    )
    ext.cuda_home, ext.nvcc = cuda_home, nvcc_or_reason
    return [ext]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": CUDABuildExt},
    package_data={"dinov3_kernels": ["_ptxas_report.txt", "auto_table.json"]},
)
