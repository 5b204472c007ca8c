"""Several CPU processes over gloo for the tests: `spawn_gloo` for a function, `torchrun_cmd` for a command line.

Two things made these tests fail now and then under load, and both are handled here:

- torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when it is first imported, and
  torch._dynamo imports it lazily (e.g. on the first call of a torch.library custom op). Imported after
  init_process_group, it keeps the default group alive: destroy_process_group() then cannot free it, its gloo
  threads are still running at interpreter exit, and a process whose peer is still connected can die there of
  SIGABRT ("terminate called without an active exception"). Importing it before init_process_group binds None.
  (dinov3/train/trainer.py does the same for `dinov3-train` under torchrun.)
- A port found free and then closed can be taken by another process before the store binds it. The workers here
  meet through a FileStore in the test's tmp_path, and torchrun binds port 0 itself.
"""

import importlib
import os
import signal
import subprocess
import sys
import uuid

import pytest

import torch.distributed as dist
import torch.multiprocessing as mp

# Threads a live gloo process group (and a TCPStore server) run; none may survive destroy_process_group().
GLOO_THREADS = ("gloo_tcp_loop", "pt_gloo_runloop", "pt_tcpstore_uv")


def spawn_gloo(fn, world, tmp_path, *args):
    """Runs ``fn(rank, *args)`` in `world` fresh processes joined in one gloo group; raises if any of them fails."""
    store = os.path.join(str(tmp_path), "gloo_file_store")
    mp.spawn(_gloo_worker, args=(world, store, fn, args), nprocs=world, join=True)


def _gloo_worker(rank, world, store, fn, args):
    importlib.import_module("torch.distributed.nn.functional")  # before init_process_group: see the module doc
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
        dist.barrier()  # no rank tears its group down while a peer may still be in a collective
    finally:
        dist.destroy_process_group()
    alive = live_gloo_threads()
    assert not alive, f"rank {rank}: the destroyed process group still runs threads {alive} (a reference pins it)"


def live_gloo_threads():
    """Names of this process's threads that belong to a gloo process group (Linux; empty elsewhere)."""
    names = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return names
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name in GLOO_THREADS:
            names.append(name)
    return sorted(names)


def torchrun_cmd(nproc, *args):
    """`python -m torch.distributed.run` on this machine with a rendezvous store on a port it binds itself."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", uuid.uuid4().hex, "--local-addr", "127.0.0.1", *args]


def run_cmd(cmd, env, timeout):
    """``subprocess.run(cmd, env=env, capture_output=True, text=True)``, except that a command still running after
    `timeout` seconds is not just killed: every process of its tree (torchrun and its workers) first gets SIGABRT
    with faulthandler on, so each Python process prints all its threads' stacks, and the test fails with the end of
    that output. A hang then says where it hung."""
    env = dict(env, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: signal the whole process tree, not just the group.
        tree = _process_tree(proc.pid)
        _signal_all(tree, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_all(tree + _process_tree(proc.pid), signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s, stopped with SIGABRT (stacks below): {' '.join(cmd)}\n"
                    f"--- stdout (end)\n{out[-3000:]}\n--- stderr (end)\n{err[-20000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


CLI_EXIT_DRIVER = """
import gc, os, sys
sys.path.insert(0, {tests!r})
from _dist import live_gloo_threads
from dinov3.train import trainer
from dinov3.train.cli import main

# A trainer that only the cycle collector can free (here a reference to itself), with the collector off: as at
# interpreter exit, its DDP wrapper would outlive destroy_process_group() unless Trainer.close() lets it go first.
gc.disable()
init = trainer.Trainer.__init__


def init_with_a_cycle(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self._cycle = self


trainer.Trainer.__init__ = init_with_a_cycle
rc = main()
# What is left of the process group once `dinov3-train` has returned: its gloo threads must be gone. A DDP reducer
# that outlives destroy_process_group() keeps the group alive, and at interpreter exit freeing it (joining the gloo
# threads while holding the GIL) can deadlock against a gloo thread that needs the GIL to free a finished work.
alive = live_gloo_threads()
print(f"rank {{os.environ['RANK']}}: gloo threads after main: {{alive}}", file=sys.stderr, flush=True)
sys.exit(rc or (3 if alive else 0))
"""


def cli_exit_driver(tmp_path):
    """A script for torchrun that runs `dinov3-train` (its arguments), then reports the gloo threads still running."""
    path = os.path.join(str(tmp_path), "cli_exit_driver.py")
    with open(path, "w") as f:
        f.write(CLI_EXIT_DRIVER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    return path


def assert_no_gloo_thread_left(stderr, world):
    for rank in range(world):
        assert f"rank {rank}: gloo threads after main: []" in stderr, stderr[-4000:]


def _process_tree(pid):
    """pid and its descendants (Linux /proc; just pid elsewhere)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def _signal_all(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:  # already gone
            pass
