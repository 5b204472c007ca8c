"""dinov3-features and dinov3-viz on generated PNGs with a tiny random checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3.cli import features as features_cli
from dinov3.cli import viz as viz_cli
from dinov3.models import vit_small
from dinov3.viz import patch_similarity, pca_rgb

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8, "attn_backend": "reference"}
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = vit_small(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    ckpt = root / "tiny.pth"
    torch.save(model.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(imgs / "sub" / "b.png")
    (imgs / "notes.txt").write_text("not an image")
    return root, ckpt, model, imgs


def model_args(ckpt):
    return ["--checkpoint", str(ckpt), "--arch", "vit_small", "--model-kwargs", json.dumps(TINY), "--device", "cpu"]


def normalized(img: Image.Image) -> torch.Tensor:
    arr = (np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD
    return torch.tensor(arr.transpose(2, 0, 1), dtype=torch.float32)


def test_features_safetensors_square(setup, tmp_path):
    from safetensors import safe_open

    root, ckpt, model, imgs = setup
    out = tmp_path / "feats.safetensors"
    rc = features_cli.main(model_args(ckpt) + [str(imgs), "--output", str(out), "--size", "32", "--batch-size", "1",
                                               "--no-progress"])
    assert rc == 0
    with safe_open(str(out), "pt") as f:
        paths = json.loads(f.metadata()["paths"])
        cls, patch, storage = f.get_tensor("cls"), f.get_tensor("patch"), f.get_tensor("storage")
    assert [p.split("/")[-1] for p in paths] == ["a.png", "b.png"]  # recursive, sorted, .txt skipped
    assert cls.shape == (2, 32) and patch.shape == (2, 4, 4, 32) and storage.shape == (2, 4, 32)
    # expected: the test's own resize (bicubic to 32x32) and ImageNet normalisation
    x = torch.stack([normalized(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC)) for p in paths])
    with torch.no_grad():
        ref = model.forward_features(x)
    torch.testing.assert_close(cls, ref["x_norm_clstoken"], rtol=0, atol=1e-5)
    torch.testing.assert_close(patch, ref["x_norm_patchtokens"].reshape(2, 4, 4, 32), rtol=0, atol=1e-5)


def test_features_native_sizes_npz_and_npy(setup, tmp_path):
    root, ckpt, model, imgs = setup
    out = tmp_path / "feats.npz"
    rc = features_cli.main(model_args(ckpt) + [str(imgs / "a.png"), str(imgs / "sub"), "-o", str(out), "--size", "0",
                                               "--no-progress"])
    assert rc == 0
    data = np.load(out)
    # native 56x40 -> 7x5 patches; 47x33 centre-cropped to 40x32 -> 5x4 patches
    assert data["patch.0"].shape == (5, 7, 32) and data["patch.1"].shape == (4, 5, 32)
    crop = Image.open(imgs / "sub" / "b.png").convert("RGB").crop((3, 0, 43, 32))
    with torch.no_grad():
        ref = model.forward_features(normalized(crop)[None])["x_norm_clstoken"][0]
    torch.testing.assert_close(torch.from_numpy(data["cls"][1]), ref, rtol=0, atol=1e-5)
    # .npy needs one size
    rc = features_cli.main(model_args(ckpt) + [str(imgs), "-o", str(tmp_path / "f.npy"), "--size", "0",
                                               "--no-progress"])
    assert rc == 2
    rc = features_cli.main(model_args(ckpt) + [str(imgs), "-o", str(tmp_path / "f.npy"), "--size", "16",
                                               "--keep-aspect", "--no-progress"])
    assert rc == 0
    assert np.load(tmp_path / "f.npy").shape == (2, 32)
    # a.png 56x40 -> shorter side 16 -> 22x16 -> crop 16x16; b.png 47x33 -> 23x16 -> 16x16
    assert np.load(tmp_path / "f_patch.npy").shape == (2, 2, 2, 32)
    assert len((tmp_path / "f_paths.txt").read_text().split()) == 2


def test_features_bad_inputs(setup, tmp_path, capsys):
    root, ckpt, model, imgs = setup
    rc = features_cli.main(model_args(ckpt) + [str(tmp_path / "missing"), "-o", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    # checkpoint for another size
    args = ["--checkpoint", str(ckpt), "--arch", "vit_small", "--device", "cpu"]
    rc = features_cli.main(args + [str(imgs), "-o", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "mis-shaped" in capsys.readouterr().err
    rc = features_cli.main(model_args(ckpt) + [str(imgs), "-o", str(tmp_path / "x.csv")])
    assert rc == 2 and "dinov3-features: error: --output must end with" in capsys.readouterr().err


def test_viz_writes_pca_and_similarity_pngs(setup, tmp_path):
    root, ckpt, model, imgs = setup
    out_dir = tmp_path / "viz"
    rc = viz_cli.main(model_args(ckpt) + [str(imgs / "a.png"), "--output-dir", str(out_dir), "--patch", "2", "3",
                                          "--fg-threshold", "0.5"])
    assert rc == 0
    pca = np.asarray(Image.open(out_dir / "a_pca.png"))
    sim = np.asarray(Image.open(out_dir / "a_sim_r2_c3.png"))
    assert pca.shape == sim.shape == (40, 56, 3)  # native resolution, already a multiple of 8
    # one colour per 8x8 patch
    assert (pca[:8, :8] == pca[0, 0]).all() and (sim[16:24, 24:32] == (255, 0, 0)).all()
    with torch.no_grad():
        feats = model.forward_features(normalized(Image.open(imgs / "a.png").convert("RGB"))[None])
    grid = feats["x_norm_patchtokens"][0].reshape(5, 7, 32)
    rgb, fg = pca_rgb(grid, fg_threshold=0.5)
    assert (pca[::8, ::8][~fg] == 0).all() and fg.any() and (~fg).any()
    expected = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(pca[::8, ::8].astype(int) - expected.astype(int)).max() <= 1
    # default location: next to the input
    rc = viz_cli.main(model_args(ckpt) + [str(imgs / "sub")])
    assert rc == 0 and (imgs / "sub" / "b_pca.png").exists()
    assert np.asarray(Image.open(imgs / "sub" / "b_pca.png")).shape == (32, 40, 3)
    # a second run over the folder does not treat its own outputs as inputs
    assert viz_cli.main(model_args(ckpt) + [str(imgs / "sub")]) == 0
    assert not (imgs / "sub" / "b_pca_pca.png").exists()


def test_viz_bad_patch(setup, tmp_path, capsys):
    root, ckpt, model, imgs = setup
    rc = viz_cli.main(model_args(ckpt) + [str(imgs / "a.png"), "--output-dir", str(tmp_path), "--patch", "5", "0"])
    assert rc == 2 and "outside" in capsys.readouterr().err


def test_pca_and_similarity_math():
    # features on a 2x3 grid that vary along one direction only: PC1 carries everything
    direction = torch.randn(16)
    t = torch.arange(6, dtype=torch.float32)
    feats = (t[:, None] * direction[None]).reshape(2, 3, 16)
    rgb, fg = pca_rgb(feats)
    r = rgb[..., 0].reshape(-1)
    assert np.isclose(r.min(), 0) and np.isclose(r.max(), 1)
    assert np.all(np.diff(r) > 0) or np.all(np.diff(r) < 0)  # monotone in t
    assert fg.all()
    feats = torch.randn(2, 3, 16)
    sim = patch_similarity(feats, 0, 2)
    assert np.isclose(sim[0, 2], 1.0)
    f = feats.reshape(6, 16).double()
    expected = [(f[i] @ f[2] / (f[i].norm() * f[2].norm())).item() for i in range(6)]
    np.testing.assert_allclose(sim.reshape(-1), expected, atol=1e-12)
    assert len(set(np.round(sim.reshape(-1), 6))) == 6


def test_cli_detects_untied_local_norm(tmp_path):
    # a SAT-493M-style checkpoint (local_cls_norm present) loads without extra flags
    m = vit_small(**TINY, untie_global_and_local_cls_norm=True)
    ckpt = tmp_path / "sat.pth"
    torch.save(m.state_dict(), ckpt)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "z.png")
    rc = features_cli.main(model_args(ckpt) + [str(tmp_path / "z.png"), "-o", str(tmp_path / "z.safetensors"),
                                               "--no-progress"])
    assert rc == 0


# ------------------------------------------------------------------------ user errors, unreadable inputs, big images
SCRIPTS = Path(sys.executable).parent  # this environment's console scripts


def run_script(name: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def random_png(path, h=40, w=48, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("script", ["dinov3-features", "dinov3-viz"])
def test_console_scripts_report_user_errors_without_traceback(setup, tmp_path, script):
    root, ckpt, model, imgs = setup
    out = ["-o", tmp_path / "f.npz"] if script == "dinov3-features" else ["--output-dir", tmp_path]
    bad = ["--device", "tpu"] if script == "dinov3-features" else ["--model-kwargs", '{"foo": 1}']
    r = run_script(script, "--checkpoint", ckpt, "--arch", "vit_small", imgs / "a.png", *out, *bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    expected = "--device 'tpu' is not a device" if script == "dinov3-features" else (
        "--model-kwargs: unknown DinoVisionTransformer argument(s) foo; accepted: attn_backend, depth,")
    assert r.stderr.startswith(f"{script}: error: {expected}"), r.stderr


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")


@pytest.mark.parametrize("inputs, extra, message", [
    (["{imgs}"], ["--device", "tpu"], "--device 'tpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    pytest.param(["{imgs}"], ["--device", "cuda"], "--device cuda: ", marks=NO_CUDA),
    (["{t}/missing"], [], "no such file or folder: {t}/missing"),
    (["{t}/empty"], [], "no image files (.jpg .jpeg .png"),
    (["{t}/texts"], [], "in {t}/texts (1 other files, e.g. a.txt)"),
    (["{imgs}/a.png/"], [], "{imgs}/a.png/ is a file, not a folder"),
    (["{imgs}"], ["-o", "{t}/file.txt/f.npz"], "--output: cannot create {t}/file.txt: {t}/file.txt is a file"),
    (["{imgs}"], ["-o", "{t}/out.npz"], "--output {t}/out.npz is a folder, not a file"),
], ids=["tpu", "cuda", "missing input", "empty folder", "no images in folder", "file as folder",
        "output parent is a file", "output is a folder"])
def test_features_usage_errors_before_loading_the_model(setup, tmp_path, capsys, monkeypatch, inputs, extra, message):
    root, ckpt, model, imgs = setup
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    (tmp_path / "out.npz").mkdir()
    fill = {"t": tmp_path, "imgs": imgs}
    monkeypatch.setattr(features_cli, "load_model", _no_model)
    argv = [a.format(**fill) for a in inputs + ["-o", "{t}/f.npz"] + extra]
    rc = features_cli.main(model_args(ckpt)[:-2] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dinov3-features: error: ") and message.format(**fill) in err, err


@pytest.mark.parametrize("checkpoint, extra, message", [
    ("{t}", [], "--checkpoint {t} is a folder; give a weights file"),
    ("{imgs}/a.png", [], "--checkpoint {imgs}/a.png: cannot be read as weights: not a PyTorch weights file"),
    ("{ckpt}", ["--model-kwargs", '{"foo": 1, "bar": 2}'],
     "--model-kwargs: unknown DinoVisionTransformer argument(s) bar, foo; accepted: attn_backend, depth, "),
    ("{ckpt}", ["--arch", "vit_giant"], "--arch 'vit_giant' is unknown; choose from vit_7b, vit_base, "),
])
def test_features_checkpoint_and_model_errors(setup, tmp_path, capsys, checkpoint, extra, message):
    root, ckpt, model, imgs = setup
    fill = {"t": tmp_path, "imgs": imgs, "ckpt": ckpt}
    args = model_args(ckpt)
    args[1] = checkpoint.format(**fill)
    if "--arch" in extra:
        args[2:4] = []
    rc = features_cli.main(args + extra + [str(imgs), "-o", str(tmp_path / "f.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dinov3-features: error: " + message.format(**fill)), err


def test_viz_output_errors_before_loading_the_model(setup, tmp_path, capsys, monkeypatch):
    root, ckpt, model, imgs = setup
    monkeypatch.setattr(viz_cli, "load_model", _no_model)
    (tmp_path / "file.txt").write_text("x")
    rc = viz_cli.main(model_args(ckpt) + [str(imgs), "--output-dir", str(tmp_path / "file.txt")])
    assert rc == 2 and f"--output-dir {tmp_path}/file.txt is a file, not a folder" in capsys.readouterr().err
    # two inputs named alike would overwrite each other's maps in one output folder
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        random_png(tmp_path / sub / "same.png")
    rc = viz_cli.main(model_args(ckpt) + [str(tmp_path / "x"), str(tmp_path / "y"), "--output-dir",
                                          str(tmp_path / "out")])
    assert rc == 2 and "would both write" in capsys.readouterr().err


@pytest.fixture
def mixed_folder(tmp_path, monkeypatch):
    """Two good images and four unreadable files, one of them over a (lowered) decompression-bomb limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "mixed"
    folder.mkdir()
    random_png(folder / "good1.png", 16, 24, seed=1)
    random_png(folder / "good2.png", 24, 16, seed=2)
    random_png(folder / "huge.png", 40, 48, seed=3)  # 1920 pixels
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture")
    data = random_png(tmp_path / "full.png", 24, 24, seed=4).read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    reasons = {"empty.jpg": "empty file (0 bytes)", "huge.png": "too many pixels",
               "text.jpg": "not an image file Pillow can decode", "truncated.png": "truncated or corrupt"}
    return folder, reasons


