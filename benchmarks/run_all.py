"""The whole GPU evidence in one process: environment, ceilings, the GPU test suite, every benchmark, the roofline.

    python benchmarks/run_all.py [--out DIR] [--budget-s 420] [--only gram,koleo] [--skip train]
    python benchmarks/run_all.py --dry-run --out /tmp/x      # the same pipeline on the CPU, tiny shapes

Phases, each with a time budget (printed first) and each in its own try/except, so one failure loses nothing else:
  environment  GPU name, SMs, clocks, driver, CUDA, torch, triton, numpy, commit, and the build time (gpu_check.sh)
  ceilings     a 2 GiB device-to-device copy; 8192³ matmuls in bf16, TF32 and IEEE fp32 (random data)
  tests        `pytest -m gpu tests` in a subprocess (the installed package, not the source tree), representative
               cases first, in 8 xdist processes when pytest-xdist is installed, under a time budget, failures not
               stopping the run; JUnit XML kept
  gram, koleo, attention, data, train
               the benchmark scripts' run() functions at the shapes their issues name (bench_*.py)
Every measurement warms up first (compilation and autotuning are timed apart, as compile_ms), and gets the roofline
prediction (roofline.py) at the measured ceilings beside it. Writes into --out (default
benchmarks/results/<gpu>/<date>-<commit>/): results.json (one record per measurement, and issue 14's goals checked
against them: goals.py), results.md (tables, the goals with the model's verdict beside each), one PNG per op,
tests.xml, tests.log and auto_table.json (the committed auto table with the rows this run timed ordered by its
measurements: roofline.measured_rows). results.json is rewritten after every phase, so a run cut short keeps what it
measured (`roofline.py --auto-table --measured` and `goals.py` rebuild the rest from it).

Exit status: 0; 1 if a GPU test failed or errored; 2 if the GPU tests could not run or finish (no pytest, pytest
crashed or was interrupted, a test ran past the budget's grace period); 4 if a phase crashed (its error is in
results.json). The largest applicable code wins.

--dry-run runs on the CPU (tiny shapes, the reference backends and the Triton interpreter; torch.compile only for the
Gram loss, to keep it short) so that CI checks this script end to end: its numbers are not GPU results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402

import _pytest_budget  # noqa: E402
import bench_attention  # noqa: E402
import bench_data  # noqa: E402
import bench_gram  # noqa: E402
import bench_koleo  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
import goals  # noqa: E402
import roofline  # noqa: E402

SIZE_LABELS = {"gram_loss": "P (patches per Gram matrix)", "koleo_loss": "n (rows)", "rope_attention": "N (tokens)",
               "train_step": "backbone parameters (M)", "data_loader": "batch"}
BASELINES = {"gram_loss": "official_tf32", "koleo_loss": "official_tf32", "rope_attention": "official"}
DRY_TESTS = ["tests/kernels/test_koleo.py"]
GRACE_S = 30  # seconds a GPU test started before the phase's budget ran out may take to finish


@dataclass
class Phase:
    name: str
    gpu_s: float  # budget on an H200 (seconds)
    cpu_s: float  # budget with --dry-run on a 2-core CPU
    what: str


PHASES = [
    Phase("ceilings", 15, 20, "2 GiB copy, 8192³ matmuls (bf16, TF32, fp32)"),
    Phase("tests", 100, 60, "pytest -m gpu: representative cases first, then as many as fit"),
    Phase("gram", 65, 120, "fp32: 4 shapes x 7 backends x 2 passes, compile of the official loss; then bf16 "
                           "(GPU only): 3 shapes x 5 backends x 2 passes, no compile; then fp32 at the 7B width "
                           "and 768 px (GPU only, no compile) as far as the budget goes"),
    Phase("koleo", 50, 40, "6 shapes x 6 backends x 2 passes, the two Triton searches from n = 4096"),
    Phase("attention", 70, 60, "ViT-L, 7B, S, B, H+ at N = 201..4101 x 8 backends x 2 passes (budget cuts the last)"),
    Phase("data", 25, 30, "loader and BatchAugment at the vits16 crops, 8 workers"),
    Phase("train", 70, 60, "ViT-L and ViT-S steps, official vs fused ops, compiled blocks, Gram phase on/off"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>/<date>-<commit>/)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the pipeline, measures nothing")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock seconds for all phases (default: the sum of the phase budgets)")
    p.add_argument("--only", default="", help="comma-separated phases to run (default all)")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out")
    p.add_argument("--tests", default=None, help="pytest paths of the GPU test phase (default: tests)")
    p.add_argument("--tests-budget-s", type=float, default=None, help="seconds for the GPU test phase")
    p.add_argument("--test-workers", type=int, default=None,
                   help="pytest-xdist processes for the GPU tests, when xdist is installed (default 8 on a GPU, 0 dry)")
    return p.parse_args(argv)


# ---- the GPU test phase ----------------------------------------------------------------------------------------------
def parse_junit(path: str) -> dict:
    """Counts and failures from a JUnit XML file; skips for the time budget are counted apart."""
    root = ET.parse(path).getroot()
    summary = {"total": 0, "passed": 0, "failed": 0, "errors": 0, "timed_out": 0, "skipped": 0, "not_run_budget": 0,
               "seconds": 0.0, "failures": []}
    for case in root.iter("testcase"):
        summary["total"] += 1
        summary["seconds"] += float(case.get("time") or 0)
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure, error, skip = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            message = (node.get("message") or node.text or "").strip()
            # pytest-timeout ends a test still running at the budget's end (see _pytest_budget): not finished.
            kind = "timed_out" if "Timeout" in message.split("\n", 1)[0] else (
                "failed" if failure is not None else "errors")
            summary[kind] += 1
            summary["failures"].append({"test": name, "kind": kind, "message": message[:500]})
        elif skip is not None:
            budget = _pytest_budget.BUDGET_REASON in (skip.get("message") or "")
            summary["not_run_budget" if budget else "skipped"] += 1
        else:
            summary["passed"] += 1
    return summary


def pytest_command(paths, xml: str, workers: int) -> list:
    """`pytest -m gpu` on the installed package: `python -P` (Python >= 3.11; before, the pytest script) keeps the
    source tree, which has no compiled extension, off sys.path, as README's plain `pytest` command does."""
    import importlib.util

    if sys.version_info >= (3, 11):
        cmd = [sys.executable, "-P", "-m", "pytest"]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "pytest")]
    cmd += ["-m", "gpu", *paths, "-p", "_pytest_budget", "-p", "no:cacheprovider", "-q", "-rfE",
            "--continue-on-collection-errors", f"--junitxml={xml}", "-o", "junit_family=xunit2"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=300")  # a hang guard: the first test of a kernel may autotune for a minute
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        # Several processes share the GPU: the suite is bound by Triton's compiles, which then run side by side.
        cmd += ["-n", str(workers)]
    return cmd


def run_tests(paths, out_dir: str, budget_s: float, workers: int = 0) -> dict:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"status": "not run", "reason": "pytest is not installed in this Python: the GPU tests did not run"}
    xml, log = os.path.join(out_dir, "tests.xml"), os.path.join(out_dir, "tests.log")
    env = dict(os.environ, DINOV3_TEST_BUDGET_S=str(max(1.0, budget_s)), DINOV3_TEST_GRACE_S=str(GRACE_S),
               PYTHONPATH=os.pathsep.join([common.HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = pytest_command(paths, xml, workers)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    limit = budget_s + 2 * GRACE_S + 30  # started tests may finish (pytest-timeout ends them); worker start-up
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=limit)
            status = "ran"
        except subprocess.TimeoutExpired:
            # SIGINT, as Ctrl-C: pytest stops and still writes the JUnit XML of the tests that finished.
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            status = "interrupted"
    with open(log) as f:
        tail = f.read()[-3000:]
    print(tail, flush=True)
    result = {"status": status, "returncode": rc, "wall_s": time.monotonic() - t0, "command": " ".join(cmd)}
    if status == "interrupted":  # the test that was running may be listed without an outcome, as if it passed
        result["reason"] = (f"pytest was still running {limit:.0f} s after it started and was interrupted: the "
                            "counts below may include the test that was running as passed")
    if os.path.exists(xml):
        result.update(parse_junit(xml))
    else:
        result.update(status="crashed", reason=f"pytest exited {rc} without writing {xml}: {tail[-500:]}")
    return result


# ---- orchestration ---------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.env = common.environment()
        self.env["build_seconds"] = os.environ.get("DINOV3_BUILD_SECONDS")
        self.env["build_status"] = os.environ.get("DINOV3_BUILD_STATUS")
        slug = "cpu-dry-run" if self.dry else common.device_slug(self.env)
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        self.out = args.out or os.path.join(common.RESULTS_DIR, slug, f"{date}-{self.env['commit']}")
        os.makedirs(self.out, exist_ok=True)
        self.records: list = []
        self.ceilings: dict = {}
        self.tests: dict = {}
        self.phases: list = []
        self.table_changes = None  # write_auto_table: the changed rows, or why the table was not written
        wanted = [p for p in PHASES if (not args.only or p.name in args.only.split(","))
                  and p.name not in args.skip.split(",")]
        self.plan = wanted
        total = sum(p.cpu_s if self.dry else p.gpu_s for p in wanted)
        self.deadline = common.Deadline(args.budget_s if args.budget_s is not None else total)

    def budget(self, phase: Phase) -> float:
        own = phase.cpu_s if self.dry else phase.gpu_s
        if phase.name == "tests" and self.args.tests_budget_s is not None:
            own = self.args.tests_budget_s
        return min(own, self.deadline.remaining())

    def settings(self, phase: Phase, seconds: float) -> common.Settings:
        s = common.Settings(device="cpu" if self.dry else "cuda", deadline=common.Deadline(seconds))
        if self.dry:  # few reps (the interpreter takes ~0.1-1 s per kernel call), compile only where it is cheap
            s.rep_ms, s.min_reps, s.max_reps, s.compile = 5.0, 3, 5, phase.name == "gram"
        return s

    def model_ceilings(self) -> roofline.Ceilings:
        c = roofline.measured_ceilings(self.ceilings, gpu=not self.dry)
        return dataclasses.replace(c, sms=self.env.get("sms") or c.sms)

    # -- phases
    def phase_ceilings(self, st):
        records, self.ceilings = common.measure_ceilings(st)
        return records

    def phase_tests(self, st):
        paths = self.args.tests.split(",") if self.args.tests else (DRY_TESTS if self.dry else ["tests"])
        workers = self.args.test_workers if self.args.test_workers is not None else (0 if self.dry else 8)
        self.tests = run_tests(paths, self.out, st.deadline.remaining(), workers)
        return []

    def phase_gram(self, st):
        records = bench_gram.run(st)  # fp32 features, as training passes them: every shape first
        if not self.dry:
            # bf16 features, in what the fp32 part left of the budget: the goal of 40 % of the bf16
            # tensor-core peak (P >= 1024 first), and the auto table's bf16 rows (the same three deciding shapes).
            # Without torch.compile (no goal compares with it in bf16; its recompile would take the budget).
            records += bench_gram.run(dataclasses.replace(st, compile=False), shapes=bench_gram.BF16_GPU_SHAPES,
                                      dtypes=[torch.bfloat16])
            # Then fp32 at the ViT-7B width and at 768 px (the goal's P >= 1024 beyond its two ViT-L shapes), as far as
            # the budget goes.
            records += bench_gram.run(dataclasses.replace(st, compile=False), shapes=bench_gram.WIDE_GPU_SHAPES)
        return records

    def phase_koleo(self, st):
        return bench_koleo.run(st)

    def phase_attention(self, st):
        return bench_attention.run(st)

    def phase_data(self, st):
        return bench_data.run(st)

    def phase_train(self, st):
        return bench_train.run(st)

    def run_phase(self, phase: Phase):
        seconds = self.budget(phase)
        info = {"name": phase.name, "budget_s": round(seconds, 1)}
        print(f"\n===== {phase.name}: budget {seconds:.0f} s ({phase.what})", flush=True)
        t0 = time.monotonic()
        if seconds <= 0:
            info["status"] = "skipped: the run's total budget was used up"
        else:
            fn: Callable = getattr(self, f"phase_{phase.name}")
            try:
                new = fn(self.settings(phase, seconds))
                for r in new:
                    r.extra["phase"] = phase.name
                    roofline.annotate(r, self.model_ceilings())
                self.records += new
                info["status"] = "ok"
                info["records"] = len(new)
                info["compile_s"] = round(sum(r.compile_ms or 0 for r in new) / 1e3, 1)
                info["skipped_for_budget"] = sum(r.status == "skipped" for r in new)
            except Exception as exc:  # noqa: BLE001 - one phase's failure must not lose the others
                info["status"] = "error"
                info["error"] = f"{type(exc).__name__}: {exc}"
                info["traceback"] = traceback.format_exc()[-4000:]
                print(info["traceback"], flush=True)
        info["used_s"] = round(time.monotonic() - t0, 1)
        self.phases.append(info)
        print(f"===== {phase.name}: {info['status']} in {info['used_s']} s", flush=True)
        self.write()
        if not self.dry:
            torch.cuda.empty_cache()

    def exit_code(self) -> int:
        code = 0
        if "tests" in {p.name for p in self.plan}:
            t = self.tests
            if t.get("status") != "ran" or t.get("returncode") not in (0, 1, 5) or t.get("timed_out", 0):
                code = 2
            elif t.get("failed", 0) or t.get("errors", 0):
                code = 1
        if any(p["status"] == "error" for p in self.phases):
            code = 4
        return code

    # -- writing
    def write(self, final: bool = False):
        records = [r.to_dict() for r in self.records]
        data = {"environment": self.env, "dry_run": self.dry, "ceilings": self.ceilings, "tests": self.tests,
                "phases": self.phases, "records": records, "goals": self.goal_verdicts(records),
                "model": {"ceilings": vars(self.model_ceilings()),
                          "note": "predicted_ms: roofline.py at these ceilings; predicted_ms_H100/H200 in extra: at "
                                  "the datasheet ceilings (benchmarks/results/predicted.md)"}}
        if final:
            data["exit_code"] = self.exit_code()
        tmp = os.path.join(self.out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, os.path.join(self.out, "results.json"))

    def goal_verdicts(self, records: list, time: str = "median_ms"):
        """Issue 14's goals against the records so far (benchmarks/goals.py; time="predicted_ms": the model's verdicts
        at the measured ceilings), or why they could not be checked."""
        try:
            return goals.evaluate(json.loads(json.dumps(records, default=str)), time)
        except Exception as exc:  # noqa: BLE001 - the measurements matter more than their verdicts
            traceback.print_exc()
            return f"not checked: {type(exc).__name__}: {exc}"

    def markdown(self, plots) -> str:
        env = self.env
        lines = [f"# GPU run: {env['device']}", "", common.banner(env), ""]
        if self.dry:
            lines += ["**DRY RUN on the CPU: tiny shapes, the Triton interpreter. Nothing here is a GPU result.**", ""]
        lines += ["## Environment", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in env.items() if k != "backends"]
        lines += [f"| backends | {env.get('backends')} |", ""]
        lines += ["## Phases", "", "| phase | status | budget s | used s | compile+autotune s | records | "
                  "not run (budget) |", "|---|---|---|---|---|---|---|"]
        for p in self.phases:
            lines.append(f"| {p['name']} | {p['status']} | {p['budget_s']} | {p['used_s']} | {p.get('compile_s', '-')}"
                         f" | {p.get('records', '-')} | {p.get('skipped_for_budget', '-')} |")
        t = self.tests
        lines += ["", "## GPU tests", ""]
        if t:
            lines.append(f"status {t.get('status')}, pytest exit {t.get('returncode')}: {t.get('passed', 0)} passed, "
                         f"{t.get('failed', 0)} failed, {t.get('errors', 0)} errors, {t.get('timed_out', 0)} still running at the "
                         f"end of the budget's grace period, {t.get('skipped', 0)} skipped, "
                         f"{t.get('not_run_budget', 0)} not run (time budget), of {t.get('total', 0)}. "
                         f"{t.get('reason', '')}")
            for f in t.get("failures", [])[:50]:
                lines.append(f"- {f['kind']}: `{f['test']}`: {f['message'].splitlines()[0] if f['message'] else ''}")
        else:
            lines.append("not run")
        records = [r.to_dict() for r in self.records]
        verdicts, model = self.goal_verdicts(records), self.goal_verdicts(records, "predicted_ms")
        lines += [""] + (goals.markdown(verdicts, dry=self.dry, predicted=model if isinstance(model, list) else None)
                         if isinstance(verdicts, list) else ["## Issue 14's goals, measured", "", verdicts, ""])
        lines += ["## Ceilings (measured)", "", f"{self.ceilings}", ""]
        lines += ["## The roofline model against the measurements", "",
                  "measured/predicted per op and backend (roofline.py at the measured ceilings; 1 = at the model's "
                  "floor; the spread says how well the model explains the backend)", "",
                  "| op | backend | records | median | min | max |", "|---|---|---|---|---|---|"]
        ratios: dict = {}
        for r in self.records:
            if r.measured_over_predicted:
                ratios.setdefault((r.op, r.backend), []).append(r.measured_over_predicted)
        for (op, backend), v in ratios.items():
            lines.append(f"| {op} | {backend} | {len(v)} | {common.fmt(statistics.median(v))} | "
                         f"{common.fmt(min(v))} | {common.fmt(max(v))} |")
        lines.append("")
        lines += self.table_markdown()
        for op in dict.fromkeys(r.op for r in self.records):
            recs = [r for r in self.records if r.op == op]
            base = BASELINES.get(op)
            if op == "train_step":
                base = next((r.backend for r in recs if r.backend.startswith("official")), None)
            if base:
                common.add_speedups(recs, base)
            lines += [f"## {op}", "", common.markdown_table(recs, base), ""]
            png = os.path.join(self.out, f"{op}.png")
            if png in plots:
                lines += [f"![{op}]({op}.png)", ""]
        return "\n".join(lines) + "\n"

    def write_auto_table(self) -> None:
        """auto_table.json beside the results: the committed table (dinov3_kernels/auto_table.json) with each row
        whose deciding shape this run timed ordered by its measured times (roofline.measured_rows). Adopting it is
        a commit: copy it over the committed one, or `python benchmarks/roofline.py --auto-table --measured
        <this folder>/results.json`. A failure here is reported and loses nothing else."""
        try:
            with open(roofline.AUTO_TABLE) as f:
                committed = json.load(f)
            data = {"environment": self.env, "dry_run": self.dry,
                    "records": json.loads(json.dumps([r.to_dict() for r in self.records], default=str))}
            table = roofline.auto_table(committed, roofline.measured_rows(data, allow_dry_run=self.dry))
            tmp = os.path.join(self.out, "auto_table.json.tmp")
            with open(tmp, "w") as f:
                f.write(json.dumps(table, indent=1) + "\n")
            os.replace(tmp, os.path.join(self.out, "auto_table.json"))
            self.table_changes = roofline.table_changes(committed, table)
        except Exception as exc:  # noqa: BLE001 - the measurements are already written
            self.table_changes = f"not written: {type(exc).__name__}: {exc}"
            traceback.print_exc()

    def table_markdown(self) -> list:
        lines = ["## The auto table this run measured", ""]
        changes = self.table_changes
        if isinstance(changes, str) or changes is None:
            return lines + [f"auto_table.json {changes or 'not written'}", ""]
        lines += ["`auto_table.json` in this folder: the committed `dinov3_kernels/auto_table.json` with the rows "
                  "whose deciding shape this run timed (forward+backward, batch aside) ordered by the measured "
                  "medians. Adopt it with `python benchmarks/roofline.py --auto-table --measured "
                  "<this folder>/results.json`" + (" (a dry run is refused there)." if self.dry else "."), ""]
        if not changes:
            return lines + ["No row changed.", ""]
        lines += ["| op | dtype | size ≤ | committed order | this run's order | source |", "|---|---|---|---|---|---|"]
        for op, dtype, size, old, new, source in changes:
            lines.append(f"| {op} | {dtype} | {size if size is not None else 'any'} | {', '.join(old or [])} | "
                         f"{', '.join(new)} | {source} |")
        return lines + [""]

    def finish(self) -> int:
        plots = common.plot_records(self.records, self.out, SIZE_LABELS)
        self.write(final=True)
        self.write_auto_table()
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(self.markdown(plots))
        code = self.exit_code()
        verdicts = self.goal_verdicts([r.to_dict() for r in self.records])
        if isinstance(verdicts, list):  # last, so that the tail of the log (all a device call may return) has them
            print(f"\nissue 14's goals{' (DRY RUN: not a verdict)' if self.dry else ''}: {goals.summary(verdicts)}")
            for v in verdicts:
                if v["verdict"] != "met":
                    print(f"  {v['verdict']}: {v['goal']} at {v['shape']} ({v['dtype']}): "
                          + (f"{v['best']} {v['value']:.3g}" if v["value"] is not None else v.get("reason", "")))
        print(f"\nwrote {self.out}/results.json, results.md, auto_table.json and {len(plots)} plots; "
              f"exit status {code}")
        return code


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("run_all.py: no CUDA GPU here. Use --dry-run to check the pipeline on the CPU.", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes; and CI machines are shared
    run = Run(args)
    print(common.banner(run.env))
    print(f"results -> {run.out}\nplan (budget s, {'CPU dry run' if run.dry else 'H200'}; total "
          f"{run.deadline.remaining():.0f} s; what each phase does on the GPU):")
    for p in run.plan:
        print(f"  {p.name:10s} {p.cpu_s if run.dry else p.gpu_s:6.0f}  {p.what}")
    run.write()
    for phase in run.plan:
        run.run_phase(phase)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
