"""What the compile checks read from the machine code, what they require of it, and which kernels are excused.

Shared by tests/kernels/triton_compile.py (Triton kernels), tests/kernels/cuda_compile.py (csrc/*.cu) and their
tests. Imports neither torch nor triton, so a test running under TRITON_INTERPRET=1 can import it.

Properties checked per kernel (Triton: at each launcher's default configuration, i.e. its own choice or the first
autotune candidate; CUDA: every instantiation):
  tensor_cores      a dot on 16-bit or TF32 operands compiles to wgmma (SASS HGMMA), never to mma.sync (HMMA);
                    not applicable to a kernel without tl.dot, or whose dots are IEEE fp32 (FMA by design).
                    (CUDA: reported, not required; the hand-written kernels use mma.sync by design, see the table)
  no_spills         no local-memory stack (cuobjdump STACK / ptxas "stack frame") and no STL/LDL in the SASS
  fits              at least one CTA per SM on sm_90: shared memory, registers x threads and threads within the limits
  no_fenced_atomics no global atomic (RED/ATOM) with a GPU- or system-scope MEMBAR just before it: the pattern of an
                    acq_rel / __threadfence'd atomic, a serialised L2 round trip per atomic (issue 14 point 1)
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile

# ---- the machine ---------------------------------------------------------------------------------------------------
# sm_90 (H100 / H200), from the CUDA C++ Programming Guide (compute capability 9.0) and the occupancy calculator.
SM90 = {
    "smem_per_sm": 228 * 1024,      # bytes of shared memory an SM can give its CTAs
    "smem_per_cta": 227 * 1024,     # the most one CTA may use (opt-in above 48 KB)
    "smem_reserved_per_cta": 1024,  # the runtime reserves 1 KB of shared memory per resident CTA
    "regs_per_sm": 65536,
    "reg_unit_per_warp": 256,       # registers are allocated per warp in units of 256
    "max_ctas_per_sm": 32,
    "max_threads_per_sm": 2048,
    "max_threads_per_cta": 1024,
}
# sm_80 (A100): 164 KB per SM, 163 KB per CTA; the rest as sm_90.
SM80 = dict(SM90, smem_per_sm=164 * 1024, smem_per_cta=163 * 1024)
LIMITS = {80: SM80, 90: SM90}


def ctas_per_sm(threads: int, regs: int | None, smem: int, lim: dict = SM90) -> tuple[int, str]:
    """(resident CTAs per SM, what limits it: smem / regs / threads / ctas), the occupancy calculator's arithmetic.
    0 means the kernel cannot launch with this configuration."""
    if threads > lim["max_threads_per_cta"] or smem > lim["smem_per_cta"]:
        return 0, "threads" if threads > lim["max_threads_per_cta"] else "smem"
    warps = math.ceil(threads / 32)
    limits = {
        "ctas": lim["max_ctas_per_sm"],
        "threads": lim["max_threads_per_sm"] // (warps * 32),
        "smem": lim["smem_per_sm"] // (smem + lim["smem_reserved_per_cta"]),
    }
    if regs:
        per_warp = math.ceil(regs * 32 / lim["reg_unit_per_warp"]) * lim["reg_unit_per_warp"]
        limits["regs"] = lim["regs_per_sm"] // (per_warp * warps)
    limiter = min(limits, key=lambda k: (limits[k], k != "smem"))
    return limits[limiter], limiter


# ---- reading SASS --------------------------------------------------------------------------------------------------
def nvidia_tool(name: str) -> str | None:
    """cuobjdump / nvdisasm: the copy Triton ships (CUDA 12.8 with Triton 3.6, 13.1 with 3.9), else one on PATH or in
    CUDA_HOME. (The CUDA 13 toolkit image here has nvcc and ptxas but no cuobjdump.)"""
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    return shutil.which(name)


def run_tool(tool: str, args: list[str], blob: bytes | None = None, path: str | None = None) -> str:
    """stdout of `tool args FILE` for a file on disk or bytes written to a temporary one."""
    if path is None:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(blob)
            f.flush()
            return run_tool(tool, args, path=f.name)
    r = subprocess.run([tool, *args, path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{os.path.basename(tool)} {' '.join(args)} failed: {r.stderr[-500:]}")
    return r.stdout


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_ATOMIC = re.compile(r"^(?:RED|REDG|ATOM|ATOMG)\.")
_GPU_FENCE = re.compile(r"^MEMBAR\.\w+\.(?:GPU|SYS)$")
_DOT = re.compile(r"^(?:HGMMA|HMMA|IMMA|QGMMA|IGMMA|BGMMA)\b")
FENCE_WINDOW = 8  # instructions before an atomic searched for its fence (acq_rel: MEMBAR, ERRBAR, CCTL.IVALL, ...)
_ADDRESSED = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*)")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def loop_ranges(sass: str) -> list[tuple[int, int]]:
    """(first, last) addresses of the loops in one function's SASS: every branch to an earlier address closes one."""
    loops = []
    for addr, op, operands in _ADDRESSED.findall(sass):
        if op.startswith(("BRA", "JMP")):
            target = _BRANCH_TARGET.search(operands)
            if target and int(target.group(1), 16) <= int(addr, 16):
                loops.append((int(target.group(1), 16), int(addr, 16)))
    return loops


