"""The training loop: one process (CPU or one GPU) or many under torchrun (DDP or FSDP2), with exact resume."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import atomic_save, get_rng_state, latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .config import dump_config, validate_config
from .data import BatchAugment, build_loader
from .param_groups import apply_optim_schedule, build_param_groups
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


def setup_distributed(device: str | None = None) -> DistInfo:
    """Reads torchrun's environment; NCCL on GPU, gloo on CPU. A single process needs no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
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
    def __init__(self, cfg: dict, *, data_dir: str, output_dir: str, max_iters: int | None = None,
                 resume: bool = False, device: str | None = None):
        validate_config(cfg)
        self.cfg, self.data_dir, self.output_dir = cfg, data_dir, output_dir
        self.dist = setup_distributed(device)
        self.device = self.dist.device
        self.total_iters = int(cfg["train"]["iterations"])
        self.end_iter = self.total_iters if max_iters is None else min(int(max_iters), self.total_iters)
        self.ckpt_dir = os.path.join(output_dir, "checkpoints")
        if self.dist.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)

        seed = int(cfg["train"]["seed"])
        # Same seed on every rank: identical initial weights (DDP also broadcasts; FSDP2 shards what it finds).
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

        world = self.dist.world_size
        self.arch = SSLMetaArch(cfg, distributed=world > 1).to(self.device)
        self.parallel = cfg["train"]["parallel"] if world > 1 else "none"
        g = cfg["gram"]
        if g["use_loss"] and g["ckpt"]:
            self._load_gram_checkpoint(g["ckpt"])
        if cfg["train"]["compile"]:
            for m in (self.arch.student.backbone, self.arch.teacher.backbone, self.arch.gram_teacher):
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

        o = cfg["optim"]
        self.optimizer = torch.optim.AdamW(build_param_groups(self.arch.student, o), lr=0.0,
                                           betas=(float(o["adamw_beta1"]), float(o["adamw_beta2"])))
        sch, scale = cfg["schedules"], _lr_scale(cfg, world)
        lr_cfg = dict(sch["lr"], peak=sch["lr"]["peak"] * scale, end=sch["lr"].get("end", sch["lr"]["peak"]) * scale)
        self.lr_schedule = Schedule.from_config(lr_cfg, self.total_iters)
        self.wd_schedule = Schedule.from_config(sch["weight_decay"], self.total_iters)
        self.momentum_schedule = Schedule.from_config(sch["momentum"], self.total_iters)
        self.teacher_temp_schedule = Schedule.from_config(sch["teacher_temp"], self.total_iters)

        self.start_iter = 0
        self.skipped_files: set[str] = set()
        self._resume_state = None
        if resume:
            path = latest_checkpoint(self.ckpt_dir)
            if path is None:
                logger.warning("--resume: no checkpoint in %s, starting from scratch", self.ckpt_dir)
            else:
                self._resume_state = load_checkpoint(path)
                self._load_state(self._resume_state)
                logger.info("resumed from %s at iteration %d", path, self.start_iter)

        ac = cfg["train"]["autocast_dtype"]
        if self.device.type == "cuda" and ac in ("bf16", "fp16"):
            dtype = torch.bfloat16 if ac == "bf16" else torch.float16
            self.autocast = lambda: torch.autocast("cuda", dtype=dtype)
        else:
            self.autocast = contextlib.nullcontext
        aug_dev = cfg["train"]["augment_device"]
        self.augment = BatchAugment(cfg, self.device if aug_dev == "auto" else torch.device(aug_dev))

    # ------------------------------------------------------------------------------------------------ setup
    def _shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.device.type == "cuda" and self.cfg["train"]["autocast_dtype"] == "bf16" else MixedPrecisionPolicy())
        for root, backbone in ((self.arch.student, self.arch.student.backbone),
                               (self.arch.teacher, self.arch.teacher.backbone),
                               (self.arch.gram_teacher, self.arch.gram_teacher)):
            if root is None:
                continue
            for blk in backbone.blocks:
                fully_shard(blk, mp_policy=mp)
            fully_shard(root, mp_policy=mp)

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
            self.arch.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
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
            path = save_checkpoint(state, self.ckpt_dir, iteration, int(self.cfg["checkpointing"]["max_to_keep"]))
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
        # Rows past the resume point belong to the interrupted run: drop them so the file reads as one run.
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                rows = [line for line in f if line.strip() and json.loads(line).get("iteration", -1) < self.start_iter]
            tmp = self.metrics_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(rows)
            os.replace(tmp, self.metrics_path)
        with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
            f.write(dump_config(self.cfg))
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

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg, arch = self.cfg, self.arch
        g = cfg["gram"]
        _, loader = build_loader(cfg, root=self.data_dir, rank=self.dist.rank, world_size=self.dist.world_size,
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
        arch.train()
        progress = None
        if self.dist.is_main and cfg["train"]["progress_bar"]:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.end_iter, initial=self.start_iter, desc="dinov3-train", dynamic_ncols=True)
        log_every = max(1, int(cfg["train"]["log_every"]))
        period = int(cfg["checkpointing"]["period"])
        imgs_per_step = int(cfg["train"]["batch_size_per_gpu"]) * self.dist.world_size
        freeze = int(cfg["optim"]["freeze_last_layer_iters"])
        clip = float(cfg["optim"]["clip_grad"] or 0.0)
        last_row: dict = {}
        nan_streak = 0
        tick = time.perf_counter()
        for it in range(self.start_iter, self.end_iter):
            batch = next(data_iter)
            for path in batch.pop("skipped"):
                if path not in self.skipped_files:
                    self.skipped_files.add(path)
                    logger.warning("skipping unreadable image file %s", path)
            if arch.gram_active(it) and not arch.gram_initialized:
                logger.info("iteration %d: Gram phase starts, Gram teacher <- EMA teacher", it)
                arch.load_gram_from_teacher()

            lr, wd = self.lr_schedule(it), self.wd_schedule(it)
            mom, temp = self.momentum_schedule(it), self.teacher_temp_schedule(it)
            apply_optim_schedule(self.optimizer, lr=lr, wd=wd, last_layer_lr=0.0 if it < freeze else lr)
            batch = self.augment(batch, iteration=it, rank=self.dist.rank)
            if batch["global_crops"].device != self.device:
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

            self.optimizer.zero_grad(set_to_none=True)
            total, losses = arch.forward_backward(batch, teacher_temp=temp, iteration=it,
                                                  student_forward=self.student_forward, autocast=self.autocast)
            metrics = dict(losses)
            if clip > 0:
                for name in ("backbone", "dino_head", "ibot_head"):
                    norm = torch.nn.utils.clip_grad_norm_(getattr(arch.student, name).parameters(), max_norm=clip)
                    metrics[f"{name}_grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.optimizer.step()
            arch.update_teacher(mom)

            if (g["use_loss"] and g["rep_update"] and arch.gram_active(it)
                    and (it + 1 - int(g["start_iter"])) % int(g["update_frequency"]) == 0
                    and (g["max_updates"] is None or arch.gram_num_updates < int(g["max_updates"]))):
                logger.info("after iteration %d: Gram teacher refreshed from EMA teacher", it)
                arch.load_gram_from_teacher()
                arch.gram_num_updates += 1

            metrics["total_loss"] = total
            reduced = self._reduce(metrics)
            if not math.isfinite(reduced["total_loss"]):
                nan_streak += 1
                logger.warning("non-finite loss at iteration %d: %s", it, reduced)
                if nan_streak > 2:
                    raise FloatingPointError("loss was not finite for 3 consecutive iterations, aborting")
            else:
                nan_streak = 0
            now = time.perf_counter()
            row = {"iteration": it, **reduced, "lr": lr, "wd": wd, "momentum": mom, "teacher_temp": temp,
                   "last_layer_lr": 0.0 if it < freeze else lr, "gram_active": arch.gram_active(it),
                   "gram_updates": arch.gram_num_updates, "skipped_files": len(self.skipped_files),
                   "images_per_s": imgs_per_step / max(now - tick, 1e-9)}
            tick = now
            last_row = row
            if self.dist.is_main and ((it + 1) % log_every == 0 or it + 1 == self.end_iter):
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if self.tb is not None:
                    for k, v in row.items():
                        if isinstance(v, (int, float)) and k != "iteration":
                            self.tb.add_scalar(k, v, it)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{reduced['total_loss']:.3f}", lr=f"{lr:.2e}",
                                     img_s=f"{row['images_per_s']:.1f}")
            if (it + 1) % period == 0 or it + 1 == self.end_iter:
                self.save(it + 1)
        if progress is not None:
            progress.close()
        if self.tb is not None:
            self.tb.close()
        self.export_backbone()
        if self.skipped_files and self.dist.is_main:
            logger.warning("%d unreadable image file(s) were skipped", len(self.skipped_files))
        return last_row

    def close(self) -> None:
        if self.dist.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: dict, *, data_dir: str, output_dir: str, max_iters: int | None = None, resume: bool = False,
          device: str | None = None) -> dict:
    trainer = Trainer(cfg, data_dir=data_dir, output_dir=output_dir, max_iters=max_iters, resume=resume, device=device)
    try:
        return trainer.train()
    finally:
        trainer.close()
