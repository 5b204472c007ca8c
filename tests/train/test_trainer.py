"""End-to-end tests of the training loop on generated images (CPU, tiny config)."""

import json
import math
import os

import pytest
import torch

from dinov3.models import DinoVisionTransformer
from dinov3.train.checkpoint import list_checkpoints, load_checkpoint
from dinov3.train.config import load_config
from dinov3.train.data import BatchAugment, build_loader
from dinov3.train.ssl_arch import SSLMetaArch
from dinov3.train.trainer import train

LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(image_dir, tmp_path_factory):
    """The uninterrupted reference run: 6 iterations, checkpoints every 2, Gram phase from iteration 2."""
    from conftest import TINY_OVERRIDES

    out = str(tmp_path_factory.mktemp("full"))
    cfg = load_config("tiny", TINY_OVERRIDES)
    train(cfg, data_dir=image_dir, output_dir=out)
    return cfg, out


def test_losses_finite_gram_switch_and_outputs(full_run):
    cfg, out = full_run
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == list(range(6))
    for r in rows:
        for k in LOSS_KEYS + ("total_loss", "lr", "images_per_s"):
            assert math.isfinite(r[k]), (k, r)
    # The corrupt file is counted once, from the batch that first drew it (every file is drawn within 6 iterations).
    counts = [r["skipped_files"] for r in rows]
    assert counts == sorted(counts) and counts[-1] == 1
    # Gram phase: off before gram.start_iter=2, on from it; one refresh (max_updates=1) after iteration 3.
    assert [r["gram_active"] for r in rows] == [False, False, True, True, True, True]
    assert all(("gram_loss" in r) == r["gram_active"] for r in rows)
    assert all(math.isfinite(r["gram_loss"]) and r["gram_loss"] >= 0 for r in rows if r["gram_active"])
    assert [r["gram_updates"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert all(r["gram_loss_weight"] == 1.0 for r in rows if r["gram_active"])
    # Linear warm-up of the lr over 2 iterations, then cosine from the peak 1e-3; from gram.start_iter=2 on, times
    # gram.lr_multiplier=0.6 and the EMA momentum is gram.teacher_momentum=0.999 instead of tiny's 0.99.
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(0.5e-3) and rows[2]["lr"] == pytest.approx(0.6e-3)
    assert [r["momentum"] for r in rows] == [0.99, 0.99] + [0.999] * 4
    # Prototypes frozen for tiny's 80 iterations: the whole of this run.
    assert all(r["last_layer_lr"] == 0.0 for r in rows)

    # Keep-last-2 checkpoints, loadable with weights_only=True.
    ckpts = list_checkpoints(os.path.join(out, "checkpoints"))
    assert [i for i, _ in ckpts] == [4, 6]
    state = load_checkpoint(ckpts[-1][1])
    assert state["iteration"] == 6 and state["gram"] == {"initialized": True, "num_updates": 1}
    assert len(state["skipped_files"]) == 1 and state["skipped_files"][0].endswith("corrupt.png")
    assert not [f for f in os.listdir(os.path.join(out, "checkpoints")) if f.startswith(".tmp")]

    # backbone.pth + backbone.json rebuild the EMA teacher backbone exactly.
    with open(os.path.join(out, "backbone.json")) as f:
        kwargs = json.load(f)
    model = DinoVisionTransformer(**kwargs)
    sd = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    model.load_state_dict(sd, strict=True)
    for k, v in sd.items():
        assert torch.equal(v, state["model"]["teacher.backbone." + k])
    assert "blocks.0.attn.qkv.weight" in sd and "cls_token" in sd  # official key layout


def test_teacher_is_ema_of_student(image_dir, tmp_path, tiny_overrides):
    cfg = load_config("tiny", tiny_overrides + ["schedules.momentum.peak=0.9", "schedules.momentum.start=0.9",
                                               "schedules.lr.warmup_iters=0"])
    train(cfg, data_dir=image_dir, output_dir=str(tmp_path), max_iters=1)
    state = load_checkpoint(os.path.join(tmp_path, "checkpoints", "checkpoint_00000001.pth"))["model"]
    # The initial student (= initial teacher) is rebuilt from the same seed.
    torch.manual_seed(cfg["train"]["seed"])
    init = SSLMetaArch(cfg).student.state_dict()
    n_checked = 0
    for k, s0 in init.items():
        if not s0.is_floating_point() or k.endswith("bias_mask") or "rope_embed" in k:
            continue
        s1, t1 = state["student." + k], state["teacher." + k]
        torch.testing.assert_close(t1, 0.9 * s0 + 0.1 * s1, rtol=1e-5, atol=1e-7)
        n_checked += 1
    changed = sum(not torch.equal(init[k], state["student." + k]) for k in init if init[k].is_floating_point())
    assert n_checked > 20 and changed > 20  # the student moved, so the formula was really exercised


def test_update_teacher_formula_unit(tiny_overrides):
    cfg = load_config("tiny", tiny_overrides)
    arch = SSLMetaArch(cfg)
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.clone() for p in arch.teacher.parameters()]
    s = [p.clone() for p in arch.student.parameters()]
    arch.update_teacher(0.7)
    for a, b, t in zip(t0, s, arch.teacher.parameters()):
        torch.testing.assert_close(t, 0.7 * a + 0.3 * b)


def test_every_trainable_parameter_gets_a_gradient(image_dir, tiny_overrides):
    cfg = load_config("tiny", tiny_overrides + ["ibot.mask_sample_probability=1.0", "gram.start_iter=0"])
    arch = SSLMetaArch(cfg).train()
    _, loader = build_loader(cfg, root=image_dir, rank=0, world_size=1, start_iter=0, end_iter=1)
    batch = BatchAugment(cfg, torch.device("cpu"))(next(iter(loader)), iteration=0, rank=0)
    arch.load_gram_from_teacher()
    total, losses = arch.forward_backward(batch, teacher_temp=0.04, iteration=0)
    assert set(LOSS_KEYS) | {"gram_loss"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(total)
    missing = [n for n, p in arch.student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    nonfinite = [n for n, p in arch.student.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not nonfinite
    zero = [n for n, p in arch.student.named_parameters() if not p.grad.any()]
    assert len(zero) <= 2, zero  # at most e.g. the zero-initialised mask token's exact cancellations
    assert all(p.grad is None for p in arch.teacher.parameters())
    assert all(p.grad is None for p in arch.gram_teacher.parameters())


def test_resume_matches_uninterrupted_run(full_run, image_dir, tmp_path):
    cfg, full_out = full_run
    out = str(tmp_path)
    # "Killed" run: got past the checkpoint at 2 and one more iteration, whose checkpoint never made it to disk.
    train(cfg, data_dir=image_dir, output_dir=out, max_iters=3)
    os.unlink(os.path.join(out, "checkpoints", "checkpoint_00000003.pth"))
    assert [r["iteration"] for r in _rows(out)] == [0, 1, 2]
    train(cfg, data_dir=image_dir, output_dir=out, max_iters=4, resume=True)

    ref_rows, rows = _rows(full_out), _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]  # the killed run's row 2 was replaced
    for a, b in zip(ref_rows[:4], rows):
        for k in LOSS_KEYS + ("gram_loss", "total_loss", "lr", "teacher_temp", "gram_updates"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), (a["iteration"], k)
    ref = load_checkpoint(os.path.join(full_out, "checkpoints", "checkpoint_00000004.pth"))
    got = load_checkpoint(os.path.join(out, "checkpoints", "checkpoint_00000004.pth"))
    assert ref["model"].keys() == got["model"].keys()
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=1e-6, msg=k)
    for sid, st in ref["optimizer"]["state"].items():
        for name, v in st.items():
            torch.testing.assert_close(got["optimizer"]["state"][sid][name], v, rtol=0, atol=1e-6)
    assert got["gram"] == ref["gram"]


def test_sigkill_then_resume_matches_uninterrupted_run(full_run, image_dir, tmp_path):
    """A real kill: `dinov3-train` in a subprocess gets SIGKILL as soon as its first checkpoint is on disk (possibly
    mid-write of the next one); `--resume` must then finish with the uninterrupted run's losses and weights."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import TINY_OVERRIDES

    cfg, full_out = full_run
    out = str(tmp_path / "run")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "dinov3.train", "--config", "tiny", "--data", image_dir, "--output", out,
           *TINY_OVERRIDES]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = os.path.join(out, "checkpoints", "checkpoint_00000002.pth")
    deadline = time.monotonic() + 240
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]  # killed, not finished
    done = [it for it, _ in list_checkpoints(os.path.join(out, "checkpoints"))]
    assert done and max(done) < 6, done

    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    ref_rows, rows = _rows(full_out), _rows(out)
    assert [r["iteration"] for r in rows] == list(range(6))
    for a, b in zip(ref_rows, rows):
        for k in LOSS_KEYS + ("gram_loss", "total_loss", "lr"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["iteration"], k)
    ref = load_checkpoint(os.path.join(full_out, "checkpoints", "checkpoint_00000006.pth"))
    got = load_checkpoint(os.path.join(out, "checkpoints", "checkpoint_00000006.pth"))
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=1e-5, msg=k)


def test_resume_through_the_api_refuses_another_config(full_run, image_dir, tmp_path):
    from dinov3.train.config import ConfigError

    cfg, _ = full_run
    out = str(tmp_path)
    train(cfg, data_dir=image_dir, output_dir=out, max_iters=2)
    from conftest import TINY_OVERRIDES

    other = load_config("tiny", [*TINY_OVERRIDES, "train.seed=9"])
    with pytest.raises(ConfigError, match="train.seed: 0 in the checkpoint, 9 now"):
        train(other, data_dir=image_dir, output_dir=out, max_iters=3, resume=True)
    train(other, data_dir=image_dir, output_dir=out, max_iters=3, resume=True, allow_config_change=True)
    assert [r["iteration"] for r in _rows(out)] == [0, 1, 2]
