"""The CUDA kernels' sm_90a machine code (cuda_compile.py): no spills, at least one CTA per SM, no fenced atomics
beyond the allow-list in compile_checks.py. Reads the installed build when it is current (CI installs with nvcc, so
nothing is compiled here); otherwise compiles csrc/*.cu once with nvcc (about 2 minutes); skips without either."""

import json
import os
import re
import subprocess
import sys

import pytest

import compile_checks
import cuda_compile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_cuda_kernels_have_the_compile_properties(tmp_path):
    if cuda_compile.find_nvcc() is None and cuda_compile.installed_build() is None:
        pytest.skip("no nvcc and no installed build of the CUDA extension")
    if compile_checks.nvidia_tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (Triton ships one) to read the SASS")
    path = tmp_path / "cuda.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "cuda_compile.py"), "--check", "--json", str(path)],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads(path.read_text())
    kernels = report["kernels"]
    # Every csrc/*.cu contributed kernels, each with its SASS read.
    for src in ("gram", "koleo", "rope_attention"):
        assert any(src in k["mangled"] for k in kernels), src
    assert all(k["instructions"] > 0 and k["threads"] for k in kernels)
    bad = [f"{k['name']}: {p} {s}" for k in kernels for p, s in k["status"].items() if s.startswith("FAIL")]
    assert not bad, bad
    # The 16-bit attention forward and backward stream their K'/V and Q'/dO tiles, the KoLeo search (16-bit rows only:
    # fp32 input is searched on its fp16 copy) and every Gram forward their feature chunks, the 16-bit Gram gradient
    # its W tiles and X chunks, with cp.async (SASS LDGSTS).
    piped = [k for k in kernels
             if re.match(r"(_rope_attention_(fwd|bwd)_kernel|koleo_search_kernel|_gram_grad_kernel)<__(half|nv_bfloat16)",
                         k["name"])
             or k["name"].startswith("_gram_fwd_kernel<")]
    assert len(piped) == 24 and all(k["async_copies"] > 0 for k in piped), [(k["name"], k["async_copies"])
                                                                             for k in piped]


PTXAS = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\n"
         "ptxas info    : Function properties for _Z1kv\n"
         "    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
         "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n"
         "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
         "ptxas info    : Function properties for _Z1kv\n"
         "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
         "ptxas info    : Used 32 registers, used 1 barriers, 28688 bytes smem\n"
         "ptxas info    : Compile time = 1.0 ms\n"
         "ptxas info    : Function properties for $__internal_0_$__cuda_sm20_rcp_rn_f32_slowpath\n"
         "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
         "ptxas info    : Compiling entry function '_Z1jv' for 'sm_90a'\n"
         "ptxas info    : Function properties for _Z1jv\n"
         "    16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
         "ptxas info    : Used 255 registers, used 0 barriers\n")


def test_ptxas_parser_reads_one_arch_and_catches_spills():
    p = cuda_compile.parse_ptxas(PTXAS)
    assert p == {"_Z1kv": {"regs": 32, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 28688},
                 "_Z1jv": {"regs": 255, "stack": 16, "spill_stores": 4, "spill_loads": 4, "smem": 0}}
    k = dict(p["_Z1jv"], hgmma=0, hmma=0, local_stores=0, local_loads=0, ctas_per_sm=1, limiter="regs", atomics=0,
             fenced_atomics=0)
    assert compile_checks.evaluate(k, None)["no_spills"].startswith("FAIL")
    assert cuda_compile.parse_ptxas(PTXAS, "sm_80")["_Z1kv"]["stack"] == 8


def test_launch_bounds_are_read_from_the_cubin_info():
    elf = (".nv.info._Z1kv\n\t<0x1>\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n\tValue:\t0x80 0x1 0x1 \n"
           "\n\n.nv.info._Z1jv\n\t<0x1>\n\tAttribute:\tEIATTR_CUDA_API_VERSION\n\tFormat:\tEIFMT_SVAL\n"
           "\tValue:\t0x82 \n")
    assert cuda_compile.max_threads(elf) == {"_Z1kv": 128}


def test_nvcc_flags_are_setup_pys():
    # cuda_compile.py compiles as setup.py builds (one arch, to a cubin): the same flags, in setup.py's flag list.
    setup = open(os.path.join(ROOT, "setup.py")).read()
    flags = re.search(r"nvcc_flags = \[(.*?)\]", setup, re.S).group(1)
    listed = re.findall(r'"([^"]+)"', flags)
    assert [f for f in listed if not f.startswith("-I")] == cuda_compile.NVCC_FLAGS


def test_installed_build_has_no_spills_for_any_arch():
    # The installed ptxas report covers every arch built (sm_80 as well as sm_90a); reading it costs nothing.
    build = cuda_compile.installed_build()
    if build is None:
        pytest.skip("no current installed build of the CUDA extension")
    report = open(build[1]).read()
    archs = set(re.findall(r"Compiling entry function '[^']+' for '(sm_\w+)'", report))
    assert "sm_90a" in archs
    for arch in archs:
        spills = {k: v for k, v in cuda_compile.parse_ptxas(report, arch).items()
                  if (v["stack"], v["spill_stores"], v["spill_loads"]) != (0, 0, 0)}
        assert not spills, (arch, spills)
