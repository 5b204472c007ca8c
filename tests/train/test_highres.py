"""The high-resolution adaptation stage (`--config tiny-highres --init-from CHECKPOINT`): recipes, the per-iteration
resolution schedule (same on every rank, both sizes), crops and iBOT masks at each size, the CLI on one CPU and under
a 2-process torchrun, exact resume, and the exported backbone in dinov3-features."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _dist import assert_no_gloo_thread_left, cli_exit_driver, run_cmd, torchrun_cmd
from conftest import cli_env, one_torch_thread

from dinov3.train.checkpoint import load_checkpoint
from dinov3.train.config import ConfigError, backbone_kwargs, load_config
from dinov3.train.data import build_loader
from dinov3.train.highres import ResolutionSchedule, crop_resolutions
from dinov3.train.trainer import Trainer, train

PRE = ["train.batch_size_per_gpu=2", "crops.local_crops_number=2", "train.iterations=2", "train.progress_bar=false",
       "gram.use_loss=false", "checkpointing.period=2", "train.probe_every=0"]
# The stage at test size: its own crop sizes (64/96 px global, 96/144 px Gram), a few iterations. With seed 0 the
# schedule draws 64, 96, 96, 96 px for iterations 0-3 (checked below).
HR = ["train.batch_size_per_gpu=2", "crops.local_crops_number=2", "train.iterations=4", "train.progress_bar=false",
      "checkpointing.period=2", "train.probe_every=0", "train.log_every=1"]
LOSSES = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "gram_loss")


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pretrained(image_dir, tmp_path_factory):
    """A tiny pretraining run's last training checkpoint (backbone and heads)."""
    out = str(tmp_path_factory.mktemp("pre"))
    with one_torch_thread():
        train(load_config("tiny", PRE), data_dir=image_dir, output_dir=out)
    return os.path.join(out, "checkpoints", "checkpoint_00000002.pth")


@pytest.fixture(scope="module")
def cli_run(image_dir, pretrained, tmp_path_factory):
    """`dinov3-train --config tiny-highres --init-from CHECKPOINT` on one CPU, uninterrupted."""
    out = str(tmp_path_factory.mktemp("hr_cli"))
    cmd = [sys.executable, "-m", "dinov3.train", "--config", "tiny-highres", "--data", image_dir, "--output", out,
           "--init-from", pretrained, *HR]
    res = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    return out, res.stderr


