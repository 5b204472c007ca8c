"""Compiles every Triton kernel for a GPU target on a machine without one, at the configurations the GPU path uses.

The interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) checks what a kernel computes, not that it
compiles: tl.dot shape and dtype rules, layouts, shared memory and the PTX/ptxas stages only run in a real compile.
This runs the real launchers (dinov3_kernels/_triton/*.py) on CPU tensors with the GPU branch of every host-side
choice (block sizes, every autotune config, TF32), but with a stand-in Triton driver that reports a GPU target and a
JIT that compiles down to a cubin (Triton's own ptxas) without launching anything. It prints one line per compiled
kernel (name, target, dtype, config, shared memory; with the cuobjdump Triton ships: registers, spill stack, atomics
and the fences before them, wgmma/mma.sync dots, CTAs per SM) and the checks of compile_checks.py at each launch's
default config (the launcher's choice or the first autotune candidate): wgmma for 16-bit/TF32 dots, no spills, fits an
SM, no fenced atomics, with its allow-list. Exits non-zero on any compile error, and with --check on a failed check.
--json / --md write the report (benchmarks/results/compile/ holds the committed ones). Used by
tests/kernels/test_triton_compile.py; run it by hand as

    python tests/kernels/triton_compile.py [--arch 90] [--quick | --full] [--ops ...] [--dtypes ...] [--check]
        [--json PATH] [--md PATH]

`--full` compiles the whole matrix (every dtype x head dim x autotune config), the default bf16/fp32/tf32 at head dims
64 and 128 with every autotune config, `--quick` the subset CI compiles (bf16/fp32/tf32, head dim 64, first autotune
candidate: about 100 s of CPU without Triton's cache).
Works on Triton 3.6 and 3.9. Must run in a fresh process: TRITON_INTERPRET must be unset before triton is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile.py: unset TRITON_INTERPRET (this compiles for a GPU target instead of interpreting)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compile_checks  # noqa: E402


class _CompileOnlyDriver:
    """What JITFunction.run asks of the active driver before it compiles; nothing here touches a device."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: list[dict] = []  # one entry per compiled kernel variant
_CONTEXT: dict = {"candidate": 0}  # op, dtype, head dim (attention) or shape (KoLeo) of the launches being compiled;
# autotune candidate index
_QUICK = False  # --quick: only the first autotune candidate of each launch
_JIT_RUN = JITFunction.run  # the real compile-and-launch, called with warmup=True
_DOT = re.compile(r"tt\.dot [^:]*?(?:inputPrecision = (\w+) )?: tensor<[0-9x]*x(\w+)>")


def _dots(ttir: str) -> tuple[bool | None, str]:
    """(whether the kernel's dots must run on tensor cores, what they are), from the TTIR (after inlining, so the
    dots of called @triton.jit helpers count): 16-bit/8-bit operands or TF32 precision need tensor cores; IEEE fp32
    dots are FMA by design; no tt.dot at all, nothing to check."""
    dots = {(prec or "ieee", ty) for prec, ty in _DOT.findall(ttir)}
    if not dots:
        return None, "no tl.dot"
    tc = sorted(f"{ty}" if ty != "f32" else prec for prec, ty in dots if ty != "f32" or prec != "ieee")
    if not tc:
        return False, "IEEE fp32 dots (FMA)"
    return True, "dots on " + "/".join(tc)


def _machine_facts(kernel) -> dict:
    """Registers per thread and local-memory stack of the compiled cubin (cuobjdump -res-usage) and what its SASS
    holds (compile_checks.sass_facts), from the cuobjdump Triton ships (or one on PATH); {} if there is none."""
    tool = compile_checks.nvidia_tool("cuobjdump")
    cubin = kernel.asm.get("cubin") if hasattr(kernel, "asm") else None
    if tool is None or not cubin:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = compile_checks.run_tool(tool, ["-res-usage"], path=f.name)
        sass = compile_checks.run_tool(tool, ["-sass"], path=f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", res, re.S)
    if not m:
        return {}
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), **compile_checks.sass_facts(sass)}


def _jit_run(self, *args, grid, warmup, **kwargs):
    t0 = time.perf_counter()
    kernel = _JIT_RUN(self, *args, grid=grid, warmup=True, **kwargs)  # compile, never launch
    seconds = time.perf_counter() - t0
    meta = {k: kwargs[k] for k in sorted(kwargs) if k.isupper() and k.startswith("BLOCK")}
    md = kernel.metadata
    asm = kernel.asm if hasattr(kernel, "asm") else {}
    ptx = asm.get("ptx", "")
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no-mma"
    needs_tc, dot_kind = _dots(asm.get("ttir", ""))
    COMPILED.append(dict(name=self.fn.__name__, **_CONTEXT, blocks=meta, warps=md.num_warps, stages=md.num_stages,
                         shared=md.shared, mma=mma, needs_tensor_cores=needs_tc, dot_kind=dot_kind,
                         **_machine_facts(kernel), seconds=seconds))
    return kernel


