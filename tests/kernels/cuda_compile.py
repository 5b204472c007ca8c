"""Reads the sm_90a machine code of the CUDA kernels (csrc/*.cu) and checks it, without a GPU.

Per kernel (every template instantiation): registers, stack and spills and static shared memory from `ptxas -v`,
threads per CTA from __launch_bounds__ (EIATTR_MAX_THREADS in the cubin), CTAs per SM from those and the sm_90
limits, and from the SASS (`cuobjdump -sass`): the dot instructions (HGMMA = wgmma, HMMA = mma.sync), global atomics
and the GPU-scope fences before them. The properties and the allow-list are in compile_checks.py.

Where the facts come from, cheapest first:
  the installed build   `pip install .` with nvcc writes dinov3_kernels/_ptxas_report.txt beside _C (setup.py) and _C
                        holds the sm_90a cubins: used when both exist and _C is newer than every file in csrc/
                        (what CI has: it installs, then tests)
  a compile             otherwise nvcc compiles csrc/*.cu (or --files) to sm_90a cubins with setup.py's flags (about
                        2 minutes for the three files on the 2-core CI machine)

    python tests/kernels/cuda_compile.py [--compile] [--files koleo_loss] [--json PATH] [--md PATH] [--check]

Exits 2 when there is no nvcc and no installed build to read, 1 with --check when a kernel lacks a property the
allow-list does not excuse.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
sys.path.insert(0, HERE)
import compile_checks  # noqa: E402

ARCH = "sm_90a"
# setup.py (CUDABuildExt.build_extension), for one arch and to a cubin; test_cuda_compile.py checks they stay equal.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-Xptxas", "-v"]


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.path.join(os.environ[var], "bin", "nvcc")
    return shutil.which("nvcc")


def installed_build() -> tuple[str, str] | None:
    """(_C library, ptxas report) of the installed package when both exist and _C is newer than csrc/, else None."""
    spec = importlib.util.find_spec("dinov3_kernels")
    if spec is None or not spec.origin:
        return None
    pkg = os.path.dirname(spec.origin)
    libs = glob.glob(os.path.join(pkg, "_C*.so"))
    report = os.path.join(pkg, "_ptxas_report.txt")
    if not libs or not os.path.exists(report):
        return None
    sources = glob.glob(os.path.join(CSRC, "*"))
    if sources and os.path.getmtime(libs[0]) < max(os.path.getmtime(s) for s in sources):
        return None  # built from older sources
    return libs[0], report


def compile_cubins(files: list[str], out_dir: str) -> tuple[list[str], str]:
    """nvcc -cubin for sm_90a with setup.py's flags: (cubin paths, ptxas -v output of all of them)."""
    nvcc = find_nvcc()
    cubins, logs = [], []
    for src in files:
        cubin = os.path.join(out_dir, os.path.basename(src) + ".cubin")
        r = subprocess.run([nvcc, *NVCC_FLAGS, f"-I{CSRC}", f"-gencode=arch=compute_{ARCH[3:]},code={ARCH}", "-cubin",
                            src, "-o", cubin], capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        cubins.append(cubin)
        logs.append(r.stdout + r.stderr)
    return cubins, "\n".join(logs)


def parse_ptxas(report: str, arch: str = ARCH) -> dict[str, dict]:
    """ptxas -v output -> {mangled kernel: {regs, stack, spill_stores, spill_loads, smem}} for entry functions of `arch`
    (a report may hold several archs, as setup.py's does)."""
    out = {}
    blocks = re.split(r"^ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'\s*$", report, flags=re.M)
    for i in range(1, len(blocks) - 2, 3):
        name, a, body = blocks[i], blocks[i + 1], blocks[i + 2]
        if a != arch:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
        used = re.search(r"Used (\d+) registers", body)
        smem = re.search(r"(\d+) bytes smem", body)
        if frame is None or used is None:
            raise ValueError(f"ptxas report: no resource usage for {name} ({a})")
        out[name] = {"regs": int(used.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
                     "spill_loads": int(frame.group(3)), "smem": int(smem.group(1)) if smem else 0}
    return out


def max_threads(elf: str) -> dict[str, int]:
    """cuobjdump -elf -> {mangled kernel: threads per CTA from __launch_bounds__ (EIATTR_MAX_THREADS)}."""
    out = {}
    for name, body in re.findall(r"^\.nv\.info\.(\S+)\n(.*?)(?=^\.|\Z)", elf, flags=re.M | re.S):
        m = re.search(r"EIATTR_MAX_THREADS\s+Format:\s*\S+\s+Value:\s*((?:0x[0-9a-f]+\s*)+)", body)
        if m:
            x, y, z = (int(v, 16) for v in m.group(1).split()[:3])
            out[name] = x * y * z
    return out


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    pretty = r.stdout.splitlines()
    if len(pretty) != len(names):
        return {n: n for n in names}
    # void dinov3::(anonymous namespace)::_gram_fwd_kernel<float, true>(dinov3::...) -> _gram_fwd_kernel<float, true>
    short = []
    for p in pretty:
        p = re.sub(r"^void ", "", p.replace("(anonymous namespace)::", "")).split("(")[0]
        short.append(re.sub(r"^dinov3::(?:\w+::)?", "", p))
    return dict(zip(names, short))


def collect(files: list[str] | None, force_compile: bool) -> tuple[list[dict], dict]:
    """Facts per kernel and where they came from."""
    cuobjdump = compile_checks.nvidia_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("no cuobjdump (install triton, which ships one, or a CUDA toolkit with it)")
    build = None if (force_compile or files) else installed_build()
    with tempfile.TemporaryDirectory() as tmp:
        ptxas = parse_ptxas(open(build[1]).read()) if build is not None else {}
        if ptxas:  # an installed build with sm_90a code (DINOV3_CUDA_ARCHS may have left it out)
            binaries = [build[0]]
            source = f"installed build ({build[0]})"
        else:
            if find_nvcc() is None:
                raise FileNotFoundError("no nvcc and no installed build of the CUDA extension")
            srcs = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
            if files:
                srcs = [s for s in srcs if os.path.splitext(os.path.basename(s))[0] in files]
            binaries, log = compile_cubins(srcs, tmp)
            ptxas = parse_ptxas(log)
            source = "nvcc " + " ".join(os.path.basename(s) for s in srcs)
        sass, threads = {}, {}
        for b in binaries:
            sass.update(compile_checks.split_functions(
                compile_checks.run_tool(cuobjdump, ["-sass", "-arch", ARCH], path=b)))
            threads.update(max_threads(compile_checks.run_tool(cuobjdump, ["-elf", "-arch", ARCH], path=b)))
    names = demangle(sorted(ptxas))
    kernels = []
    for mangled in sorted(ptxas, key=lambda n: names[n]):
        p = ptxas[mangled]
        facts = compile_checks.sass_facts(sass.get(mangled, ""))
        t = threads.get(mangled)
        ctas, limiter = compile_checks.ctas_per_sm(t, p["regs"], p["smem"]) if t else (None, "threads unknown")
        k = {"name": names[mangled], "mangled": mangled, "threads": t, **p, **facts, "ctas_per_sm": ctas,
             "limiter": limiter}
        k["dot_kind"] = ("mma.sync by design (hand-written; reported, not required)" if facts["hmma"] else
                         "wgmma" if facts["hgmma"] else "no tensor-core dot")
        status = compile_checks.evaluate(dict(k, ctas_per_sm=ctas if ctas is not None else 1), None)
        if ctas is None:
            status["fits"] = "n/a: no __launch_bounds__ (threads per CTA set at launch)"
        if mangled not in sass:
            status["no_fenced_atomics"] = "FAIL: no SASS found for this kernel"
        k["status"] = status
        kernels.append(k)
    return kernels, {"source": source, "cuobjdump": cuobjdump}


def _markdown(report: dict) -> str:
    m = report["meta"]
    out = [f"# CUDA kernels (csrc/*.cu) compiled for {ARCH} without a GPU", "",
           f"{m['date']}, commit {m['commit']}, {m['nvcc']}; facts from {m['source']}; `{m['command']}` "
           f"({m['seconds']:.0f} s on the 2-core CPU machine). Compile-time facts only: no timing.", "",
           "Registers, stack/spills and static shared memory from `ptxas -v`; threads per CTA from __launch_bounds__; "
           "CTAs/SM from those and the sm_90 limits (228 KB smem + 1 KB per CTA, 64K registers, 32 CTAs, 2048 "
           "threads); dynamic shared memory (set by the launcher: the 16-bit attention forward, 36 / 68 KB at Dh 64 / "
            "128, and backward, 64 / 73.5 KB) is not included. Dots and atomics from `cuobjdump -sass`. Checked "
            "(tests/kernels/compile_checks.py): spill = no stack/spills/STL, "
           "fit = at least one CTA per SM, fence = no GPU-scope MEMBAR before an atomic. The hand-written kernels use "
           "mma.sync by design: their dots are reported, not checked.", "",
           "| kernel | threads | regs | stack | spills (st/ld B) | smem B | CTAs/SM | dots (SASS) | atomics (fenced) | "
           "spill | fit | fence |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(s):
        return "ok" if s == "ok" else "n/a" if s.startswith("n/a") else "allowed" if s.startswith("allowed") \
            else "**FAIL**"

    for k in report["kernels"]:
        dots = ", ".join(f"{f} x{n}" for f, n in k["dot_forms"].items()) or "none"
        st = k["status"]
        out.append(f"| `{k['name']}` | {k['threads'] or '?'} | {k['regs']} | {k['stack']} | {k['spill_stores']}/"
                   f"{k['spill_loads']} | {k['smem']} | {k['ctas_per_sm'] or '?'} ({k['limiter']}) | {dots} | "
                   f"{k['atomics']} ({k['fenced_atomics']}) | {cell(st['no_spills'])} | {cell(st['fits'])} | "
                   f"{cell(st['no_fenced_atomics'])} |")
    allowed: dict = {}  # (kernel without template arguments, property, status) -> instantiations
    for k in report["kernels"]:
        for p, s in k["status"].items():
            if s.startswith("allowed"):
                key = (k["name"].split("<")[0], p, s)
                allowed[key] = allowed.get(key, 0) + 1
    out += ["", "## Allowed", ""] + ([f"- `{n}` {p} ({c} instantiations): {s[len('allowed: '):]}"
                                      for (n, p, s), c in sorted(allowed.items())] or ["- none"])
    fails = [f"- `{k['name']}` {p}: {s}" for k in report["kernels"] for p, s in k["status"].items()
             if s.startswith("FAIL")]
    out += ["", "## Failures", ""] + (fails or ["- none"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="compile csrc/ even if an up-to-date installed build exists")
    ap.add_argument("--files", nargs="+", metavar="STEM", help="compile only these csrc files (e.g. koleo_loss)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a kernel lacks a property not allowed")
    ap.add_argument("--json", metavar="PATH", help="write the report as JSON")
    ap.add_argument("--md", metavar="PATH", help="write the report as a markdown table")
    args = ap.parse_args(argv)
    known = {os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(CSRC, "*.cu"))}
    if args.files and not set(args.files) <= known:
        ap.error(f"--files: unknown {sorted(set(args.files) - known)} (csrc has {sorted(known)})")
    t0 = time.perf_counter()
    try:
        kernels, where = collect(args.files, args.compile)
    except FileNotFoundError as e:
        print(f"cuda_compile.py: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    used: set = set()
    for k in kernels:
        k["status"] = compile_checks.apply_allow(k, k["status"], compile_checks.CUDA_ALLOW, used)
    for k in kernels:
        fails = [f"{p} {s}" for p, s in k["status"].items() if s.startswith("FAIL")]
        print(f"{'FAIL' if fails else 'ok'} {ARCH} {k['name']:60s} threads {k['threads']} regs {k['regs']} "
              f"stack {k['stack']} spills {k['spill_stores']}/{k['spill_loads']} smem {k['smem']} "
              f"ctas/sm {k['ctas_per_sm']} ({k['limiter']}) hgmma {k['hgmma']} hmma {k['hmma']} atomics {k['atomics']} "
              f"fenced {k['fenced_atomics']}" + (": " + "; ".join(fails) if fails else ""))
    print(f"{len(kernels)} CUDA kernels for {ARCH} from {where['source']} in {seconds:.0f} s")
    nvcc = find_nvcc()
    version = (subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
               if nvcc else "no nvcc")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!benchmarks/results"], capture_output=True, text=True).stdout.strip()  # reports aside
    report = {"meta": {"arch": ARCH, "date": time.strftime("%Y-%m-%d"), "commit": commit + ("-dirty" if dirty else ""),
                       "nvcc": version, "command": "python tests/kernels/cuda_compile.py " + " ".join(
                           argv if argv is not None else sys.argv[1:]), "seconds": round(seconds, 1),
                       "limits": compile_checks.SM90, **where,
                       "allow_unused": [e for i, e in enumerate(compile_checks.CUDA_ALLOW) if i not in used]},
              "kernels": kernels}
    report["meta"]["command"] = report["meta"]["command"].strip()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.md:
        with open(args.md, "w") as f:
            f.write(_markdown(report))
    failures = [k for k in kernels if any(s.startswith("FAIL") for s in k["status"].values())]
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
