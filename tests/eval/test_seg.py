"""The generated segmentation task (dinov3/eval/scenes.py), the linear segmentation probe (dinov3/eval/seg.py) and the
`dinov3-eval` command (dinov3/eval/cli.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3.eval import cli as eval_cli
from dinov3.eval.scenes import CLASSES, make_scene, write_scenes
from dinov3.eval.seg import (confusion_matrix, find_pairs, iou_from_confusion, load_pair, patch_targets, read_mask,
                             seg_probe)
from dinov3.models import DinoVisionTransformer

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ scenes
def test_scenes_are_a_function_of_the_seed():
    a, ma = make_scene(0, "train", 3, 64)
    b, mb = make_scene(0, "train", 3, 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3) and ma.shape == (64, 64) and ma.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, make_scene(1, "train", 3, 64)[0])
    assert not np.array_equal(a, make_scene(0, "val", 3, 64)[0])  # splits do not share scenes


def test_scenes_cover_the_classes_with_varied_objects():
    stats = {k: {"area": [], "centre": [], "colour": []} for k in range(1, len(CLASSES))}
    seen = np.zeros(len(CLASSES), dtype=int)
    for i in range(40):
        rgb, mask = make_scene(0, "train", i, 64)
        assert mask.max() < len(CLASSES)
        seen += np.bincount(mask.ravel(), minlength=len(CLASSES)) > 0
        for k in np.unique(mask):
            if k == 0:
                continue
            ys, xs = np.nonzero(mask == k)
            stats[k]["area"].append(len(ys))
            stats[k]["centre"].append((ys.mean(), xs.mean()))
            stats[k]["colour"].append(rgb[mask == k].mean(0))
    assert len(CLASSES) >= 6 and (seen >= 5).all()  # ground + 5 object classes, each in several scenes
    for k, s in stats.items():
        area, centre, colour = np.array(s["area"]), np.array(s["centre"]), np.array(s["colour"])
        assert area.max() > 3 * area.min(), (CLASSES[k], "scale")
        assert centre.std(0).min() > 6, (CLASSES[k], "position")
        assert colour.std(0).max() > 25, (CLASSES[k], "colour")
    # Textured, not flat: the pixels of one object vary.
    rgb, mask = make_scene(0, "train", 0, 64)
    k = int(np.bincount(mask.ravel())[1:].argmax()) + 1
    assert rgb[mask == k].std(0).max() > 10


def test_write_scenes_layout(tmp_path):
    meta = write_scenes(str(tmp_path), n_train=3, n_val=2, n_unlabeled=2, size=32, seed=5)
    assert meta["classes"] == list(CLASSES)
    assert json.loads((tmp_path / "classes.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [
        "scene_00000.png", "scene_00000_mask.png", "scene_00001.png", "scene_00001_mask.png"]
    assert sorted(p.name for p in (tmp_path / "unlabeled").iterdir()) == ["scene_00000.png", "scene_00001.png"]
    with Image.open(tmp_path / "train" / "scene_00002_mask.png") as m:
        assert m.mode == "L" and m.size == (32, 32)
        assert np.array_equal(np.asarray(m), make_scene(5, "train", 2, 32)[1])


# ------------------------------------------------------------------------------------------------ the probe
def test_find_pairs_and_masks(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.full((10, 12), 2, np.uint8)).save(tmp_path / "a_mask.png")
    Image.fromarray(rgb).save(tmp_path / "b.jpg")  # no mask
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c_mask.png")  # an RGB mask
    pairs, lonely = find_pairs(tmp_path)
    assert [(p.name, m.name) for p, m in pairs] == [("a.png", "a_mask.png"), ("c.png", "c_mask.png")]
    assert [p.name for p in lonely] == ["b.jpg"]
    img, mask = load_pair(*pairs[0], size=8)
    assert img.shape == (8, 8, 3) and mask.shape == (8, 8) and (mask == 2).all()
    with pytest.raises(ValueError, match="single-channel"):
        read_mask(tmp_path / "c_mask.png")
    Image.fromarray(np.zeros((9, 12), np.uint8)).save(tmp_path / "a_mask.png")
    with pytest.raises(ValueError, match="does not match"):
        load_pair(*pairs[0], size=8)


def test_patch_targets_confusion_and_iou():
    masks = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 2, 2], [2, 2, 255, 255]]])
    t = patch_targets(masks, (2, 2), 3)
    assert torch.allclose(t[0, 0, 0], torch.tensor([1.0, 0, 0]))  # three labelled pixels, all class 0
    assert torch.allclose(t[0, 1, 1], torch.tensor([0.0, 0, 1]))
    pred = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 2], [2, 2, 2, 2], [1, 2, 0, 0]]])
    conf = confusion_matrix(pred, masks, 3)
    assert conf.sum() == 13 and conf[1, 2] == 1 and conf[2, 1] == 1
    miou, per_class = iou_from_confusion(conf)
    assert per_class == pytest.approx([1.0, 3 / 5, 5 / 7])
    assert miou == pytest.approx((1 + 3 / 5 + 5 / 7) / 3)
    assert np.isnan(iou_from_confusion(torch.zeros(2, 2, dtype=torch.long))[0])


def test_seg_probe_learns_linearly_encoded_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    n, h, d, c = 24, 4, 16, 4
    # One class per quadrant of 2x2 patches (bilinear upsampling of the logits blurs only the quadrant edges).
    patch_cls = torch.randint(c, (n, 2, 2), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    masks = patch_cls.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 8x8 pixels per patch
    codes = torch.randn(c, d, generator=g)
    feats = codes[patch_cls] + 0.3 * torch.randn(n, h, h, d, generator=g)
    good = seg_probe(feats[:16], masks[:16], feats[16:], masks[16:], steps=100)
    assert good.miou > 0.9 and good.num_classes == c and good.n_val == 8
    noise = torch.randn(n, h, h, d, generator=g)
    bad = seg_probe(noise[:16], masks[:16], noise[16:], masks[16:], steps=100)
    assert bad.miou < 0.5
    again = seg_probe(feats[:16], masks[:16], feats[16:], masks[16:], steps=100)
    assert again.miou == good.miou  # seeded


# ------------------------------------------------------------------------------------------------ dinov3-eval
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "n_storage_tokens": 1}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = DinoVisionTransformer(**KWARGS)
    torch.save(model.state_dict(), root / "backbone.pth")
    (root / "backbone.json").write_text(json.dumps(KWARGS))
    return root / "backbone.pth"


def test_eval_scenes_then_seg(backbone, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    assert eval_cli.main(["scenes", str(scenes), "--train", "12", "--val", "6", "--size", "32"]) == 0
    assert "12 train, 6 val at 32 px" in capsys.readouterr().out
    out = tmp_path / "res" / "seg.json"
    args = ["seg", "--checkpoint", str(backbone), "--train", str(scenes / "train"), "--val", str(scenes / "val"),
            "--size", "32", "--steps", "20", "--device", "cpu"]
    assert eval_cli.main(args + ["--output", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["task"] == "seg" and 0 <= res["miou"] <= 1 and res["n_train"] == 12 and res["n_val"] == 6
    assert res["classes"][:2] == ["ground", "disc"]  # names from classes.json
    assert f"mIoU {res['miou']:.4f}" in printed and "ground" in printed
    # User errors before any compute: exit status 2 and one line.
    assert eval_cli.main(args[:-2] + ["--size", "30"]) == 2
    assert "multiple of the model's patch size 8" in capsys.readouterr().err
    assert eval_cli.main(["seg", "--checkpoint", str(backbone), "--train", str(tmp_path / "no"), "--val", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "bare" / "x.png")
    assert eval_cli.main(args[:4] + [str(tmp_path / "bare")] + args[5:]) == 2
    assert "no (image, mask) pair" in capsys.readouterr().err


def test_eval_knn_on_class_folders(backbone, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    (tmp_path / "val" / "red" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "knn.json"
    args = ["knn", "--checkpoint", str(backbone), "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
            "--size", "32", "--k", "3", "--device", "cpu", "--output", str(out)]
    assert eval_cli.main(args) == 0
    res = json.loads(out.read_text())
    assert res["classes"] == ["blue", "red"] and res["n_train"] == 12 and res["n_val"] == 6
    assert res["accuracy"] == 1.0  # colour alone separates them, even for a random backbone
    assert len(res["skipped"]) == 1 and res["skipped"][0][0].endswith("broken.png")
    assert "top-1 accuracy 1.0000" in capsys.readouterr().out
    (tmp_path / "val" / "green").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / "green" / "0.png")
    assert eval_cli.main(args) == 2
    assert "classes that --train lacks: green" in capsys.readouterr().err


def test_python_m_dinov3_eval():
    proc = subprocess.run([sys.executable, "-m", "dinov3.eval", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "knn" in proc.stdout and "seg" in proc.stdout and "scenes" in proc.stdout
