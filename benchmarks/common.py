"""The one benchmark harness every script uses.

Timing: a warm-up that runs until a call compiles nothing new (torch.compile, Triton's JIT and autotuning happen
there, and their time is reported separately as compile_ms), then the median of many timed calls: CUDA events with an
L2 flush between calls on a GPU, time.perf_counter on the CPU (labelled as such: CPU numbers are not GPU results).
Memory: `torch.cuda.max_memory_allocated` after a reset, minus what was allocated before the call. FLOPs and bytes
come from formulas in each script (and benchmarks/roofline.py). Errors: relative to a float64 reference. Results: one
`Record` per measurement, a printed table, JSON and markdown stamped with the device, versions, date and commit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
CPU_TIMER = "cpu perf_counter (not a GPU result)"
GPU_TIMER = "cuda events"


def has_gpu() -> bool:
    return torch.cuda.is_available()


def sync():
    if has_gpu():
        torch.cuda.synchronize()


# ---- environment ---------------------------------------------------------------------------------------------------
def _run(cmd, cwd=None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _tree_hash() -> str:
    """A short hash of the sources, for copies of the repository without .git (the device machine gets one)."""
    h = hashlib.sha256()
    for top in ("csrc", "dinov3_kernels", "dinov3", "benchmarks", "setup.py"):
        path = os.path.join(ROOT, top)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
            if f.endswith((".py", ".cu", ".cuh", ".cpp", ".h", ".sh")))
        for f in files:
            h.update(os.path.relpath(f, ROOT).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:10]


def git_commit() -> str:
    """Short commit (+ "-dirty"), else $DINOV3_COMMIT, else "tree-<hash of the sources>"."""
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT)
    if head:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT)
        return head + ("-dirty" if dirty else "")
    return os.environ.get("DINOV3_COMMIT") or f"tree-{_tree_hash()}"


def _nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {}
    fields = ["driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit",
              "temperature.gpu", "persistence_mode"]
    out = _run(["nvidia-smi", "--query-gpu=" + ",".join(fields), "--format=csv,noheader", "-i", "0"])
    if not out:
        return {}
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return {f"smi_{k.replace('.', '_')}": v for k, v in zip(fields, values)}


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import numpy

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "gpu": has_gpu(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu_count": os.cpu_count(),
    }
    if has_gpu():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, sms=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1),
                   l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                   cudnn=torch.backends.cudnn.version())
        env.update(_nvidia_smi())
        if "smi_clocks_max_sm" not in env:
            try:  # through NVML, when nvidia-smi is missing
                env["sm_clock_mhz"] = torch.cuda.clock_rate(0)
            except Exception:  # noqa: BLE001 - a missing clock is recorded as missing
                env["sm_clock_mhz"] = None
    else:
        env.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", cuda=None)
    try:
        from dinov3_kernels import available_backends

        env["backends"] = {k: (v or "ok") for k, v in available_backends().items()}
    except ImportError:
        pass
    return env


def device_slug(env: dict) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", env["device"].split("(")[0].strip()).strip("-").lower() or "device"


# ---- precision and compilation ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def tf32(enabled: bool):
    """torch.backends.cuda.matmul.allow_tf32 for the duration (the flag the official trainer sets, and the one the
    kernels read to choose TF32 for fp32 input)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def with_tf32(fn: Callable, enabled: bool) -> Callable:
    def run(*args, **kwargs):
        with tf32(enabled):
            return fn(*args, **kwargs)

    return run


def allow_recompiles(limit: int = 64):
    """Room for a benchmark's many shapes: past dynamo's recompile limit a compiled function silently falls back to
    eager, and a "compile" row would time the eager path."""
    import torch._dynamo.config as dcfg

    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dcfg, name, max(limit, getattr(dcfg, name)))


_COMPILED: dict = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), one wrapper per function for the whole run (its cache then serves every shape)."""
    allow_recompiles()
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


# ---- timing ----------------------------------------------------------------------------------------------------------
def _compile_events() -> int:
    """Frames dynamo has tried to compile so far (a call that changes this count compiled something)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["frames"]["total"])


