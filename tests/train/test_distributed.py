"""Two processes on CPU through torchrun (gloo): DDP and FSDP2 give the same training, and FSDP2 resumes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from _dist import assert_no_gloo_thread_left, cli_exit_driver, run_cmd, torchrun_cmd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ["train.batch_size_per_gpu=3", "crops.local_crops_number=2", "train.iterations=6",
             "train.progress_bar=false", "gram.start_iter=1", "gram.update_frequency=1", "checkpointing.period=2",
             "dino.koleo_loss_distributed=true"]


def _torchrun(data, out, *args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("WORLD_SIZE", None)
    cmd = torchrun_cmd(2, "-m", "dinov3.train", "--config", "tiny", "--data", data, "--output", out, *args,
                       *OVERRIDES)
    proc = run_cmd(cmd, env, timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def ddp_run(image_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    _torchrun(image_dir, out, "--max-iters", "3")
    return out


def test_ddp_two_processes(ddp_run):
    rows = _rows(ddp_run)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(r["gram_active"] == (r["iteration"] >= 1) for r in rows)
    for r in rows:
        for k in ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss"):
            assert torch.isfinite(torch.tensor(r[k])), (k, r)
    state = torch.load(os.path.join(ddp_run, "checkpoints", "checkpoint_00000003.pth"), weights_only=True)
    assert len(state["rng"]) == 2  # one RNG state per rank
    assert state["data"]["world_size"] == 2
    assert os.path.exists(os.path.join(ddp_run, "backbone.pth"))


def test_fsdp_matches_ddp_and_resumes(ddp_run, image_dir, tmp_path):
    out = str(tmp_path)
    _torchrun(image_dir, out, "--max-iters", "2", "train.parallel=fsdp")
    _torchrun(image_dir, out, "--max-iters", "3", "--resume", "train.parallel=fsdp")
    ref, got = _rows(ddp_run), _rows(out)
    assert [r["iteration"] for r in got] == [0, 1, 2]
    for a, b in zip(ref, got):
        for k in ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "gram_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["iteration"], k)
    a = torch.load(os.path.join(ddp_run, "checkpoints", "checkpoint_00000003.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(out, "checkpoints", "checkpoint_00000003.pth"), weights_only=True)["model"]
    assert a.keys() == b.keys()  # full (unsharded) state dicts with the same names
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_feature_anchor_same_under_ddp_and_fsdp(image_dir, tmp_path):
    """train.feature_anchor from --init-from weights, two processes: DDP and FSDP2 (which shards the starting backbone
    and the predictor) log the same anchor term and end with the same weights."""
    from dinov3.models import DinoVisionTransformer
    from dinov3.train.config import backbone_kwargs, load_config

    torch.manual_seed(5)
    weights = str(tmp_path / "start.pth")
    torch.save(DinoVisionTransformer(**backbone_kwargs(load_config("tiny"))).state_dict(), weights)
    runs = {}
    for parallel in ("ddp", "fsdp"):
        out = str(tmp_path / parallel)
        _torchrun(image_dir, out, "--max-iters", "3", "--init-from", weights, "train.feature_anchor=1",
                  "train.head_warmup_iters=1", f"train.parallel={parallel}")
        runs[parallel] = out
    ref, got = _rows(runs["ddp"]), _rows(runs["fsdp"])
    assert [r["iteration"] for r in got] == [0, 1, 2] and ref[-1]["feature_anchor_loss"] > 0
    for a, b in zip(ref, got):
        assert b["feature_anchor_loss"] == pytest.approx(a["feature_anchor_loss"], rel=1e-5, abs=1e-6)
    a, b = (torch.load(os.path.join(runs[p], "checkpoints", "checkpoint_00000003.pth"), weights_only=True)["model"]
            for p in ("ddp", "fsdp"))
    assert a.keys() == b.keys() and "student.anchor_proj.weight" in a and "pretrained_reference.cls_token" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def _children(pid):
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"]) if b"RANK" in env else None


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the worker processes through /proc")
def test_signal_to_one_rank_stops_every_rank_at_the_same_iteration(image_dir, tmp_path):
    """SIGTERM reaches rank 1 only; rank 0 must stop after the same iteration and write the checkpoint."""
    import signal
    import time

    out = str(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("WORLD_SIZE", None)
    args = ["-m", "dinov3.train", "--config", "tiny", "--data", image_dir, "--output", out, *OVERRIDES,
            "train.iterations=400", "train.log_every=1", "checkpointing.period=1000"]
    cmd = torchrun_cmd(2, *args)
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = os.path.join(out, "metrics.jsonl")
        while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2):
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[1][-4000:]
            time.sleep(0.05)
        workers = {_rank_of(p): p for p in _children(agent.pid)}
        assert set(workers) >= {0, 1}, workers
        os.kill(workers[1], signal.SIGTERM)
        _, err = agent.communicate(timeout=180)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0  # the workers exit 143: torchrun reports the run as stopped
    rows = _rows(out)
    done = [int(n[len("checkpoint_"):-len(".pth")]) for n in os.listdir(os.path.join(out, "checkpoints"))
            if n.startswith("checkpoint_")]
    assert done == [rows[-1]["iteration"] + 1], (done, rows[-1]["iteration"], err[-3000:])
    assert "stopped by SIGTERM" in err
    res = run_cmd(torchrun_cmd(2, *args, "--resume", "--max-iters", str(done[0] + 1)), env, 240)
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["iteration"] for r in _rows(out)] == list(range(done[0] + 1))


DRIVER = """
import signal, sys
from dinov3.train import trainer
from dinov3.train.cli import main

