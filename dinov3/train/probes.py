"""Dense-feature probes of a run: the DINOv3 paper's PCA and patch-similarity maps of a few fixed images, drawn from
the EMA teacher every ``train.probe_every`` iterations so their evolution can be followed.

At the start of a run ``train.probe_images`` images are chosen from the data folder (a seeded draw among the
readable ones), centre-cropped and resized to ``train.probe_size`` pixels and kept in ``OUTPUT/probes/images/`` with
``probes/probe_set.json`` (their source files, size and reference patches); a resumed run reuses them. Each probe
event ``N`` (iterations done; 0 = the initial weights) writes

    probes/iter_0000000N/probeI_pca.png            first three principal components of image I's patch features
    probes/iter_0000000N/probeI_sim_rR_cC.png      cosine similarity of every patch to patch (R, C), marked in red
    probes/iter_0000000N.png                       one sheet: a row per image (input, PCA, similarity maps)

and the sheet goes to TensorBoard as the image ``probes``. Maps are drawn at the image's resolution (each patch a
patch_size x patch_size block); similarities on a fixed [-1, 1] scale, so maps of different iterations compare.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch

from dinov3.images import UnreadableImage, center_square, load_rgb
from dinov3.viz import colorize, patch_similarity, pca_rgb, upscale_nearest

logger = logging.getLogger("dinov3.train")

PROBE_DIR = "probes"
SET_FILE = "probe_set.json"
_EVENT = re.compile(r"^iter_(\d{8})(\.png)?$")
_SEED_SALT = 0x9B0BE5


def reference_patches(grid: int) -> list[tuple[int, int]]:
    """Three reference patches of a grid x grid map: upper-left quarter, centre, lower-right quarter."""
    q, c = grid // 4, grid // 2
    return list(dict.fromkeys([(q, q), (c, c), (grid - 1 - q, grid - 1 - q)]))


def choose_images(paths: list[str], n: int, seed: int, size: int) -> list[tuple[str, np.ndarray]]:
    """Up to ``n`` (source path, (size, size, 3) uint8) from ``paths``, drawn in a seeded order, unreadable files
    passed over. Uses its own RNG: the training streams are untouched."""
    order = list(range(len(paths)))
    random.Random(seed ^ _SEED_SALT).shuffle(order)
    chosen = []
    for i in order:
        try:
            img = load_rgb(paths[i])
        except UnreadableImage:
            continue
        chosen.append((paths[i], np.asarray(center_square(img, size))))
        if len(chosen) == n:
            break
    return chosen


def event_name(done: int) -> str:
    return f"iter_{done:08d}"


def list_events(probe_dir: str) -> list[int]:
    """The probe events (iterations done) written under ``probe_dir``, sorted."""
    if not os.path.isdir(probe_dir):
        return []
    found = {int(m.group(1)) for m in map(_EVENT.match, os.listdir(probe_dir)) if m}
    return sorted(found)


class Probes:
    """The probe set of one run and the writer of its maps (rank 0 writes; under FSDP every rank runs the
    teacher, since its forward is collective)."""

    def __init__(self, images: list[np.ndarray], sources: list[str], *, size: int, patch_size: int, mean, std,
                 output_dir: str):
        self.rgb = images
        self.sources = sources
        self.size, self.patch_size = size, patch_size
        self.grid = size // patch_size
        self.patches = reference_patches(self.grid)
        self.dir = os.path.join(output_dir, PROBE_DIR)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # (n, 3, S, S)
        self.inputs = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    # ------------------------------------------------------------------------------------------------ the set
    @classmethod
    def prepare(cls, cfg: dict, *, image_paths: list[str], output_dir: str, start_iter: int,
                write: bool) -> "Probes | None":
        """The run's probe set: the saved one when it matches the config, else a new draw from ``image_paths`` (the
        data folder's images; saved when ``write``). Events past ``start_iter`` (left by an interrupted run) are
        removed when ``write``. None when probes are off or no image can be read."""
        t = cfg["train"]
        if int(t["probe_every"]) <= 0:
            return None
        patch = int(cfg["student"]["patch_size"])
        g = cfg["crops"]["global_crops_size"]
        size = int(t["probe_size"]) or 2 * int(max(g) if isinstance(g, list) else g)
        n = int(t["probe_images"])
        probe_dir = os.path.join(output_dir, PROBE_DIR)
        kw = dict(size=size, patch_size=patch, mean=cfg["crops"]["rgb_mean"], std=cfg["crops"]["rgb_std"],
                  output_dir=output_dir)
        saved = cls._read_set(probe_dir, size, n)
        if saved is not None:
            probes = cls(saved[1], saved[0], **kw)
        else:
            chosen = choose_images(image_paths, n, int(t["seed"]), size)
            if not chosen:
                logger.warning("probes: no readable image among the %d of the data folder; no probe maps will be "
                               "drawn", len(image_paths))
                return None
            probes = cls([a for _, a in chosen], [p for p, _ in chosen], **kw)
            if write:
                probes._write_set()
        if write:
            for done in list_events(probe_dir):
                if done > start_iter:
                    probes._remove_event(done)
        return probes

    @staticmethod
    def _read_set(probe_dir: str, size: int, n: int):
        from PIL import Image

        try:
            with open(os.path.join(probe_dir, SET_FILE)) as f:
                meta = json.load(f)
            if meta["size"] != size or len(meta["images"]) != n:
                logger.warning("probes: the saved probe set (%d images at %d px) differs from the config's (%d at %d "
                               "px): drawing a new one", len(meta["images"]), meta["size"], n, size)
                return None
            images = [np.asarray(Image.open(os.path.join(probe_dir, e["file"])).convert("RGB")) for e in meta["images"]]
            return [e["source"] for e in meta["images"]], images
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("probes: cannot read the saved probe set in %s (%s): drawing a new one", probe_dir, exc)
            return None

    def _write_set(self) -> None:
        from PIL import Image

        os.makedirs(os.path.join(self.dir, "images"), exist_ok=True)
        entries = []
        for i, (src, rgb) in enumerate(zip(self.sources, self.rgb)):
            name = os.path.join("images", f"probe{i}.png")
            Image.fromarray(rgb).save(os.path.join(self.dir, name))
            entries.append({"file": name, "source": os.path.abspath(src)})
        meta = {"size": self.size, "patch_size": self.patch_size, "reference_patches": [list(p) for p in self.patches],
                "images": entries}
        tmp = os.path.join(self.dir, f".{SET_FILE}.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, os.path.join(self.dir, SET_FILE))

    def _remove_event(self, done: int) -> None:
        base = os.path.join(self.dir, event_name(done))
        shutil.rmtree(base, ignore_errors=True)
        if os.path.exists(base + ".png"):
            os.unlink(base + ".png")

    # ------------------------------------------------------------------------------------------------ one event
    @torch.no_grad()
    def features(self, patch_features) -> torch.Tensor:
        """(n, grid, grid, D) float32 on CPU from ``patch_features``: normalised images (n, 3, S, S) -> patch tokens
        (n, grid * grid, D) (the trainer passes the EMA teacher's)."""
        return patch_features(self.inputs).float().cpu().unflatten(1, (self.grid, self.grid))

    def maps(self, feats: torch.Tensor) -> list[dict[str, np.ndarray]]:
        """Per probe image, name -> RGB map in [0, 1] at the image's resolution (``pca``, ``sim_rR_cC``)."""
        out = []
        for f in feats:
            rgb, _ = pca_rgb(f)
            m = {"pca": upscale_nearest(rgb, self.patch_size)}
            for r, c in self.patches:
                sim = colorize(patch_similarity(f, r, c), -1.0, 1.0)
                sim[r, c] = (1.0, 0.0, 0.0)  # the reference patch
                m[f"sim_r{r}_c{c}"] = upscale_nearest(sim, self.patch_size)
            out.append(m)
        return out

    def sheet(self, maps: list[dict[str, np.ndarray]]) -> np.ndarray:
        """One uint8 image (H, W, 3): a row per probe image, columns input | PCA | similarity maps, 2 px gaps."""
        gap = 2
        rows = []
        for rgb, m in zip(self.rgb, maps):
            cells = [rgb.astype(np.float64) / 255.0, *m.values()]
            rows.append(_join(cells, axis=1, gap=gap))
        return _to_uint8(_join(rows, axis=0, gap=gap))

    def write(self, feats: torch.Tensor, done: int, tb=None) -> str:
        """Write event ``done`` (iterations done) from the teacher features; returns the sheet's path."""
        from PIL import Image

        folder = os.path.join(self.dir, event_name(done))
        os.makedirs(folder, exist_ok=True)
        maps = self.maps(feats)
        for i, m in enumerate(maps):
            for name, rgb in m.items():
                Image.fromarray(_to_uint8(rgb)).save(os.path.join(folder, f"probe{i}_{name}.png"))
        sheet = self.sheet(maps)
        path = folder + ".png"
        Image.fromarray(sheet).save(path)
        if tb is not None:
            tb.add_image("probes", sheet, done, dataformats="HWC")
        return path


def _join(images: list[np.ndarray], *, axis: int, gap: int) -> np.ndarray:
    """Concatenate (H, W, 3) images along ``axis`` with white gaps of ``gap`` pixels."""
    shape = list(images[0].shape)
    shape[axis] = gap
    parts = []
    for img in images:
        parts += [img, np.ones(shape)]
    return np.concatenate(parts[:-1], axis=axis)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
