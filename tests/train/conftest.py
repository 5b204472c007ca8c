"""Fixtures for the trainer tests: a folder of small generated images (plus one corrupt file) and a tiny config."""

import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image


def write_images(root, n=12, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "nested", "deeper"), exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(20, 56, 2))
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        sub = ["", "nested", os.path.join("nested", "deeper")][i % 3]
        ext = ["png", "jpg", "JPEG"][i % 3]
        path = os.path.join(root, sub, f"im{i:03d}.{ext}")
        mode = "L" if i == 4 else "RGB"  # one grayscale image: must be converted to RGB
        Image.fromarray(img[..., 0] if mode == "L" else img).save(path, format="PNG" if ext == "png" else "JPEG")
        paths.append(path)
    with open(os.path.join(root, "nested", "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    with open(os.path.join(root, "notes.txt"), "w") as f:  # not an image: ignored
        f.write("hello")
    return paths


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("images"))
    write_images(root)
    return root


# Small enough for ~0.1 s per iteration on two CPU cores, but every part of the recipe is on.
TINY_OVERRIDES = [
    "train.batch_size_per_gpu=4",
    "train.iterations=6",
    "train.progress_bar=false",
    "crops.local_crops_number=2",
    "gram.start_iter=2",
    "gram.update_frequency=2",
    "gram.max_updates=1",
    "checkpointing.period=2",
    "checkpointing.max_to_keep=2",
    "schedules.lr.warmup_iters=2",
    # The official Gram phase's teacher momentum and lr factor (tiny keeps its own), so that exact resume is
    # checked across the switch.
    "gram.teacher_momentum=0.999",
    "gram.lr_multiplier=0.6",
]


@contextlib.contextmanager
def one_torch_thread():
    """For training runs of a few seconds: on a busy 2-core machine a second torch thread only slows them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def tiny_overrides():
    return list(TINY_OVERRIDES)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli_env(**extra):
    """Environment for a `python -m dinov3.train` subprocess that imports this checkout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env
