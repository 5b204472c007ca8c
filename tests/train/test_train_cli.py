"""`dinov3-train` as a user runs it: the output folder is never clobbered, one process at a time, resume keeps the
run's config, unreadable checkpoints are skipped, signals stop cleanly, user errors are messages.

Behaviour that is about processes (signals, locks, folders) runs the real command in a subprocess."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_OVERRIDES, cli_env

from dinov3.train.checkpoint import list_checkpoints, load_checkpoint
from dinov3.train.cli import main
from dinov3.train.config import load_config
from dinov3.train.rundir import RunFolderError, RunLock
from dinov3.train.trainer import Trainer, train


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "dinov3.train", "--config", "tiny", "--data", data, "--output", out, *extra]


def _run(cmd, timeout=240):
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _snapshot(folder):
    """Every file under ``folder`` with its bytes' hash (and the folder list), to show nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), folder) + "/"] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.path.getmtime(path))
    return out


def _wait_for(predicate, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def _n_rows(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


@pytest.fixture(scope="module")
def finished_run(image_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished"))
    res = _run(_cmd(image_dir, out, *TINY_OVERRIDES))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------- 1. existing run
def test_fresh_run_into_a_run_folder_is_refused_and_changes_nothing(finished_run, image_dir):
    before = _snapshot(finished_run)
    res = _run(_cmd(image_dir, finished_run, *TINY_OVERRIDES, "train.seed=1"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "already holds a training run" in res.stderr
    assert "--resume" in res.stderr and "--overwrite" in res.stderr
    assert "Traceback" not in res.stderr
    assert _snapshot(finished_run) == before


def test_overwrite_replaces_the_run_and_says_what_it_deleted(image_dir, tmp_path):
    out = str(tmp_path / "run")
    cfg = load_config("tiny", TINY_OVERRIDES)
    train(cfg, data_dir=image_dir, output_dir=out)  # 6 iterations, checkpoints 4 and 6 kept
    keep = tmp_path / "run" / "my_notes.txt"
    keep.write_text("mine")
    res = _run(_cmd(image_dir, out, *TINY_OVERRIDES, "train.seed=1", "--max-iters", "2", "--overwrite"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--overwrite: deleting" in res.stderr and "metrics.jsonl" in res.stderr
    assert [r["iteration"] for r in _rows(out)] == [0, 1]
    assert [i for i, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [2]
    assert "seed: 1" in (tmp_path / "run" / "config.yaml").read_text()
    assert keep.read_text() == "mine"  # not a file of the run: left alone


def test_resume_and_overwrite_together_are_refused(image_dir, tmp_path, capsys):
    assert main(["--config", "tiny", "--data", image_dir, "--output", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 2. one process
def test_lock_is_exclusive_and_released(tmp_path):
    a, b = RunLock(str(tmp_path)), RunLock(str(tmp_path))
    a.acquire()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()


def test_second_trainer_on_a_folder_refuses_and_a_killed_one_leaves_no_stale_lock(image_dir, tmp_path):
    out = str(tmp_path / "run")
    long_run = [*TINY_OVERRIDES, "train.iterations=400", "train.log_every=1"]
    first = subprocess.Popen(_cmd(image_dir, out, *long_run), env=cli_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _n_rows(out) >= 1, first)
        # With --resume (the folder check passes) the lock is what refuses it; without, the folder check does.
        second = _run(_cmd(image_dir, out, *long_run, "--resume"))
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another dinov3-train (pid {first.pid})" in second.stderr
        third = _run(_cmd(image_dir, out, *long_run, "train.seed=5"))
        assert third.returncode == 2 and "already holds a training run" in third.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert os.path.exists(os.path.join(out, ".dinov3-train.lock"))
    res = _run(_cmd(image_dir, out, *long_run, "--resume", "--max-iters", "3"))
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- 4. resume config
def test_resume_keeps_the_checkpoint_config_and_refuses_breaking_changes(image_dir, tmp_path):
    out = str(tmp_path / "run")
    custom = [*TINY_OVERRIDES, "schedules.lr.peak=3e-3", "train.seed=3"]
    res = _run(_cmd(image_dir, out, *custom, "--max-iters", "2"))
    assert res.returncode == 0, res.stderr[-3000:]
    ref = str(tmp_path / "ref")
    train(load_config("tiny", custom), data_dir=image_dir, output_dir=ref, max_iters=4)

    # A changed batch size, seed or head is refused, with the list of differences; nothing is written.
    before = _snapshot(out)
    res = _run(_cmd(image_dir, out, *TINY_OVERRIDES, "train.batch_size_per_gpu=3", "train.seed=4", "--resume"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "train.batch_size_per_gpu: 4 in the checkpoint, 3 now" in res.stderr
    assert "train.seed: 3 in the checkpoint, 4 now" in res.stderr and "--allow-config-change" in res.stderr
    assert _snapshot(out) == before
    # Forced through, a head of another size cannot take the checkpoint's weights: a message, not a traceback.
    res = _run(_cmd(image_dir, out, "dino.head_n_prototypes=128", "--resume", "--allow-config-change"))
    assert res.returncode == 2 and "do not fit the model" in res.stderr and "Traceback" not in res.stderr

    # Without repeating the overrides: the checkpoint's schedule and seed are kept; harmless changes are applied.
    res = _run(_cmd(image_dir, out, "--resume", "--max-iters", "4", "train.log_every=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train.log_every changed from 1 to 2" in res.stderr
    assert "differs in" in res.stderr and "schedules.lr.peak" in res.stderr  # --config tiny's own values: ignored
    rows, ref_rows = _rows(out), _rows(ref)
    assert [r["iteration"] for r in rows] == [0, 1, 3]  # log_every=2 from iteration 2 on
    assert rows[-1]["lr"] == pytest.approx(ref_rows[3]["lr"]) and rows[-1]["lr"] > 1.2e-3
    assert rows[-1]["total_loss"] == pytest.approx(ref_rows[3]["total_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- 5. unreadable ckpt
def test_resume_skips_an_unreadable_newest_checkpoint(image_dir, tmp_path):
    out = str(tmp_path / "run")
    res = _run(_cmd(image_dir, out, *TINY_OVERRIDES, "--max-iters", "4", "checkpointing.period=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    newest = os.path.join(out, "checkpoints", "checkpoint_00000004.pth")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    res = _run(_cmd(image_dir, out, *TINY_OVERRIDES, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping {newest}: it cannot be read" in res.stderr
    assert "resumed from" in res.stderr and "checkpoint_00000002.pth at iteration 2" in res.stderr
    assert [r["iteration"] for r in _rows(out)] == list(range(6))
    assert load_checkpoint(os.path.join(out, "checkpoints", "checkpoint_00000006.pth"))["iteration"] == 6


# ---------------------------------------------------------------------------------------------- 6. signals
# A step of about a second on two CPU cores, so a signal lands inside one.
SLOW = [*TINY_OVERRIDES, "train.iterations=400", "train.log_every=1", "checkpointing.period=1000",
        "train.batch_size_per_gpu=12", "crops.global_crops_size=64", "crops.local_crops_size=32",
        "crops.gram_teacher_crops_size=64"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_checkpoints_and_prints_the_resume_command(image_dir, tmp_path, sig, code):
    out = str(tmp_path / "run")
    cmd = _cmd(image_dir, out, *SLOW)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _n_rows(out) >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    done = [i for i, _ in list_checkpoints(os.path.join(out, "checkpoints"))]
    rows = _rows(out)
    assert done == [rows[-1]["iteration"] + 1]  # the step in flight finished and was saved; nothing is lost
    assert "dinov3-train --config tiny" in err and err.rstrip().endswith("--resume")
    resume_args = err.rstrip().splitlines()[-1].split()[1:]
    res = _run([sys.executable, "-m", "dinov3.train", *resume_args, "--max-iters", str(done[0] + 1)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["iteration"] for r in _rows(out)] == list(range(done[0] + 1))


def test_train_function_raises_training_stopped_after_a_signal(image_dir, tmp_path):
    """The Python API: a script calling train() must not carry on as if the run had finished (no backbone.pth): it
    gets TrainingStopped with the iteration its checkpoint holds."""
    out = str(tmp_path / "run")
    script = (
        "import json, sys\n"
        "from dinov3.train import TrainingStopped, load_config, train\n"
        f"cfg = load_config('tiny', {SLOW!r})\n"
        "try:\n"
        f"    train(cfg, data_dir={image_dir!r}, output_dir={out!r})\n"
        "except TrainingStopped as exc:\n"
        "    print(json.dumps({'signum': exc.signum, 'iteration': exc.iteration, 'message': str(exc)}))\n"
        "    sys.exit(3)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _n_rows(out) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    done = [i for i, _ in list_checkpoints(os.path.join(out, "checkpoints"))]
    assert got["signum"] == signal.SIGTERM and done == [got["iteration"]]
    assert "stopped by SIGTERM after iteration" in got["message"] and "resume=True" in got["message"]
    assert not os.path.exists(os.path.join(out, "backbone.pth"))


def test_second_signal_exits_at_once(image_dir, tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(image_dir, out, *SLOW), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _n_rows(out) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    # The second signal must come while the step the first one lets finish is still running: a SLOW step takes
    # ~0.08 s on an idle 2-core machine, after which the checkpoint is written and the handlers are gone. 20 ms is
    # long enough for the first handler to have run (two signals before it runs would count as one).
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "second SIGINT: exiting now, without a checkpoint" in err
    assert list_checkpoints(os.path.join(out, "checkpoints")) == []


# ---------------------------------------------------------------------------------------------- 7. DDP saving
def test_only_rank_zero_copies_the_state_under_ddp(image_dir, tmp_path, tiny_overrides, monkeypatch, caplog):
    cfg = load_config("tiny", tiny_overrides)
    trainer = Trainer(cfg, data_dir=image_dir, output_dir=str(tmp_path))
    try:
        with caplog.at_level("INFO", logger="dinov3.train"):
            path = trainer.save(0)
        assert any("written (" in r.getMessage() and "MB)" in r.getMessage() for r in caplog.records)
        assert os.path.exists(path)
        # As rank 1 of a DDP run (replicated state): no CPU copy of the weights, nothing written.
        trainer.dist.rank = 1
        monkeypatch.setattr(trainer.arch, "state_dict", lambda *a, **k: pytest.fail("rank 1 copied the weights"))
        assert trainer._model_state() == (None, None)
        assert trainer.save(1) is None
        assert [i for i, _ in list_checkpoints(os.path.join(tmp_path, "checkpoints"))] == [0]
    finally:
        trainer.dist.rank = 0
        trainer.close()


# ---------------------------------------------------------------------------------------------- 12. console
def test_plain_progress_lines_when_not_a_terminal(image_dir, tmp_path):
    out = str(tmp_path / "run")
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("train.progress_bar")] + ["train.log_every=2"]
    res = _run(_cmd(image_dir, out, *overrides))  # the bar is on, but stderr is a pipe
    assert res.returncode == 0, res.stderr[-3000:]
    assert "\r" not in res.stderr and "it/s" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "iteration " in ln and "/6  total" in ln]
    assert [ln.split("iteration ")[1].split()[0] for ln in lines] == ["2/6", "4/6", "6/6"]
    for ln in lines:
        for part in ("dino_global_crops", "ibot", "koleo", "lr ", "img/s", "ETA"):
            assert part in ln, (part, ln)
    assert "finished: 6 iterations done (of 6)" in res.stderr


# ---------------------------------------------------------------------------------------------- 9. user errors
def _bad(tmp_path, image_dir):
    not_images = tmp_path / "not_images"
    not_images.mkdir()
    (not_images / "a.jpg").write_text("not a jpeg")
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("base: tiny\ntrain:\n  iterations: 5\n  seed: [1, 2\n")
    typo_yaml = tmp_path / "typo.yaml"
    typo_yaml.write_text("base: tiny\ntrain:\n  iteratoins: 5\n")
    out = str(tmp_path / "out")
    return [
        (["--data", str(tmp_path / "missing"), "--output", out], "no such folder"),
        (["--data", str(a_file), "--output", out], "is a file; give the folder"),
        (["--data", str(empty), "--output", out], "no image files"),
        (["--data", str(not_images), "--output", out], "none of the 1 image files could be decoded (" + str(not_images)),
        (["--data", image_dir, "--output", str(a_file)], "is a file, not a folder"),
        (["--data", image_dir, "--output", str(a_file / "sub")], f"cannot create {a_file / 'sub'}: {a_file} is a file"),
        (["--data", image_dir, "--output", out, "--device", "tpu"], "--device 'tpu' is not a device"),
        (["--data", image_dir, "--output", out, "--device", "cuda"], "--device cuda: "),
        (["--data", image_dir, "--output", out, "--config", str(bad_yaml)], "invalid YAML at line 5"),
        (["--data", image_dir, "--output", out, "--config", str(typo_yaml)],
         "unknown key 'train.iteratoins' in section 'train'; did you mean 'train.iterations'?"),
        (["--data", image_dir, "--output", out, "train.batch_size_per_gpu=abc"],
         "train.batch_size_per_gpu: expected an integer, got 'abc'"),
        (["--data", image_dir, "--output", out, "train.autocast_dtype=fp16"], "use train.autocast_dtype=bf16"),
        (["--data", image_dir, "--output", out, "student.model_kwargs.foo=1"], "unknown key 'student.model_kwargs.foo'"),
        (["--data", image_dir, "--output", out, "--max-iters", "0"], "--max-iters must be >= 1"),
    ]


def test_user_errors_are_messages_before_any_compute(image_dir, tmp_path, capsys, monkeypatch):
    import dinov3.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", lambda *a, **k: pytest.fail("got to training"))
    for args, message in _bad(tmp_path, image_dir):
        argv = (["--config", "tiny"] if "--config" not in args else []) + args
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("dinov3-train: error: ") and message in err, (argv, err)
    assert not os.path.exists(tmp_path / "out")  # nothing was created by a refused command


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    res = _run(_cmd(str(tmp_path / "missing"), str(tmp_path / "out")))
    assert res.returncode == 2 and res.stderr.startswith("dinov3-train: error: --data") and "Traceback" not in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_trainer_api_rejects_cuda_without_a_gpu(image_dir, tmp_path, tiny_overrides):
    from dinov3.train.config import ConfigError

    with pytest.raises(ConfigError, match="--device cuda: .*use --device cpu"):
        Trainer(load_config("tiny", tiny_overrides), data_dir=image_dir, output_dir=str(tmp_path), device="cuda")


@pytest.mark.skipif(sys.platform != "linux", reason="uses a pseudo-terminal")
def test_on_a_terminal_the_bar_and_log_lines_do_not_mix(image_dir, tmp_path):
    import pty

    out = str(tmp_path / "run")
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("train.progress_bar")]
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal of 160 columns
    proc = subprocess.Popen(_cmd(image_dir, out, *overrides), env=cli_env(), stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=240) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "dinov3-train: 100%" in text and "6/6" in text  # the tqdm bar
    written = [ln for ln in text.splitlines() if "checkpoint_00000006.pth written" in ln]
    assert len(written) == 1, written  # logged once, on a line of its own (not through two handlers)
    assert written[0].strip().startswith("20") and "\r" not in written[0].strip()
    assert "iteration 6/6  total" not in text  # the plain lines are for non-terminals only
