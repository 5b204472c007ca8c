"""AdamW parameter groups: layer-wise lr decay, patch-embed lr multiplier, no weight decay on norms/biases/tokens."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

_EMBED_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "storage_tokens")
_NO_DECAY_NAMES = ("norm", "gamma", "cls_token", "storage_tokens", "mask_token", "pos_embed")


def clean_name(name: str) -> str:
    """Strip the prefixes that DDP, FSDP, torch.compile and parametrizations add to parameter names."""
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name.replace("parametrizations.", "")


def layer_lr_multiplier(name: str, decay: float, n_blocks: int) -> float:
    """decay ** (n_blocks + 1 - layer_id): embeddings and tokens are layer 0, block i is layer i + 1 and everything
    after the blocks (final norm) is layer n_blocks + 1 (multiplier 1). Heads (n_blocks = 0) get 1."""
    if n_blocks == 0:
        return 1.0
    layer_id = n_blocks + 1
    if any(k in name for k in _EMBED_NAMES):
        layer_id = 0
    elif name.startswith("blocks.") or ".blocks." in name:
        tail = name[name.index("blocks.") + len("blocks."):]
        layer_id = int(tail.split(".")[0]) + 1
    return decay ** (n_blocks + 1 - layer_id)


def param_group_specs(module: nn.Module, *, layerwise_decay: float, patch_embed_lr_mult: float,
                      wd_multiplier: float = 1.0) -> list[dict]:
    """One spec per trainable parameter of ``module`` (a backbone or a head)."""
    blocks = getattr(module, "blocks", None)
    n_blocks = len(blocks) if blocks is not None else 0
    specs = []
    for raw_name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(raw_name)
        spec = {"name": name, "params": p, "lr_multiplier": layer_lr_multiplier(name, layerwise_decay, n_blocks),
                "wd_multiplier": wd_multiplier, "is_last_layer": "last_layer" in name}
        # Weight decay only on matrices: not on biases, norms, LayerScale gammas, learned tokens, weight-norm gains.
        if name.endswith("bias") or any(k in name for k in _NO_DECAY_NAMES) or name.endswith("original0") or p.ndim <= 1:
            spec["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            spec["lr_multiplier"] *= patch_embed_lr_mult
        specs.append(spec)
    return specs


def fuse_param_groups(specs: list[dict], *, split_backbone: bool = False) -> list[dict]:
    """Merge parameters that share (lr_multiplier, wd_multiplier, is_last_layer) into one optimizer group; with
    ``split_backbone`` the backbone's parameters never share a group with the heads' (their lr can then differ)."""
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for s in specs:
        backbone = split_backbone and s.get("is_backbone", False)
        key = (s["lr_multiplier"], s["wd_multiplier"], s["is_last_layer"]) + ((backbone,) if split_backbone else ())
        if key not in groups:
            groups[key] = {"params": [], "lr_multiplier": s["lr_multiplier"], "wd_multiplier": s["wd_multiplier"],
                           "is_last_layer": s["is_last_layer"]}
            if split_backbone:
                groups[key]["is_backbone"] = backbone
        groups[key]["params"].append(s["params"])
    return list(groups.values())


# The student's trainable parts, in order; the last two exist only with feature distillation (distill_proj) or
# train.feature_anchor (anchor_proj). The trainer clips each one's gradient norm separately.
STUDENT_PARTS = ("backbone", "dino_head", "ibot_head", "distill_proj", "anchor_proj")


def build_param_groups(student: nn.Module, optim_cfg: dict, *, split_backbone: bool = False) -> list[dict]:
    """The student's AdamW groups. ``split_backbone`` (a head warm-up) keeps backbone groups apart; without it the
    groups are those of earlier versions, so their checkpoints' optimizer states still load."""
    specs = []
    for name in STUDENT_PARTS:
        if getattr(student, name, None) is None:
            continue
        wd_mult = float(optim_cfg.get("dino_head_wd_multiplier", 1.0)) if name == "dino_head" else 1.0
        part = param_group_specs(getattr(student, name), layerwise_decay=float(optim_cfg["layerwise_decay"]),
                                 patch_embed_lr_mult=float(optim_cfg["patch_embed_lr_mult"]), wd_multiplier=wd_mult)
        for spec in part:
            spec["is_backbone"] = name == "backbone"
        specs += part
    return fuse_param_groups(specs, split_backbone=split_backbone)


def apply_optim_schedule(optimizer, *, lr: float, wd: float, last_layer_lr: float,
                         backbone_lr_factor: float = 1.0) -> None:
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        factor = backbone_lr_factor if group.get("is_backbone", False) else 1.0
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"] * factor
