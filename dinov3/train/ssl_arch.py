"""The DINOv3 self-supervised architecture: student, EMA teacher, Gram teacher, heads and the loss terms."""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from dinov3.models import DinoVisionTransformer

from .config import backbone_kwargs, feature_anchor, pretrained_anchor
from .heads import DINOHead
from .health import health_metrics
from .losses import DINOLoss, iBOTPatchLoss
from .schedules import Schedule


def _reshard(*modules) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward with no backward (the teachers): reshard so
    ``parameters()`` yields the local shards again, aligned with the student's."""
    for m in modules:
        if m is not None and hasattr(m, "reshard"):
            m.reshard()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor parameter (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


class StudentNet(nn.Module):
    """Backbone + DINO head + iBOT head; one ``forward`` does the whole student pass so DDP/FSDP can wrap it."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module,
                 distill_proj: nn.Module | None = None, anchor_proj: nn.Module | None = None):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head
        self.distill_proj = distill_proj  # feature distillation only (distill.py)
        self.anchor_proj = anchor_proj  # train.feature_anchor only (SSLMetaArch._feature_anchor_loss)

    def forward(self, global_crops, local_crops, masks, mask_indices, head_losses=None):
        g, lo = self.backbone.forward_features([global_crops, local_crops], masks=[masks, None])
        g_cls, l_cls, g_patch = g["x_norm_clstoken"], lo["x_norm_clstoken"], g["x_norm_patchtokens"]
        out = {"g_cls": g_cls, "g_patch": g_patch}
        if self.anchor_proj is not None:  # train.feature_anchor: in the forward, where DDP/FSDP expect every weight
            out.update(anchor_cls=self.anchor_proj(g_cls), anchor_patch=self.anchor_proj(g_patch))
        if self.distill_proj is not None:  # feature distillation: no heads, the tokens through the projection
            return {**out, **self.distill_proj(g_cls, l_cls, g_patch)}
        masked_patches = torch.index_select(g_patch.flatten(0, 1), 0, mask_indices)  # (M, D)
        if head_losses is not None:  # fused losses on the bottleneck codes, inside forward (FSDP: weights unsharded)
            return {**out, "head_losses": head_losses(
                self.dino_head.bottleneck(torch.cat([g_cls, l_cls])), self.dino_head.prototypes(),
                self.ibot_head.bottleneck(masked_patches), self.ibot_head.prototypes())}
        logits = self.dino_head(torch.cat([g_cls, l_cls]))  # one head pass for all CLS tokens
        g_logits, l_logits = logits.split([g_cls.shape[0], l_cls.shape[0]])
        return {**out, "g_logits": g_logits, "l_logits": l_logits,
                "ibot_logits": self.ibot_head(masked_patches)}


class TeacherNet(nn.Module):
    """Same modules as :class:`StudentNet` (so their parameters zip one to one for the EMA); sees global crops only."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module,
                 distill_proj: nn.Module | None = None, anchor_proj: nn.Module | None = None):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head
        self.distill_proj = distill_proj  # the EMA of the student's (unused by the forward)
        self.anchor_proj = anchor_proj  # likewise

    def forward(self, global_crops, mask_indices, features=False):
        out = self.backbone.forward_features(global_crops)
        cls, patch = out["x_norm_clstoken"], out["x_norm_patchtokens"]
        masked_patches = torch.index_select(patch.flatten(0, 1), 0, mask_indices)
        if features:  # bottleneck codes and prototypes, for the fused losses
            return {"cls": cls, "patch": patch, "cls_z": self.dino_head.bottleneck(cls),
                    "dino_W": self.dino_head.prototypes(), "ibot_z": self.ibot_head.bottleneck(masked_patches),
                    "ibot_W": self.ibot_head.prototypes()}
        return {"cls": cls, "patch": patch, "cls_logits": self.dino_head(cls),
                "ibot_logits": self.ibot_head(masked_patches)}