def _autotuner_run(self, *args, **kwargs):
    """Every config the autotuner would time, compiled (pruned as the autotuner prunes them); with --quick the first.
    The first is the default the checks hold to (candidate 0), as is a launcher's own choice without autotuning."""
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs)
    try:
        for i, config in enumerate(configs[:1] if _QUICK else configs):
            _CONTEXT["candidate"] = i
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
    finally:
        _CONTEXT["candidate"] = 0


def _install(arch: int, tf32: list[bool]):
    from dinov3_kernels._triton import attention, gram, head_loss, koleo

    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = _jit_run
    Autotuner.run = _autotuner_run

    # The GPU branch of every host-side choice the launchers make from the tensors' device.
    def gpu_precision(x):
        fp32 = x.dtype == torch.float32
        return fp32, ("tf32" if fp32 and tf32[0] else "ieee")

    for mod in (attention, gram, koleo, head_loss):
        mod.dot_precision = gpu_precision
    gram_blocks, koleo_blocks, attn_launch = gram._block_sizes, koleo._block_sizes, attention._launch
    gram._block_sizes = lambda P, D, on_cpu, *a: gram_blocks(P, D, False, *a)
    gram._sm = lambda t: arch
    koleo._block_sizes = lambda n, D, on_cpu, is_fp32, *a: koleo_blocks(n, D, False, is_fp32, *a)
    koleo_sym = koleo._symmetric_sizes
    koleo._symmetric_sizes = lambda n, kcp, on_cpu: koleo_sym(n, kcp, False)
    attention._launch = lambda tuned, raw, tile, N, B, H, on_cpu, *a, **m: attn_launch(tuned, raw, tile, N, B, H,
                                                                                         False, *a, **m)
    row_pass = attention._row_pass
    attention._row_pass = lambda B, H, N, head_dim, on_cpu: row_pass(B, H, N, head_dim, False)
    head_config = head_loss._config
    head_loss._config = lambda z, D, p, **kw: head_config(torch.empty(0, dtype=z.dtype, device="meta"), D, p, **kw)


# label -> (dtype, tf32)
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
          "tf32": (torch.float32, True)}
OPS = ("gram", "koleo", "attention", "head")


