"""The training loop: one process (CPU or one GPU) or many under torchrun (DDP or FSDP2), with exact resume."""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import atomic_save, get_rng_state, list_checkpoints, save_checkpoint, set_rng_state
from .anchor import PretrainedAnchor
from .config import (ConfigError, check_resume_changes, config_from_text, dump_config, head_warmup_iters,
                     pretrained_anchor, validate_config)
from .data import BatchAugment, build_loader
from .health import HealthMonitor
from .param_groups import STUDENT_PARTS, apply_optim_schedule, build_param_groups
from .probes import Probes
from .rundir import (RunFolderError, RunLock, check_output_dir, latest_readable_checkpoint, refuse_existing_run,
                     remove_run, run_artifacts)
from .schedules import Schedule
from .ssl_arch import SSLMetaArch

logger = logging.getLogger("dinov3.train")

CHECKPOINT_FORMAT = 1


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_device(device: str | None) -> torch.device | None:
    """``None``/"auto" (None: CUDA when available), "cpu", "cuda" or "cuda:N"; anything else is a ConfigError."""
    if device in (None, "auto"):
        return None
    from dinov3.cli._common import CLIError, resolve_device

    try:
        dev = resolve_device(device)
    except CLIError as exc:
        raise ConfigError(str(exc)) from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: the trainer runs on cpu or cuda")
    return dev


