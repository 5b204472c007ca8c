"""Probe maps written by a tiny run (dinov3/train/probes.py) and `dinov3-plot` on that run (dinov3/cli/plot.py)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from dinov3.cli import plot as plot_cli
from dinov3.train.config import load_config
from dinov3.train.probes import Probes, choose_images, list_events, reference_patches
from dinov3.train.rundir import RunFolderError, read_metrics, refuse_existing_run, remove_run
from dinov3.train.trainer import train

N_IMAGES = 3
SIZE = 64  # probe_size 0: twice tiny's 32 px global crops
PATCH = 8


@pytest.fixture(scope="module")
def probe_run(image_dir, tmp_path_factory):
    from conftest import TINY_OVERRIDES, one_torch_thread

    out = str(tmp_path_factory.mktemp("probes"))
    # gram.teacher_momentum=null: the teacher keeps momentum 0.99 in the Gram phase (from iteration 2 here), so its
    # maps move visibly within 6 iterations (0.999 would leave the 8-bit PNGs unchanged).
    cfg = load_config("tiny", TINY_OVERRIDES + ["train.probe_every=2", f"train.probe_images={N_IMAGES}",
                                                "gram.teacher_momentum=null"])
    with one_torch_thread():
        train(cfg, data_dir=image_dir, output_dir=out)
    return cfg, out


def _png(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_probe_files_and_content(probe_run):
    _, out = probe_run
    probes = os.path.join(out, "probes")
    assert list_events(probes) == [0, 2, 4, 6]  # the start, every 2 iterations, the end
    with open(os.path.join(probes, "probe_set.json")) as f:
        meta = json.load(f)
    assert meta["size"] == SIZE and meta["patch_size"] == PATCH and len(meta["images"]) == N_IMAGES
    assert meta["reference_patches"] == [[2, 2], [4, 4], [5, 5]] == [list(p) for p in reference_patches(SIZE // PATCH)]
    assert all(not e["source"].endswith("corrupt.png") and os.path.isabs(e["source"]) for e in meta["images"])
    for i in range(N_IMAGES):
        assert _png(os.path.join(probes, "images", f"probe{i}.png")).shape == (SIZE, SIZE, 3)
    kinds = ["pca"] + [f"sim_r{r}_c{c}" for r, c in meta["reference_patches"]]
    for event in ("iter_00000000", "iter_00000006"):
        names = sorted(os.listdir(os.path.join(probes, event)))
        assert names == sorted(f"probe{i}_{k}.png" for i in range(N_IMAGES) for k in kinds)
        for name in names:
            path = os.path.join(probes, event, name)
            rgb = _png(path)
            assert rgb.shape == (SIZE, SIZE, 3) and os.path.getsize(path) > 150
            blocks = rgb.reshape(SIZE // PATCH, PATCH, SIZE // PATCH, PATCH, 3)
            assert (blocks == blocks[:, :1, :, :1]).all()  # one colour per patch
            assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 4  # a map, not a flat image
            if "_sim_" in name:
                r, c = (int(v) for v in name[:-4].split("_sim_r")[1].split("_c"))
                assert tuple(rgb[r * PATCH + 3, c * PATCH + 3]) == (255, 0, 0)  # the reference patch in red
        sheet = _png(os.path.join(probes, event + ".png"))
        # A row per image (2 px gaps), columns input | PCA | three similarity maps.
        assert sheet.shape == (N_IMAGES * SIZE + (N_IMAGES - 1) * 2, 5 * SIZE + 4 * 2, 3)
        assert (sheet[SIZE:SIZE + 2] == 255).all()
    # The maps follow the teacher: the PCA of the first image changed between the start and the end.
    assert not np.array_equal(_png(os.path.join(probes, "iter_00000000", "probe0_pca.png")),
                              _png(os.path.join(probes, "iter_00000006", "probe0_pca.png")))


def test_probes_leave_training_unchanged(probe_run, image_dir, tmp_path):
    from conftest import TINY_OVERRIDES, one_torch_thread

    _, out = probe_run
    with one_torch_thread():
        train(load_config("tiny", TINY_OVERRIDES + ["train.probe_every=0", "gram.teacher_momentum=null"]),
              data_dir=image_dir, output_dir=str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "probes"))
    keys = ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "gram_loss", "feature_rank")
    rows = [read_metrics(os.path.join(d, "metrics.jsonl")) for d in (out, tmp_path)]
    assert [[r.get(k) for k in keys] for r in rows[0]] == [[r.get(k) for k in keys] for r in rows[1]]


def test_probe_set_kept_on_resume_and_later_events_dropped(probe_run, image_dir, tmp_path):
    cfg, out = probe_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = json.loads((run / "probes" / "probe_set.json").read_text())
    # A resume from iteration 4 of a run that had written events 0..6: the set is reused, 6 goes.
    probes = Probes.prepare(cfg, image_paths=[], output_dir=str(run), start_iter=4, write=True)
    assert list_events(str(run / "probes")) == [0, 2, 4]
    assert probes.sources == [e["source"] for e in before["images"]]
    assert json.loads((run / "probes" / "probe_set.json").read_text()) == before
    # probes/ is part of the run: a new run into the folder is refused, --overwrite deletes it.
    with pytest.raises(RunFolderError, match="probes/"):
        refuse_existing_run(str(run), resume=False, overwrite=False)
    remove_run(str(run))
    assert not (run / "probes").exists()


def test_choose_images_is_seeded_and_skips_unreadable(image_dir):
    from dinov3.train.data import find_images

    paths = find_images(image_dir)
    everything = choose_images(paths, 100, seed=0, size=16)
    assert len(everything) == len(paths) - 1  # all but the corrupt file
    assert all(a.shape == (16, 16, 3) and a.dtype == np.uint8 for _, a in everything)
    first = [p for p, _ in choose_images(paths, 3, seed=0, size=16)]
    assert first == [p for p, _ in everything[:3]]
    assert first != [p for p, _ in choose_images(paths, 3, seed=1, size=16)]


# ------------------------------------------------------------------------------------------------ dinov3-plot
def test_dinov3_plot_writes_figures_and_page(probe_run, capsys):
    _, out = probe_run
    assert plot_cli.main([out]) == 0
    plots = os.path.join(out, "plots")
    printed = capsys.readouterr().out.split()
    expected = {"losses.png": (650, 1300), "health.png": (650, 1100), "schedules.png": (320, 1400)}
    for name, (h, w) in expected.items():
        rgb = _png(os.path.join(plots, name))
        assert rgb.shape[:2] == (h, w)
        assert os.path.getsize(os.path.join(plots, name)) > 20_000
        assert (rgb < 128).mean() > 0.005  # curves, labels and axes, not a blank canvas
    strip = _png(os.path.join(plots, "probes.png"))
    assert strip.shape[0] > 400 and strip.shape[1] > 400 and os.path.getsize(os.path.join(plots, "probes.png")) > 20_000
    assert sorted(os.path.basename(p) for p in printed) == sorted([*expected, "probes.png", "index.html"])
    page = open(os.path.join(plots, "index.html")).read()
    for name in expected:
        assert f"src='{name}'" in page
    srcs = [s.split("'")[0] for s in page.split("src='")[1:]]
    probe_maps = [s for s in srcs if "iter_" in s]
    assert len(probe_maps) == N_IMAGES * 4 * 4  # images x map kinds x events (0, 2, 4, 6)
    assert all(os.path.isfile(os.path.join(plots, s)) for s in srcs)
    assert "iteration 6" in page and "similarity to patch (4, 4)" in page


def test_dinov3_plot_output_elsewhere_and_errors(probe_run, tmp_path, capsys):
    _, out = probe_run
    assert plot_cli.main([out, "--output", str(tmp_path / "figs"), "--strip-columns", "2"]) == 0
    page = (tmp_path / "figs" / "index.html").read_text()
    srcs = [s.split("'")[0] for s in page.split("src='")[1:]]
    assert all((tmp_path / "figs" / s).is_file() for s in srcs)
    assert "iteration 0" in page and "iteration 6" in page and "iteration 2" not in page
    capsys.readouterr()
    assert plot_cli.main([str(tmp_path / "nothing")]) == 2
    assert "dinov3-plot: error:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot_cli.main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_gram_start_is_marked_only_once_the_rows_reach_it():
    from dinov3.cli.plot import gram_start

    cfg = {"gram": {"use_loss": True, "start_iter": 150}}
    rows = [{"iteration": i} for i in range(20)]
    assert gram_start(rows, cfg) is None  # a 20-iteration run of tiny (Gram from 150): no mark at 150
    assert gram_start(rows + [{"iteration": 160}], cfg) == 150
    assert gram_start(rows, {"gram": {"use_loss": False, "start_iter": 0}}) is None