# ------------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("name", ["tiny-highres", "vits16-highres", "vitb16-highres", "vitl16-highres"])
def test_highres_recipes_follow_the_official_stage(name):
    base, cfg = load_config(name.removesuffix("-highres")), load_config(name)
    c = cfg["crops"]
    res = crop_resolutions(cfg)
    assert [r.probability for r in res] == pytest.approx([0.3, 0.3, 0.3, 0.05, 0.05])
    # Two global sizes, 2x and 3x the pretraining crop; the Gram teacher at 1.5x each; local crops grow with them.
    g0 = base["crops"]["global_crops_size"]
    assert sorted({r.global_size for r in res}) == [2 * g0, 3 * g0]
    assert all(r.gram_size * 2 == r.global_size * 3 for r in res)
    assert [r.local_size for r in res] == sorted(r.local_size for r in res) and res[0].local_size < res[-1].local_size
    assert cfg["train"]["batch_size_per_gpu"] * 2 == base["train"]["batch_size_per_gpu"]
    assert backbone_kwargs(cfg)["img_size"] == max(c["global_crops_size"])
    # The model is the pretraining one (the stage continues it).
    assert cfg["student"]["arch"] == base["student"]["arch"] and cfg["student"]["model_kwargs"] == base["student"][
        "model_kwargs"]
    g, s = cfg["gram"], cfg["schedules"]
    assert g["use_loss"] and g["start_iter"] == 0 and not g["rep_update"] and g["loss_weight"] == 1.5
    assert cfg["student"]["pretrained_heads"] and cfg["optim"]["freeze_last_layer_iters"] == 0
    assert s["teacher_temp"]["start"] == s["teacher_temp"]["peak"] == 0.07
    # lr: 0 -> 0.25x the recipe's peak over the first third, then constant.
    from dinov3.train.schedules import Schedule

    lr = Schedule.from_config(s["lr"], cfg["train"]["iterations"])
    n, ramp = cfg["train"]["iterations"], s["lr"]["cosine_iters"]
    peak = 0.25 * base["schedules"]["lr"]["peak"]
    assert lr(0) == 0.0 and 0 < lr(ramp // 2) < peak and lr(ramp) == pytest.approx(peak) == lr(n - 1)
    assert abs(ramp - n / 3) <= 1


def test_crop_size_lists_are_checked():
    with pytest.raises(ConfigError, match="one entry per resolution.*global_crops_size has 2.*local_crops_size has 3"):
        load_config("tiny", ["crops.global_crops_size=[32, 48]", "crops.local_crops_size=[16, 16, 24]"])
    with pytest.raises(ConfigError, match=r"crops.global_crops_size=\[32, 44\]: must be a positive multiple"):
        load_config("tiny", ["crops.global_crops_size=[32, 44]", "crops.gram_teacher_crops_size=48"])
    with pytest.raises(ConfigError, match="gram_teacher_crops_size.*at least.*entry by entry"):
        load_config("tiny", ["crops.global_crops_size=[32, 64]", "crops.gram_teacher_crops_size=48"])
    with pytest.raises(ConfigError, match="ratios.*not all 0"):
        load_config("tiny", ["crops.global_crops_size=[32, 64]", "crops.gram_teacher_crops_size=96",
                             "crops.global_local_crop_pairs_ratios=[0, 0]"])
    with pytest.raises(ConfigError, match="or a list of them"):
        load_config("tiny", ["crops.local_crops_size=big"])
    # A number stands for every entry; null ratios are equal.
    cfg = load_config("tiny", ["crops.global_crops_size=[32, 64]", "crops.gram_teacher_crops_size=96"])
    assert [tuple(r) for r in crop_resolutions(cfg)] == [(32, 16, 96, 0.5), (64, 16, 96, 0.5)]
    assert [tuple(r) for r in crop_resolutions(load_config("tiny"))] == [(32, 16, 48, 1.0)]


# ------------------------------------------------------------------------------------------------ the schedule
def test_resolution_schedule_draws_the_ratios_from_the_iteration_alone():
    cfg = load_config("tiny-highres")
    a, b = ResolutionSchedule.from_config(cfg), ResolutionSchedule.from_config(cfg)
    draws = [a(i) for i in range(20000)]
    assert [b(i) for i in reversed(range(20000))] == draws[::-1]  # stateless: any order, any instance
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert np.allclose(freq, [0.3, 0.3, 0.3, 0.05, 0.05], atol=0.015), freq
    assert [crop_resolutions(cfg)[i].global_size for i in draws[:4]] == [64, 96, 96, 96]  # what HR's runs see
    other = ResolutionSchedule.from_config(load_config("tiny-highres", ["train.seed=1"]))
    assert [other(i) for i in range(50)] != draws[:50]
    assert all(ResolutionSchedule.from_config(load_config("tiny"))(i) == 0 for i in range(10))


def test_every_rank_samples_the_same_resolution(image_dir):
    cfg = load_config("tiny-highres", HR)
    samplers = [build_loader(cfg, root=image_dir, rank=r, world_size=2, start_iter=0, end_iter=20)[1].batch_sampler
                for r in (0, 1)]
    sched = ResolutionSchedule.from_config(cfg)
    for it in range(20):
        a, b = (s.batch(it) for s in samplers)
        assert [x[:2] for x in a] != [x[:2] for x in b]  # other images on each rank ...
        assert {x[3] for x in a} == {x[3] for x in b} == {sched(it)}  # ... at the iteration's resolution


def test_crops_and_ibot_masks_follow_each_resolution(image_dir):
    cfg = load_config("tiny-highres", HR + ["train.batch_size_per_gpu=4", "ibot.mask_sample_probability=0.5"])
    _, loader = build_loader(cfg, root=image_dir, rank=0, world_size=1, start_iter=0, end_iter=6)
    lo, hi = cfg["ibot"]["mask_ratio_min_max"]
    seen = set()
    for batch in loader:
        side = batch["global_crops"].shape[-1]
        seen.add(side)
        grid = side // 8
        assert batch["global_crops"].shape == (8, 3, side, side)
        assert batch["gram_crops"].shape[-1] == side * 3 // 2
        assert batch["local_crops"].shape[-1] in {r.local_size for r in crop_resolutions(cfg) if r.global_size == side}
        masks = batch["masks"]
        assert masks.shape == (8, grid * grid)
        # The official collate: int(8 * 0.5) = 4 images masked, with int(N * r) patches for the upper edges r of
        # linspace(min, max, 5) (float32), the other 4 with none.
        edges = np.linspace(lo, hi, 5, dtype=np.float32)[1:]
        assert sorted(masks.sum(1).tolist()) == [0] * 4 + sorted(int(grid * grid * float(e)) for e in edges)
        assert batch["mask_indices"].tolist() == masks.flatten().nonzero().flatten().tolist()
        assert int(batch["n_masked_patches"]) == int(masks.sum())
        counts = masks.sum(1, keepdim=True).clamp(min=1).expand_as(masks)[masks]
        torch.testing.assert_close(batch["masks_weight"], 1.0 / counts.float())
    assert seen == {64, 96}


# ------------------------------------------------------------------------------------------------ the stage
def test_heads_come_from_the_checkpoint_and_the_stage_needs_one(image_dir, pretrained, tmp_path, backbone_file):
    cfg = load_config("tiny-highres", HR + [f"student.pretrained_weights={json.dumps(pretrained)}"])
    trainer = Trainer(cfg, data_dir=image_dir, output_dir=str(tmp_path / "a"))
    try:
        saved = load_checkpoint(pretrained)["model"]  # the pretraining run's EMA teacher: backbone and heads
        teacher = {k[len("teacher."):]: v for k, v in saved.items() if k.startswith("teacher.")}
        arch = trainer.arch
        for net in (arch.student, arch.teacher):
            for k, v in net.state_dict().items():
                assert torch.equal(v, teacher[k]), k
        for k, v in arch.gram_teacher.state_dict().items():
            assert torch.equal(v, teacher["backbone." + k]), k
        assert trainer.head_warmup_iters == 0
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match="--init-from"):
        Trainer(load_config("tiny-highres", HR), data_dir=image_dir, output_dir=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="holds no DINO/iBOT heads.*pretrained_heads=false"):
        load_config("tiny-highres", HR + [f"student.pretrained_weights={json.dumps(backbone_file)}"])