def setup_distributed(device: str | None = None) -> DistInfo:
    """Reads torchrun's environment; NCCL on GPU, gloo on CPU. A single process needs no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = parse_device(device)
    use_cuda = torch.cuda.is_available() if wanted is None else wanted.type == "cuda"
    index = wanted.index if wanted is not None and wanted.index is not None and world == 1 else local_rank
    dev = torch.device(f"cuda:{index}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local_rank, dev)
    if world > 1 and not dist.is_initialized():
        # torch.distributed.nn.functional binds group.WORLD as default arguments when first imported, and torch._dynamo
        # imports it lazily (building an optimizer, the first custom-op call). Imported after init_process_group it
        # pins the group: destroy_process_group() cannot free it, and its gloo threads run on into interpreter exit,
        # where the process can die of SIGABRT.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        info.initialized_here = True
    return info


def _lr_scale(cfg: dict, world: int) -> float:
    rule, bs = cfg["optim"]["scaling_rule"], int(cfg["train"]["batch_size_per_gpu"]) * world
    if rule == "sqrt_wrt_1024":
        return 4.0 * math.sqrt(bs / 1024.0)
    if rule == "linear_wrt_256":
        return bs / 256.0
    return 1.0


class Trainer:
    """One training run writing into ``output_dir``.

    ``resume``: continue from the newest readable checkpoint there (or from ``resume_state``, a checkpoint already
    loaded by the caller). ``overwrite``: replace a run already in ``output_dir``; without it (and without
    ``resume``) such a folder is refused before anything is written. Rank 0 holds the folder's lock until
    :meth:`close`."""

    def __init__(self, cfg: dict, *, data_dir: str, output_dir: str, max_iters: int | None = None,
                 resume: bool = False, device: str | None = None, overwrite: bool = False,
                 resume_state: tuple[str, dict] | None = None, allow_config_change: bool = False):
        validate_config(cfg)
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: choose one")
        self.cfg, self.data_dir, self.output_dir = cfg, data_dir, output_dir
        self.dist = setup_distributed(device)
        self.device = self.dist.device
        self.total_iters = int(cfg["train"]["iterations"])
        self.end_iter = self.total_iters if max_iters is None else min(int(max_iters), self.total_iters)
        self.ckpt_dir = os.path.join(output_dir, "checkpoints")
        self.lock: RunLock | None = None
        self.stopped_by_signal: int | None = None
        self.stopped_at: int | None = None  # the iteration a signal stopped the run after (its checkpoint's)
        self.allow_config_change = allow_config_change
        try:
            self._claim_output(resume=resume or resume_state is not None, overwrite=overwrite)
            self._build(resume, resume_state)
        except BaseException:
            self.close()  # the lock and the process group go with the failed run
            raise

    def _build(self, resume: bool, resume_state: tuple[str, dict] | None) -> None:
        cfg, output_dir = self.cfg, self.output_dir
        d = cfg["dino"]
        if (d["koleo_loss_weight"] > 0 and d["koleo_loss_distributed"]
                and cfg["train"]["batch_size_per_gpu"] * self.dist.world_size <= d["koleo_topk"]):
            raise ConfigError(f"dino.koleo_topk={d['koleo_topk']} needs more rows than train.batch_size_per_gpu x "
                              f"world size = {cfg['train']['batch_size_per_gpu'] * self.dist.world_size}")
        if resume and resume_state is None:
            resume_state = latest_readable_checkpoint(self.ckpt_dir)
            if resume_state is None:
                # A run killed before its first checkpoint left only logs: it starts again from iteration 0 (the
                # same command can serve for the first start and every restart). Unreadable checkpoints or a
                # finished run's backbone are not thrown away silently.
                unsafe = [n for n in run_artifacts(output_dir) if n == "backbone.pth"]
                unsafe += ["checkpoints/"] if list_checkpoints(self.ckpt_dir) else []
                if unsafe:
                    raise RunFolderError(
                        f"--resume: no readable checkpoint in {self.ckpt_dir}, but {output_dir} holds "
                        f"{', '.join(unsafe)} of a run: add --overwrite to replace it, or choose a new --output folder")
                logger.warning("--resume: no checkpoint in %s yet: starting the run from iteration 0", self.ckpt_dir)

        seed = int(cfg["train"]["seed"])
        # Same seed on every rank: identical initial weights (DDP also broadcasts; FSDP2 shards what it finds).
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

        world = self.dist.world_size
        if resume_state is not None and cfg["distillation"]["enabled"]:  # the teacher must be the run's own
            from .distill import check_teacher_record, teacher_record_of

            check_teacher_record(cfg, teacher_record_of(resume_state[1]))
        self.arch = SSLMetaArch(cfg, distributed=world > 1)
        self.parallel = cfg["train"]["parallel"] if world > 1 else "none"
        # The Gram teacher waits on the CPU until its phase (it goes to the device once the resume point says so);
        # FSDP shards it with the others instead.
        assert not list(self.arch.parameters(recurse=False)) and not list(self.arch.buffers(recurse=False))
        for name, child in self.arch.named_children():
            if name != "gram_teacher" or self.parallel == "fsdp":
                child.to(self.device)
        if self.arch.distiller is not None and self.parallel != "fsdp":
            self.arch.distiller.to(self.device)
        g = cfg["gram"]
        if cfg["student"]["pretrained_heads"] and not cfg["student"]["pretrained_weights"]:
            raise ConfigError("student.pretrained_heads=true continues a run: give its training checkpoint with "
                              "--init-from (student.pretrained_weights)")
        if cfg["student"]["pretrained_weights"] and resume_state is None:
            from .pretrained import load_heads_into_arch, load_into_arch

            load_into_arch(self.arch, cfg)
            if cfg["student"]["pretrained_heads"]:
                load_heads_into_arch(self.arch, cfg)
        if g["use_loss"] and g["ckpt"]:
            self._load_gram_checkpoint(g["ckpt"])
        if cfg["train"]["compile"]:
            distiller = self.arch.distiller
            for m in (self.arch.student.backbone, self.arch.teacher.backbone, self.arch.gram_teacher,
                      None if distiller is None else getattr(distiller.teacher, "backbone", distiller.teacher)):
                if m is not None:
                    for blk in m.blocks:
                        blk.compile()
        self.student_forward = self.arch.student
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.student_forward = DDP(self.arch.student, device_ids=[self.device.index] if self.device.type == "cuda"
                                       else None)
            self.arch.teacher.load_state_dict(self.arch.student.state_dict())
        elif self.parallel == "fsdp":
            self._shard()

        self.anchor = None
        if pretrained_anchor(cfg) > 0:  # (the reference is also kept for train.feature_anchor alone)
            self.anchor = PretrainedAnchor(self.arch.student.backbone, self.arch.pretrained_reference,
                                           pretrained_anchor(cfg))
        o = cfg["optim"]
        self.head_warmup_iters, self.backbone_lr_ramp_iters = head_warmup_iters(cfg)
        groups = build_param_groups(self.arch.student, o,
                                    split_backbone=self.head_warmup_iters + self.backbone_lr_ramp_iters > 0)
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(float(o["adamw_beta1"]), float(o["adamw_beta2"])))
        sch, scale = cfg["schedules"], _lr_scale(cfg, world)
        lr_cfg = dict(sch["lr"], peak=sch["lr"]["peak"] * scale, end=sch["lr"].get("end", sch["lr"]["peak"]) * scale)
        self.lr_schedule = Schedule.from_config(lr_cfg, self.total_iters)
        self.wd_schedule = Schedule.from_config(sch["weight_decay"], self.total_iters)
        self.momentum_schedule = Schedule.from_config(sch["momentum"], self.total_iters)
        self.teacher_temp_schedule = Schedule.from_config(sch["teacher_temp"], self.total_iters)

        self.start_iter = 0
        self.skipped_files: set[str] = set()
        self._resume_state = None
        if resume_state is not None:
            path, self._resume_state = resume_state
            # The checkpoint's config is the run's config: a resume that would compute something else is refused.
            check_resume_changes(config_from_text(self._resume_state["config"]), cfg,
                                 iteration=int(self._resume_state["iteration"]), allow_change=self.allow_config_change)
            self._load_state(self._resume_state)
            logger.info("resumed from %s at iteration %d", path, self.start_iter)
        if self.arch.gram_active(self.start_iter):
            self._gram_teacher_to(self.device)

        ac = cfg["train"]["autocast_dtype"]
        if self.device.type == "cuda" and ac in ("bf16", "fp16"):
            dtype = torch.bfloat16 if ac == "bf16" else torch.float16
            self.autocast = lambda: torch.autocast("cuda", dtype=dtype)
        else:
            self.autocast = contextlib.nullcontext
        aug_dev = cfg["train"]["augment_device"]
        self.augment = BatchAugment(cfg, self.device if aug_dev == "auto" else torch.device(aug_dev))

    # ------------------------------------------------------------------------------------------------ setup
    def _claim_output(self, *, resume: bool, overwrite: bool) -> None:
        """Rank 0 checks the output folder (before writing anything), takes its lock and, with ``overwrite``,
        removes the earlier run; every rank then learns the outcome, so all of them stop with the same message."""
        error = None
        if self.dist.is_main:
            try:
                check_output_dir(self.output_dir)
                refuse_existing_run(self.output_dir, resume, overwrite)
                os.makedirs(self.output_dir, exist_ok=True)
                self.lock = RunLock(self.output_dir)
                self.lock.acquire()
                refuse_existing_run(self.output_dir, resume, overwrite)  # a run that started while we looked
                if overwrite:
                    remove_run(self.output_dir)
                os.makedirs(self.ckpt_dir, exist_ok=True)
                for name in os.listdir(self.ckpt_dir):  # torn writes of a killed run (we hold the lock)
                    if name.startswith(".tmp_"):
                        os.unlink(os.path.join(self.ckpt_dir, name))
            except (RunFolderError, OSError) as exc:
                error = exc if isinstance(exc, RunFolderError) else RunFolderError(f"{self.output_dir}: {exc}")
        if self.dist.world_size > 1:
            box = [None if error is None else str(error)]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                error = RunFolderError(box[0])
        if error is not None:
            raise error

    def _shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.device.type == "cuda" and self.cfg["train"]["autocast_dtype"] == "bf16" else MixedPrecisionPolicy())
        for root, backbone in ((self.arch.student, self.arch.student.backbone),
                               (self.arch.teacher, self.arch.teacher.backbone),
                               (self.arch.gram_teacher, self.arch.gram_teacher),
                               (self.arch.pretrained_reference, self.arch.pretrained_reference)):
            if root is None:
                continue
            for blk in backbone.blocks:
                fully_shard(blk, mp_policy=mp)
            fully_shard(root, mp_policy=mp)
        if self.arch.distiller is not None:
            self.arch.distiller.to(self.device).shard(mp)
        # torch >= 2.13 warns at every step that the student returns views (its CLS and patch tokens are slices of the
        # normed tokens, the logits a split): an in-place op on one would drop FSDP2's pre-backward hook. Nothing
        # writes into the student's outputs (the losses and kernels never modify their inputs; FSDP2 and DDP train
        # alike: tests/train/test_distributed.py), so the warning is noise to a user, silenced for this module only.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPStudentNet\) returned a view tensor",
                                category=UserWarning)

    def _gram_teacher_to(self, device: torch.device) -> None:
        if self.arch.gram_teacher is not None and self.parallel != "fsdp":
            self.arch.gram_teacher.to(device)

    def _load_gram_checkpoint(self, path: str) -> None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if "model" in sd:  # one of our training checkpoints: take its EMA teacher backbone
            sd = {k[len("teacher.backbone."):]: v for k, v in sd["model"].items() if k.startswith("teacher.backbone.")}
        elif "teacher" in sd:  # official eval checkpoint layout
            sd = {k[len("backbone."):]: v for k, v in sd["teacher"].items() if k.startswith("backbone.")}
        self.arch.gram_teacher.load_state_dict(sd)
        self.arch.gram_initialized = True

    def _model_state(self) -> tuple[dict, dict]:
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.arch, options=opts),
                    get_optimizer_state_dict(self.arch.student, self.optimizer, options=opts))
        if not self.dist.is_main:  # DDP replicas hold the same weights and optimizer state: rank 0 writes them
            return None, None
        return ({k: v.detach().cpu().clone() for k, v in self.arch.state_dict().items()}, self.optimizer.state_dict())

    def _load_state(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.arch, state["model"], options=opts)
            set_optimizer_state_dict(self.arch.student, self.optimizer, state["optimizer"], options=opts)
        else:
            try:
                self.arch.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise ConfigError(
                    "the checkpoint's weights do not fit the model this config builds (was the architecture or a "
                    f"head changed?): {str(exc).strip().splitlines()[0]} ...") from None
        self.start_iter = int(state["iteration"])
        self.arch.gram_initialized = bool(state["gram"]["initialized"])
        self.arch.gram_num_updates = int(state["gram"]["num_updates"])
        self.skipped_files = set(state.get("skipped_files", []))

    def _gather_rng(self) -> list[dict]:
        mine = get_rng_state()
        if self.dist.world_size == 1:
            return [mine]
        out = [None] * self.dist.world_size
        dist.all_gather_object(out, mine)
        return out

    def save(self, iteration: int) -> str | None:
        model, optim = self._model_state()
        rng = self._gather_rng()
        path = None
        if self.dist.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "iteration": iteration,
                "model": model,
                "optimizer": optim,
                "gram": {"initialized": self.arch.gram_initialized, "num_updates": self.arch.gram_num_updates},
                "rng": rng,
                # The data stream is a function of (seed, iteration, rank, world size): the position is the iteration.
                "data": {"next_iteration": iteration, "world_size": self.dist.world_size,
                         "samples_seen": iteration * self.dist.world_size * int(self.cfg["train"]["batch_size_per_gpu"])},
                "skipped_files": sorted(self.skipped_files),
                "config": dump_config(self.cfg),
            }
            if self.arch.distiller is not None:  # the teacher's path and hash, never its weights
                state["distillation"] = self.arch.distiller.record()
            path = save_checkpoint(state, self.ckpt_dir, iteration, int(self.cfg["checkpointing"]["max_to_keep"]))
            logger.info("checkpoint %s written (%.1f MB)", path, os.path.getsize(path) / 1e6)
        if self.dist.world_size > 1:
            dist.barrier()
        return path

    def export_backbone(self) -> None:
        """``backbone.pth``: the EMA teacher backbone in the official key layout; ``backbone.json``: its kwargs."""
        model, _ = self._model_state() if self.parallel == "fsdp" else ({}, None)
        if not self.dist.is_main:
            return
        if self.parallel == "fsdp":
            sd = {k[len("teacher.backbone."):]: v for k, v in model.items() if k.startswith("teacher.backbone.")}
        else:
            sd = {k: v.detach().cpu().clone() for k, v in self.arch.teacher.backbone.state_dict().items()}
        atomic_save(sd, os.path.join(self.output_dir, "backbone.pth"))
        tmp = os.path.join(self.output_dir, ".backbone.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.arch.backbone_kwargs, f, indent=2)
        os.replace(tmp, os.path.join(self.output_dir, "backbone.json"))

    # ------------------------------------------------------------------------------------------------ logging
    def _open_logs(self):
        self.metrics_path = os.path.join(self.output_dir, "metrics.jsonl")
        if not self.dist.is_main:
            self.tb = None
            return
        # Rows past the resume point belong to the interrupted run: drop them so the file reads as one run (a row
        # torn by a kill does not parse and goes too).
        if os.path.exists(self.metrics_path):
            rows = []
            with open(self.metrics_path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("iteration", -1) < self.start_iter:
                            rows.append(line if line.endswith("\n") else line + "\n")
                    except (json.JSONDecodeError, AttributeError):
                        continue
            _write_text_atomic(self.metrics_path, "".join(rows))
        _write_text_atomic(os.path.join(self.output_dir, "config.yaml"), dump_config(self.cfg))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.output_dir, "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def _reduce(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.stack([values[k].float().reshape(()).to(self.device) for k in keys])
        if self.dist.world_size > 1:
            dist.all_reduce(t)
            t = t / self.dist.world_size
        return dict(zip(keys, t.tolist()))

    def _console_line(self, row: dict, elapsed: float, done: int) -> str:
        """One plain progress line: iteration/total, each loss term, lr, images/s, ETA."""
        it = row["iteration"] + 1
        per_iter = elapsed / max(done, 1)
        eta = int(per_iter * (self.end_iter - it))
        losses = "  ".join(f"{k.removesuffix('_loss')} {row[k]:.4f}" for k in sorted(row)
                           if k.endswith("_loss") and k != "total_loss")
        return (f"iteration {it}/{self.end_iter}  total {row['total_loss']:.4f}  {losses}  lr {row['lr']:.3e}  "
                f"{row['images_per_s']:.1f} img/s  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")

    def _probe(self, probes: Probes, done: int) -> None:
        """Probe maps of the EMA teacher after ``done`` iterations (every rank runs the teacher under FSDP)."""
        if self.parallel != "fsdp" and not self.dist.is_main:
            return
        feats = probes.features(lambda x: self.arch.teacher_patch_features(x.to(self.device), self.autocast))
        if self.dist.is_main:
            probes.write(feats, done, self.tb)

    # ------------------------------------------------------------------------------------------------ loop
    def backbone_lr_factor(self, it: int) -> float:
        """0 during the head warm-up (the backbone is frozen), then a linear ramp to 1."""
        w, r = self.head_warmup_iters, self.backbone_lr_ramp_iters
        if it < w:
            return 0.0
        return min(1.0, (it - w + 1) / r) if r > 0 else 1.0

    def schedule_values(self, it: int) -> tuple[float, float, float, float, float]:
        """(lr, weight decay, EMA momentum, teacher temperature, last-layer lr) of iteration ``it``: the schedules,
        with the Gram phase's lr multiplier and teacher momentum from gram.start_iter on."""
        g = self.cfg["gram"]
        lr, wd = self.lr_schedule(it), self.wd_schedule(it)
        mom, temp = self.momentum_schedule(it), self.teacher_temp_schedule(it)
        if self.arch.gram_active(it):
            lr *= float(g["lr_multiplier"])
            if g["teacher_momentum"] is not None:
                mom = float(g["teacher_momentum"])
        last_layer_lr = 0.0 if it < int(self.cfg["optim"]["freeze_last_layer_iters"]) else lr
        return lr, wd, mom, temp, last_layer_lr

    def train(self) -> dict:
        """Runs to ``end_iter`` or until SIGINT/SIGTERM. On a signal the current step finishes, every rank stops at
        the same iteration, a checkpoint is written and :attr:`stopped_by_signal` is set."""
        with _StopSignals(repeat_window=1.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0) as stop:
            return self._loop(stop)

    def _loop(self, stop: "_StopSignals") -> dict:
        cfg, arch = self.cfg, self.arch
        g = cfg["gram"]
        dataset, loader = build_loader(cfg, root=self.data_dir, rank=self.dist.rank, world_size=self.dist.world_size,
                                       start_iter=self.start_iter, end_iter=self.end_iter,
                                       pin_memory=self.device.type == "cuda")
        data_iter = iter(loader)
        if self._resume_state is not None:
            rngs = self._resume_state["rng"]
            if len(rngs) == self.dist.world_size:
                set_rng_state(rngs[self.dist.rank])
            else:
                logger.warning("checkpoint has RNG states for %d ranks, running %d: not restoring them", len(rngs),
                               self.dist.world_size)
        self._open_logs()
        health = HealthMonitor.from_config(cfg)
        if self.dist.is_main and self.start_iter > 0:
            health.prime(self.metrics_path)
        probes = Probes.prepare(cfg, image_paths=dataset.paths, output_dir=self.output_dir, start_iter=self.start_iter,
                                write=self.dist.is_main)
        probe_every = int(cfg["train"]["probe_every"])
        arch.train()
        if probes is not None and self.start_iter == 0:
            self._probe(probes, 0)
        progress = None
        # The bar only on a terminal; otherwise (redirected output, or the bar turned off) plain lines.
        if self.dist.is_main and cfg["train"]["progress_bar"] and sys.stderr.isatty():
            from tqdm.auto import tqdm

            progress = tqdm(total=self.end_iter, initial=self.start_iter, desc="dinov3-train", dynamic_ncols=True)
        log_every = max(1, int(cfg["train"]["log_every"]))
        period = int(cfg["checkpointing"]["period"])
        imgs_per_step = int(cfg["train"]["batch_size_per_gpu"]) * self.dist.world_size
        clip = float(cfg["optim"]["clip_grad"] or 0.0)
        # The parts whose gradient norm is clipped (feature distillation: no heads, maybe a projection).
        clipped = [n for n in STUDENT_PARTS
                   if getattr(arch.student, n) is not None
                   and any(p.requires_grad for p in getattr(arch.student, n).parameters())]
        last_row: dict = {}
        nan_streak = 0
        start_time = tick = time.perf_counter()
        saved_at = None
        with _logging_through(progress):
            for it in range(self.start_iter, self.end_iter):
                batch = next(data_iter)
                for path, reason in batch.pop("skipped"):
                    if path not in self.skipped_files:
                        self.skipped_files.add(path)
                        logger.warning("skipping unreadable image file %s: %s", path, reason)
                if arch.gram_active(it) and not arch.gram_active(it - 1):
                    self._gram_teacher_to(self.device)
                if arch.gram_active(it) and not arch.gram_initialized:
                    logger.info("iteration %d: Gram phase starts, Gram teacher <- EMA teacher", it)
                    arch.load_gram_from_teacher()

                lr, wd, mom, temp, last_layer_lr = self.schedule_values(it)
                backbone_factor = self.backbone_lr_factor(it)
                apply_optim_schedule(self.optimizer, lr=lr, wd=wd, last_layer_lr=last_layer_lr,
                                     backbone_lr_factor=backbone_factor)
                batch = self.augment(batch, iteration=it, rank=self.dist.rank)
                if batch["global_crops"].device != self.device:
                    batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

                log_now = (it + 1) % log_every == 0 or it + 1 == self.end_iter
                self.optimizer.zero_grad(set_to_none=True)
                total, losses = arch.forward_backward(batch, teacher_temp=temp, iteration=it,
                                                      student_forward=self.student_forward, autocast=self.autocast,
                                                      health=log_now)
                metrics = dict(losses)
                if backbone_factor == 0.0:
                    # Head warm-up: without gradients AdamW leaves the backbone as it is (no step, no decay, no
                    # moment updates); the EMA then keeps the teacher backbone equal to it too.
                    for p in arch.student.backbone.parameters():
                        p.grad = None
                if clip > 0:
                    for name in clipped:
                        norm = torch.nn.utils.clip_grad_norm_(getattr(arch.student, name).parameters(), max_norm=clip)
                        metrics[f"{name}_grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                self.optimizer.step()
                if self.anchor is not None:
                    self.anchor.step(self.optimizer)
                arch.update_teacher(mom)

                if (g["use_loss"] and g["rep_update"] and arch.gram_active(it)
                        and (it + 1 - int(g["start_iter"])) % int(g["update_frequency"]) == 0
                        and (g["max_updates"] is None or arch.gram_num_updates < int(g["max_updates"]))):
                    logger.info("after iteration %d: Gram teacher refreshed from EMA teacher", it)
                    arch.load_gram_from_teacher()
                    arch.gram_num_updates += 1

                metrics["total_loss"] = total
                # Averaged over the ranks like the losses: a size none of the resolutions has would show that the
                # ranks trained on different ones (they draw the same: dinov3/train/highres.py).
                metrics["global_crops_size"] = torch.tensor(float(batch["global_crops"].shape[-1]))
                # A signal seen by any rank stops every rank after this same iteration (the flag rides along with
                # the metrics' all-reduce). The decision is the reduced flags' alone: a signal that lands during the
                # all-reduce counts from the next iteration on every rank (read once: rank 1 stopping on a flag
                # rank 0 never saw would leave rank 0 waiting in the next collective).
                signum_now = stop.signum
                for s in _StopSignals.SIGNALS:
                    metrics[f"_stop_{int(s)}"] = torch.tensor(float(signum_now == s))
                reduced = self._reduce(metrics)
                seen = [s for s in _StopSignals.SIGNALS if reduced.pop(f"_stop_{int(s)}") > 0]
                stop_signum = max(seen) if seen else 0
                if not math.isfinite(reduced["total_loss"]):
                    nan_streak += 1
                    logger.warning("non-finite loss at iteration %d: %s", it, reduced)
                    if nan_streak > 2:
                        raise FloatingPointError("loss was not finite for 3 consecutive iterations, aborting")
                else:
                    nan_streak = 0
                now = time.perf_counter()
                row = {"iteration": it, **reduced, "lr": lr, "wd": wd, "momentum": mom, "teacher_temp": temp,
                       "last_layer_lr": last_layer_lr, "backbone_lr_factor": backbone_factor,
                       "gram_active": arch.gram_active(it), "gram_updates": arch.gram_num_updates,
                       "skipped_files": len(self.skipped_files), "images_per_s": imgs_per_step / max(now - tick, 1e-9)}
                tick = now
                last_row = row
                if self.dist.is_main and log_now:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if self.tb is not None:
                        for k, v in row.items():
                            if isinstance(v, (int, float)) and k != "iteration":
                                self.tb.add_scalar(k, v, it)
                    if progress is None:
                        logger.info("%s", self._console_line(row, now - start_time, it + 1 - self.start_iter))
                    for message in health.check(row):
                        logger.warning("%s", message)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{reduced['total_loss']:.3f}", lr=f"{lr:.2e}",
                                         img_s=f"{row['images_per_s']:.1f}")
                if probes is not None and ((it + 1) % probe_every == 0 or it + 1 == self.end_iter):
                    self._probe(probes, it + 1)
                if (it + 1) % period == 0 or it + 1 == self.end_iter or stop_signum:
                    self.save(it + 1)
                    saved_at = it + 1
                if stop_signum:
                    self.stopped_by_signal, self.stopped_at = int(stop_signum), it + 1
                    logger.warning("stopped by %s after iteration %d; checkpoint %s written",
                                   signal.Signals(self.stopped_by_signal).name, it + 1, saved_at)
                    break
        if progress is not None:
            progress.close()
        if self.tb is not None:
            self.tb.close()
        if self.stopped_by_signal is None:
            self.export_backbone()
        if self.skipped_files and self.dist.is_main:
            logger.warning("%d unreadable image file(s) were skipped", len(self.skipped_files))
        return last_row

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.dist.initialized_here and dist.is_initialized():
            # DDP's reducer holds the process group. Freed after destroy_process_group() (by the cycle collector, or
            # at interpreter exit), it takes the group down with it: ~ProcessGroupGloo joins the gloo threads while
            # the GIL is held, and a gloo thread freeing a finished work needs the GIL to drop its tensors: a
            # deadlock (seen once in CI, on rank 1 at exit). So the model, its wrapper and optimizer go first, with
            # whatever cycle holds them, while the group is still registered, and destroy_process_group() frees it
            # without the GIL. The group was ours (torchrun): the run is over. Under FSDP2 the DTensor sharding
            # caches hold the device mesh (and through it the group) after the model is gone: cleared as well, and
            # the meshes torch 2.11 leaks let go of their groups (tests/train/test_distributed.py
            # test_no_gloo_thread_outlives_the_cli, both parallel modes).
            self.student_forward = self.optimizer = self.arch = self.anchor = self.augment = None
            gc.collect()
            if self.parallel == "fsdp":
                _clear_dtensor_caches()
                gc.collect()
                _release_mesh_groups()
            dist.destroy_process_group()
            self.dist.initialized_here = False


