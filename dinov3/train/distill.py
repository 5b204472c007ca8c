"""Distillation: a student trained from a frozen teacher, as configuration over the one training loop.

Two modes (``distillation.mode``; "auto" picks by what the teacher file holds):

- ``heads`` (the teacher is one of our training checkpoints: backbone + DINO/iBOT heads). The official scheme
  (ssl_meta_arch.py with ``distillation.enabled``): the frozen teacher's backbone and heads give the DINO and iBOT
  targets, Sinkhorn-Knopp centred as the EMA teacher's are in pretraining, for the student's heads; same crops, KoLeo
  on the student, and the student sees its global crops unmasked (official: ``masks=None`` when distilling), the
  iBOT term then predicting the teacher's assignments of the patches the mask would have hidden. The student's EMA is
  still kept (official ``model_ema``) and is what the run exports; it does not produce targets.
- ``features`` (the teacher is a backbone only: released weights have no heads). The student's tokens, through a
  small learnable projection when the widths differ (a part of the student, saved in checkpoints, not exported),
  regress the teacher's: the CLS token of each global crop to the teacher's CLS of the same crop, each local crop's
  CLS to the teacher's CLS of both global crops (DINO's cross-view pairs), and the global crops' patch tokens to the
  teacher's, resized over the patch grid when the grids differ. Loss: cosine, smooth-L1 or L2.

The teacher runs under ``torch.no_grad()`` in the autocast dtype, is not a submodule of the model (so never in a
checkpoint's state dict), and checkpoints record its path and sha256, which ``--resume`` verifies.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, backbone_kwargs, config_from_text

logger = logging.getLogger("dinov3.train")

KEY = "distillation.teacher"
_HASHES: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: the trainer hashes a file once per process


# ------------------------------------------------------------------------------------------------ the file
def teacher_sha256(path: str) -> str:
    """sha256 of the teacher's bytes: of the file, or for a folder (Hugging Face) of its files' relative names and
    contents in sorted order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    else:
        files = [""]
    stats = tuple((f, os.stat(os.path.join(path, f) if f else path).st_size,
                   os.stat(os.path.join(path, f) if f else path).st_mtime_ns) for f in files)
    key = (os.path.abspath(path), stats)
    if key not in _HASHES:
        h = hashlib.sha256()
        for f in files:
            if f:
                h.update(f.encode() + b"\0")
            with open(os.path.join(path, f) if f else path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _is_training_checkpoint(obj) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and isinstance(obj.get("config"), str)


def _read_training_checkpoint(path: str) -> dict | None:
    """The training checkpoint at ``path``, or None when the file is something else (backbone weights)."""
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch.load raises, the file is not a usable teacher
        raise ConfigError(f"{KEY}={path} cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return obj if _is_training_checkpoint(obj) else None


def check_teacher_record(cfg: dict, record: dict | None) -> None:
    """Before a resume: the teacher file the checkpoint was trained from must be there, unchanged."""
    if not cfg["distillation"]["enabled"]:
        return
    if record is None:
        raise ConfigError("--resume: this checkpoint does not record a distillation teacher, but the config "
                          "distils: it was not written by a distillation run")
    path = cfg["distillation"]["teacher"]
    if not os.path.exists(path):
        raise ConfigError(f"--resume: the run is distilled from {KEY}={path} (sha256 {record['sha256'][:16]}...), "
                          "which is no longer there: put the same file back to continue the run exactly")
    now = teacher_sha256(path)
    if now != record["sha256"]:
        raise ConfigError(f"--resume: {KEY}={path} has changed since the run started (sha256 {now[:16]}... now, "
                          f"{record['sha256'][:16]}... in the checkpoint): the run would no longer be one exact run. "
                          "Put the original teacher back, or start a new run in another --output folder")


# ------------------------------------------------------------------------------------------------ the student's part
class DistillProjection(nn.Module):
    """Student tokens (.., d_student) -> the teacher's width (.., d_teacher): one linear map for the CLS tokens and
    one for the patch tokens; the identity (no parameters) when the widths agree."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        if student_dim == teacher_dim:
            self.cls, self.patch = nn.Identity(), nn.Identity()
        else:
            self.cls, self.patch = nn.Linear(student_dim, teacher_dim), nn.Linear(student_dim, teacher_dim)

    def forward(self, g_cls, l_cls, g_patch) -> dict[str, torch.Tensor]:
        n_g = g_cls.shape[0]
        cls = self.cls(torch.cat([g_cls, l_cls]))  # one pass for all CLS tokens
        return {"proj_g_cls": cls[:n_g], "proj_l_cls": cls[n_g:], "proj_g_patch": self.patch(g_patch)}


# ------------------------------------------------------------------------------------------------ the losses
def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float = 1.0) -> torch.Tensor:
    """Mean over tokens (..., D) of 1 - cos(s, t) ("cosine"), or mean over elements of smooth-L1 with ``beta``
    ("smooth_l1") or of (s - t)^2 ("l2"). Computed in fp32."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)).mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(s, t, beta=beta)
    if kind == "l2":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown feature loss {kind!r}")


def resize_patch_tokens(patch: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                        mode: str = "bilinear") -> torch.Tensor:
    """Patch tokens (N, h*w, D) on the ``grid`` (h, w) resampled to ``size`` (h', w'): (N, h'*w', D)."""
    if tuple(grid) == tuple(size):
        return patch
    hw = patch.float().transpose(1, 2).unflatten(-1, tuple(grid))  # (N, D, h, w)
    kw = {} if mode in ("nearest", "area") else {"align_corners": False,
                                                  "antialias": size[0] < grid[0] or size[1] < grid[1]}
    hw = F.interpolate(hw, size=tuple(size), mode=mode, **kw)
    return hw.flatten(-2).transpose(1, 2).to(patch.dtype)


# ------------------------------------------------------------------------------------------------ the teacher
class Distiller:
    """The frozen teacher of a distillation run and what it needs: which mode, its width and patch size, the file's
    hash. Not an ``nn.Module`` on purpose: the model's state dict (the checkpoints) must not contain the teacher."""

    def __init__(self, cfg: dict):
        d = cfg["distillation"]
        path = d["teacher"]
        if not path or not os.path.exists(path):
            raise ConfigError(f"{KEY}={path}: no such file or folder")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{KEY}={path}: not readable (permissions)")
        self.cfg, self.path = cfg, os.fspath(path)
        ckpt = _read_training_checkpoint(self.path)
        mode = d["mode"]
        if mode == "auto":
            mode = "heads" if ckpt is not None else "features"
        if mode == "heads" and ckpt is None:
            raise ConfigError(f"{KEY}={path} holds backbone weights only, while distillation.mode=heads needs the "
                              "teacher's DINO and iBOT heads (one of our training checkpoints, "
                              "OUTPUT/checkpoints/checkpoint_*.pth): use distillation.mode=features (or auto)")
        self.mode = mode
        s_patch = int(cfg["student"]["patch_size"])
        s_chans = int(cfg["student"]["model_kwargs"].get("in_chans", 3))
        # The student's RNG stream stays that of a run without a teacher: the teacher is built aside.
        with torch.random.fork_rng(devices=[]):
            if mode == "heads":
                self.teacher, tkw = self._build_heads_teacher(ckpt)
                backbone = self.teacher.backbone
            else:
                backbone, tkw = self._build_backbone_teacher(ckpt)
                self.teacher = backbone
        del ckpt
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.dim = int(backbone.embed_dim)
        self.patch_size = int(tkw["patch_size"])
        if int(tkw.get("in_chans", 3)) != s_chans:
            raise ConfigError(f"{KEY}={path}: the teacher takes {tkw.get('in_chans', 3)}-channel images, the student "
                              f"{s_chans} (student.model_kwargs.in_chans)")
        size = int(cfg["crops"]["global_crops_size"])
        if mode == "heads" and self.patch_size != s_patch:
            raise ConfigError(f"{KEY}={path}: the teacher's patch size is {self.patch_size}, the student's "
                              f"{s_patch} (student.patch_size): head distillation compares the two per patch (the "
                              "iBOT targets), so they must agree; feature distillation (distillation.mode=features) "
                              "resizes the teacher's patch grid instead")
        if size % self.patch_size:
            raise ConfigError(f"{KEY}={path}: the teacher's patch size {self.patch_size} does not divide "
                              f"crops.global_crops_size={size}: the teacher sees the student's global crops")
        self.sha256 = teacher_sha256(self.path)
        logger.info("distillation (%s) from %s: width %d, patch %d, sha256 %s", mode, self.path, self.dim,
                    self.patch_size, self.sha256[:16])

    def _build_heads_teacher(self, ckpt: dict):
        from dinov3.models import DinoVisionTransformer
        from dinov3.models.checkpoint import CheckpointMismatchError, load_pretrained

        from .ssl_arch import TeacherNet, make_heads

        cfg, path = self.cfg, self.path
        try:
            tcfg = config_from_text(ckpt["config"])
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{KEY}={path}: the checkpoint's training config cannot be read ({exc})") from None
        for head in ("dino", "ibot"):
            theirs, ours = int(tcfg[head]["head_n_prototypes"]), int(cfg[head]["head_n_prototypes"])
            if theirs != ours:
                raise ConfigError(f"{KEY}={path}: the teacher's {head} head has {theirs} prototypes, the student's "
                                  f"{ours}: set {head}.head_n_prototypes={theirs} (the student learns the teacher's "
                                  "assignments to its prototypes)")
            if cfg["train"]["head_loss_backend"] == "fused":
                theirs, ours = int(tcfg[head]["head_bottleneck_dim"]), int(cfg[head]["head_bottleneck_dim"])
                if theirs != ours:
                    raise ConfigError(f"{KEY}={path}: the teacher's {head} head has bottleneck {theirs}, the "
                                      f"student's {ours}: the fused head losses need them equal: set "
                                      f"{head}.head_bottleneck_dim={theirs} or train.head_loss_backend=official")
        kw = backbone_kwargs(tcfg)
        sd = {k[len("teacher."):]: v for k, v in ckpt["model"].items() if k.startswith("teacher.")}
        backbone = DinoVisionTransformer(device="meta", **kw, attn_backend=cfg["student"]["attn_backend"])
        try:
            load_pretrained(backbone, {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
            net = TeacherNet(backbone, *make_heads(tcfg, int(kw["embed_dim"])))
            net.load_state_dict({k: v.clone() for k, v in sd.items()})
        except (CheckpointMismatchError, RuntimeError) as exc:
            raise ConfigError(f"{KEY}={path}: its EMA teacher does not fit the model its own config describes: "
                              + " ".join(str(exc).splitlines()[:3])) from None
        return net, kw

    def _build_backbone_teacher(self, ckpt: dict | None):
        from dinov3.models import DinoVisionTransformer
        from dinov3.models.checkpoint import CheckpointMismatchError, load_pretrained

        from .pretrained import KEY as PRETRAINED_KEY, read_pretrained

        path = self.path
        try:
            weights = read_pretrained(path)
        except ConfigError as exc:  # its messages name student.pretrained_weights
            raise ConfigError(str(exc).replace(PRETRAINED_KEY, KEY)) from None
        kw = dict(weights.model_kwargs)
        missing = [k for k in ("embed_dim", "depth", "num_heads", "patch_size") if k not in kw]
        if missing:
            raise ConfigError(f"{KEY}={path}: the file does not say the teacher's {', '.join(missing)} "
                              "(give a backbone.pth with its backbone.json, a Hugging Face folder, or a checkpoint)")
        kw.pop("img_size", None)
        try:
            model = DinoVisionTransformer(device="meta", **kw, attn_backend=self.cfg["student"]["attn_backend"])
            load_pretrained(model, weights.state_dict)
        except (CheckpointMismatchError, ValueError, TypeError) as exc:
            raise ConfigError(f"{KEY}={path} does not fit the model {weights.described_by} gives: "
                              + " ".join(str(exc).splitlines()[:3])) from None
        return model, kw

    # -------------------------------------------------------------------------------------------- placement
    def make_projection(self, student_dim: int) -> DistillProjection:
        return DistillProjection(student_dim, self.dim)

    def to(self, device) -> "Distiller":
        self.teacher.to(device)
        return self

    def shard(self, mp_policy) -> None:
        """FSDP2: shard the frozen teacher like the EMA teacher (blocks, then the root)."""
        from torch.distributed.fsdp import fully_shard

        backbone = self.teacher.backbone if self.mode == "heads" else self.teacher
        for blk in backbone.blocks:
            fully_shard(blk, mp_policy=mp_policy)
        fully_shard(self.teacher, mp_policy=mp_policy)

    def reshard(self) -> None:
        if hasattr(self.teacher, "reshard"):
            self.teacher.reshard()

    def record(self) -> dict:
        """What a checkpoint stores of the teacher (never its weights)."""
        return {"teacher": os.path.abspath(self.path), "sha256": self.sha256, "mode": self.mode}

    # -------------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def teacher_features(self, global_crops: torch.Tensor, autocast) -> dict[str, torch.Tensor]:
        """The teacher's CLS (2B, D_t) and patch tokens (2B, P_t, D_t) of the global crops."""
        with autocast():
            out = self.teacher(global_crops, is_training=True)  # through __call__: FSDP's unshard hooks run
        return {"cls": out["x_norm_clstoken"], "patch": out["x_norm_patchtokens"]}

    def feature_losses(self, st: dict, t: dict, *, n_global: int, crop_size: int, student_patch: int):
        """(weighted total, {loss name: value}) of feature distillation from the student pass ``st`` (projected
        tokens) and the teacher's tokens ``t``."""
        d = self.cfg["distillation"]
        kind, beta = d["loss"], float(d["smooth_l1_beta"])
        g_cls, l_cls, g_patch = st["proj_g_cls"], st["proj_l_cls"], st["proj_g_patch"]
        t_cls, t_patch = t["cls"], t["patch"]
        B = g_cls.shape[0] // n_global
        n_local = l_cls.shape[0] // B
        losses = {"distill_cls_loss": feature_loss(g_cls, t_cls, kind, beta)}
        if n_local:  # every (local crop, teacher global crop) pair of an image: (n_l, 1, B, D) vs (1, n_g, B, D)
            s = l_cls.unflatten(0, (n_local, 1, B)).expand(n_local, n_global, B, -1)
            tt = t_cls.unflatten(0, (1, n_global, B)).expand(n_local, n_global, B, -1)
            losses["distill_local_cls_loss"] = feature_loss(s, tt, kind, beta)
        n_s, n_t = crop_size // student_patch, crop_size // self.patch_size
        t_patch = resize_patch_tokens(t_patch, (n_t, n_t), (n_s, n_s), d["patch_resize_method"])
        losses["distill_patch_loss"] = feature_loss(g_patch, t_patch, kind, beta)
        total = (float(d["cls_loss_weight"]) * losses["distill_cls_loss"]
                 + float(d["patch_loss_weight"]) * losses["distill_patch_loss"])
        if n_local:
            total = total + float(d["local_cls_loss_weight"]) * losses["distill_local_cls_loss"]
        return total, losses


def teacher_record_of(state: dict) -> dict | None:
    """The teacher a checkpoint was distilled from ({teacher, sha256, mode}), or None."""
    rec = state.get("distillation")
    return copy.deepcopy(rec) if isinstance(rec, Mapping) else None


def student_health(g_cls: torch.Tensor, g_patch: torch.Tensor, n_global: int) -> dict[str, torch.Tensor]:
    """The backbone statistics of dinov3/train/health.py on the student's global-crop tokens (feature distillation
    has no head distributions)."""
    from .health import cls_patch_cos, effective_rank, pairwise_cos

    with torch.no_grad():
        cls = g_cls.detach().float()
        return {"cls_pairwise_cos": pairwise_cos(cls.unflatten(0, (n_global, -1))),
                "cls_patch_cos": cls_patch_cos(cls, g_patch.detach()), "feature_rank": effective_rank(cls)}


__all__ = ["Distiller", "DistillProjection", "check_teacher_record", "feature_loss", "resize_patch_tokens",
           "student_health", "teacher_record_of", "teacher_sha256"]
