"""The speed and memory goals of issue 14, checked against a run's measurements.

    python benchmarks/goals.py benchmarks/results/<gpu>/<run>/results.json
    python benchmarks/goals.py --predicted      # the roofline model's verdicts (H200 datasheet), as in predicted.md

run_all.py writes the verdicts into results.json ("goals") and results.md. Each goal is checked per benchmark shape
it covers, for the fastest of the package's backends there (what "auto" takes once the run's measurements order the
auto table), with every package backend's value beside it. A backend whose result was further than 5 % from float64
(roofline.MAX_MEASURED_ERROR) does not count. Verdicts: "met", "MISSED", or "not measured" with the reason (a
baseline or every backend missing, failed or cut by the time budget). Forward+backward passes throughout, as training
runs them.

The goals (issue 14, "Goals"):
  Gram       fp32 features at P >= 1024: >= 3x the official path as run (TF32 on) and >= 1.5x its torch.compile;
             peak memory <= 1/4 of the official path's; bf16 features at P >= 1024: >= 40 % of the bf16 tensor-core
             peak (the datasheet's dense rate, 989 TFLOP/s on the H100/H200 SXM) by the FLOPs the design executes
             (roofline.py's count for the backend; the useful-FLOP formula 6·G·P²·D beside it)
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

# The package's ways of computing an op. "factored" is the Gram loss's O(P·D²) form, which gram_loss(method="auto")
# takes on tall groups (P several times D: the 1024 px shapes) whatever the backend; the other ops have no such row.
PACKAGE = ("composed", "triton", "cuda", "factored")
BF16_PEAK_TFLOPS = roofline.H200.tflops["bf16"]  # dense, datasheet; the H100 SXM's is the same
SDPA = ("sdpa_flash", "sdpa_cudnn")


def _shapes(records, op: str, dtype: str, time: str) -> dict:
    """shape -> {backend: record} over the forward+backward records of op and dtype that ran and are accurate; each
    record's r["ms"] is its `time` (median_ms, or predicted_ms for the model's verdicts)."""
    out: dict = {}
    for r in records:
        if r.get("op") != op or r.get("dtype") != dtype or r.get("pass") != "fwd+bwd":
            continue
        entry = out.setdefault(r["shape"], {"params": r.get("params") or {}, "ok": {}})
        accurate = r.get("error") is None or r["error"] <= roofline.MAX_MEASURED_ERROR
        if r.get("status") == "ok" and r.get(time) and accurate:
            entry["ok"][r["backend"]] = dict(r, ms=float(r[time]))
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
    got = {b: r["ms"] for b, r in entry["ok"].items() if b in PACKAGE}
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
        base_ms = min(e["ok"][b]["ms"] for b in bases)
        values = {b: (base_ms / e["ok"][b]["ms"] if b in e["ok"] else None) for b in PACKAGE}
        rows.append(_row(goal, shape, dtype, target, values))
    return rows


def _peak_fractions(r) -> tuple:
    """(executed, useful) fractions of the bf16 tensor-core peak at the record's time: the FLOPs its design executes
    (roofline.estimate's flops_exec: the design's count, e.g. one triangle of a symmetric product) and the useful-FLOP
    formula the benchmark reports (its flops field, 6·G·P²·D for the Gram loss, which a design exploiting symmetry
    can exceed the peak by). Either is None where unknown."""
    secs = r["ms"] * 1e-3
    est = roofline.estimate(r["op"], r["backend"], r.get("params") or {}, r["dtype"], "fwd+bwd", r.get("tf32"))
    executed = est.flops_exec / secs / 1e12 / BF16_PEAK_TFLOPS if est is not None else None
    useful = r["flops"] / secs / 1e12 / BF16_PEAK_TFLOPS if r.get("flops") else None
    return executed, useful


def evaluate(records: list, time: str = "median_ms") -> list:
    """Every goal's verdict per benchmark shape it covers (see the module docstring), by the records' measured times
    (time="median_ms") or by the roofline predictions beside them (time="predicted_ms"; the memory goals, which
    the model does not predict, are then left out)."""
    memory = time == "median_ms"
    rows: list = []
    gram32 = _shapes(records, "gram_loss", "float32", time)
    big = lambda p: p.get("P", 0) >= 1024  # noqa: E731
    rows += _speedups("Gram >= 3x official (TF32 on), P >= 1024", "float32", 3.0, gram32, "official_tf32", big)
    rows += _speedups("Gram >= 1.5x official's torch.compile, P >= 1024", "float32", 1.5, gram32, "compile", big)
    for shape, e in gram32.items():
        if not memory or not big(e["params"]):
            continue
        goal = "Gram peak memory <= 1/4 of official, P >= 1024"
        off = e["ok"].get("official_tf32")
        fastest = _fastest(e)
        if off is None or not off.get("peak_mb"):
            rows.append(_not_measured(goal, shape, "float32", 0.25, "of official",
                                      "no peak memory of the official path"))
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
    for shape, e in _shapes(records, "gram_loss", "bfloat16", time).items():
        if not big(e["params"]):
            continue
        # The verdict for the fastest backend by the FLOPs its design executes (how busy it keeps the tensor cores);
        # the useful-FLOP fraction beside it.
        fractions = {b: _peak_fractions(e["ok"][b]) for b in PACKAGE if b in e["ok"]}
        row = _row(f"Gram >= 40 % of bf16 peak ({BF16_PEAK_TFLOPS:g} TFLOP/s, executed FLOPs), P >= 1024", shape,
                   "bfloat16", 0.40, {b: f[0] for b, f in fractions.items()}, unit="of peak")
        fastest = _fastest(e)
        if fastest is not None and fractions[fastest][0] is not None:  # the backend "auto" takes, as for memory
            value = fractions[fastest][0]
            row.update(best=fastest, value=round(value, 4), verdict="met" if value >= 0.40 else "MISSED")
        useful = {b: f[1] for b, f in fractions.items() if f[1] is not None}
        if useful:
            row["note"] = "useful-FLOP formula: " + ", ".join(f"{b} {v:.3g}" for b, v in useful.items())
        rows.append(row)

    koleo = _shapes(records, "koleo_loss", "float32", time)
    rows += _speedups("KoLeo never slower than official (TF32 on)", "float32", 1.0, koleo, "official_tf32",
                      lambda p: True)
    rows += _speedups("KoLeo >= 3x official (TF32 on), n >= 8192", "float32", 3.0, koleo, "official_tf32",
                      lambda p: p.get("n", 0) >= 8192)
    widths: dict = {}
    for shape, e in (koleo if memory else {}).items():
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
        attn = _shapes(records, "rope_attention", dtype, time)
        rows += _speedups("attention >= 1.5x official eager, N <= 261", dtype, 1.5, attn, "official",
                          lambda p: p.get("N", 0) <= 261)
        rows += _speedups("attention >= 1.2x official eager, N = 1029", dtype, 1.2, attn, "official",
                          lambda p: p.get("N") == 1029)
        rows += _speedups("attention >= 0.95x SDPA without RoPE", dtype, 0.95, attn, SDPA, lambda p: True)
    return rows


def predicted_records(device: roofline.Ceilings = roofline.H200) -> list:
    """The forward+backward records a GPU run would write (run_all.py's GPU shapes and backends), each timed by the
    roofline model's prediction on `device` (datasheet ceilings) as predicted_ms: evaluate(predicted_records(),
    "predicted_ms") is the model's verdict on every goal it predicts (not memory)."""
    out = []
    for op, backends, shapes, dtype in roofline.benchmark_cases():
        for label, params in shapes:
            for backend in backends:
                est = roofline.estimate(op, backend, params, dtype, "fwd+bwd", backend != "official_fp32")
                if est is not None:
                    out.append({"op": op, "backend": backend, "dtype": dtype, "pass": "fwd+bwd", "params": params,
                                "shape": label, "status": "ok", "median_ms": None,
                                "predicted_ms": roofline.predict(est, device)["ms"], "flops": est.flops,
                                "error": None, "peak_mb": None})
    return out