def compile_all(arch: int, full: bool, dtypes=None, ops=OPS, head_dims=None) -> None:
    tf32 = [False]
    _install(arch, tf32)
    from dinov3_kernels._triton import attention, gram, head_loss, koleo

    dtypes = dtypes or (list(DTYPES) if full else ["bf16", "fp32", "tf32"])
    for label in dtypes:
        dtype, tf32[0] = DTYPES[label]
        _CONTEXT.update(op="gram", dtype=label, head_dim=None, shape=None)
        for P, D in (((200, 384), (261, 1024)) if full else ((200, 384),)) if "gram" in ops else ():
            s = torch.randn(2, P, D).to(dtype)
            t = torch.randn(2, P, D).to(dtype)
            gram.gram_fwd_triton(s, t, apply_norm=True, clamp_s=False, clamp_t=False, grad_s=True, grad_t=False)
            gram.gram_fwd_triton(s, t, apply_norm=False, clamp_s=True, clamp_t=True, grad_s=True, grad_t=True)
        # The factored form's row passes (its products are cuBLAS GEMMs): Z in fp16 for 16-bit input and under TF32,
        # fp32 otherwise; whole rows up to 4096 columns, chunks beyond (D = 5000).
        for P, D in ((200, 384), (50, 5000)) if "gram" in ops else ():
            s = torch.randn(2, P, D).to(dtype)
            z = torch.empty(2, P, 2 * D, dtype=torch.float32 if label == "fp32" else torch.float16)
            nrm = gram.gram_sum_diff_triton(s, s, z, apply_norm=True)
            gram.gram_norm_backward_triton(s, torch.randn(2, P, D), nrm[:, 0], torch.ones(()), apply_norm=True)
            k = [torch.randn(2, 384, 384) for _ in range(3)]
            gram.gram_factored_dd_triton(*k, torch.ones(()), z.dtype, want_s=True, want_t=True)

        _CONTEXT.update(op="koleo", head_dim=None, shape=None)
        # d <= 384 below 4096 rows takes the resident search, larger d (or n) the chunked one, or from 4096 rows (the
        # whole set searched, offset 0) possibly the symmetric one: both are compiled there, whichever is the default
        # (symmetric tiles 128 x 128 for lists of <= 16 slots, 128 x 64 for 32: fp32 topk 9).
        koleo_shapes = ((64, 384, 1), (64, 1024, 1), (9000, 1024, 4), (64, 160, 1), (9000, 1024, 1), (9000, 1024, 9),
                        (4500, 100, 1))  # d = 100: rows not 16-byte aligned unless the launcher pads them
        koleo_shapes += ((9000, 384, 4),) if full else ()
        for n, D, topk in koleo_shapes if "koleo" in ops else ():
            _CONTEXT["shape"] = f"n={n} d={D} topk={topk}"  # (the report's JSON: which launch a kernel came from)
            x = torch.randn(n, D).to(dtype)
            if n >= koleo.SYMMETRIC_MIN_ROWS:
                koleo.koleo_fwd_triton(x, 0, n, topk, 1e-8, 1e-8, symmetric=False)
            loss, idx, dist, norm = koleo.koleo_fwd_triton(x, 0, n, topk, 1e-8, 1e-8,
                                                           symmetric=True if n >= koleo.SYMMETRIC_MIN_ROWS else None)
            idx.zero_()
            dist.fill_(1.0)
            koleo.koleo_bwd_triton(torch.ones(()), x, idx, dist, norm, 0, n, 1e-8, 1e-8)
            koleo.candidate_dots_triton(x.float(), 0, n, torch.zeros((n, topk + 8), dtype=torch.int64))  # composed

        _CONTEXT.update(op="head", head_dim=None, shape=None)
        # DINO (10 student crops against 2 teacher crops of 7 images) at the bottleneck widths of the official
        # configs; the loss kernels do not depend on K beyond its masks.
        for D in ((256, 384, 512) if full else (256,)) if "head" in ops else ():
            zs, zt = torch.randn(70, D).to(dtype), torch.randn(14, D).to(dtype)
            Ws, Wt = torch.randn(1000, D).to(dtype), torch.randn(1000, D).to(dtype)
            bias, none = torch.randn(1000), torch.empty(0)
            head_loss.head_col_lse_triton(zt, Wt, none, none, 20.0)
            head_loss.head_col_lse_triton(zt, Wt, bias, torch.randn(14), 20.0)
            lse = head_loss.head_row_lse_triton(zt, Wt, bias, 20.0)
            pw = torch.rand(70, 2)
            _, slse = head_loss.head_ce_fwd_triton(zs, Ws, zt, Wt, bias, lse, pw, 10.0, 20.0)
            head_loss.head_ce_bwd_triton(torch.ones(70), zs, Ws, zt, Wt, bias, lse, pw, slse, 10.0, 20.0, True, True)

        _CONTEXT.update(op="attention", shape=None)
        dims = head_dims or ((64, 128, 80, 256) if full else (64, 128))
        # The split backward (attention._split_bwd) serves TF32 at Dh 128 only: compiled there when Dh 128 is not in
        # the list (--quick), so that every kernel is compiled and checked.
        extra = [(128, False)] if label == "tf32" and 128 not in dims else []
        for Dh, fwd in [(d, True) for d in dims] + extra if "attention" in ops else ():
            _CONTEXT["head_dim"] = Dh
            H, prefix, hw = 2, 5, 196
            N = prefix + hw
            qkv = torch.randn(1, N, 3 * H * Dh).to(dtype)
            sin = torch.randn(hw, Dh)
            cos = torch.randn(hw, Dh)
            if fwd:
                out, lse = attention.rope_attention_fwd_triton(qkv, sin, cos, H, prefix, Dh ** -0.5)
            else:
                out, lse = torch.randn(1, N, H * Dh).to(dtype), torch.randn(1, H, N)
            attention.rope_attention_bwd_triton(qkv, sin, cos, out, lse, torch.randn_like(out), H, prefix, Dh ** -0.5)
            if Dh == 64:  # apply_rope and the composed backend's passes, with tied sin/cos halves
                q = torch.randn(1, H, N, Dh).to(dtype)
                half_sin, half_cos = sin[:, : Dh // 2].contiguous(), cos[:, : Dh // 2].contiguous()
                attention.apply_rope_triton(q, q.clone(), half_sin, half_cos, prefix)
                attention.rope_qkv_split_triton(qkv, half_sin, half_cos, H, prefix)
                attention.rope_qkv_merge_triton(q, q.clone(), q.clone(), half_sin, half_cos, prefix)


def _check(arch: int, smem_limit: int) -> list[dict]:
    """Adds occupancy and the property statuses (compile_checks) to every compiled kernel; returns the rows."""
    lim = dict(compile_checks.LIMITS[arch], smem_per_cta=smem_limit)
    used: set = set()
    for c in COMPILED:
        c["default"] = c["candidate"] == 0
        c["ctas_per_sm"], c["limiter"] = compile_checks.ctas_per_sm(c["warps"] * 32, c.get("regs"), c["shared"], lim)
        if "regs" not in c:  # no cuobjdump: only what the compiler's metadata says
            c["status"] = {"fits": "ok" if c["ctas_per_sm"] else f"FAIL: 0 CTAs per SM ({c['limiter']})"}
            continue
        needs = c["needs_tensor_cores"] if arch >= 90 else None  # wgmma exists from sm_90 on
        status = compile_checks.evaluate(c, needs)
        c["status"] = compile_checks.apply_allow(c, status, compile_checks.TRITON_ALLOW, used) if c["default"] \
            else status
    return [e for i, e in enumerate(compile_checks.TRITON_ALLOW) if i not in used]


def _line(arch: int, c: dict) -> str:
    res = (f"regs {c['regs']} stack {c['stack']} atomics {c['atomics']} fences {c['fences']} "
           f"fenced {c['fenced_atomics']} hgmma {c['hgmma']} hmma {c['hmma']} ") if "regs" in c else ""
    fails = [f"{p} {s}" for p, s in c["status"].items() if s.startswith("FAIL")]
    allowed = [p for p, s in c["status"].items() if s.startswith("allowed")]
    verdict = ("FAIL " + "; ".join(fails)) if fails else "checks ok" + (f" (allowed: {', '.join(allowed)})"
                                                                        if allowed else "")
    if not c["default"]:
        verdict = f"candidate {c['candidate']} (not checked)" + (": " + "; ".join(fails) if fails else "")
    return (f"ok sm_{arch} {c['op']:9s} {c['dtype']:4s} {c['name']:34s} Dh {c['head_dim']} {c['blocks']} "
            f"warps {c['warps']} stages {c['stages']} smem {c['shared']} {res}{c['mma']} "
            f"ctas/sm {c['ctas_per_sm']} ({c['limiter']}) {verdict} ({c['seconds']:.1f} s)")


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(HERE))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"], capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _markdown(report: dict) -> str:
    m = report["meta"]
    out = [f"# Triton kernels compiled for sm_{m['arch']} without a GPU",
           "",
           f"{m['date']}, commit {m['commit']}, triton {m['triton']}, torch {m['torch']}; "
           f"`{m['command']}` ({m['seconds']:.0f} s on the 2-core CPU machine). Compile-time facts only: no timing.",
           "",
           "Properties (tests/kernels/compile_checks.py) are held at each launch's default config (the launcher's "
           "choice or the first autotune candidate, **bold**); other candidates are reported, not checked. "
           "tc = tensor cores (dots on 16-bit/TF32 operands compile to wgmma), spill = no local memory, "
           "fit = at least one CTA per SM, fence = no GPU-scope MEMBAR before an atomic. "
           "CTAs/SM from shared memory + 1 KB, registers x threads and the sm_90 limits "
           "(228 KB smem, 64K registers, 32 CTAs, 2048 threads per SM).",
           "",
           "| op | dtype | Dh | kernel | config | warps | stages | smem B | regs | stack | CTAs/SM | dots (SASS) | "
           "atomics (fenced) | tc | spill | fit | fence |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(s):
        return "ok" if s == "ok" else "n/a" if s.startswith("n/a") else "allowed" if s.startswith("allowed") \
            else "**FAIL**"

    for c in report["kernels"]:
        name = f"**{c['name']}**" if c["default"] else c["name"]
        cfg = " ".join(f"{k.replace('BLOCK_', '').replace('BLOCK', 'B')}={v}" for k, v in c["blocks"].items())
        dots = ", ".join(f"{f} x{n}" for f, n in c.get("dot_forms", {}).items()) or c["dot_kind"]
        st = c["status"]
        out.append(f"| {c['op']} | {c['dtype']} | {c['head_dim'] or ''} | {name} | {cfg} | {c['warps']} | "
                   f"{c['stages']} | {c['shared']} | {c.get('regs', '?')} | {c.get('stack', '?')} | "
                   f"{c['ctas_per_sm']} ({c['limiter']}) | {dots} | {c.get('atomics', '?')} "
                   f"({c.get('fenced_atomics', '?')}) | "
                   + " | ".join(cell(st.get(p, "n/a")) for p in compile_checks.PROPERTIES) + " |")
    allowed = sorted({(c["name"], p, s) for c in report["kernels"] for p, s in c["status"].items()
                      if s.startswith("allowed")})
    counts = {a: sum(1 for c in report["kernels"] if c["name"] == a[0] and c["status"].get(a[1]) == a[2])
              for a in allowed}
    out += ["", "## Allowed (default configs that lack a property, and why)", ""]
    out += [f"- `{n}` {p} ({counts[(n, p, s)]} launches): {s[len('allowed: '):]}" for n, p, s in allowed] or [
        "- none"]
    fails = [f"- `{c['name']}` ({c['dtype']}, Dh {c['head_dim']}) {p}: {s}" for c in report["kernels"]
             if c["default"] for p, s in c["status"].items() if s.startswith("FAIL")]
    out += ["", "## Failures at default configs", ""] + (fails or ["- none"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(compile_checks.LIMITS),
                    help="compute capability x10 (80: A100, 90: H100/H200)")
    ap.add_argument("--smem-limit", type=int, default=None,
                    help="bytes of shared memory a block may use (default: 232448 for sm_90, 166912 for sm_80)")
    ap.add_argument("--full", action="store_true", help="every dtype, head dim and autotune config")
    ap.add_argument("--quick", action="store_true",
                    help="what CI compiles: bf16, fp32 and TF32, head dim 64, the first autotune config of each kernel")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="only these input dtypes")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=OPS, help="only these ops")
    ap.add_argument("--head-dims", nargs="+", type=int, help="attention head dims")
    ap.add_argument("--check", action="store_true",
                    help="exit non-zero when a default config lacks a property the allow-list does not excuse")
    ap.add_argument("--json", metavar="PATH", help="write the report (every kernel, facts and checks) as JSON")
    ap.add_argument("--md", metavar="PATH", help="write the report as a markdown table")
    args = ap.parse_args(argv)
    if any(d % 16 or not 16 <= d <= 256 for d in args.head_dims or ()):
        ap.error(f"--head-dims: the triton attention takes multiples of 16 from 16 to 256, got {args.head_dims}")
    if args.quick:
        global _QUICK
        _QUICK = True
        args.dtypes, args.head_dims = args.dtypes or ["bf16", "fp32", "tf32"], args.head_dims or [64]
    t0 = time.perf_counter()
    compile_all(args.arch, args.full, args.dtypes, args.ops, args.head_dims)
    seconds = time.perf_counter() - t0
    limit = args.smem_limit or compile_checks.LIMITS[args.arch]["smem_per_cta"]
    unused_allow = _check(args.arch, limit)
    fits: dict[tuple, bool] = {}
    for c in COMPILED:
        ok = c["shared"] <= limit
        key = (c["name"], c["dtype"], c["head_dim"])
        fits[key] = fits.get(key, False) or ok
        print(_line(args.arch, c), flush=True)
    print(f"triton {triton.__version__}: {len(COMPILED)} kernels compiled for sm_{args.arch} in {seconds:.0f} s")
    failures = [(c, p, s) for c in COMPILED if c["default"] for p, s in c["status"].items() if s.startswith("FAIL")]
    for c, p, s in failures:
        print(f"{'FAIL' if args.check else 'note'}: {c['name']} ({c['dtype']}, head_dim {c['head_dim']}, "
              f"{c['blocks']}) {p}: {s}")
    if "regs" not in (COMPILED[0] if COMPILED else {}):
        print("note: no cuobjdump found: registers, spills, dots and atomics were not read")
    cmd = "python tests/kernels/triton_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "meta": {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "commit": _git_commit(), "command": cmd.strip(),
                 "seconds": round(seconds, 1), "limits": dict(compile_checks.LIMITS[args.arch], smem_per_cta=limit),
                 "cuobjdump": compile_checks.nvidia_tool("cuobjdump"), "quick": args.quick, "full": args.full,
                 "allow_unused": unused_allow},
        "kernels": [{k: v for k, v in c.items()} for c in COMPILED],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
            f.write("\n")
    if args.md:
        with open(args.md, "w") as f:
            f.write(_markdown(report))
    # A launch whose every candidate needs more shared memory than a block may have fails on the device.
    none_fit = [key for key, ok in fits.items() if not ok]
    for name, dtype, head_dim in none_fit:
        print(f"FAIL: no config of {name} ({dtype}, head_dim {head_dim}) fits in {limit} bytes of shared memory")
    return 1 if none_fit or (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
