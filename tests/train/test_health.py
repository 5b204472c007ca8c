"""Health metrics (dinov3/train/health.py) against brute-force formulas, their plumbing through forward_backward and
the trainer, and the alarms: fired by a run whose DINO head collapses, silent on one whose DINO head learns."""

import json
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dinov3.train.config import load_config
from dinov3.train.data import BatchAugment, build_loader
from dinov3.train.health import (HEALTH_KEYS, HealthMonitor, cls_patch_cos, effective_rank, mean_entropy,
                                 mean_softmax_entropy, pairwise_cos)
from dinov3.train.rundir import read_metrics
from dinov3.train.ssl_arch import SSLMetaArch
from dinov3.train.trainer import train

DINO_ALARM = "the DINO loss has stayed within"
CLS_ALARM = "CLS tokens of different images have mean cosine"


# ------------------------------------------------------------------------------------------------ the formulas
def test_entropies():
    k = 37
    assert mean_entropy(torch.full((5, k), 1.0 / k)).item() == pytest.approx(math.log(k), rel=1e-6)
    assert mean_entropy(F.one_hot(torch.arange(5), k).float()).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(torch.randn(2, 3, k, generator=torch.Generator().manual_seed(0)), -1)
    brute = sum(-(r * r.log()).sum() for r in p.reshape(-1, k)) / 6
    assert mean_entropy(p).item() == pytest.approx(brute.item(), rel=1e-5)
    z = torch.randn(4, k, generator=torch.Generator().manual_seed(1))
    assert mean_softmax_entropy(z, 0.1).item() == pytest.approx(mean_entropy(torch.softmax(z / 0.1, -1)).item(),
                                                                rel=1e-5)
    assert mean_softmax_entropy(torch.zeros(3, k), 0.1).item() == pytest.approx(math.log(k), rel=1e-6)
    assert math.isnan(mean_entropy(torch.empty(0, k)).item())  # no masked patch in a batch


def test_cosines_and_rank():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 13, generator=g)  # (views, B, D)
    u = F.normalize(x, dim=-1)
    brute = torch.stack([(u[v] @ u[v].T)[~torch.eye(7, dtype=torch.bool)].mean() for v in range(2)]).mean()
    assert pairwise_cos(x).item() == pytest.approx(brute.item(), rel=1e-5)
    assert pairwise_cos(torch.ones(6, 4) * torch.rand(6, 1)).item() == pytest.approx(1.0)  # one direction: collapse
    assert pairwise_cos(torch.eye(5)).item() == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(pairwise_cos(torch.randn(1, 4)).item())

    cls, patch = torch.randn(3, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    brute = torch.stack([F.cosine_similarity(cls[n][None], patch[n]).mean() for n in range(3)]).mean()
    assert cls_patch_cos(cls, patch).item() == pytest.approx(brute.item(), rel=1e-5)
    assert cls_patch_cos(cls, cls[:, None].expand(3, 5, 8)).item() == pytest.approx(1.0)

    assert effective_rank(torch.ones(10, 6) * 3).item() == pytest.approx(1.0, rel=1e-4)
    assert effective_rank(torch.eye(6)).item() == pytest.approx(6.0, rel=1e-5)
    assert effective_rank(torch.eye(6)[:4] * 2).item() == pytest.approx(4.0, rel=1e-5)


def test_forward_backward_health_flag_changes_nothing_else(image_dir, tiny_overrides):
    cfg = load_config("tiny", tiny_overrides)
    _, loader = build_loader(cfg, root=image_dir, rank=0, world_size=1, start_iter=0, end_iter=1)
    batch = BatchAugment(cfg, torch.device("cpu"))(next(iter(loader)), iteration=0, rank=0)
    out = {}
    for health in (False, True):
        torch.manual_seed(0)
        arch = SSLMetaArch(cfg).train()
        total, terms = arch.forward_backward(batch, teacher_temp=0.05, iteration=0, health=health)
        out[health] = total, terms, [p.grad.clone() for p in arch.student.parameters()]
    assert not set(HEALTH_KEYS) & set(out[False][1])
    assert set(HEALTH_KEYS) <= set(out[True][1])
    assert torch.equal(out[False][0], out[True][0])
    assert all(torch.equal(out[False][1][k], out[True][1][k]) for k in out[False][1])
    assert all(torch.equal(a, b) for a, b in zip(out[False][2], out[True][2]))
    h = out[True][1]
    assert h["dino_log_k"].item() == pytest.approx(math.log(cfg["dino"]["head_n_prototypes"]))
    for key in ("dino_target_entropy", "dino_student_entropy"):
        assert 0 <= h[key].item() <= h["dino_log_k"].item() + 1e-4
    assert 0 <= h["ibot_target_entropy"].item() <= math.log(cfg["ibot"]["head_n_prototypes"]) + 1e-4
    assert -1 <= h["cls_pairwise_cos"].item() <= 1 and -1 <= h["cls_patch_cos"].item() <= 1
    assert 1 <= h["feature_rank"].item() <= 2 * cfg["train"]["batch_size_per_gpu"]


# ------------------------------------------------------------------------------------------------ the monitor
def _row(it, dino, cos=0.1, log_k=5.0):
    return {"iteration": it, "dino_global_crops_loss": dino, "dino_local_crops_loss": dino, "dino_log_k": log_k,
            "cls_pairwise_cos": cos, "dino_student_entropy": log_k, "dino_target_entropy": log_k,
            "feature_rank": 3.0}


def _monitor(**kw):
    args = dict(warmup_iters=10, dino_margin=0.02, cls_cos_threshold=0.9, warn_every=50, patience=3)
    return HealthMonitor(**{**args, **kw})


def test_monitor_dino_alarm_waits_for_warmup_and_patience_then_repeats_every_n():
    m = _monitor()
    fired = {it: m.check(_row(it, 5.005)) for it in range(0, 120)}
    # Not during the warm-up (0..9); the streak starts at 10 and needs 3 rows.
    assert [it for it, msgs in fired.items() if msgs] == [12, 62, 112]
    assert "since iteration 10" in fired[12][0] and "log K = 5.0000" in fired[12][0]
    m = _monitor()
    # A row away from log K breaks the streak.
    assert not any(m.check(_row(it, 5.005 if it % 3 else 4.5)) for it in range(10, 60))
    # Far from log K on either side: silent.
    m = _monitor()
    assert not any(m.check(_row(it, d)) for it in range(10, 60) for d in (5.1,)) and not m.check(_row(70, 4.9))


def test_monitor_cls_alarm_fires_when_the_cosine_passes_the_threshold_from_below():
    m = _monitor()
    # Initialisation: every CLS token about the same (cosine ~0.99); wandering around the threshold on the way down
    # is no alarm (hysteresis); then they spread.
    assert not any(m.check(_row(it, 4.0, cos=c)) for it, c in enumerate([0.99, 0.98, 0.85, 0.95, 0.6, 0.3]))
    msgs = m.check(_row(6, 4.0, cos=0.97))
    assert len(msgs) == 1 and CLS_ALARM in msgs[0] and "0.970" in msgs[0]
    assert not m.check(_row(7, 4.0, cos=0.98))  # once per warn_every
    assert m.check(_row(60, 4.0, cos=0.98))


def test_monitor_prime_carries_a_resumed_runs_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(_row(it, 5.0, cos=0.5)) + "\n" for it in range(10, 14)) + "{torn")
    m = _monitor()
    m.prime(str(path))
    assert m.check(_row(14, 5.0, cos=0.95))  # both alarms can fire at once in the new process
    assert len(m.check(_row(64, 5.0, cos=0.95))) == 2


