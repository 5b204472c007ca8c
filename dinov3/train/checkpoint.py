"""Checkpoints: atomic writes, keep-last-K, and RNG states as plain tensors (loadable with weights_only=True)."""

from __future__ import annotations

import os
import random
import re
import tempfile

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint_(\d{8,})\.pth$")


def checkpoint_path(ckpt_dir: str, iteration: int) -> str:
    """``iteration`` is the number of completed iterations (the resumed run starts there)."""
    return os.path.join(ckpt_dir, f"checkpoint_{iteration:08d}.pth")


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace: a crash never leaves a torn
    file under the final name."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, ckpt_dir: str, iteration: int, keep: int) -> str:
    path = checkpoint_path(ckpt_dir, iteration)
    atomic_save(state, path)
    for _, old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        os.unlink(old)
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------------------------------- RNG states
def get_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors / lists / ints only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                   "gauss_next": py_state[2] if py_state[2] is None else float(py_state[2])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
