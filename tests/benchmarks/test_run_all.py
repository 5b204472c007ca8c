"""benchmarks/run_all.py end to end on the CPU (--dry-run): every phase runs, every record carries what the GPU run
must report, and a failing GPU test makes the exit status non-zero while every result is still written."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import _pytest_budget

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_ALL = os.path.join(ROOT, "benchmarks", "run_all.py")
OPS = {"ceiling", "gram_loss", "koleo_loss", "rope_attention", "train_step", "data_loader"}
KERNEL_OPS = {"gram_loss", "koleo_loss", "rope_attention"}
KEYS = {"op", "backend", "shape", "dtype", "pass", "median_ms", "min_ms", "max_ms", "tflops", "gbps",
        "fraction_of_ceiling", "peak_mb", "error", "predicted_ms", "measured_over_predicted", "compile_ms", "status",
        "timer"}


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # run_all sets it for the dry run
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_all")
    r = subprocess.run([sys.executable, RUN_ALL, "--dry-run", "--out", str(out)], capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    with open(out / "results.json") as f:
        return out, json.load(f), r.stdout


def test_every_phase_ran(dry_run):
    _, data, stdout = dry_run
    assert [p["name"] for p in data["phases"]] == ["ceilings", "tests", "gram", "koleo", "attention", "data", "train"]
    assert all(p["status"] == "ok" for p in data["phases"]), data["phases"]
    assert "budget" in stdout  # the plan, with each phase's time budget, comes first
    assert data["exit_code"] == 0 and data["dry_run"] is True
    env = data["environment"]
    for key in ("device", "torch", "triton", "numpy", "python", "commit", "date"):
        assert env.get(key), key
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["bf16_tflops"] > 0
    assert data["ceilings"]["tf32_tflops"] > 0


def test_gpu_test_phase_ran_pytest_and_kept_junit(dry_run):
    out, data, _ = dry_run
    t = data["tests"]
    assert t["status"] == "ran" and t["returncode"] == 0 and t["total"] > 0
    assert t["skipped"] == t["total"]  # no GPU here: every gpu test skips, and none is counted as passing
    assert t["passed"] == 0 and t["failed"] == 0
    assert (out / "tests.xml").exists()


def test_records_carry_every_field(dry_run):
    _, data, _ = dry_run
    records = data["records"]
    assert {r["op"] for r in records} == OPS
    for r in records:
        assert KEYS <= set(r), set(KEYS) - set(r)
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["op"] for r in ok} == OPS
    for r in ok:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"], r
        assert r["timer"] and "not a GPU result" in r["timer"] or r["op"] == "data_loader", r
        assert r["compile_ms"] is not None, r
    for r in (r for r in ok if r["op"] in KERNEL_OPS):
        assert r["tflops"] > 0 and r["gbps"] > 0, r
        assert r["predicted_ms"] > 0 and r["measured_over_predicted"] > 0 and r["fraction_of_ceiling"] > 0, r
        assert r["extra"]["predicted_ms_H100"] > 0 and r["extra"]["predicted_ms_H200"] > 0, r
        if "no RoPE" not in r["note"]:
            assert r["error"] is not None and r["error"] < 1e-3, r  # fp32 on the CPU against float64
    backends = {(r["op"], r["backend"]) for r in ok}
    for want in [("gram_loss", "official_tf32"), ("gram_loss", "official_fp32"), ("gram_loss", "compile"),
                 ("gram_loss", "triton"), ("gram_loss", "factored"), ("koleo_loss", "official_tf32"),
                 ("koleo_loss", "official_fp32"), ("koleo_loss", "triton"), ("rope_attention", "official"),
                 ("rope_attention", "sdpa_flash"), ("rope_attention", "triton"), ("data_loader", "loader"),
                 ("data_loader", "loader+augment"), ("train_step", "official"), ("train_step", "fused")]:
        assert want in backends, want
    # Not runnable here, and said so (not silently dropped).
    assert any(r["backend"] == "cuda" and r["status"] == "n/a" and r["note"] for r in records)


def test_compilation_is_timed_apart(dry_run):
    _, data, _ = dry_run
    compiled = [r for r in data["records"] if r["backend"] == "compile" and r["status"] == "ok"]
    assert compiled
    first = compiled[0]  # the first call of the first compiled function compiles it
    assert first["compile_ms"] > 20 * first["median_ms"], first


def test_markdown_and_plots(dry_run):
    out, _, _ = dry_run
    md = (out / "results.md").read_text()
    assert "DRY RUN" in md and "## gram_loss" in md and "## GPU tests" in md
    for op in OPS - {"ceiling"}:
        png = out / f"{op}.png"
        assert png.exists() and png.stat().st_size > 1000, op
        assert f"({op}.png)" in md


def test_the_run_writes_its_auto_table(dry_run):
    """The table run_all.py writes beside its results (tests/benchmarks/test_auto_table_measured.py checks how
    measurements order it): the dry run's tiny shapes decide no row, so it is the committed table, and results.md
    says that no row changed."""
    out, _, stdout = dry_run
    with open(os.path.join(ROOT, "dinov3_kernels", "auto_table.json")) as f:
        committed = json.load(f)
    assert json.loads((out / "auto_table.json").read_text()) == committed
    md = (out / "results.md").read_text()
    assert "## The auto table this run measured" in md and "No row changed." in md
    assert "auto_table.json" in stdout and not list(out.glob("*.tmp"))


def test_the_run_checks_the_issue_goals(dry_run):
    """results.json and results.md carry issue 14's goals checked against the records (benchmarks/goals.py; its own
    tests check the verdicts): the dry run's KoLeo and attention shapes get verdicts, labelled as a dry run."""
    out, data, stdout = dry_run
    assert isinstance(data["goals"], list) and data["goals"], data.get("goals")
    # The summary and every goal not met close the log (the tail a device call returns)
    tail = stdout[stdout.index("issue 14's goals (DRY RUN: not a verdict)"):]
    assert sum(line.startswith(("  MISSED: ", "  not measured: ")) for line in tail.splitlines()) == sum(
        g["verdict"] != "met" for g in data["goals"])
    assert {g["verdict"] for g in data["goals"]} <= {"met", "MISSED", "not measured"}
    assert {g["goal"].split()[0] for g in data["goals"]} == {"KoLeo", "attention"}  # no dry Gram shape has P >= 1024
    md = (out / "results.md").read_text()
    assert "## Issue 14's goals, measured" in md and "Dry run: CPU times" in md
    assert "| all backends | model |" in md  # the model's verdict at the measured ceilings beside each one