def make_anchor_proj(embed_dim: int) -> nn.Linear:
    """The predictor of train.feature_anchor: a linear map of the student's tokens, the identity at iteration 0 (the
    student starts as the starting backbone, so the term starts at 0)."""
    proj = nn.Linear(embed_dim, embed_dim)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(embed_dim))
        proj.bias.zero_()
    return proj


def make_heads(cfg: dict, embed_dim: int) -> tuple[DINOHead, DINOHead]:
    """The DINO and iBOT heads of ``cfg`` on a backbone of width ``embed_dim``."""
    d, ib = cfg["dino"], cfg["ibot"]
    dino = DINOHead(embed_dim, int(d["head_n_prototypes"]), nlayers=int(d["head_nlayers"]),
                    hidden_dim=int(d["head_hidden_dim"]), bottleneck_dim=int(d["head_bottleneck_dim"]),
                    weight_norm=bool(d["head_weight_norm"]), init_std=float(d["head_init_std"]))
    ibot = DINOHead(embed_dim, int(ib["head_n_prototypes"]), nlayers=int(ib["head_nlayers"]),
                    hidden_dim=int(ib["head_hidden_dim"]), bottleneck_dim=int(ib["head_bottleneck_dim"]),
                    weight_norm=bool(ib["head_weight_norm"]), init_std=float(ib["head_init_std"]))
    return dino, ibot