def loop_sizes(sass: str) -> list[list[int]]:
    """[instructions, dot instructions] of each loop of one function's SASS, in address order of the loops' starts
    (nested loops count their inner loops' instructions too)."""
    instrs = [(int(addr, 16), op) for addr, op, _ in _ADDRESSED.findall(sass)]
    return [[sum(1 for a, _ in instrs if lo <= a <= hi), sum(1 for a, op in instrs if lo <= a <= hi and _DOT.match(op))]
            for lo, hi in sorted(set(loop_ranges(sass)))]


def loop_local_accesses(sass: str) -> int:
    """Local-memory instructions (STL/LDL: spills) inside a loop of the function: the ones that cost per iteration."""
    loops = loop_ranges(sass)
    return sum(1 for addr, op, _ in _ADDRESSED.findall(sass)
               if op.startswith(("STL", "LDL")) and any(a <= int(addr, 16) <= b for a, b in loops))


def split_functions(sass: str) -> dict[str, str]:
    """cuobjdump -sass output of a cubin or library -> {function name: its SASS} (one arch at a time)."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def sass_facts(sass: str) -> dict:
    """Counts read from one function's SASS: dot instructions by form, global atomics, GPU-scope fences and the
    atomics they guard, local-memory traffic (spills)."""
    ops = _INSTR.findall(sass)
    dots: dict[str, int] = {}
    atomics = fenced = 0
    last_atomic = -1
    for i, op in enumerate(ops):
        if _DOT.match(op):
            form = ".".join(op.split(".")[:4])
            dots[form] = dots.get(form, 0) + 1
        elif _ATOMIC.match(op):
            # A fence wraps the atomic it precedes closely, not one further on past another atomic.
            atomics += 1
            fenced += any(_GPU_FENCE.match(o) for o in ops[max(last_atomic + 1, i - FENCE_WINDOW):i])
            last_atomic = i
    return {
        "hgmma": sum(n for f, n in dots.items() if "GMMA" in f),
        "hmma": sum(n for f, n in dots.items() if f.startswith(("HMMA", "IMMA"))),
        "dot_forms": dict(sorted(dots.items())),
        "atomics": atomics,
        "fenced_atomics": fenced,
        "fences": sum(1 for o in ops if _GPU_FENCE.match(o)),
        "local_stores": sum(1 for o in ops if o.startswith("STL")),
        "local_loads": sum(1 for o in ops if o.startswith("LDL")),
        "loop_local": loop_local_accesses(sass),  # of those, inside a loop
        "ffma": sum(1 for o in ops if o.startswith("FFMA")),
        "async_copies": sum(1 for o in ops if o.startswith("LDGSTS")),  # cp.async global -> shared (sm_80+)
        "instructions": len(ops),
        "loops": loop_sizes(sass),
    }


# ---- the properties ------------------------------------------------------------------------------------------------
PROPERTIES = ("tensor_cores", "no_spills", "fits", "no_fenced_atomics")


def evaluate(k: dict, needs_tensor_cores: bool | None) -> dict[str, str]:
    """{property: "ok" | "n/a: why" | "FAIL: what"} for one compiled kernel `k` (keys: stack, hgmma, hmma,
    local_stores, local_loads, ctas_per_sm, fenced_atomics); needs_tensor_cores None means not checked."""
    out = {}
    if needs_tensor_cores is None:
        out["tensor_cores"] = "n/a: " + k.get("dot_kind", "no tensor-core dot required")
    elif not needs_tensor_cores:
        out["tensor_cores"] = "n/a: " + k.get("dot_kind", "no dot")
    elif k["hmma"] or not k["hgmma"]:
        out["tensor_cores"] = f"FAIL: {k['hmma']} mma.sync (HMMA), {k['hgmma']} wgmma (HGMMA)"
    else:
        out["tensor_cores"] = "ok"
    spill = [f"{n} {k[key]}" for n, key in (("stack", "stack"), ("spill stores", "spill_stores"),
                                             ("spill loads", "spill_loads"), ("STL", "local_stores"),
                                             ("LDL", "local_loads")) if k.get(key)]
    out["no_spills"] = "FAIL: " + ", ".join(spill) if spill else "ok"
    out["fits"] = "ok" if k["ctas_per_sm"] >= 1 else f"FAIL: 0 CTAs per SM ({k['limiter']})"
    out["no_fenced_atomics"] = f"FAIL: {k['fenced_atomics']} of {k['atomics']}" if k["fenced_atomics"] else "ok"
    return out


def apply_allow(kernel: dict, status: dict, allow: list[dict], used: set) -> dict:
    """Replaces a FAIL by "allowed: reason" where an allow-list entry matches the kernel name (regex, full match), the
    dtype (if the entry names dtypes), the head dim (if it names them), for fenced atomics the count (at most
    `max`) and, for an `outside_loops` spill entry, no STL/LDL inside a loop and a stack of at most `max_stack` bytes.
    Records the indices of the entries used."""
    out = dict(status)
    for i, e in enumerate(allow):
        prop = e["property"]
        if not out.get(prop, "").startswith("FAIL"):
            continue
        if not re.fullmatch(e["kernel"], kernel["name"]):
            continue
        if "dtypes" in e and kernel.get("dtype") not in e["dtypes"]:
            continue
        if "head_dims" in e and kernel.get("head_dim") not in e["head_dims"]:
            continue
        if "max" in e and kernel.get(prop.replace("no_", ""), 0) > e["max"]:
            continue
        if e.get("outside_loops") and (kernel.get("loop_local") is None or kernel["loop_local"] > 0
                                       or kernel.get("stack", 0) > e.get("max_stack", 0)):
            continue  # a spill entry that holds only while no spill sits inside a loop (and the stack stays small)
        out[prop] = f"allowed: {e['reason']}"
        used.add(i)
    return out


REDESIGN = "being redesigned (issue 14 point 3)"

# Triton kernels at their default configs. Kernels without tl.dot, or with IEEE fp32 dots only, need no entry for
# tensor_cores: the check reads the dots from the TTIR and does not apply to them.
TRITON_ALLOW = [
    {"kernel": "_gram_bwd_kernel", "property": "no_spills", "dtypes": ["tf32"], "outside_loops": True,
     "max_stack": 160,
     "reason": "fp32 input under TF32: two 128x128 fp32 accumulators (two row blocks per program share each x̂ tile) "
               "and the fp32 x tiles of the normalize-backward epilogue leave 88-136 B of stack; every STL/LDL is "
               "outside the K loops (checked), a one-time cost per program against half the x̂ traffic of one block"},
    # The KoLeo and attention entries of the kernels before the issue-14 rewrites (mma.sync KoLeo search at BLOCK_M=32,
    # its acq_rel completion counter, attention spills and sub-64-row backward tiles) matched nothing after the
    # rewrites merged and were removed; so were the attention backward's TF32 entries (mma.sync at Dh 128, 104 B of
    # spill at Dh 64 on Triton 3.6) once K came pre-rotated and TF32 at Dh 128 took the split backward.
]

# CUDA kernels (every instantiation in csrc/*.cu, sm_90a), matched against the demangled name.
CUDA_ALLOW = [
    {"kernel": r".*koleo_finish_kernel.*", "property": "no_fenced_atomics", "max": 1,
     "reason": "one __threadfence + atomicAdd completion counter per CTA of the merge-and-distance kernel (the last "
               "CTA sums the partial losses, the classic threadFenceReduction pattern): one fence per CTA, not per "
               "element"},
]