# ------------------------------------------------------------------------------------------------ real runs
# The same short run, logged every iteration, with the teacher-temperature warm-up over 5 iterations:
RUN = ["train.batch_size_per_gpu=8", "train.iterations=40", "train.progress_bar=false", "train.probe_every=0",
       "crops.local_crops_number=2", "gram.use_loss=false", "checkpointing.period=1000", "schedules.lr.peak=5e-3",
       "schedules.lr.warmup_iters=2", "schedules.teacher_temp.warmup_iters=5", "health.warn_every=1000",
       # The prototypes train from the start (tiny freezes them for its first 80 iterations, longer than this run).
       "optim.freeze_last_layer_iters=0"]
# Collapsed: the tiny recipe's DINO head on noise images, whose crops say nothing about each other (the digits demo's
# failure, sped up). Healthy: easy views of structured scenes and a head that can commit (16 prototypes, a sharper
# teacher, a larger init): its output stays far from uniform.
COLLAPSED = RUN
HEALTHY = RUN + ["crops.global_crops_scale=[0.9,1.0]", "crops.local_crops_scale=[0.6,1.0]",
                 "dino.head_n_prototypes=16", "dino.head_init_std=0.5", "schedules.teacher_temp.peak=0.04"]


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    from dinov3.eval.scenes import write_scenes

    root = tmp_path_factory.mktemp("scenes")
    write_scenes(str(root), n_train=0, n_val=0, n_unlabeled=16, size=64)
    return str(root / "unlabeled")


def _run(cfg_overrides, data, out, caplog):
    from conftest import one_torch_thread

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov3.train"), one_torch_thread():
        train(load_config("tiny", cfg_overrides), data_dir=data, output_dir=str(out))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return read_metrics(os.path.join(out, "metrics.jsonl")), warnings


def test_alarm_fires_on_a_collapsed_run(image_dir, tmp_path, caplog):
    rows, warnings = _run(COLLAPSED, image_dir, tmp_path, caplog)
    assert len(rows) == 40 and all(set(HEALTH_KEYS) <= set(r) for r in rows)
    last = rows[-1]
    # The collapse itself: the student's output is uniform, so its entropy and both DINO terms sit at log K.
    assert last["dino_student_entropy"] == pytest.approx(last["dino_log_k"], abs=0.02)
    assert abs(last["dino_global_crops_loss"] - last["dino_log_k"]) < 0.02
    alarms = [w for w in warnings if DINO_ALARM in w]
    assert len(alarms) == 1, warnings  # once (health.warn_every=1000)
    assert "collapsed to the uniform distribution" in alarms[0] and "crops.global_crops_scale" in alarms[0]


def test_no_alarm_on_a_healthy_run(scene_dir, tmp_path, caplog):
    rows, warnings = _run(HEALTHY, scene_dir, tmp_path, caplog)
    last = rows[-1]
    assert last["dino_student_entropy"] < last["dino_log_k"] - 0.08  # the DINO head commits to prototypes
    assert not [w for w in warnings if DINO_ALARM in w or CLS_ALARM in w], warnings