reduce, calls = trainer.Trainer._reduce, [0]


def reduce_then_signal(self, values):
    out = reduce(self, values)
    if self.dist.rank == 1 and any(k.startswith("_stop_") for k in values):
        calls[0] += 1
        if calls[0] == 2:  # iteration 1's all-reduce has returned: the signal lands before its flags are read
            signal.raise_signal(signal.SIGTERM)
    return out


trainer.Trainer._reduce = reduce_then_signal
sys.exit(main())
"""


def test_signal_during_the_all_reduce_stops_every_rank_at_the_same_iteration(image_dir, tmp_path):
    """SIGTERM reaching rank 1 between the metrics' all-reduce and the reading of its stop flags: rank 1 must not stop
    on a flag rank 0 never saw (it would leave rank 0 in the next collective, and no checkpoint would be written).
    Both ranks stop after the next iteration, and rank 0 writes its checkpoint."""
    out, driver = str(tmp_path / "run"), tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("WORLD_SIZE", None)
    cmd = torchrun_cmd(2, str(driver), "--config", "tiny", "--data", image_dir, "--output", out, *OVERRIDES,
                       "train.iterations=50", "train.log_every=1", "checkpointing.period=1000")
    proc = run_cmd(cmd, env, 240)
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]  # the workers exit 143
    assert "stopped by SIGTERM after iteration 3" in err, err[-4000:]
    done = sorted(int(n[len("checkpoint_"):-len(".pth")]) for n in os.listdir(os.path.join(out, "checkpoints"))
                  if n.startswith("checkpoint_"))
    assert done == [3], (done, err[-3000:])
    assert [r["iteration"] for r in _rows(out)] == [0, 1, 2]



@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_no_gloo_thread_outlives_the_cli(image_dir, tmp_path, parallel):
    """CI once hung at the end of a 2-process run: rank 1's interpreter, exiting, freed the DDP reducer and with it
    the process group, whose destructor (GIL held) joined a gloo thread waiting for the GIL (read with gdb on the
    stuck process). No gloo thread may be left when `dinov3-train` returns, even when the trainer can only be freed
    by the cycle collector (tests/_dist.py `cli_exit_driver`; fails without Trainer.close() releasing the DDP model).
    Under FSDP2 torch's DTensor caches hold the device mesh and with it the group: fails without Trainer.close()
    clearing them."""
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("WORLD_SIZE", None)
    cmd = torchrun_cmd(2, cli_exit_driver(tmp_path), "--config", "tiny", "--data", image_dir, "--output", out,
                       *OVERRIDES, "train.iterations=2", f"train.parallel={parallel}")
    proc = run_cmd(cmd, env, 240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_no_gloo_thread_left(proc.stderr, 2)
    assert "returned a view tensor" not in proc.stderr  # FSDP2's per-step warning about the student's outputs


MESH_LEAK_SCRIPT = r"""
import gc, os, sys, warnings
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from dinov3.train.trainer import _release_mesh_groups

def gloo_threads():
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return [n for n in names if "gloo" in n]

dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
leaked = [init_device_mesh("cpu", (1,))]  # what torch 2.11 keeps alive after an FSDP2 run
assert gloo_threads(), "a gloo group has threads"
if sys.argv[1] == "release":
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _release_mesh_groups()
dist.destroy_process_group()
gc.collect()
print("gloo threads:", gloo_threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from Linux /proc")
@pytest.mark.parametrize("release", [False, True])
def test_a_mesh_that_outlives_the_run_lets_go_of_its_group(tmp_path, release):
    """torch 2.11 leaks each FSDP2 run's DeviceMesh (Trainer.close's `_release_mesh_groups`); a mesh held alive here
    stands for it on any torch. Held, it keeps the group's gloo threads running past destroy_process_group(); released
    (without a warning), none is left."""
    script = tmp_path / "mesh_leak.py"
    script.write_text(MESH_LEAK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, str(script), "release" if release else "keep", str(tmp_path / "store")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("gloo threads:")]
    assert line, proc.stdout + proc.stderr[-3000:]
    assert (line[0] == "gloo threads: []") == release, line[0]