def _make_koleo(cfg: dict, distributed: bool, backend: str) -> nn.Module:
    from dinov3_kernels import KoLeoLoss, KoLeoLossDistributed

    d = cfg["dino"]
    if d["koleo_loss_distributed"] and distributed:
        cls, kwargs = KoLeoLossDistributed, {"topk": int(d["koleo_topk"]),
                                             "loss_group_size": d["koleo_distributed_loss_group_size"]}
    else:
        cls, kwargs = KoLeoLoss, {}
    if "backend" in inspect.signature(cls.__init__).parameters:
        kwargs["backend"] = backend
    return cls(**kwargs)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: dict, *, distributed: bool = False):
        super().__init__()
        self.cfg = cfg
        s, d, ib, g = cfg["student"], cfg["dino"], cfg["ibot"], cfg["gram"]
        backend = cfg["train"]["kernel_backend"]
        kw = backbone_kwargs(cfg)
        self.backbone_kwargs = kw
        attn = s["attn_backend"]

        # Distillation (distill.py): the frozen teacher lives outside the module tree, so never in a state dict.
        self.distiller = None
        features = False
        if cfg["distillation"]["enabled"]:
            from .distill import Distiller

            self.distiller = Distiller(cfg)
            features = self.distiller.mode == "features"

        def heads():  # feature distillation trains no heads
            return (nn.Identity(), nn.Identity()) if features else make_heads(cfg, kw["embed_dim"])

        def proj():
            return self.distiller.make_projection(kw["embed_dim"]) if features else None

        student_backbone = DinoVisionTransformer(**{**kw, "drop_path_rate": float(s["drop_path_rate"])},
                                                 attn_backend=attn)
        self.feature_anchor = feature_anchor(cfg)

        def anchor_proj():
            return make_anchor_proj(kw["embed_dim"]) if self.feature_anchor > 0 else None

        self.student = StudentNet(student_backbone, *heads(), proj(), anchor_proj())
        self.teacher = TeacherNet(DinoVisionTransformer(**kw, attn_backend=attn), *heads(), proj(), anchor_proj())
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.distill_masks = self.distiller is not None and not features and cfg["distillation"]["mask_student"]
        if self.distiller is not None and not self.distill_masks:  # unmasked student (official): no mask token
            self.student.backbone.mask_token.requires_grad_(False)

        self.gram_use_loss = bool(g["use_loss"])
        self.gram_teacher = None
        if self.gram_use_loss:
            self.gram_teacher = DinoVisionTransformer(**kw, attn_backend=attn)
            self.gram_teacher.requires_grad_(False)
            from dinov3_kernels import GramLoss

            self.gram_loss = GramLoss(apply_norm=bool(g["normalized"]), img_level=bool(g["img_level"]),
                                      remove_neg=bool(g["remove_neg"]),
                                      remove_only_teacher_neg=bool(g["remove_only_teacher_neg"]), backend=backend)
        # The backbone the run started from (train.pretrained_anchor, anchor.py; train.feature_anchor): the
        # student's initial weights, replaced by the pretrained ones (pretrained.load_into_arch); never trained,
        # saved in checkpoints.
        self.pretrained_reference = None
        if pretrained_anchor(cfg) > 0 or self.feature_anchor > 0:
            self.pretrained_reference = DinoVisionTransformer(**kw, attn_backend=attn)
            self.pretrained_reference.load_state_dict(student_backbone.state_dict())
            self.pretrained_reference.requires_grad_(False)
        # Gram teacher bookkeeping (saved in checkpoints).
        self.gram_initialized = False
        self.gram_num_updates = 0

        self.dino_loss = DINOLoss(int(d["head_n_prototypes"]), student_temp=float(d["student_temp"]))
        self.ibot_loss = iBOTPatchLoss(int(ib["head_n_prototypes"]), student_temp=float(ib["student_temp"]))
        self.koleo_loss = _make_koleo(cfg, distributed, backend)

        total = int(cfg["train"]["iterations"])
        self.gram_weight_schedule = (
            Schedule.from_config(g["loss_weight_schedule"], total - int(g["start_iter"]), offset=int(g["start_iter"]))
            if g.get("loss_weight_schedule") else None)
        self.local_weight_schedule = (Schedule.from_config(d["local_loss_weight_schedule"], total)
                                      if d.get("local_loss_weight_schedule") else None)

    # ------------------------------------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        if self.pretrained_reference is not None:
            self.pretrained_reference.eval()
        return self

    def gram_active(self, iteration: int) -> bool:
        return self.gram_use_loss and iteration >= int(self.cfg["gram"]["start_iter"])

    # ------------------------------------------------------------------------------------------- teachers
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        _reshard(self.student, self.teacher)
        t = [_local(p) for p in self.teacher.parameters()]
        s = [_local(p.detach()) for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    @torch.no_grad()
    def load_gram_from_teacher(self) -> None:
        """Gram teacher <- current EMA teacher backbone (its start, and every refresh)."""
        _reshard(self.teacher, self.gram_teacher)
        dst = [_local(p) for p in self.gram_teacher.parameters()]
        src = [_local(p) for p in self.teacher.backbone.parameters()]
        torch._foreach_copy_(dst, src)
        self.gram_initialized = True

    @torch.no_grad()
    def teacher_patch_features(self, images: torch.Tensor, autocast=None) -> torch.Tensor:
        """The EMA teacher's patch tokens (N, P, D) of ``images``, outside a training step (the probes). Under FSDP
        every rank must call it (the forward is collective)."""
        autocast = autocast or contextlib.nullcontext
        with autocast():
            patch = self.teacher(images, torch.empty(0, dtype=torch.long, device=images.device))["patch"]
        _reshard(self.teacher)
        return patch

    # ------------------------------------------------------------------------------------------- the step
    def forward_backward(self, batch: dict, *, teacher_temp: float, iteration: int, student_forward=None,
                         autocast=None, health: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher and student passes, every loss term, and ``backward()`` of their weighted sum. With ``health``
        (the trainer sets it on logged iterations) the returned terms also hold :mod:`.health`'s metrics, computed
        from this step's tensors."""
        student_forward = student_forward or self.student
        autocast = autocast or contextlib.nullcontext  # a factory of fresh context managers
        cfg = self.cfg
        gl, lo = batch["global_crops"], batch["local_crops"]
        masks, mask_indices = batch["masks"], batch["mask_indices"]
        n_g = 2
        B = gl.shape[0] // n_g
        n_l = lo.shape[0] // B
        centering = cfg["train"]["centering"]
        fused = cfg["train"].get("head_loss_backend", "official") == "fused"
        # DINOv2/v3 scales: global and local pair counts share the DINO weight.
        ignore_diag = bool(cfg["dino"]["global_ignore_diagonal"])
        g_terms = n_g * (n_g - 1) if ignore_diag else n_g * n_g
        l_terms = n_g * n_l

        distill = self.distiller
        losses: dict[str, torch.Tensor] = {}
        if distill is not None and distill.mode == "features":
            t = distill.teacher_features(gl, autocast)
            with autocast():
                st = student_forward(gl, lo, None, mask_indices)
            total, losses = distill.feature_losses(st, t, n_global=n_g, crop_size=gl.shape[-1],
                                                   student_patch=int(cfg["student"]["patch_size"]))
            return self._finish_step(total, losses, batch, st, n_g, iteration, autocast, None if health else False)
        if distill is not None and not self.distill_masks:  # head distillation: unmasked student (official)
            masks = None
        with torch.no_grad(), autocast():
            t = (self.teacher if distill is None else distill.teacher)(gl, mask_indices, features=fused)
        if fused:
            codes = {}
            # The centers the targets are taken against (the fused softmax-centering call moves them).
            centers = (self.dino_loss.center.clone(), self.ibot_loss.center.clone()) if health else None

            def head_losses(cls_z, dino_W, ibot_z, ibot_W):
                if health:  # copies (FSDP frees its unsharded weights after forward), logged iterations only
                    codes.update(cls_z=cls_z.detach().float(), dino_W=dino_W.detach().float().clone(),
                                 ibot_z=ibot_z.detach().float(), ibot_W=ibot_W.detach().float().clone())
                return self._fused_head_losses(t, batch, teacher_temp, n_g, ignore_diag, cls_z, dino_W, ibot_z, ibot_W)

            with autocast():
                st = student_forward(gl, lo, masks, mask_indices, head_losses=head_losses)
            # One DINO call for all crops: its per-row terms, summed over the global or local crops and rescaled
            # from the joint pair count to each one's own, are the two official losses.
            rows, losses["ibot_loss"] = st["head_losses"]
            losses["dino_local_crops_loss"] = rows[n_g:].sum() * ((g_terms + l_terms) / max(l_terms, 1))
            losses["dino_global_crops_loss"] = rows[:n_g].sum() * ((g_terms + l_terms) / g_terms)
            if health:  # the fused losses never form the logits: the health metrics form them on these iterations
                with torch.no_grad():
                    cls_probs, patch_probs = self._teacher_targets(
                        t["cls_z"].float() @ t["dino_W"].float().T, t["ibot_z"].float() @ t["ibot_W"].float().T,
                        batch, teacher_temp, centering, centers=centers)
                    logits = codes["cls_z"] @ codes["dino_W"].T
                    st["g_logits"], st["l_logits"] = logits[: n_g * B], logits[n_g * B:]
                    st["ibot_logits"] = codes["ibot_z"] @ codes["ibot_W"].T
                cls_probs = cls_probs.unflatten(0, (n_g, B))
        else:
            cls_probs, patch_probs = self._teacher_targets(t["cls_logits"], t["ibot_logits"], batch, teacher_temp,
                                                           centering)
            cls_probs = cls_probs.unflatten(0, (n_g, B))  # (2, B, K)

            with autocast():
                st = student_forward(gl, lo, masks, mask_indices)
            losses["dino_local_crops_loss"] = self.dino_loss(st["l_logits"].unflatten(0, (n_l, B)), cls_probs)
            losses["dino_global_crops_loss"] = self.dino_loss(st["g_logits"].unflatten(0, (n_g, B)), cls_probs,
                                                              ignore_diagonal=ignore_diag)
            losses["ibot_loss"] = self.ibot_loss.forward_masked(st["ibot_logits"], patch_probs, masks=batch["masks"],
                                                                masks_weight=batch["masks_weight"])
        dino_w = float(cfg["dino"]["loss_weight"])
        local_w = self.local_weight_schedule(iteration) if self.local_weight_schedule else 1.0
        total = (dino_w * l_terms / (g_terms + l_terms) * local_w * losses["dino_local_crops_loss"]
                 + dino_w * g_terms / (g_terms + l_terms) * losses["dino_global_crops_loss"])
        total = total + float(cfg["ibot"]["loss_weight"]) * losses["ibot_loss"]
        if self.feature_anchor > 0:
            losses["feature_anchor_loss"] = self._feature_anchor_loss(st, gl, autocast)
            total = total + self.feature_anchor * losses["feature_anchor_loss"]
        if health:
            teacher_cls, teacher_patch = ((t["cls"], t["patch"]) if distill is None  # distilling: the student's
                                          else (st["g_cls"].detach(), st["g_patch"].detach()))
            health_terms = health_metrics(
                dino_targets=cls_probs, dino_student_logits=[st["g_logits"].detach(), st["l_logits"].detach()],
                dino_student_temp=self.dino_loss.student_temp, ibot_targets=patch_probs,
                ibot_student_logits=st["ibot_logits"].detach(), ibot_student_temp=self.ibot_loss.student_temp,
                teacher_cls=teacher_cls, teacher_patch=teacher_patch, n_global=n_g)
        return self._finish_step(total, losses, batch, st, n_g, iteration, autocast, health and health_terms)

    def _feature_anchor_loss(self, st: dict, global_crops: torch.Tensor, autocast) -> torch.Tensor:
        """train.feature_anchor's term: (1 - cos) between the predictor's image of each of the student's global-crop
        CLS tokens and the starting backbone's CLS token of the same crop, averaged, plus the same over the patch
        tokens (the student's input masked as the step masks it; the starting backbone sees the whole crop)."""
        with torch.no_grad(), autocast():
            # Through __call__ (not forward_features) so FSDP's unshard hooks run.
            ref = self.pretrained_reference(global_crops, is_training=True)
        _reshard(self.pretrained_reference)
        cos = nn.functional.cosine_similarity
        return ((1 - cos(st["anchor_cls"].float(), ref["x_norm_clstoken"].float(), dim=-1)).mean()
                + (1 - cos(st["anchor_patch"].float(), ref["x_norm_patchtokens"].float(), dim=-1)).mean())

    def _finish_step(self, total, losses, batch, st, n_g, iteration, autocast, health):
        """The terms every stage shares (KoLeo on the student, the Gram term), ``backward()``, and the returned
        (total, terms); ``health``: False or this step's health metrics (None: take them from the student)."""
        cfg = self.cfg
        g_cls = st["g_cls"].float().unflatten(0, (n_g, -1))
        losses["koleo_loss"] = sum(self.koleo_loss(x) for x in g_cls) / n_g
        total = total + float(cfg["dino"]["koleo_loss_weight"]) * n_g * losses["koleo_loss"]

        if self.gram_active(iteration):
            gram_w = (self.gram_weight_schedule(iteration) if self.gram_weight_schedule
                      else float(cfg["gram"]["loss_weight"]))
            student_patches, teacher_patches = self._gram_features(batch, st["g_patch"], autocast)
            losses["gram_loss"] = self.gram_loss(student_patches, teacher_patches,
                                                 img_level=bool(cfg["gram"]["img_level"]))
            losses["gram_loss_weight"] = torch.tensor(gram_w)
            total = total + gram_w * losses["gram_loss"]

        total.backward()
        if self.distiller is not None:  # FSDP: after the step, as its prototypes may be among the targets' inputs
            self.distiller.reshard()
        if health is None:
            from .distill import student_health

            health = student_health(st["g_cls"], st["g_patch"], n_g)
        if health:
            losses.update(health)
        return total.detach(), {k: v.detach() for k, v in losses.items()}

    def _teacher_targets(self, cls_logits, ibot_logits, batch, teacher_temp, centering, centers=None):
        """The teacher's DINO and iBOT target distributions, as the official losses compute them. ``centers``:
        softmax centering against these (the centers before the fused losses updated them), leaving the losses'
        own centers alone."""
        if centering == "sinkhorn_knopp":
            return (self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp),
                    self.ibot_loss.sinkhorn_knopp_teacher(ibot_logits, teacher_temp, batch["n_masked_patches"]))
        if centers is not None:
            return tuple(F.softmax((x.float() - c) / teacher_temp, dim=-1)
                         for x, c in zip((cls_logits, ibot_logits), centers))
        return (self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp),
                self.ibot_loss.softmax_center_teacher(ibot_logits, teacher_temp))

    def _fused_head_losses(self, t, batch, teacher_temp, n_g, ignore_diag, cls_z, dino_W, ibot_z, ibot_W):
        """(DINO per-row terms (crops, B) over all crops, iBOT loss) from dinov3_kernels' fused losses."""
        from dinov3_kernels import dino_head_loss, ibot_head_loss

        cfg = self.cfg
        backend = cfg["train"]["kernel_backend"]
        backend = "auto" if backend == "cuda" else backend  # no CUDA C kernels for these: Triton on GPU
        dev = cls_z.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

        def cast(x):  # the heads' last layer in the precision autocast would run it
            return x if dtype is None else x.to(dtype)

        softmax = cfg["train"]["centering"] == "softmax"
        common = dict(teacher_temp=teacher_temp, centering=cfg["train"]["centering"], backend=backend)
        dino_kw = dict(common, n_student_crops=cls_z.shape[0] * n_g // t["cls_z"].shape[0], n_teacher_crops=n_g,
                       student_temp=self.dino_loss.student_temp, ignore_diagonal=ignore_diag, reduction="none")
        ibot_kw = dict(common, student_temp=self.ibot_loss.student_temp, masks_weight=batch["masks_weight"],
                       n_images=batch["masks"].shape[0])
        if softmax:
            dino_kw.update(center=self.dino_loss.center, center_momentum=self.dino_loss.center_momentum)
            ibot_kw.update(center=self.ibot_loss.center, center_momentum=self.ibot_loss.center_momentum)
        rows = dino_head_loss(cast(cls_z), cast(t["cls_z"]), cast(dino_W), cast(t["dino_W"]), **dino_kw)
        ibot = ibot_head_loss(cast(ibot_z), cast(t["ibot_z"]), cast(ibot_W), cast(t["ibot_W"]), **ibot_kw)
        if softmax:
            (rows, dino_center), (ibot, ibot_center) = rows, ibot
            with torch.no_grad():
                self.dino_loss.center.copy_(dino_center)
                self.ibot_loss.center.copy_(ibot_center)
        return rows, ibot

    def _gram_features(self, batch, student_patches, autocast):
        if not self.gram_initialized:
            raise RuntimeError("Gram teacher used before it was loaded (checkpoint or EMA copy)")
        crops = batch.get("gram_crops")
        if crops is None:
            if self.cfg["crops"]["gram_teacher_crops_size"] is not None:
                raise RuntimeError("Gram phase without the Gram-teacher crops (the loader builds them from "
                                   "gram.start_iter on)")
            crops = batch["global_crops"]
        with torch.no_grad(), autocast():
            # Through __call__ (not forward_features) so FSDP's unshard hooks run.
            teacher_patches = self.gram_teacher(crops, is_training=True)["x_norm_patchtokens"]
        g = self.cfg["gram"]
        if teacher_patches.shape[1] != student_patches.shape[1]:
            # Resize the high-resolution teacher feature map to the student's patch grid.
            nt = int(math.isqrt(teacher_patches.shape[1]))
            ns = int(math.isqrt(student_patches.shape[1]))
            hw = teacher_patches.float().transpose(1, 2).unflatten(-1, (nt, nt))  # (2B, D, nt, nt)
            hw = F.interpolate(hw, size=(ns, ns), mode=g["global_teacher_resize_method"], align_corners=False,
                               antialias=bool(g["global_teacher_resize_antialias"]))
            teacher_patches = hw.flatten(-2).transpose(1, 2)  # (2B, ns*ns, D)
        teacher_patches = teacher_patches.to(student_patches.dtype)
        if g["tokens_used"] == "masked":
            student_patches, teacher_patches = student_patches[batch["masks"]], teacher_patches[batch["masks"]]
        elif g["tokens_used"] == "unmasked":
            student_patches, teacher_patches = student_patches[~batch["masks"]], teacher_patches[~batch["masks"]]
        return student_patches, teacher_patches
