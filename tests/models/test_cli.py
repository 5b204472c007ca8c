"""dinov3-features and dinov3-viz on generated PNGs with a tiny random checkpoint."""

import json

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