def summary(rows: list) -> str:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("met", "MISSED", "not measured")}
    return f"{counts['met']} met, {counts['MISSED']} missed, {counts['not measured']} not measured"


def markdown(rows: list, dry: bool = False, predicted: Optional[list] = None,
             title: str = "## Issue 14's goals, measured") -> list:
    """The verdicts as a markdown table; `predicted` (evaluate(records, "predicted_ms")) adds the model's verdict at
    the run's measured ceilings beside each measured one."""
    lines = [title, ""]
    if dry:
        lines += ["**Dry run: CPU times at tiny shapes. These verdicts only show that the check runs.**", ""]
    model = {(r["goal"], r["shape"], r["dtype"]): r for r in predicted or []}
    lines += [f"{summary(rows)}. Per shape the fastest accurate package backend (what \"auto\" takes once the "
              "measurements order the table), every package backend beside it. Definitions: `benchmarks/goals.py`.",
              ""]
    head = "| goal | shape | dtype | target | verdict | best | value | all backends |"
    if predicted is not None:
        lines += ["The model's column: the same goal by the roofline predictions at this run's measured ceilings "
                  "(`predicted_ms` of the records).", "", head + " model |", "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        values = ", ".join(f"{b} {v:.3g}" for b, v in r["values"].items()) or r.get("reason", "")
        if r.get("note"):
            values += f"; {r['note']}"
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        line = (f"| {r['goal']} | {r['shape']} | {r['dtype']} | {r['target']:g} {r['unit']} | {r['verdict']} | "
                f"{r['best'] or '-'} | {value} | {values} |")
        if predicted is not None:
            m = model.get((r["goal"], r["shape"], r["dtype"]))
            line += (" - |" if m is None or m["value"] is None else
                     f" {m['verdict']} ({m['best']} {m['value']:.3g}) |")
        lines.append(line)
    return lines + [""]


def predicted_markdown() -> list:
    return markdown(evaluate(predicted_records(), "predicted_ms"),
                    title="## Issue 14's goals as the model predicts them (H200 datasheet; memory not modelled)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", help="a results.json written by benchmarks/run_all.py")
    p.add_argument("--predicted", action="store_true",
                   help="the model's verdicts instead: roofline predictions (H200 datasheet) at the GPU run's shapes")
    args = p.parse_args(argv)
    if args.predicted:
        print("\n".join(predicted_markdown()))
        return 0
    if not args.results:
        p.error("give a results.json, or --predicted")
    try:
        with open(args.results) as f:
            data = json.load(f)
        records = data["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"goals.py: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(markdown(evaluate(records), dry=bool(data.get("dry_run")),
                             predicted=evaluate(records, "predicted_ms"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
