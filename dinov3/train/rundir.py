"""The output folder of a run: what it holds, who may write into it, and which checkpoint a resume starts from.

Rules, checked before anything is written:
- a fresh run refuses a folder that already holds a run (unless ``overwrite``, which removes that run's files and
  names each one);
- one process at a time: rank 0 holds an exclusive ``flock`` on ``OUTPUT/.dinov3-train.lock`` for the whole run.
  The kernel drops it when the process dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil

from .checkpoint import list_checkpoints, load_checkpoint

logger = logging.getLogger("dinov3.train")

LOCK_NAME = ".dinov3-train.lock"
# What a run writes into its output folder (checkpoints/ holds checkpoint_XXXXXXXX.pth files).
RUN_FILES = ("metrics.jsonl", "config.yaml", "backbone.pth", "backbone.json")
# probes/ holds the probe maps (dinov3/train/probes.py); plots/ what `dinov3-plot RUN_DIR` draws from the run.
RUN_DIRS = ("checkpoints", "tensorboard", "probes", "plots")


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; the message says what to do instead."""


def run_artifacts(output_dir: str) -> list[str]:
    """The files and folders of an earlier run in ``output_dir`` (relative names, sorted)."""
    if not os.path.isdir(output_dir):
        return []
    found = [name for name in RUN_FILES if os.path.lexists(os.path.join(output_dir, name))]
    for name in RUN_DIRS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and os.listdir(path):
            found.append(name + "/")
    return sorted(found)


def read_metrics(path: str) -> list[dict]:
    """The rows of a run's metrics.jsonl in file order; a line that does not parse (torn by a kill, or being
    written) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "iteration" in row:
                rows.append(row)
    return rows


def check_output_dir(output_dir: str) -> None:
    """The output path must be a folder we can create and write in (checked before any compute; creates nothing)."""
    from pathlib import Path

    from dinov3.cli._common import CLIError, check_output_dir as check_writable_dir

    try:
        check_writable_dir(Path(output_dir), "--output")
    except CLIError as exc:
        raise RunFolderError(str(exc)) from None


def refuse_existing_run(output_dir: str, resume: bool, overwrite: bool) -> None:
    """A fresh run into a folder that holds a run would truncate its metrics and delete its checkpoints: refuse."""
    if resume or overwrite:
        return
    found = run_artifacts(output_dir)
    if found:
        raise RunFolderError(
            f"{output_dir} already holds a training run ({', '.join(found)}); nothing was changed. "
            "To continue it, add --resume; to replace it, add --overwrite (deletes those files); "
            "or choose a new --output folder.")


def remove_run(output_dir: str) -> None:
    """``--overwrite``: delete the earlier run's files (each one logged); anything else in the folder stays."""
    for name in run_artifacts(output_dir):
        path = os.path.join(output_dir, name.rstrip("/"))
        logger.warning("--overwrite: deleting %s", path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


class RunLock:
    """An exclusive, non-blocking ``flock`` on the output folder's lock file, held until :meth:`release` or exit."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                who = f" (pid {holder})" if holder else ""
                raise RunFolderError(
                    f"another dinov3-train{who} is writing to {os.path.dirname(self.path)}; "
                    "wait for it to finish or stop it, or choose another --output folder") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def latest_readable_checkpoint(ckpt_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint that loads (``weights_only=True``) and has a training state; newer files that do not
    are skipped with a warning that says why. None when there is no usable checkpoint."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - truncated, empty, not a zip: any reader failure
            logger.warning("--resume: skipping %s: it cannot be read (%s: %s)", path, type(exc).__name__,
                           str(exc).splitlines()[0] if str(exc) else "")
            continue
        missing = [k for k in ("format", "iteration", "model", "optimizer", "config")
                   if not isinstance(state, dict) or k not in state]
        if missing:
            logger.warning("--resume: skipping %s: it is not a training checkpoint (no %s)", path, ", ".join(missing))
            continue
        return path, state
    return None
