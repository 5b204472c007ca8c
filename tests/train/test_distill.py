"""Distillation (dinov3/train/distill.py): both modes through `dinov3-train` on one CPU and under torchrun (gloo),
exact resume, the teacher never in a checkpoint and never trained, the feature losses against their formulas, the
exported student read by `dinov3-features`, and the errors a user gets."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _dist import run_cmd, torchrun_cmd
from conftest import REPO, cli_env, one_torch_thread

from dinov3.train.checkpoint import load_checkpoint
from dinov3.train.cli import main
from dinov3.train.config import ConfigError, load_config
from dinov3.train.data import BatchAugment, build_loader
from dinov3.train.distill import DistillProjection, feature_loss, resize_patch_tokens
from dinov3.train.ssl_arch import SSLMetaArch
from dinov3.train.trainer import train

# Small and quick: 2 local crops, no Gram phase (the official distillation config has none).
BASE = ["train.batch_size_per_gpu=3", "train.iterations=4", "train.progress_bar=false", "crops.local_crops_number=2",
        "gram.use_loss=false", "checkpointing.period=2", "checkpointing.max_to_keep=0", "schedules.lr.warmup_iters=1",
        "train.probe_every=0"]
NANO = ["student.arch=vit_nano"]  # width 32 against the teacher's 64: the projection is exercised


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def teacher(image_dir, tmp_path_factory):
    """A `tiny` run of 2 iterations: its checkpoint (backbone + heads) and its backbone.pth (+ backbone.json)."""
    out = str(tmp_path_factory.mktemp("teacher"))
    with one_torch_thread():
        train(load_config("tiny", BASE + ["train.iterations=2"]), data_dir=image_dir, output_dir=out)
    return {"checkpoint": os.path.join(out, "checkpoints", "checkpoint_00000002.pth"),
            "backbone": os.path.join(out, "backbone.pth")}


def _distill(teacher, mode, *extra):
    path = teacher["checkpoint"] if mode == "heads" else teacher["backbone"]
    return BASE + ["distillation.enabled=true", f"distillation.teacher={path}", f"distillation.mode={mode}", *extra]


# ------------------------------------------------------------------------------------------------ the formulas
def test_feature_losses_against_hand_written_formulas():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    # cosine: rows at 45 degrees and parallel -> mean of (1 - 1/sqrt 2, 0)
    assert feature_loss(s, t, "cosine").item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2)
    # differences (0, -1, 0, 1): squared 0, 1, 0, 1 -> 0.5
    assert feature_loss(s, t, "l2").item() == pytest.approx(0.5)
    # smooth-L1: |d| = 1 is not below beta = 1 -> |d| - beta / 2 = 0.5 twice over 4 elements; beta = 2 -> d^2 / 4
    assert feature_loss(s, t, "smooth_l1", 1.0).item() == pytest.approx(0.25)
    assert feature_loss(s, t, "smooth_l1", 2.0).item() == pytest.approx(0.125)
    # random (..., D) tokens against elementwise Python loops
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    rows = [(a[i, j], b[i, j]) for i in range(2) for j in range(3)]
    cos = sum(1 - float(x @ y) / (float(x.norm()) * float(y.norm())) for x, y in rows) / 6
    sl1 = sum(0.5 * d * d / 0.5 if abs(d) < 0.5 else abs(d) - 0.25 for d in (a - b).flatten().tolist()) / 30
    assert feature_loss(a, b, "cosine").item() == pytest.approx(cos, rel=1e-5)
    assert feature_loss(a, b, "l2").item() == pytest.approx(float(((a - b) ** 2).sum()) / 30, rel=1e-5)
    assert feature_loss(a, b, "smooth_l1", 0.5).item() == pytest.approx(sl1, rel=1e-5)


def test_patch_resize_keeps_the_grid_layout():
    x = torch.arange(8.0).reshape(1, 4, 2)  # 2x2 grid, 2 channels, tokens row-major
    up = resize_patch_tokens(x, (2, 2), (4, 4), "nearest")
    for i in range(4):
        for j in range(4):
            assert torch.equal(up[0, 4 * i + j], x[0, 2 * (i // 2) + j // 2])
    # 2x2 -> 1x1 bilinear with antialias: the triangle filter weighs the four tokens equally
    torch.testing.assert_close(resize_patch_tokens(x, (2, 2), (1, 1)), x.mean(1, keepdim=True))
    assert resize_patch_tokens(x, (2, 2), (2, 2)) is x


def test_feature_losses_of_a_step_against_the_formulas(teacher):
    """The Distiller's terms from given tokens: global CLS vs the same crop, every (local, teacher global) pair of an
    image, patch tokens vs the teacher's resized to the student's grid, and their weighted sum."""
    cfg = load_config("tiny", _distill(teacher, "features", *NANO, "distillation.loss=l2",
                                       "distillation.cls_loss_weight=0.5", "distillation.local_cls_loss_weight=2",
                                       "distillation.patch_loss_weight=3"))
    arch = SSLMetaArch(cfg)
    g = torch.Generator().manual_seed(1)
    n_g, n_l, B, D = 2, 3, 2, 64
    st = {"proj_g_cls": torch.randn(n_g * B, D, generator=g), "proj_l_cls": torch.randn(n_l * B, D, generator=g),
          "proj_g_patch": torch.randn(n_g * B, 16, D, generator=g)}  # a 4x4 student grid (32 px, patch 8)
    t = {"cls": torch.randn(n_g * B, D, generator=g), "patch": torch.randn(n_g * B, 16, D, generator=g)}
    total, losses = arch.distiller.feature_losses(st, t, n_global=n_g, crop_size=32, student_patch=8)
    mse = lambda x, y: float(((x - y) ** 2).mean())  # noqa: E731
    want_local = sum(mse(st["proj_l_cls"][i * B + b], t["cls"][j * B + b])
                     for i in range(n_l) for j in range(n_g) for b in range(B)) / (n_l * n_g * B)
    assert losses["distill_cls_loss"].item() == pytest.approx(mse(st["proj_g_cls"], t["cls"]), rel=1e-5)
    assert losses["distill_local_cls_loss"].item() == pytest.approx(want_local, rel=1e-5)
    assert losses["distill_patch_loss"].item() == pytest.approx(mse(st["proj_g_patch"], t["patch"]), rel=1e-5)
    assert total.item() == pytest.approx(0.5 * losses["distill_cls_loss"].item()
                                         + 2 * losses["distill_local_cls_loss"].item()
                                         + 3 * losses["distill_patch_loss"].item(), rel=1e-6)
    # A student of patch 4 has an 8x8 grid: the teacher's 4x4 map is interpolated onto it.
    st["proj_g_patch"] = torch.randn(n_g * B, 64, D, generator=g)
    _, losses = arch.distiller.feature_losses(st, t, n_global=n_g, crop_size=32, student_patch=4)
    hw = F.interpolate(t["patch"].transpose(1, 2).unflatten(-1, (4, 4)), size=(8, 8), mode="bilinear",
                       align_corners=False).flatten(-2).transpose(1, 2)
    assert losses["distill_patch_loss"].item() == pytest.approx(mse(st["proj_g_patch"], hw), rel=1e-5)


def test_projection_only_when_the_widths_differ():
    assert not list(DistillProjection(64, 64).parameters())
    proj = DistillProjection(32, 64)
    out = proj(torch.randn(4, 32), torch.randn(6, 32), torch.randn(4, 5, 32))
    assert out["proj_g_cls"].shape == (4, 64) and out["proj_l_cls"].shape == (6, 64)
    assert out["proj_g_patch"].shape == (4, 5, 64)


# ------------------------------------------------------------------------------------------------ a step
@pytest.mark.parametrize("mode", ["heads", "heads-masked", "features", "features-patch4"])
def test_step_trains_the_student_only(teacher, image_dir, mode):
    """One step of each mode; "features-patch4": a student of patch 4 (8x8 grid) against the teacher's patch 8 (4x4)."""
    masked = mode == "heads-masked"
    extra = (NANO + (["student.patch_size=4"] if mode.endswith("patch4") else []) if mode.startswith("features")
             else [f"distillation.mask_student={str(masked).lower()}", "ibot.mask_sample_probability=1.0"])
    mode = mode.split("-")[0]
    cfg = load_config("tiny", _distill(teacher, mode, *extra))
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg).train()
    t = arch.distiller.teacher
    before = {k: v.clone() for k, v in t.state_dict().items()}
    _, loader = build_loader(cfg, root=image_dir, rank=0, world_size=1, start_iter=0, end_iter=1)
    batch = BatchAugment(cfg, torch.device("cpu"))(next(iter(loader)), iteration=0, rank=0)
    total, losses = arch.forward_backward(batch, teacher_temp=0.05, iteration=0, health=True)
    assert torch.isfinite(total) and all(torch.isfinite(v) for k, v in losses.items() if k.endswith("_loss"))
    want = ({"dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss"} if mode == "heads" else
            {"distill_cls_loss", "distill_local_cls_loss", "distill_patch_loss", "koleo_loss"})
    assert want <= set(losses) and "feature_rank" in losses
    # The teacher: frozen, no gradient, unchanged, in eval mode, not a submodule (so in no state dict).
    assert not any(p.requires_grad for p in t.parameters()) and all(p.grad is None for p in t.parameters())
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items()) and not t.training
    assert not any(m is t for m in arch.modules())
    # Every trainable student parameter got a gradient; the mask token is frozen where the student sees unmasked
    # crops (official), and trains with distillation.mask_student.
    assert arch.student.backbone.mask_token.requires_grad == masked
    missing = [n for n, p in arch.student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    if mode == "features":
        assert arch.student.distill_proj.cls.weight.grad.abs().sum() > 0
    else:  # the targets come from the teacher file's heads, not from the student's EMA
        ckpt = load_checkpoint(teacher["checkpoint"])["model"]
        torch.testing.assert_close(t.dino_head.last_layer.weight, ckpt["teacher.dino_head.last_layer.weight"])


# ------------------------------------------------------------------------------------------------ the CLI, one CPU
def _cli(data, out, *overrides, timeout=240):
    cmd = [sys.executable, "-m", "dinov3.train", "--config", "tiny", "--data", data, "--output", out, *overrides]
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["heads", "features"])
def test_cli_one_cpu_checkpoint_export_and_features(teacher, image_dir, tmp_path, mode, capsys):
    extra = NANO if mode == "features" else []
    out = str(tmp_path / "run")
    proc = _cli(image_dir, out, *_distill(teacher, mode, *extra, "train.iterations=2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1]
    key = "ibot_loss" if mode == "heads" else "distill_patch_loss"
    assert all(math.isfinite(r[key]) and math.isfinite(r["total_loss"]) for r in rows)
    state = load_checkpoint(os.path.join(out, "checkpoints", "checkpoint_00000002.pth"))
    src = teacher["checkpoint"] if mode == "heads" else teacher["backbone"]
    assert state["distillation"] == {"teacher": os.path.abspath(src), "sha256": _sha256(src), "mode": mode}
    # No teacher weights in the checkpoint: exactly the keys of the student's own model (+ its EMA).
    cfg = load_config("tiny", _distill(teacher, mode, *extra))
    assert set(state["model"]) == set(SSLMetaArch(cfg).state_dict())
    assert all(k.split(".")[0] in ("student", "teacher", "dino_loss", "ibot_loss") for k in state["model"])
    proj = [k for k in state["model"] if ".distill_proj." in k]
    assert bool(proj) == (mode == "features")  # the projection is saved (32 -> 64), not exported
    exported = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    assert not any("distill_proj" in k for k in exported)
    assert exported["cls_token"].shape[-1] == (32 if mode == "features" else 64)
    for k, v in exported.items():
        assert torch.equal(v, state["model"]["teacher.backbone." + k])  # the student's EMA, as official exports
    from dinov3.cli import features as features_cli

    rc = features_cli.main(["--checkpoint", os.path.join(out, "backbone.pth"), "--device", "cpu", image_dir, "-o",
                            str(tmp_path / "f.npz"), "--size", "32", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    import numpy as np

    assert np.load(tmp_path / "f.npz")["cls"].shape[-1] == exported["cls_token"].shape[-1]


# ------------------------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("mode", ["heads", "heads-softmax", "features"])
def test_resume_is_exact(teacher, image_dir, tmp_path, mode):
    """heads-softmax: head distillation with softmax centering (README: measured beside Sinkhorn-Knopp), whose
    running centers must come back from the checkpoint."""
    extra = {"features": NANO, "heads-softmax": ["train.centering=softmax"]}.get(mode, [])
    cfg = load_config("tiny", _distill(teacher, mode.split("-")[0], *extra))
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    with one_torch_thread():
        train(cfg, data_dir=image_dir, output_dir=full)
        train(cfg, data_dir=image_dir, output_dir=part, max_iters=2)
        train(cfg, data_dir=image_dir, output_dir=part, resume=True)
    a = load_checkpoint(os.path.join(full, "checkpoints", "checkpoint_00000004.pth"))
    b = load_checkpoint(os.path.join(part, "checkpoints", "checkpoint_00000004.pth"))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if mode == "heads-softmax":  # the centers moved (and so were compared above)
        assert a["model"]["dino_loss.center"].abs().sum() > 0 and a["model"]["ibot_loss.center"].abs().sum() > 0
    for sid, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(b["optimizer"]["state"][sid][name], v), (sid, name)
    assert [r["total_loss"] for r in _rows(full)] == [r["total_loss"] for r in _rows(part)]


def test_resume_refuses_a_changed_or_missing_teacher(teacher, image_dir, tmp_path, capsys):
    src = str(tmp_path / "teacher.pth")
    shutil.copy(teacher["checkpoint"], src)
    out = str(tmp_path / "run")
    overrides = BASE + ["distillation.enabled=true", f"distillation.teacher={src}"]
    with one_torch_thread():
        train(load_config("tiny", overrides), data_dir=image_dir, output_dir=out, max_iters=2)
    sd = torch.load(src, weights_only=True)
    sd["model"]["teacher.dino_head.last_layer.weight"] += 1  # another teacher under the same name
    torch.save(sd, src)
    args = ["--data", image_dir, "--output", out, "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "dinov3-train: error: --resume: distillation.teacher=" in err and "has changed since the run started" in err
    os.unlink(src)
    assert main(args) == 2 and "which is no longer there" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ torchrun
def test_torchrun_two_processes_both_modes(teacher, image_dir, tmp_path):
    env = dict(cli_env())
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for mode in ("heads", "features"):
        out = str(tmp_path / mode)
        extra = NANO if mode == "features" else []
        cmd = torchrun_cmd(2, "-m", "dinov3.train", "--config", "tiny", "--data", image_dir, "--output", out,
                           *_distill(teacher, mode, *extra, "train.iterations=2"))
        proc = run_cmd(cmd, env, 240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        state = load_checkpoint(os.path.join(out, "checkpoints", "checkpoint_00000002.pth"))
        assert len(state["rng"]) == 2 and state["distillation"]["mode"] == mode
        assert all(math.isfinite(r["total_loss"]) for r in _rows(out))
        assert os.path.exists(os.path.join(out, "backbone.pth"))


# ------------------------------------------------------------------------------------------------ errors
def test_config_errors():
    with pytest.raises(ConfigError, match="distillation.teacher=None: distillation.enabled=true needs"):
        load_config("tiny", ["distillation.enabled=true"])
    with pytest.raises(ConfigError, match="distillation.mode: expected one of"):
        load_config("tiny", ["distillation.mode=logits"])
    with pytest.raises(ConfigError, match="distillation.loss: expected one of"):
        load_config("tiny", ["distillation.loss=l1"])
    with pytest.raises(ConfigError, match="distillation.patch_loss_weight=-1: must be >= 0"):
        load_config("tiny", ["distillation.enabled=true", "distillation.teacher=x",
                             "distillation.patch_loss_weight=-1"])


def test_teacher_errors(teacher, tmp_path):
    def build(*overrides):
        SSLMetaArch(load_config("tiny", BASE + ["distillation.enabled=true", *overrides]))

    with pytest.raises(ConfigError, match=r"distillation.teacher=\S*nowhere.pth: no such file or folder"):
        build(f"distillation.teacher={tmp_path / 'nowhere.pth'}")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth cannot be read"):
        build(f"distillation.teacher={junk}")
    with pytest.raises(ConfigError, match="holds backbone weights only, while distillation.mode=heads"):
        build(f"distillation.teacher={teacher['backbone']}", "distillation.mode=heads")
    with pytest.raises(ConfigError, match="the teacher's patch size is 8, the student's 4"):
        build(f"distillation.teacher={teacher['checkpoint']}", "student.patch_size=4")
    with pytest.raises(ConfigError, match="the teacher's dino head has 256 prototypes, the student's 128"):
        build(f"distillation.teacher={teacher['checkpoint']}", "dino.head_n_prototypes=128")
    with pytest.raises(ConfigError, match="patch size 8 does not divide crops.global_crops_size=36"):
        build(f"distillation.teacher={teacher['backbone']}", "student.patch_size=4", "crops.global_crops_size=36",
              "crops.local_crops_size=16")
    with pytest.raises(ConfigError, match="a distilled student starts from scratch"):
        load_config("tiny", ["distillation.enabled=true", f"distillation.teacher={teacher['backbone']}",
                             f"student.pretrained_weights={teacher['backbone']}"])


def test_cli_errors_are_messages(teacher, image_dir, tmp_path, capsys):
    def run(out, *overrides):
        return main(["--config", "tiny", "--data", image_dir, "--output", str(tmp_path / out), *overrides])

    assert run("a", "distillation.enabled=true", f"distillation.teacher={tmp_path / 'missing.pth'}") == 2
    err = capsys.readouterr().err
    assert "dinov3-train: error: distillation.teacher=" in err and "no such file or folder" in err
    assert not (tmp_path / "a").exists()  # refused before the output folder is made
    # head distillation compares per patch: another patch size is refused before any training
    assert run("b", "distillation.enabled=true", "distillation.mode=heads",
               f"distillation.teacher={teacher['checkpoint']}", "student.patch_size=4") == 2
    assert "dinov3-train: error: distillation.teacher=" in capsys.readouterr().err
    assert run("c", "distillation.enabled=true", f"distillation.teacher={teacher['backbone']}",
               f"--init-from={teacher['backbone']}") == 2
    assert "a distilled student starts from scratch" in capsys.readouterr().err