def _host_ms(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def _agree(a: float, b: float) -> bool:
    return a <= 1.5 * b + 0.5 and b <= 1.5 * a + 0.5  # relative, with 0.5 ms for host-timer noise on tiny calls


def warm_up(fn: Callable[[], object], *, max_calls: int = 12, max_s: float = 600.0) -> list:
    """Calls fn until two consecutive calls take about the same time and the last compiled nothing new; returns each
    call's milliseconds. torch.compile (and its lazily compiled backward), recompiles for new shapes, Triton's JIT and
    autotuning all land here, never in the timed calls."""
    times: list = []
    start = time.perf_counter()
    while True:
        before = _compile_events()
        times.append(_host_ms(fn))
        compiled_now = _compile_events() != before
        if len(times) >= max_calls or time.perf_counter() - start > max_s:
            return times
        if len(times) >= 2 and not compiled_now and _agree(times[-1], times[-2]):
            return times


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    compile_ms: float  # warm-up time beyond that many steady calls: compilation, autotuning, first-call setup
    warmup_calls: int
    timer: str


_L2_FLUSH: Optional[torch.Tensor] = None


def _flush_l2():
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")  # > any L2 today
    _L2_FLUSH.zero_()


def time_fn(fn: Callable[[], object], *, rep_ms: float = 60.0, min_reps: int = 5, max_reps: int = 200,
            flush_l2: bool = True) -> Timing:
    """Warm-up (see warm_up), then n timed calls, n = rep_ms / (one call's time) within [min_reps, max_reps]."""
    warm = warm_up(fn)
    steady = min(warm[-2:])
    n = int(min(max_reps, max(min_reps, rep_ms / max(steady, 1e-3))))
    if has_gpu():
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            if flush_l2:
                _flush_l2()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        timer = GPU_TIMER
    else:
        times = [_host_ms(fn) for _ in range(n)]
        timer = CPU_TIMER
    median = statistics.median(times)
    compile_ms = max(0.0, sum(warm) - len(warm) * median)
    return Timing(median, min(times), max(times), n, compile_ms, len(warm), timer)


def peak_memory_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak extra CUDA memory of one fn() call in MiB (None on CPU)."""
    if not has_gpu():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def pass_call(forward: Callable[[], torch.Tensor], leaf: torch.Tensor, mode: str, grad_out=None) -> Callable:
    """The call one pass times: forward() for "fwd" (grad enabled, as in training); forward() and the backward into
    leaf for "fwd+bwd"."""
    if mode == "fwd":
        return forward

    def call():
        forward().backward(grad_out)
        leaf.grad = None

    return call


def pass_result(forward: Callable[[], torch.Tensor], leaf: torch.Tensor, mode: str, grad_out=None) -> torch.Tensor:
    """What the pass produces, for the comparison with float64: the output for "fwd", leaf's gradient otherwise."""
    if mode == "fwd":
        return forward().detach()
    forward().backward(grad_out)
    grad, leaf.grad = leaf.grad, None
    return grad


def rel_error(x, ref) -> float:
    """|x - ref| / |ref| in float64 (Frobenius norms, on ref's device); inf when x is not finite."""
    ref = torch.as_tensor(ref).detach().to(torch.float64)
    x = torch.as_tensor(x).detach().to(ref.device, torch.float64)
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


# ---- deadline --------------------------------------------------------------------------------------------------------
class Deadline:
    """A wall-clock limit shared by the measurements of one phase (None: no limit)."""

    def __init__(self, seconds: Optional[float] = None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0


@dataclass
class Settings:
    """How one benchmark runs: where, with which providers, how long it may take."""

    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = True
    quick: bool = False
    rep_ms: float = 60.0
    min_reps: int = 5
    max_reps: int = 200
    deadline: Deadline = field(default_factory=Deadline)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


# ---- records ---------------------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One measurement. `mode` is the pass ("fwd", "fwd+bwd", "step", ...), written as "pass" in JSON."""

    op: str
    backend: str
    shape: str
    dtype: str
    mode: str
    params: dict = field(default_factory=dict)  # the shape as numbers (roofline.py reads them)
    series: str = ""                            # plots draw one panel per series, x = size
    size: Optional[float] = None
    tf32: Optional[bool] = None
    status: str = "ok"                          # ok | failed | n/a | skipped
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    reps: Optional[int] = None
    compile_ms: Optional[float] = None
    timer: Optional[str] = None
    flops: Optional[float] = None
    bytes: Optional[float] = None               # the fewest bytes the op must move (inputs once, outputs once)
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    peak_mb: Optional[float] = None
    error: Optional[float] = None               # vs float64: forward output for "fwd", gradient for "fwd+bwd"
    predicted_ms: Optional[float] = None        # roofline.py at this machine's measured ceilings
    measured_over_predicted: Optional[float] = None
    fraction_of_ceiling: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("mode")
        return d


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip()
    return (msg.splitlines()[0] if msg else type(exc).__name__)[:200]


def measure(rec: Record, fn: Callable[[], object], settings: Settings, *, memory: bool = True,
            error: Optional[Callable[[], float]] = None) -> Record:
    """Times fn into rec (and its peak memory and error); a failure becomes the record's status, never a crash."""
    if settings.deadline.expired():
        return skipped(rec)
    try:
        t = time_fn(fn, rep_ms=settings.rep_ms, min_reps=settings.min_reps, max_reps=settings.max_reps)
        rec.median_ms, rec.min_ms, rec.max_ms, rec.reps = t.median_ms, t.min_ms, t.max_ms, t.reps
        rec.compile_ms, rec.timer = t.compile_ms, t.timer
        rec.peak_mb = peak_memory_mb(fn) if memory else None
        if error is not None:
            rec.error = error()
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run is reported, not fatal
        rec.status, rec.note = "failed", f"failed: {_reason(exc)}"
        return rec
    secs = rec.median_ms * 1e-3
    if rec.flops:
        rec.tflops = rec.flops / secs / 1e12
    if rec.bytes:
        rec.gbps = rec.bytes / secs / 1e9
    return rec


def skipped(rec: Record) -> Record:
    rec.status, rec.note = "skipped", "not run: the time budget of the phase was used up"
    return rec


def measure_pass(rec: Record, provider, forward: Callable, leaf: torch.Tensor, settings: Settings, *,
                 grad_out=None, refs: Optional[dict] = None, check: Optional[tuple] = None) -> Record:
    """Times one pass (rec.mode) of one provider of an op.

    provider: the reason it cannot run here (an "n/a" record), or (fn, tf32 flag). forward(fn) computes the output on
    the timed inputs; leaf is the input whose gradient "fwd+bwd" produces (grad_out: the output's gradient). The error
    is against refs[pass] (float64), computed on the timed inputs or on check = (forward, leaf, grad_out) of others.
    """
    if isinstance(provider, str):
        return unavailable(rec, provider)
    fn, flag = provider
    rec.tf32 = flag
    call = pass_call(with_tf32(lambda: forward(fn), flag), leaf, rec.mode, grad_out)
    c_forward, c_leaf, c_grad = check or (forward, leaf, grad_out)
    c_call = with_tf32(lambda: c_forward(fn), flag)
    error = None if refs is None else (
        lambda: rel_error(pass_result(c_call, c_leaf, rec.mode, c_grad), refs[rec.mode]))
    return measure(rec, call, settings, error=error)


def unavailable(rec: Record, reason: str) -> Record:
    rec.status, rec.note = "n/a", f"n/a: {reason[:200]}"
    return rec


def failed(rec: Record, exc: BaseException) -> Record:
    rec.status, rec.note = "failed", f"failed: {_reason(exc)}"
    return rec


def add_speedups(records, baseline: str):
    """extra["speedup_vs_<baseline>"] = baseline ms / ms, for records of the same (op, shape, dtype, pass)."""
    base = {(r.op, r.shape, r.dtype, r.mode): r.median_ms for r in records if r.backend == baseline and r.median_ms}
    for r in records:
        b = base.get((r.op, r.shape, r.dtype, r.mode))
        if b and r.median_ms:
            r.extra["speedup_vs_" + baseline] = b / r.median_ms


# ---- ceilings --------------------------------------------------------------------------------------------------------
def measure_ceilings(settings: Settings) -> tuple:
    """The machine's two ceilings, measured (METHOD.md): a large device-to-device copy (bytes read + written) and
    square matmuls in bf16, TF32 and IEEE fp32, on random data. Returns (records, {copy_gbps, bf16_tflops, ...})."""
    gpu = settings.gpu
    nbytes = 2**31 if gpu else 2**25
    n = 8192 if gpu else 256
    dev = settings.device
    records, values = [], {}
    g = torch.Generator(device=dev).manual_seed(0)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev, generator=g)
    dst = torch.empty_like(src)
    rec = Record("ceiling", "copy", f"{nbytes / 2**30:g} GiB", "uint8", "copy", bytes=2 * nbytes, size=nbytes)
    records.append(measure(rec, lambda src=src, dst=dst: dst.copy_(src), settings, memory=False))
    values["copy_gbps"] = rec.gbps
    del src, dst
    for name, dtype, flag in (("bf16", torch.bfloat16, True), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):
        a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
        rec = Record("ceiling", f"matmul_{name}", f"{n}x{n}x{n}", str(dtype).replace("torch.", ""), "matmul",
                     flops=2.0 * n ** 3, size=n, tf32=flag)
        records.append(measure(rec, with_tf32(lambda a=a, b=b: a @ b, flag), settings, memory=False))
        values[f"{name}_tflops"] = rec.tflops
        del a, b
    if gpu:
        torch.cuda.empty_cache()
    return records, values


# ---- writing ---------------------------------------------------------------------------------------------------------
def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


COLUMNS = [("shape", "shape"), ("dtype", "dtype"), ("pass", "mode"), ("backend", "backend"), ("tf32", "tf32"),
           ("median ms", "median_ms"), ("min ms", "min_ms"), ("compile ms", "compile_ms"), ("TFLOP/s", "tflops"),
           ("GB/s", "gbps"), ("peak MiB", "peak_mb"), ("error", "error"), ("measured/predicted", None),
           ("note", "note")]


def markdown_table(records, speedup_vs: Optional[str] = None) -> str:
    cols = list(COLUMNS)
    if speedup_vs:
        cols.insert(-1, (f"speedup vs {speedup_vs}", f"speedup_vs_{speedup_vs}"))
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        cells = []
        for _, key in cols:
            if key is None:
                cells.append(fmt(r.measured_over_predicted))
            elif key.startswith("speedup_vs_"):
                cells.append(fmt(r.extra.get(key)))
            else:
                cells.append(fmt(getattr(r, key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def banner(env) -> str:
    s = (f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | cuda {env['cuda']} | "
         f"commit {env['commit']} | {env['date']}")
    if not env["gpu"]:
        s += ("\nNO GPU: small CPU shapes only. These timings are NOT GPU results and say nothing about kernel "
              "speed; the table only shows that every provider runs.")
    return s


def report(name: str, records, env: dict, args, speedup_vs: Optional[str] = None) -> None:
    """Prints the table and writes JSON + markdown (unless --no-write)."""
    if speedup_vs:
        add_speedups(records, speedup_vs)
    print(banner(env))
    print(markdown_table(records, speedup_vs))
    if getattr(args, "no_write", False):
        return
    out_dir = args.out or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    base = os.path.join(out_dir, f"{name}_{device_slug(env)}_{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"benchmark": name, "environment": env, "records": [r.to_dict() for r in records]}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# {name}\n\n{banner(env)}\n\n{markdown_table(records, speedup_vs)}\n")
    print(f"wrote {base}.json and {base}.md")


def plot_panels(records) -> list:
    """The (series, dtype, pass) rows of an op's plot, in the records' order: one line per backend in each, so that
    the same backend timed in two dtypes (the Gram loss in fp32 and bf16) never shares a line."""
    return list(dict.fromkeys((r.series, r.dtype, r.mode) for r in records))


def plot_records(records, out_dir: str, size_label: Optional[dict] = None) -> list:
    """One PNG per op: a row per (series, dtype, pass), time and peak memory against size, one line per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    size_label = size_label or {}
    written = []
    for op in dict.fromkeys(r.op for r in records if r.op != "ceiling"):
        ok = [r for r in records if r.op == op and r.median_ms and r.size is not None]
        panels = plot_panels(ok)
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.2 * len(panels)), squeeze=False)
        for (series, dtype, mode), (ax_t, ax_m) in zip(panels, axes):
            rows = [r for r in ok if (r.series, r.dtype, r.mode) == (series, dtype, mode)]
            for backend in dict.fromkeys(r.backend for r in rows):
                pts = sorted((r.size, r.median_ms, r.peak_mb) for r in rows if r.backend == backend)
                xs = [p[0] for p in pts]
                ax_t.plot(xs, [p[1] for p in pts], marker="o", label=backend)
                mem = [(x, p[2]) for x, p in zip(xs, pts) if p[2] is not None]
                if mem:
                    ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=backend)
            for ax, what in ((ax_t, "median ms"), (ax_m, "peak MiB")):
                ax.set_title(f"{op} {series} {dtype} {mode}: {what}", fontsize=9)
                ax.set_xlabel(size_label.get(op, "size"))
                if ax.lines:
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.legend(fontsize=7)
                else:
                    ax.text(0.5, 0.5, "no data (CPU: no CUDA memory)", ha="center", va="center",
                            transform=ax.transAxes)
        timer = ok[0].timer or ""
        fig.suptitle(f"{op} ({timer})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--rep-ms", type=float, default=60.0, help="timed milliseconds per measurement (>= 5 calls)")
    return p


def settings_from_args(args) -> Settings:
    return Settings(compile=not args.no_compile, quick=args.quick, rep_ms=args.rep_ms)