def _clear_dtensor_caches() -> None:
    """Empties the memo caches of torch.distributed (DTensor sharding propagation, redistribution plans, mesh
    topology, and the C++ dispatch fast path), whose entries reference the device mesh of every DTensor op run
    (FSDP2's sharded parameters): while they hold it, the mesh holds its process group, and destroy_process_group()
    cannot free the group's gloo threads. The caches are private to torch and differ between versions, so every
    functools cache of a torch.distributed function is cleared (they only save recomputation), with the two that
    are not functools caches where this torch has them."""
    clear_native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_native is not None:
        clear_native()
    try:
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
    except ImportError:
        pass
    else:
        clear_redistribute_planner_cache()
    for obj in gc.get_objects():
        if (type(obj).__name__ == "_lru_cache_wrapper"
                and str(getattr(obj, "__module__", "")).startswith("torch.distributed")):
            obj.cache_clear()


def _release_mesh_groups() -> None:
    """Drops the process groups held by device meshes that outlive their training run. torch 2.11 keeps the
    sharding-strategy tuples built while FSDP2's `fully_shard` shards parameters alive through a reference no
    Python object holds (no cache clear frees it; torch 2.13 does not leak), and with them a DTensorSpec, its
    DeviceMesh and the mesh's `_pg_registry`: the gloo group, whose threads then run into interpreter exit. Called
    only when the trainer created the default group and is about to destroy it, so every group a mesh holds is ours
    and unusable afterwards; a torch without the registry attribute is left alone. Matched by exact type: isinstance
    on every live object would trip torch's deprecated-alias warnings."""
    from torch.distributed.device_mesh import DeviceMesh

    for obj in gc.get_objects():
        if type(obj) is DeviceMesh:
            registry = getattr(obj, "_pg_registry", None)
            if isinstance(registry, dict):
                registry.clear()