def test_features_skip_unreadable_files_and_record_them(setup, mixed_folder, tmp_path, capsys):
    from safetensors import safe_open

    root, ckpt, model, imgs = setup
    folder, reasons = mixed_folder
    out = tmp_path / "f.safetensors"
    rc = features_cli.main(model_args(ckpt) + [str(folder), "-o", str(out), "--size", "16", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0 and "2 images (4 skipped) -> " in captured.out
    for name, reason in reasons.items():
        assert f"dinov3-features: warning: skipping {folder / name}: {reason}" in captured.err
    assert "dinov3-features: warning: 4 of 6 input files skipped (reasons above)" in captured.err
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert [Path(p).name for p in json.loads(meta["paths"])] == ["good1.png", "good2.png"]
        assert {Path(p).name for p in json.loads(meta["skipped"])} == set(reasons)
        assert len(json.loads(meta["skipped_reasons"])) == 4 and f.get_tensor("cls").shape == (2, 32)
    rc = features_cli.main(model_args(ckpt) + [str(folder), "-o", str(tmp_path / "f.npy"), "--size", "16",
                                               "--no-progress"])
    assert rc == 0 and len((tmp_path / "f_skipped.txt").read_text().splitlines()) == 4
    # nothing readable: an error, and no output
    bad = [str(folder / name) for name in reasons]
    rc = features_cli.main(model_args(ckpt) + bad + ["-o", str(tmp_path / "none.npz"), "--no-progress"])
    assert rc == 2 and "error: none of the 4 input files could be read" in capsys.readouterr().err
    assert not (tmp_path / "none.npz").exists()


def test_viz_skips_unreadable_files_and_shows_progress(setup, mixed_folder, tmp_path, capsys):
    root, ckpt, model, imgs = setup
    folder, reasons = mixed_folder
    rc = viz_cli.main(model_args(ckpt) + [str(folder), "--output-dir", str(tmp_path / "maps")])
    captured = capsys.readouterr()
    assert rc == 0 and sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["good1_pca.png", "good2_pca.png"]
    for name, reason in reasons.items():
        assert f"dinov3-viz: warning: skipping {folder / name}: {reason}" in captured.err
    assert "4 of 6 input files skipped" in captured.err and "6/6" in captured.err  # the progress bar


def test_16bit_png_gives_the_features_of_its_8bit_version(setup, tmp_path):
    root, ckpt, model, imgs = setup
    values = (np.random.default_rng(5).random((24, 32)) * 65535).round().astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray(np.rint(values / 257).astype(np.uint8)).convert("RGB").save(tmp_path / "flat.png")
    out = tmp_path / "f.npz"
    rc = features_cli.main(model_args(ckpt) + [str(tmp_path / "deep.png"), str(tmp_path / "flat.png"), "-o",
                                               str(out), "--size", "0", "--no-progress"])
    assert rc == 0
    cls = np.load(out)["cls"]
    np.testing.assert_allclose(cls[0], cls[1], rtol=0, atol=1e-5)


def test_large_images_downscaled_with_a_note(setup, tmp_path, capsys, monkeypatch):
    from dinov3.cli import _common

    root, ckpt, model, imgs = setup
    monkeypatch.setattr(_common, "DEFAULT_MAX_SIDE", 64)  # stands for 1024: keeps the test small
    big = random_png(tmp_path / "big.png", 120, 200)
    rc = viz_cli.main(model_args(ckpt) + [str(big), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    # 200x120 -> 64x38 -> cropped to multiples of the patch (8): 64x32
    assert rc == 0 and np.asarray(Image.open(tmp_path / "big_pca.png")).shape == (32, 64, 3)
    assert f"dinov3-viz: note: {big} is 200x120 pixels: downscaled to 64x38" in err
    for limit, grid in ((None, (4, 8)), ("0", (15, 25))):
        extra = ["--max-side", limit] if limit else []
        rc = features_cli.main(model_args(ckpt) + [str(big), "-o", str(tmp_path / "f.npz"), "--size", "0",
                                                   "--no-progress"] + extra)
        assert rc == 0 and np.load(tmp_path / "f.npz")["patch"].shape == (1, *grid, 32)


# ---------------------------------------------------------------------------------------- the trainer's outputs
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real ``dinov3-train`` run of two iterations (tiny recipe: patch 8, one storage token, 64 wide)."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    data.mkdir()
    for i in range(6):
        random_png(data / f"im{i}.png", 40, 48, seed=10 + i)
    r = run_script("dinov3-train", "--config", "tiny", "--data", data, "--output", root / "out", "--max-iters", 2,
                   "train.progress_bar=false", "train.batch_size_per_gpu=4", "crops.local_crops_number=2",
                   timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, root / "out"


def features_of(model, paths, size):
    x = torch.stack([normalized(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths])
    with torch.no_grad():
        return model.forward_features(x)["x_norm_clstoken"]


def test_features_of_the_trainers_backbone_and_checkpoint(trained_run, tmp_path, capsys):
    from safetensors import safe_open

    from dinov3.models import DinoVisionTransformer

    data, out = trained_run
    kwargs = json.loads((out / "backbone.json").read_text())
    model = DinoVisionTransformer(**kwargs).eval()
    model.load_state_dict(torch.load(out / "backbone.pth", weights_only=True))
    paths = sorted(data.iterdir())
    expected = features_of(model, paths, 32)
    # backbone.pth with backbone.json beside it: no --arch
    r = run_script("dinov3-features", "--checkpoint", out / "backbone.pth", "--device", "cpu", data, "-o",
                   tmp_path / "b.safetensors", "--size", 32, "--no-progress")
    assert r.returncode == 0, r.stderr
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("cls"), expected, rtol=0, atol=1e-5)
    # the training checkpoint: its EMA teacher, the model from its config
    ckpt = out / "checkpoints" / "checkpoint_00000002.pth"
    state = torch.load(ckpt, weights_only=True)
    teacher = {k[len("teacher.backbone."):]: v for k, v in state["model"].items() if k.startswith("teacher.backbone.")}
    model.load_state_dict(teacher)
    for arch in ([], ["--arch", "vit_tiny"]):
        rc = features_cli.main(["--checkpoint", str(ckpt), "--device", "cpu", str(data), "-o", str(tmp_path / "c.npz"),
                                "--size", "32", "--no-progress"] + arch)
        assert rc == 0
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "c.npz")["cls"]), features_of(model, paths, 32),
                                   rtol=0, atol=1e-5)
    # --arch that contradicts the weights: the differing shapes, and what to do
    rc = features_cli.main(["--checkpoint", str(out / "backbone.pth"), "--arch", "vit_small", str(data), "-o",
                            str(tmp_path / "d.npz")])
    err = capsys.readouterr().err
    # 38 tensors, plus the local-crop CLS norm (weight, bias) that the tiny recipe unties
    assert rc == 2 and "mis-shaped (40): cls_token: checkpoint (1, 1, 64) vs model (1, 1, 384)" in err
    assert (f"the model is the one {out / 'backbone.json'} gives, with the size of --arch vit_small: "
            "leave out --arch") in err
    # without its backbone.json the file does not say its model
    alone = tmp_path / "alone.pth"
    alone.write_bytes((out / "backbone.pth").read_bytes())
    rc = features_cli.main(["--checkpoint", str(alone), str(data), "-o", str(tmp_path / "d.npz")])
    assert rc == 2 and "--arch is needed: " in capsys.readouterr().err
    rc = features_cli.main(["--checkpoint", str(alone), "--arch", "vit_tiny", str(data), "-o", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "the checkpoint has patch_size 8 but the model 16" in err and "backbone.json" in err


def test_safetensors_weights_with_arch_or_a_json_beside_them(setup, tmp_path):
    from safetensors.torch import save_file

    from dinov3.models.vision_transformer import released_kwargs, size_kwargs

    root, ckpt, model, imgs = setup
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    image = str(imgs / "a.png")
    assert features_cli.main(model_args(ckpt) + [image, "-o", str(tmp_path / "ref.npz"), "--no-progress"]) == 0
    args = model_args(weights)
    assert features_cli.main(args + [image, "-o", str(tmp_path / "arch.npz"), "--no-progress"]) == 0
    # the same model described by a JSON file beside the weights, as dinov3-train writes backbone.json
    described = {**released_kwargs(), **size_kwargs("vit_small"), **TINY}
    (tmp_path / "w.json").write_text(json.dumps(described))
    rc = features_cli.main(["--checkpoint", str(weights), "--device", "cpu", image, "-o", str(tmp_path / "json.npz"),
                            "--no-progress"])
    assert rc == 0
    ref = np.load(tmp_path / "ref.npz")["cls"]
    for name in ("arch.npz", "json.npz"):
        np.testing.assert_allclose(np.load(tmp_path / name)["cls"], ref, rtol=0, atol=1e-6)
