"""benchmarks/roofline.py: the counts obey the invariants a roofline must, and the committed predictions are the
model's current output."""

import os
import subprocess
import sys

import pytest

import common
import roofline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREDICTED = os.path.join(ROOT, "benchmarks", "results", "predicted.md")
ROWS = roofline.rows()


def test_every_benchmark_shape_and_backend_is_modelled():
    ops = {(op, backend) for op, _, _, _, backend, *_ in ROWS}
    assert {op for op, _ in ops} == {"gram_loss", "koleo_loss", "rope_attention", "dino_head_loss", "ibot_head_loss"}
    assert {b for op, b in ops if op == "rope_attention"} == set(roofline.ATTENTION_BACKENDS)
    expected = sum(len(shapes) * len(backends) for _, backends, shapes, _ in roofline.benchmark_cases())
    assert len(ROWS) == 2 * expected  # 2 passes x (shapes x backends) per op
    assert {b for op, b in ops if op == "gram_loss"} == set(roofline.GRAM_BACKENDS)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r[0]}-{r[1]}-{r[3]}-{r[4]}".replace(" ", ""))
def test_roofline_invariants(row):
    op, label, dtype, mode, backend, tf32, est, preds = row
    assert est.flops > 0 and est.flops_exec > 0 and est.launches >= 1
    assert est.design_bytes >= est.min_bytes * 0.999, "the design cannot move fewer bytes than the minimum"
    assert est.min_bytes * 0.999 <= est.hbm_bytes <= est.design_bytes * 1.001
    for dev, p in zip(roofline.DEVICES, preds):
        floor = max(est.flops_exec / (dev.tflops[est.precision] * 1e12), est.hbm_bytes / (dev.hbm_gbps * 1e9),
                    est.design_bytes / (dev.l2_gbps * 1e9), est.exps / dev.exp_per_s,
                    est.min_bytes / (dev.hbm_gbps * 1e9))
        assert p["ms"] >= floor * 1e3 * 0.999
        assert p[p["bound"] + "_ms"] == pytest.approx(max(p[k + "_ms"] for k in ("compute", "hbm", "l2", "exp", "alu")))
    h100, h200 = preds
    assert h200["ms"] <= h100["ms"] * 1.0001, "the H200 has the H100's compute and more bandwidth"


def test_more_work_never_predicts_less_time():
    for G, P, D in [(8, 256, 1024), (8, 1024, 1024)]:
        small = roofline.predict(roofline.gram(G, P, D, "float32", "triton", "fwd+bwd"), roofline.H200)["ms"]
        large = roofline.predict(roofline.gram(2 * G, P, D, "float32", "triton", "fwd+bwd"), roofline.H200)["ms"]
        assert large >= small
    fwd = roofline.attention(8, 16, 1029, 64, "bfloat16", "triton", "fwd")
    both = roofline.attention(8, 16, 1029, 64, "bfloat16", "triton", "fwd+bwd")
    assert both.flops_exec > fwd.flops_exec and both.design_bytes > fwd.design_bytes and both.exps > fwd.exps


def test_annotate_adds_the_prediction_to_a_record():
    rec = common.Record("koleo_loss", "triton", "n=4096 d=1024", "float32", "fwd", params=dict(n=4096, d=1024),
                        tf32=True, median_ms=1.0, flops=2 * 4096**2 * 1024, bytes=4096 * 1024 * 4)
    ceil = roofline.measured_ceilings({"copy_gbps": 4000.0, "bf16_tflops": 750.0, "tf32_tflops": 380.0,
                                       "fp32_tflops": 50.0}, gpu=True)
    roofline.annotate(rec, ceil)
    assert rec.predicted_ms > 0 and rec.measured_over_predicted == pytest.approx(1.0 / rec.predicted_ms)
    assert 0 < rec.fraction_of_ceiling < 1
    assert rec.extra["predicted_ms_H200"] <= rec.extra["predicted_ms_H100"]
    other = common.Record("train_step", "official", "x", "bf16", "step", median_ms=1.0)
    roofline.annotate(other, ceil)  # not modelled: left alone
    assert other.predicted_ms is None


def test_committed_predictions_are_the_models_output(tmp_path):
    out = tmp_path / "predicted.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "roofline.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    def body(text):  # the tables, without the line that carries the date and commit
        return [line for line in text.splitlines() if not line.startswith("Written by")]

    assert "PREDICTIONS, NOT MEASUREMENTS" in out.read_text()
    assert body(out.read_text()) == body(open(PREDICTED).read()), (
        "benchmarks/results/predicted.md is stale: python benchmarks/roofline.py --out benchmarks/results/predicted.md")


