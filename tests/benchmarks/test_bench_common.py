"""The shared benchmark harness (benchmarks/common.py): compilation never reaches the timed calls, failures become
records, the time budget is kept."""

import time

import pytest
import torch

import common


def _slow_first_calls(n_slow, seconds, compiles=False):
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] <= n_slow:
            if compiles:  # what dynamo does when it compiles a frame
                from torch._dynamo.utils import counters

                counters["frames"]["total"] += 1
            time.sleep(seconds)

    return fn, calls


def test_a_slow_first_call_is_reported_as_compile_time_not_timed():
    fn, calls = _slow_first_calls(1, 0.5)
    t = common.time_fn(fn, rep_ms=5, min_reps=5)
    assert t.median_ms < 200 and t.max_ms < 200, t  # the 500 ms call in any timed call would show
    assert t.compile_ms >= 450, t
    assert calls["n"] == t.warmup_calls + t.reps


def test_recompiles_on_later_calls_stay_in_the_warm_up():
    # Three calls that each compile something (new shapes, a lazily compiled backward) before the steady state.
    fn, _ = _slow_first_calls(3, 0.4, compiles=True)
    t = common.time_fn(fn, rep_ms=5, min_reps=5)
    assert t.warmup_calls >= 4, t
    assert t.max_ms < 200, t
    assert t.compile_ms >= 1100, t


def test_measure_fills_the_record_and_derives_rates():
    rec = common.Record("op", "b", "s", "float32", "fwd", flops=2e9, bytes=4e9)
    common.measure(rec, lambda: time.sleep(0.002), common.Settings(device="cpu", rep_ms=10, min_reps=3),
                   error=lambda: 1e-7)
    assert rec.status == "ok" and rec.median_ms >= 2 and rec.reps >= 3 and rec.timer == common.CPU_TIMER
    assert rec.min_ms <= rec.median_ms <= rec.max_ms
    assert rec.tflops == pytest.approx(2e9 / (rec.median_ms * 1e-3) / 1e12)
    assert rec.gbps == pytest.approx(4e9 / (rec.median_ms * 1e-3) / 1e9)
    assert rec.error == 1e-7
    d = rec.to_dict()
    assert d["pass"] == "fwd" and "mode" not in d


def test_a_failing_provider_becomes_a_record():
    def boom():
        raise RuntimeError("no kernel for this shape\nsecond line")

    rec = common.measure(common.Record("op", "b", "s", "float32", "fwd"), boom, common.Settings(device="cpu"))
    assert rec.status == "failed" and rec.note == "failed: no kernel for this shape" and rec.median_ms is None


def test_an_expired_deadline_skips_without_calling():
    called = []
    st = common.Settings(device="cpu", deadline=common.Deadline(0))
    rec = common.measure(common.Record("op", "b", "s", "float32", "fwd"), lambda: called.append(1), st)
    assert rec.status == "skipped" and not called


def test_tf32_context_restores_the_flag():
    before = torch.backends.cuda.matmul.allow_tf32
    with common.tf32(not before):
        assert torch.backends.cuda.matmul.allow_tf32 == (not before)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert common.with_tf32(lambda: torch.backends.cuda.matmul.allow_tf32, True)() is True


def test_rel_error():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert common.rel_error(ref, ref) == 0
    assert common.rel_error(ref + torch.tensor([0.0, 0.5]), ref) == pytest.approx(0.1)
    assert common.rel_error(torch.tensor([float("nan"), 0.0]), ref) == float("inf")


def test_plots_keep_dtypes_apart():
    """The same backend and series timed in two dtypes (run_all.py times the Gram loss in fp32 and bf16) get a row
    of panels each, not one line through both."""
    recs = [common.Record("gram_loss", "triton", f"G=8 P={P} D=1024", dtype, mode, series="D=1024", size=P,
                          median_ms=1.0)
            for dtype in ("float32", "bfloat16") for P in (1024, 4096) for mode in ("fwd", "fwd+bwd")]
    assert common.plot_panels(recs) == [("D=1024", "float32", "fwd"), ("D=1024", "float32", "fwd+bwd"),
                                        ("D=1024", "bfloat16", "fwd"), ("D=1024", "bfloat16", "fwd+bwd")]
