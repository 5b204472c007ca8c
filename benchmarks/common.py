"""The one benchmark harness every script uses.

Timing: on CUDA, `triton.testing.do_bench` (warm-up, L2 flush, median of many runs); on CPU, perf_counter median after
warm-up. Memory: `torch.cuda.max_memory_allocated` after a reset, minus what was allocated before the call. FLOPs come
from formulas written in each script. Results: a printed table plus JSON and markdown under benchmarks/results/,
stamped with the device, versions, date and commit. On a machine without a GPU the scripts run small CPU shapes and
every output says that these are not GPU results.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def has_gpu() -> bool:
    return torch.cuda.is_available()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "gpu": has_gpu(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if has_gpu():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, sms=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2**30, 1))
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


def sync():
    if has_gpu():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of fn()."""
    if has_gpu():
        import triton.testing

        # do_bench's warmup/rep are in milliseconds of runtime; it flushes L2 between runs.
        return float(triton.testing.do_bench(fn, warmup=max(25, warmup), rep=max(100, rep), return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    provider: str
    mode: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    peak_mb: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def measure(op, shape, dtype, provider, mode, fn, *, flops=None, warmup=10, rep=50, memory=True) -> Row:
    """Times fn and records its peak memory; failures become a row with the reason (never a crash mid-table)."""
    try:
        ms = time_ms(fn, warmup=warmup, rep=rep)
        peak = peak_memory_mb(fn) if memory else None
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run is reported, not fatal
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Row(op, shape, dtype, provider, mode, note=f"failed: {msg[:120]}")
    tflops = flops / (ms * 1e-3) / 1e12 if flops else None
    return Row(op, shape, dtype, provider, mode, ms=ms, tflops=tflops, peak_mb=peak)


def unavailable(op, shape, dtype, provider, mode, reason) -> Row:
    return Row(op, shape, dtype, provider, mode, note=f"n/a: {reason[:120]}")


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def add_speedups(rows, baseline="reference"):
    """speedup = baseline ms / provider ms for rows of the same (shape, dtype, mode)."""
    base = {(r.shape, r.dtype, r.mode): r.ms for r in rows if r.provider == baseline and r.ms}
    for r in rows:
        b = base.get((r.shape, r.dtype, r.mode))
        if b and r.ms:
            r.extra["speedup_vs_" + baseline] = b / r.ms


def markdown_table(rows) -> str:
    head = "| shape | dtype | mode | provider | ms | TFLOP/s | peak MiB | speedup vs reference | note |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {_fmt(r.ms)} | {_fmt(r.tflops)} | {_fmt(r.peak_mb)}"
            f" | {_fmt(r.extra.get('speedup_vs_reference'))} | {r.note} |"
        )
    return "\n".join(lines)


def banner(env) -> str:
    where = env["device"]
    s = (f"device: {where} | torch {env['torch']} | triton {env['triton']} | cuda {env['cuda']} | "
         f"commit {env['commit']} | {env['date']}")
    if not env["gpu"]:
        s += ("\nNO GPU: small CPU shapes only. These timings are NOT GPU results and say nothing about kernel "
              "speed; the table only shows that every provider runs.")
    return s


def report(name: str, rows, env: dict, args) -> None:
    """Prints the table and writes JSON + markdown (unless --no-write)."""
    add_speedups(rows)
    print(banner(env))
    print(markdown_table(rows))
    if getattr(args, "no_write", False):
        return
    out_dir = args.out or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    base = os.path.join(out_dir, f"{name}_{device_slug(env)}_{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"benchmark": name, "environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# {name}\n\n{banner(env)}\n\n{markdown_table(rows)}\n")
    print(f"wrote {base}.json and {base}.md")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) provider")
    return p
