"""The speed and memory goals of issue 14, checked against a run's measurements.

    python benchmarks/goals.py benchmarks/results/<gpu>/<run>/results.json

run_all.py writes the verdicts into results.json ("goals") and results.md. Each goal is checked per benchmark shape
it covers, for the fastest of the package's backends there (what "auto" takes once the run's measurements order the
auto table), with every package backend's value beside it. A backend whose result was further than 5 % from float64
(roofline.MAX_MEASURED_ERROR) does not count. Verdicts: "met", "MISSED", or "not measured" with the reason (a
baseline or every backend missing, failed or cut by the time budget). Forward+backward passes throughout, as training
runs them.

The goals (issue 14, "Goals"):
  Gram       fp32 features at P >= 1024: >= 3x the official path as run (TF32 on) and >= 1.5x its torch.compile;
             peak memory <= 1/4 of the official path's; bf16 features at P >= 1024: >= 40 % of the bf16 tensor-core
             peak (the datasheet's dense rate, 989 TFLOP/s on the H100/H200 SXM; the useful-FLOP formula)
  KoLeo      never slower than the official path at any n; O(n·d) memory (peak memory grows no faster than 1.5x the
             growth of n between the smallest and largest n of a width); >= 3x the official path at n >= 8192
  attention  >= 1.5x the official eager path at N <= 261, >= 1.2x at N = 1029; >= 0.95x SDPA without RoPE (the faster
             of its flash and cuDNN kernels) at every N
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import roofline

PACKAGE = ("composed", "triton", "cuda")
BF16_PEAK_TFLOPS = roofline.H200.tflops["bf16"]  # dense, datasheet; the H100 SXM's is the same
SDPA = ("sdpa_flash", "sdpa_cudnn")


def _shapes(records, op: str, dtype: str) -> dict:
    """shape -> {backend: record} over the forward+backward records of op and dtype that ran and are accurate."""
    out: dict = {}
    for r in records:
        if r.get("op") != op or r.get("dtype") != dtype or r.get("pass") != "fwd+bwd":
            continue
        entry = out.setdefault(r["shape"], {"params": r.get("params") or {}, "ok": {}, "not_ok": {}})
        if r.get("status") == "ok" and r.get("median_ms"):
            if r.get("error") is not None and r["error"] > roofline.MAX_MEASURED_ERROR:
                entry["not_ok"][r["backend"]] = f"error {r['error']:.2g}"
            else:
                entry["ok"][r["backend"]] = r
        else:
            entry["not_ok"][r["backend"]] = r.get("status") or "?"
    return out


def _row(goal, shape, dtype, target, values: dict, higher_is_better=True, unit="x") -> dict:
    """One verdict for the best of `values` (each package backend's value; None where it did not run)."""
    have = {b: v for b, v in values.items() if v is not None}
    row = dict(goal=goal, shape=shape, dtype=dtype, target=target, unit=unit,
               values={b: round(v, 4) for b, v in have.items()})
    if not have:
        return dict(row, verdict="not measured", best=None, value=None,
                    reason="no package backend ran accurately at this shape")
    best = max(have, key=have.get) if higher_is_better else min(have, key=have.get)
    ok = have[best] >= target if higher_is_better else have[best] <= target
    return dict(row, verdict="met" if ok else "MISSED", best=best, value=round(have[best], 4))


def _not_measured(goal, shape, dtype, target, unit, reason) -> dict:
    return dict(goal=goal, shape=shape, dtype=dtype, target=target, unit=unit, values={}, verdict="not measured",
                best=None, value=None, reason=reason)


def _fastest(entry) -> Optional[str]:
    got = {b: r["median_ms"] for b, r in entry["ok"].items() if b in PACKAGE}
    return min(got, key=got.get) if got else None


def _speedups(goal, dtype, target, shapes: dict, baseline, keep) -> list:
    rows = []
    for shape, e in shapes.items():
        if not keep(e["params"]):
            continue
        names = (baseline,) if isinstance(baseline, str) else tuple(baseline)
        bases = [b for b in names if b in e["ok"]]
        if not bases:
            rows.append(_not_measured(goal, shape, dtype, target, "x", f"no accurate {' or '.join(names)} measurement"))
            continue
        base_ms = min(e["ok"][b]["median_ms"] for b in bases)
        values = {b: (base_ms / e["ok"][b]["median_ms"] if b in e["ok"] else None) for b in PACKAGE}
        rows.append(_row(goal, shape, dtype, target, values))
    return rows


def evaluate(records: list) -> list:
    """Every goal's verdict per benchmark shape it covers (see the module docstring)."""
    rows: list = []
    gram32 = _shapes(records, "gram_loss", "float32")
    big = lambda p: p.get("P", 0) >= 1024  # noqa: E731
    rows += _speedups("Gram >= 3x official (TF32 on), P >= 1024", "float32", 3.0, gram32, "official_tf32", big)
    rows += _speedups("Gram >= 1.5x official's torch.compile, P >= 1024", "float32", 1.5, gram32, "compile", big)
    for shape, e in gram32.items():
        if not big(e["params"]):
            continue
        goal = "Gram peak memory <= 1/4 of official, P >= 1024"
        off = e["ok"].get("official_tf32")
        fastest = _fastest(e)
        if off is None or not off.get("peak_mb"):
            rows.append(_not_measured(goal, shape, "float32", 0.25, "of official", "no peak memory of the official path"))
            continue
        values = {b: e["ok"][b]["peak_mb"] / off["peak_mb"] for b in PACKAGE
                  if b in e["ok"] and e["ok"][b].get("peak_mb") is not None}
        if fastest not in values:
            rows.append(_not_measured(goal, shape, "float32", 0.25, "of official", "no package backend's peak memory"))
            continue
        # The memory of the backend "auto" takes (the fastest), not of the leanest one.
        rows.append(dict(goal=goal, shape=shape, dtype="float32", target=0.25, unit="of official",
                         values={b: round(v, 4) for b, v in values.items()},
                         verdict="met" if values[fastest] <= 0.25 else "MISSED", best=fastest,
                         value=round(values[fastest], 4)))
    for shape, e in _shapes(records, "gram_loss", "bfloat16").items():
        if not big(e["params"]):
            continue
        values = {b: (e["ok"][b]["tflops"] / BF16_PEAK_TFLOPS if b in e["ok"] and e["ok"][b].get("tflops") else None)
                  for b in PACKAGE}
        rows.append(_row(f"Gram >= 40 % of bf16 peak ({BF16_PEAK_TFLOPS:g} TFLOP/s), P >= 1024", shape, "bfloat16",
                         0.40, values, unit="of peak"))

    koleo = _shapes(records, "koleo_loss", "float32")
    rows += _speedups("KoLeo never slower than official (TF32 on)", "float32", 1.0, koleo, "official_tf32",
                      lambda p: True)
    rows += _speedups("KoLeo >= 3x official (TF32 on), n >= 8192", "float32", 3.0, koleo, "official_tf32",
                      lambda p: p.get("n", 0) >= 8192)
    widths: dict = {}
    for shape, e in koleo.items():
        fastest = _fastest(e)
        if fastest is not None and e["ok"][fastest].get("peak_mb"):
            widths.setdefault(e["params"]["d"], []).append((e["params"]["n"], fastest, e["ok"][fastest]["peak_mb"]))
    for d, points in sorted(widths.items()):
        if len(points) < 2:
            continue
        (n0, b0, m0), (n1, b1, m1) = min(points), max(points)
        growth, allowed = m1 / m0, 1.5 * n1 / n0
        rows.append(dict(goal="KoLeo O(n·d) memory: peak grows <= 1.5x as fast as n", shape=f"d={d}, n {n0} -> {n1}",
                         dtype="float32", target=round(allowed, 4), unit="x growth",
                         values={f"{b0} at n={n0} (MiB)": round(m0, 2), f"{b1} at n={n1} (MiB)": round(m1, 2)},
                         verdict="met" if growth <= allowed else "MISSED", best=b1, value=round(growth, 4)))

    # Attention in the dtype the run used (bf16 on the GPU; the interpreter of a dry run is fp32-only).
    for dtype in sorted({r.get("dtype") for r in records if r.get("op") == "rope_attention"}):
        attn = _shapes(records, "rope_attention", dtype)
        rows += _speedups("attention >= 1.5x official eager, N <= 261", dtype, 1.5, attn, "official",
                          lambda p: p.get("N", 0) <= 261)
        rows += _speedups("attention >= 1.2x official eager, N = 1029", dtype, 1.2, attn, "official",
                          lambda p: p.get("N") == 1029)
        rows += _speedups("attention >= 0.95x SDPA without RoPE", dtype, 0.95, attn, SDPA, lambda p: True)
    return rows


def summary(rows: list) -> str:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("met", "MISSED", "not measured")}
    return f"{counts['met']} met, {counts['MISSED']} missed, {counts['not measured']} not measured"


def markdown(rows: list, dry: bool = False) -> list:
    lines = ["## Issue 14's goals, measured", ""]
    if dry:
        lines += ["**Dry run: CPU times at tiny shapes. These verdicts only show that the check runs.**", ""]
    lines += [f"{summary(rows)}. Per shape the fastest accurate package backend (what \"auto\" takes once this run "
              "orders the table), every package backend beside it. Definitions: `benchmarks/goals.py`.", "",
              "| goal | shape | dtype | target | verdict | best | value | all backends |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        values = ", ".join(f"{b} {v:.3g}" for b, v in r["values"].items()) or r.get("reason", "")
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        lines.append(f"| {r['goal']} | {r['shape']} | {r['dtype']} | {r['target']:g} {r['unit']} | {r['verdict']} | "
                     f"{r['best'] or '-'} | {value} | {values} |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a results.json written by benchmarks/run_all.py")
    args = p.parse_args(argv)
    try:
        with open(args.results) as f:
            data = json.load(f)
        records = data["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"goals.py: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(markdown(evaluate(records), dry=bool(data.get("dry_run")))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