def test_koleo_topk_rounds():
    # The round counts NOTES (KoLeo section 7) builds the symmetric search's default on: a fresh list takes all KC
    # rounds on its first tile (every row fills every slot), later tiles fewer; lists that see many tiles (chunked)
    # average far fewer rounds than lists that see three (symmetric); with KC = 1 every tile takes one round.
    import koleo_topk_rounds as kr

    short = kr.rounds_per_tile(3, 9, reps=5)
    long = kr.rounds_per_tile(43, 9, reps=5)
    assert short[0] == long[0] == 9 and short[2] < short[0]
    assert long.mean() < 0.5 * short.mean()
    assert (kr.rounds_per_tile(4, 1, reps=3) == 1).all()


def test_koleo_model_constants_are_the_launchers():
    # The model replicates the Triton KoLeo launcher's choices (spares, resident and symmetric searches) by its own
    # constants: they must be the launcher's.
    pytest.importorskip("triton")
    from dinov3_kernels._triton import koleo

    assert roofline.KOLEO_TRITON_EXTRA == koleo.RERANK_EXTRA
    assert roofline.KOLEO_TRITON_RESIDENT_MAX_ROWS == koleo.RESIDENT_MAX_ROWS
    assert roofline.KOLEO_TRITON_SYMMETRIC_MIN_ROWS == koleo.SYMMETRIC_MIN_ROWS
    assert roofline.KOLEO_TRITON_SYMMETRIC_MAX_KC == koleo.SYMMETRIC_MAX_KC
    assert roofline.KOLEO_TRITON_SYMMETRIC_LONG_LIST_D == koleo.SYMMETRIC_LONG_LIST_D
    assert roofline.KOLEO_TRITON_SYMMETRIC_SUPER == koleo.SYMMETRIC_SUPER
    assert roofline.KOLEO_TRITON_SYMMETRIC_MAX_SLABS == koleo.SYMMETRIC_MAX_SLABS


def test_koleo_selection_is_charged():
    # The top-k selection's instructions count: more rounds (lists of 9 that see few tiles) never predict less work,
    # and the resident search's unrolled rounds make it selection-bound at n = 16384, d = 384 in fp32 (the reason
    # the launcher stops using it from 4096 rows).
    few = roofline.koleo_select_instr("chunked", 128, 128, 9, 100, 2)
    many = roofline.koleo_select_instr("chunked", 128, 128, 9, 100, 40)
    assert few > many > 100 * 8 * roofline.KOLEO_TRITON_SELECT_INSTR[("chunked", 128, 9)][0]
    saved = roofline.KOLEO_TRITON_RESIDENT_MAX_ROWS
    try:
        roofline.KOLEO_TRITON_RESIDENT_MAX_ROWS = 10**9
        resident = roofline.predict(roofline.koleo(16384, 384, "float32", "triton", "fwd+bwd"), roofline.H200)
    finally:
        roofline.KOLEO_TRITON_RESIDENT_MAX_ROWS = saved
    chunked = roofline.predict(roofline.koleo(16384, 384, "float32", "triton", "fwd+bwd"), roofline.H200)
    assert resident["bound"] == "compute" and resident["ms"] > 1.5 * chunked["ms"]


@pytest.mark.parametrize("B,H,N,D", [(502, 16, 261, 64), (125, 32, 261, 128), (64, 16, 261, 64), (1, 12, 197, 64),
                                     (7, 32, 4101, 128), (652, 6, 201, 64), (3, 20, 1029, 80)])
def test_attention_head_groups_are_the_launchers(B, H, N, D):
    # The model charges the sin/cos tables once per group of heads of the Triton row-wise passes: the groups the
    # launcher actually makes (its GPU branch).
    pytest.importorskip("triton")
    from dinov3_kernels._triton.attention import _row_pass

    assert roofline.attention_heads_per_pass(B, H, N, D) == _row_pass(B, H, N, D, False)[2]


def test_unmeasured_ceilings_still_predict():
    """run_all.py --only without the ceilings phase: the model falls back to the datasheet (GPU) or nominal CPU
    figures instead of dividing by zero."""
    est = roofline.estimate("gram_loss", "triton", dict(G=2, P=48, D=24), "float32", "fwd+bwd", True)
    for gpu in (True, False):
        c = roofline.measured_ceilings({}, gpu=gpu)
        assert c.hbm_gbps > 0 and c.l2_gbps > 0 and min(c.tflops.values()) > 0
        assert roofline.predict(est, c)["ms"] > 0