class TrainingStopped(Exception):
    """:func:`train` was stopped by SIGINT/SIGTERM: the step finished and a checkpoint was written, but the run did not
    reach its end (no ``backbone.pth``). ``train(..., resume=True)`` with the same output folder continues it."""

    def __init__(self, signum: int, iteration: int, output_dir: str):
        self.signum, self.iteration, self.output_dir = signum, iteration, output_dir
        super().__init__(f"training stopped by {signal.Signals(signum).name} after iteration {iteration}; the checkpoint "
                         f"in {output_dir} continues it (train(..., resume=True), or dinov3-train --resume)")


def train(cfg: dict, *, data_dir: str, output_dir: str, max_iters: int | None = None, resume: bool = False,
          device: str | None = None, overwrite: bool = False, allow_config_change: bool = False) -> dict:
    """Runs :class:`Trainer` to the end (or ``max_iters``) and returns the last iteration's metrics. A SIGINT/SIGTERM
    stops it cleanly (the current step, then a checkpoint) and raises :class:`TrainingStopped`, so that a script does
    not go on as if the run had finished."""
    trainer = Trainer(cfg, data_dir=data_dir, output_dir=output_dir, max_iters=max_iters, resume=resume, device=device,
                      overwrite=overwrite, allow_config_change=allow_config_change)
    try:
        last = trainer.train()
        if trainer.stopped_by_signal is not None:
            raise TrainingStopped(trainer.stopped_by_signal, trainer.stopped_at, output_dir)
        return last
    finally:
        trainer.close()


def _write_text_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _logging_through(progress):
    """While a tqdm bar is on screen, log records are written through it so lines and the bar do not mix."""
    if progress is None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # the root logger's console handler (dinov3 loggers propagate to it)
        yield


class _StopSignals:
    """SIGINT/SIGTERM while training: the first asks for a clean stop (finish the step, checkpoint, exit 130/143);
    a second exits at once. Under torchrun the agent forwards a Ctrl-C the workers already got from the terminal:
    a repeat within ``repeat_window`` seconds is taken as that echo. Only the main thread can own signal handlers;
    elsewhere (a library user's worker thread) nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, repeat_window: float = 0.0):
        self.signum: int | None = None
        self.repeat_window = repeat_window
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            logger.warning("received %s: finishing this iteration and writing a checkpoint "
                           "(send it again to stop at once, without a checkpoint)", signal.Signals(signum).name)
            return
        if now - self._first_at < self.repeat_window:
            return
        sys.stderr.write(f"dinov3-train: second {signal.Signals(signum).name}: exiting now, without a checkpoint\n")
        sys.stderr.flush()
        os._exit(128 + int(self.signum))

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