def test_stage_without_a_training_checkpoint_is_a_message_before_anything_is_made(image_dir, backbone_file, tmp_path,
                                                                                  capsys):
    from dinov3.train.cli import main

    out = tmp_path / "out"
    for extra, message in (([], "--config tiny-highres continues a run (student.pretrained_heads=true): give its "
                                "training checkpoint with --init-from"),
                           (["--init-from", backbone_file], "holds no DINO/iBOT heads")):
        assert main(["--config", "tiny-highres", "--data", image_dir, "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dinov3-train: error: ") and message in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def backbone_file(pretrained, tmp_path_factory):
    """The pretraining run's exported backbone.pth (no heads)."""
    return os.path.join(os.path.dirname(os.path.dirname(pretrained)), "backbone.pth")


def test_stage_runs_from_the_cli_on_one_cpu(cli_run):
    out, err = cli_run
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert [r["global_crops_size"] for r in rows] == [64, 96, 96, 96]
    assert all(r["gram_active"] and r["gram_loss_weight"] == 1.5 and r["gram_updates"] == 0 for r in rows)
    for r in rows:
        for k in LOSSES + ("total_loss",):
            assert np.isfinite(r[k]), (k, r)
    assert rows[0]["lr"] == 0.0 and 0 < rows[1]["lr"] < rows[3]["lr"] <= 2.5e-4
    assert all(r["backbone_lr_factor"] == 1.0 and r["teacher_temp"] == 0.07 for r in rows)
    assert "heads loaded from" in err


def test_stage_resumes_exactly(cli_run, image_dir, pretrained, tmp_path):
    ref, _ = cli_run
    out = str(tmp_path / "run")
    cfg = load_config("tiny-highres", HR + [f"student.pretrained_weights={json.dumps(pretrained)}"])
    with one_torch_thread():
        train(cfg, data_dir=image_dir, output_dir=out, max_iters=2)
        train(cfg, data_dir=image_dir, output_dir=out, resume=True)
    for a, b in zip(_rows(ref), _rows(out), strict=True):
        assert a["global_crops_size"] == b["global_crops_size"]
        for k in LOSSES:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["iteration"], k)
    a = load_checkpoint(os.path.join(ref, "checkpoints", "checkpoint_00000004.pth"))["model"]
    b = load_checkpoint(os.path.join(out, "checkpoints", "checkpoint_00000004.pth"))["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_exported_backbone_loads_in_dinov3_features(cli_run, image_dir, tmp_path):
    from dinov3.cli import features as features_cli
    from dinov3.models import DinoVisionTransformer
    from PIL import Image

    out, _ = cli_run
    img = tmp_path / "imgs" / "x.png"
    img.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(img)
    feats = tmp_path / "f.npz"
    rc = features_cli.main(["--checkpoint", os.path.join(out, "backbone.pth"), str(img.parent), "-o", str(feats),
                            "--size", "96", "--device", "cpu", "--no-progress"])
    assert rc == 0
    got = np.load(feats)
    with open(os.path.join(out, "backbone.json")) as f:
        model = DinoVisionTransformer(**json.load(f)).eval()
    model.load_state_dict(torch.load(os.path.join(out, "backbone.pth"), weights_only=True))
    arr = (np.asarray(Image.open(img), dtype=np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        ref = model.forward_features(torch.tensor(arr.transpose(2, 0, 1), dtype=torch.float32)[None])
    cls = got["cls"]
    assert cls.shape == (1, 64)
    np.testing.assert_allclose(cls, ref["x_norm_clstoken"].numpy(), rtol=0, atol=1e-4)


def test_stage_under_torchrun_two_processes(image_dir, pretrained, tmp_path):
    out = str(tmp_path / "ddp")
    env = cli_env()
    # Through the exit driver: dinov3-train's own main, then a check that no gloo thread outlives it (this test once
    # hung in CI at interpreter exit on one: tests/_dist.py).
    cmd = torchrun_cmd(2, cli_exit_driver(tmp_path), "--config", "tiny-highres", "--data", image_dir, "--output", out,
                       "--init-from", pretrained, *HR, "--max-iters", "2", "dino.koleo_loss_distributed=true")
    res = run_cmd(cmd, env, 240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    assert_no_gloo_thread_left(res.stderr, 2)
    rows = _rows(out)
    # The crop side averaged over the two ranks: each iteration's own size, so both ranks drew it.
    assert [r["global_crops_size"] for r in rows] == [64, 96]
    assert all(np.isfinite(r[k]) for r in rows for k in LOSSES)
    state = load_checkpoint(os.path.join(out, "checkpoints", "checkpoint_00000002.pth"))
    assert len(state["rng"]) == 2 and state["data"]["world_size"] == 2
    assert os.path.exists(os.path.join(out, "backbone.pth"))
