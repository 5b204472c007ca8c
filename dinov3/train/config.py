"""Training configuration: defaults, built-in recipes, YAML files and ``key=value`` overrides.

A config is a nested dict of plain Python values (so it is YAML- and checkpoint-friendly). Sections follow the
official DINOv3 ``ssl_default_config.yaml`` where the concept is the same; iteration counts replace epochs because
a folder of images has no official epoch length.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_value(text: str):
    return yaml.load(text, Loader=_Loader)

# DinoVisionTransformer sizes (embed_dim, depth, num_heads, ffn_ratio) as in the official model factories.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(embed_dim=64, depth=2, num_heads=2, ffn_ratio=2.0),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0),
}

DEFAULTS: dict[str, Any] = {
    "student": {
        "arch": "vit_small",
        "patch_size": 16,
        # Extra DinoVisionTransformer keyword arguments; the arch entry fills embed_dim/depth/num_heads/ffn_ratio.
        "model_kwargs": {
            "in_chans": 3,
            "pos_embed_rope_base": 100.0,
            "pos_embed_rope_normalize_coords": "separate",
            "pos_embed_rope_rescale_coords": 2,
            "pos_embed_rope_dtype": "fp32",
            "qkv_bias": True,
            "layerscale_init": 1.0e-5,
            "norm_layer": "layernormbf16",
            "ffn_layer": "mlp",
            "ffn_bias": True,
            "proj_bias": True,
            "n_storage_tokens": 4,
            "mask_k_bias": True,
            "untie_cls_and_patch_norms": False,
            "untie_global_and_local_cls_norm": False,
        },
        "drop_path_rate": 0.1,
        "attn_backend": "auto",
    },
    "dino": {
        "loss_weight": 1.0,
        "global_ignore_diagonal": True,
        "student_temp": 0.1,
        "head_n_prototypes": 65536,
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "head_hidden_dim": 2048,
        # DINOv3 uses a plain linear prototype layer on L2-normalised bottleneck features; DINOv2 weight-normalised it.
        "head_weight_norm": False,
        "head_init_std": 0.02,
        "koleo_loss_weight": 0.1,
        "koleo_loss_distributed": False,
        "koleo_topk": 1,
        "koleo_distributed_loss_group_size": None,
        # Optional {start, peak, end, warmup_iters, cosine_iters}: weight of the local-crop DINO term (DINOv3 Gram
        # phase: 1 -> 0.5); None keeps 1.
        "local_loss_weight_schedule": None,
    },
    "ibot": {
        "loss_weight": 1.0,
        "mask_sample_probability": 0.5,
        "mask_ratio_min_max": [0.1, 0.5],
        "student_temp": 0.1,
        "head_n_prototypes": 65536,
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "head_hidden_dim": 2048,
        "head_weight_norm": False,
        "head_init_std": 0.02,
    },
    "gram": {
        "use_loss": False,
        # First iteration of the Gram-anchoring (refinement) phase.
        "start_iter": 0,
        "loss_weight": 1.0,
        # Optional schedule {kind, start, peak, end, warmup_iters, cosine_iters} counted from gram.start_iter.
        "loss_weight_schedule": None,
        # Path to a checkpoint (ours or a backbone.pth) for the Gram teacher; None -> copy the EMA teacher.
        "ckpt": None,
        "rep_update": True,
        "update_frequency": 10000,
        "max_updates": None,
        "normalized": True,
        "img_level": True,
        "remove_neg": False,
        "remove_only_teacher_neg": False,
        "tokens_used": "all",
        "global_teacher_resize_method": "bicubic",
        "global_teacher_resize_antialias": False,
    },
    "crops": {
        "global_crops_scale": [0.32, 1.0],
        "local_crops_number": 8,
        "local_crops_scale": [0.05, 0.32],
        "global_crops_size": 224,
        "local_crops_size": 96,
        "gram_teacher_crops_size": None,
        "gram_teacher_no_distortions": True,
        "horizontal_flips": True,
        "rgb_mean": [0.485, 0.456, 0.406],
        "rgb_std": [0.229, 0.224, 0.225],
    },
    "train": {
        "batch_size_per_gpu": 64,
        "num_workers": 8,
        "seed": 0,
        "iterations": 100000,
        "centering": "sinkhorn_knopp",
        "compile": False,
        "parallel": "ddp",  # "ddp" or "fsdp" (FSDP2 fully_shard) when world size > 1
        "autocast_dtype": "bf16",  # used on GPU only; CPU runs in fp32
        "augment_device": "auto",  # "auto" (the training device), "cpu" or "cuda"
        # Backend of the Gram and KoLeo losses ("auto" | "reference" | "triton" | "cuda"); the attention backend is
        # student.attn_backend.
        "kernel_backend": "auto",
        "log_every": 10,
        "progress_bar": True,
    },
    "teacher": {},
    "optim": {
        "adamw_beta1": 0.9,
        "adamw_beta2": 0.99,
        "clip_grad": 3.0,
        "layerwise_decay": 0.98,
        "patch_embed_lr_mult": 0.2,
        "dino_head_wd_multiplier": 1.0,
        "freeze_last_layer_iters": 0,
        "scaling_rule": "sqrt_wrt_1024",  # "sqrt_wrt_1024", "linear_wrt_256" or "none"
    },
    # Each schedule: kind "constant" (value = peak after a linear warm-up from start) or "cosine" (linear warm-up
    # start -> peak over warmup_iters, then cosine peak -> end until train.iterations). DINOv3 uses constant ones.
    "schedules": {
        "lr": {"kind": "constant", "start": 0.0, "peak": 1.0e-4, "end": 1.0e-4, "warmup_iters": 1000},
        "weight_decay": {"kind": "constant", "start": 0.04, "peak": 0.04, "end": 0.04, "warmup_iters": 0},
        "momentum": {"kind": "constant", "start": 0.994, "peak": 0.994, "end": 0.994, "warmup_iters": 0},
        "teacher_temp": {"kind": "constant", "start": 0.04, "peak": 0.07, "end": 0.07, "warmup_iters": 3000},
    },
    "checkpointing": {"period": 1000, "max_to_keep": 3},
}


def _recipe(arch: str, batch: int, lr: float, drop_path: float, gram_crops: int | None = 512) -> dict:
    # DINOv3 pretraining recipe (7B config) scaled to one node of 8 GPUs: constant lr/wd/momentum, teacher temp
    # warm-up, 2 global crops at 256 px + 8 local at 112 px, Gram refinement phase with 512 px teacher crops.
    return {
        "student": {"arch": arch, "drop_path_rate": drop_path},
        "crops": {"global_crops_size": 256, "local_crops_size": 112, "gram_teacher_crops_size": gram_crops},
        "train": {"batch_size_per_gpu": batch, "iterations": 200000},
        "schedules": {
            "lr": {"kind": "constant", "start": 0.0, "peak": lr, "end": lr, "warmup_iters": 10000},
            "teacher_temp": {"warmup_iters": 10000},
        },
        "gram": {"use_loss": True, "start_iter": 150000, "update_frequency": 10000, "max_updates": 3,
                 "loss_weight_schedule": {"kind": "cosine", "start": 0.0, "peak": 0.0, "end": 2.0, "warmup_iters": 0,
                                         "cosine_iters": 1000}},
        "dino": {"local_loss_weight_schedule": {"kind": "cosine", "start": 1.0, "peak": 1.0, "end": 0.5,
                                                "warmup_iters": 150000, "cosine_iters": 1000}},
        "checkpointing": {"period": 2500},
    }


BUILTIN: dict[str, dict[str, Any]] = {
    # Runs on a laptop CPU in minutes: 32 px global crops, 16 px local crops, patch 8, two blocks.
    "tiny": {
        "student": {
            "arch": "vit_tiny",
            "patch_size": 8,
            "drop_path_rate": 0.0,
            # LayerScale 0.1 instead of 1e-5: two blocks trained for minutes, not a deep net trained for days.
            "model_kwargs": {"n_storage_tokens": 1, "layerscale_init": 0.1},
            "attn_backend": "auto",
        },
        # Narrow heads: a larger init std keeps the signal through the MLP (see DINOHead).
        "dino": {"head_n_prototypes": 256, "head_bottleneck_dim": 32, "head_hidden_dim": 128, "head_init_std": 0.1},
        "ibot": {"head_n_prototypes": 256, "head_bottleneck_dim": 32, "head_hidden_dim": 128, "head_init_std": 0.1},
        "crops": {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 4,
                  "gram_teacher_crops_size": 48, "global_crops_scale": [0.4, 1.0], "local_crops_scale": [0.1, 0.4]},
        "train": {"batch_size_per_gpu": 16, "num_workers": 0, "iterations": 200, "log_every": 1},
        "optim": {"clip_grad": 3.0, "layerwise_decay": 0.9, "scaling_rule": "none"},
        "schedules": {
            "lr": {"kind": "cosine", "start": 0.0, "peak": 1.0e-3, "end": 1.0e-4, "warmup_iters": 10},
            "weight_decay": {"kind": "constant", "start": 0.04, "peak": 0.04, "end": 0.04, "warmup_iters": 0},
            "momentum": {"kind": "constant", "start": 0.99, "peak": 0.99, "end": 0.99, "warmup_iters": 0},
            "teacher_temp": {"kind": "constant", "start": 0.04, "peak": 0.07, "end": 0.07, "warmup_iters": 20},
        },
        "gram": {"use_loss": True, "start_iter": 150, "update_frequency": 20, "max_updates": 2},
        "checkpointing": {"period": 50, "max_to_keep": 2},
    },
    "vits16": _recipe("vit_small", batch=64, lr=2.0e-4, drop_path=0.1),
    "vitb16": _recipe("vit_base", batch=64, lr=1.5e-4, drop_path=0.2),
    "vitl16": _recipe("vit_large", batch=32, lr=1.0e-4, drop_path=0.3),
}


def deep_merge(base: dict, update: dict) -> dict:
    """Return a copy of ``base`` with ``update`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(cfg: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {item!r} has an empty key component")
    node = cfg
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            if part in node and node[part] is not None:
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node[part] = {}
        node = node[part]
    value = parse_value(raw) if raw.strip() else ""
    node[parts[-1]] = value


def load_config(config: str | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults <- built-in recipe or YAML file <- ``key=value`` overrides, then validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if isinstance(config, dict):
        cfg = deep_merge(cfg, config)
    elif config is not None:
        if config in BUILTIN:
            cfg = deep_merge(cfg, BUILTIN[config])
        elif os.path.isfile(config):
            with open(config) as f:
                loaded = yaml.load(f, Loader=_Loader) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {config} does not hold a mapping")
            base = loaded.pop("base", None)  # a YAML file may start from a built-in recipe
            if base is not None:
                if base not in BUILTIN:
                    raise ValueError(f"unknown base recipe {base!r}; choose from {sorted(BUILTIN)}")
                cfg = deep_merge(cfg, BUILTIN[base])
            cfg = deep_merge(cfg, loaded)
        else:
            raise ValueError(f"config {config!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) nor a file")
    for item in overrides:
        apply_override(cfg, item)
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict) -> None:
    s, c, ib, g, t = cfg["student"], cfg["crops"], cfg["ibot"], cfg["gram"], cfg["train"]
    if s["arch"] not in ARCHS:
        raise ValueError(f"student.arch {s['arch']!r} unknown; choose from {sorted(ARCHS)}")
    p = int(s["patch_size"])
    for name in ("global_crops_size", "local_crops_size"):
        if int(c[name]) % p:
            raise ValueError(f"crops.{name}={c[name]} must be a multiple of student.patch_size={p}")
    if c["gram_teacher_crops_size"] is not None and int(c["gram_teacher_crops_size"]) % p:
        raise ValueError("crops.gram_teacher_crops_size must be a multiple of student.patch_size")
    if int(c["local_crops_number"]) < 1:
        raise ValueError("crops.local_crops_number must be >= 1 (DINOv3 always uses local crops)")
    lo, hi = ib["mask_ratio_min_max"]
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"ibot.mask_ratio_min_max must satisfy 0 <= min < max <= 1, got {ib['mask_ratio_min_max']}")
    if not 0 <= ib["mask_sample_probability"] <= 1:
        raise ValueError("ibot.mask_sample_probability must be in [0, 1]")
    if t["centering"] not in ("sinkhorn_knopp", "softmax"):
        raise ValueError("train.centering must be 'sinkhorn_knopp' or 'softmax'")
    if t["parallel"] not in ("ddp", "fsdp"):
        raise ValueError("train.parallel must be 'ddp' or 'fsdp'")
    if int(t["batch_size_per_gpu"]) < 1 or int(t["iterations"]) < 1:
        raise ValueError("train.batch_size_per_gpu and train.iterations must be >= 1")
    if g["use_loss"]:
        if g["tokens_used"] not in ("all", "masked", "unmasked"):
            raise ValueError("gram.tokens_used must be 'all', 'masked' or 'unmasked'")
        if g["tokens_used"] != "all" and g["img_level"]:
            raise ValueError("gram.tokens_used 'masked'/'unmasked' needs gram.img_level=false (as official DINOv3)")
        if int(g["update_frequency"]) < 1:
            raise ValueError("gram.update_frequency must be >= 1")
    if not cfg["dino"]["koleo_loss_distributed"] and int(cfg["dino"]["koleo_topk"]) != 1:
        raise ValueError("dino.koleo_topk > 1 needs dino.koleo_loss_distributed=true (as official DINOv3)")
    for name, sch in cfg["schedules"].items():
        if sch.get("kind", "constant") not in ("constant", "cosine"):
            raise ValueError(f"schedules.{name}.kind must be 'constant' or 'cosine'")


def backbone_kwargs(cfg: dict) -> dict:
    """The DinoVisionTransformer keyword arguments for this config (also written to backbone.json)."""
    s = cfg["student"]
    kw = dict(ARCHS[s["arch"]])
    kw.update(img_size=int(cfg["crops"]["global_crops_size"]), patch_size=int(s["patch_size"]))
    kw.update(copy.deepcopy(s.get("model_kwargs") or {}))
    return kw


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