def test_a_failing_gpu_test_fails_the_run_but_writes_everything(tmp_path):
    tests = tmp_path / "test_fake_gpu.py"
    tests.write_text(textwrap.dedent("""
        import time
        import pytest

        @pytest.mark.gpu
        def test_a_fails():
            assert 1 == 2

        @pytest.mark.gpu
        def test_b_slow():
            time.sleep(5)

        @pytest.mark.gpu
        def test_c_after_the_budget():
            pass
    """))
    out = tmp_path / "out"
    # A 3 s budget for the test phase: a fails, b starts in time and runs past the budget, c is not run.
    r = subprocess.run([sys.executable, RUN_ALL, "--dry-run", "--only", "ceilings,tests", "--tests", str(tests),
                        "--tests-budget-s", "3", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env=_env(), timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    t = data["tests"]
    assert (t["failed"], t["passed"], t["not_run_budget"]) == (1, 1, 1), t
    assert t["failures"][0]["test"].endswith("test_a_fails")
    assert data["exit_code"] == 1 and (out / "results.md").exists()
    assert any(r["op"] == "ceiling" for r in data["records"])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 240])
def test_spread_order_is_a_permutation_that_reaches_both_ends_early(n):
    order = _pytest_budget.spread(n)
    assert sorted(order) == list(range(n))
    assert set(order[:2]) == {0, n - 1}
    if n >= 8:  # the first quarter of the order already covers every quarter of the range
        quarter = order[: max(4, n // 4)]
        assert {i * 4 // n for i in quarter} == {0, 1, 2, 3}


def test_representative_order_gives_every_test_function_a_turn():
    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    items = [Item(f"t.py::test_big[{i}]") for i in range(10)] + [Item("t.py::test_one"), Item("t.py::test_two[x]")]
    order = [i.nodeid for i in _pytest_budget.representative_order(items)]
    assert sorted(order) == sorted(i.nodeid for i in items)
    assert set(order[:3]) == {"t.py::test_big[0]", "t.py::test_one", "t.py::test_two[x]"}


def test_junit_parsing_keeps_budget_skips_and_timeouts_apart(tmp_path):
    import run_all

    xml = tmp_path / "t.xml"
    xml.write_text(f"""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="t" name="test_pass" time="0.5"/>
        <testcase classname="t" name="test_fail" time="0.1"><failure message="assert 1 == 2">trace</failure></testcase>
        <testcase classname="t" name="test_err" time="0.1"><error message="fixture broke">trace</error></testcase>
        <testcase classname="t" name="test_hung" time="40"><failure message="Failed: Timeout (&gt;31.0s) from
            pytest-timeout.">trace</failure></testcase>
        <testcase classname="t" name="test_cpu" time="0"><skipped message="needs a CUDA GPU"/></testcase>
        <testcase classname="t" name="test_late" time="0"><skipped message="{_pytest_budget.BUDGET_REASON}"/></testcase>
        </testsuite></testsuites>""")
    s = run_all.parse_junit(str(xml))
    assert (s["total"], s["passed"], s["failed"], s["errors"], s["timed_out"], s["skipped"], s["not_run_budget"]) == \
        (6, 1, 1, 1, 1, 1, 1), s
    assert [f["kind"] for f in s["failures"]] == ["failed", "errors", "timed_out"]
