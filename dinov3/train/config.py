"""Training configuration: defaults, built-in recipes, YAML files and ``key=value`` overrides.

A config is a nested dict of plain Python values (so it is YAML- and checkpoint-friendly). Sections follow the
official DINOv3 ``ssl_default_config.yaml`` where the concept is the same; iteration counts replace epochs because
a folder of images has no official epoch length.
"""

from __future__ import annotations

import copy
import difflib
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
    # Smaller than the smallest released size: students for distillation (nano) and CPU-minute runs (tiny).
    "vit_nano": dict(embed_dim=32, depth=2, num_heads=2, ffn_ratio=2.0),
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
            "pos_embed_rope_rescale_coords": 2.0,
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
        # Backbone weights to start from (student, EMA teacher and Gram teacher at iteration 0; heads, optimizer and
        # schedules start fresh): official .pth/.safetensors, a Hugging Face DINOv3ViTModel folder or safetensors
        # file, a dinov3-train backbone.pth or checkpoint. The model is then the one the weights hold. Not --resume.
        "pretrained_weights": None,
        # With pretrained_weights a dinov3-train training checkpoint: also take its EMA teacher's DINO and iBOT heads
        # into the student and teacher heads (the official student.resume_from_teacher_chkpt), so no head warm-up
        # is needed. The high-resolution recipes (*-highres) set it.
        "pretrained_heads": False,
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
        # From gram.start_iter on, the EMA momentum is this value instead of schedules.momentum (null: no change) and
        # the lr schedule is multiplied by lr_multiplier: dinov3_vit7b16_gram_anchor.yaml trains with momentum 0.999
        # and lr 3e-5 where dinov3_vit7b16_pretrain.yaml had 0.994 and 5e-5 (3e-5 / 5e-5 = 0.6).
        "teacher_momentum": 0.999,
        "lr_multiplier": 0.6,
    },
    "crops": {
        "global_crops_scale": [0.32, 1.0],
        "local_crops_number": 8,
        "local_crops_scale": [0.05, 0.32],
        # Each of the three sizes is a number or a list (official high-resolution adaptation): entry i of the lists
        # is one resolution (global, local, Gram-teacher crop size), drawn for a whole iteration (every rank the
        # same) with probability global_local_crop_pairs_ratios[i] (null: all equal); a number stands for every
        # entry. See dinov3/train/highres.py.
        "global_crops_size": 224,
        "local_crops_size": 96,
        "gram_teacher_crops_size": None,
        "global_local_crop_pairs_ratios": None,
        "gram_teacher_no_distortions": True,
        "horizontal_flips": True,
        "rgb_mean": [0.485, 0.456, 0.406],
        "rgb_std": [0.229, 0.224, 0.225],
        # Photometric augmentation (applied on the training device by BatchAugment). The defaults are the official
        # DataAugmentationDINO's; set the probabilities to 0 for data where colour, blur or intensity carry meaning
        # (microscopy, remote sensing, medical, 16-bit).
        "color_jitter_probability": 0.8,
        # ColorJitter strengths: factors drawn from [max(0, 1 - s), 1 + s]; hue: a shift in [-h, h] turns.
        "color_jitter_brightness": 0.4,
        "color_jitter_contrast": 0.4,
        "color_jitter_saturation": 0.2,
        "color_jitter_hue": 0.1,
        "grayscale_probability": 0.2,
        # Gaussian blur (kernel 9, sigma ~ U(blur_sigma)) probability on global crop 1, global crop 2, local crops.
        # The official code writes GaussianBlur(p=1.0) / (p=0.1) / (p=0.5), but its GaussianBlur hands 1 - p to
        # RandomApply (dinov3/data/transforms.py), so the released models were trained with 0 / 0.9 / 0.5.
        "blur_probabilities": [0.0, 0.9, 0.5],
        "blur_sigma": [0.1, 2.0],
        # Solarize (threshold 128) probability, on global crop 2 only (as official).
        "solarize_probability": 0.2,
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
        # DINO and iBOT losses: "fused" (dinov3_kernels.dino_head_loss / ibot_head_loss from the heads' bottleneck
        # and prototypes, no tokens x K logits; backend from kernel_backend) or "official" (losses.py on the logits).
        "head_loss_backend": "fused",
        "log_every": 10,
        "progress_bar": True,
        # Every probe_every iterations (and at the start and the end; 0: never) the EMA teacher's patch features of
        # probe_images images from the data folder (chosen at the start, kept in OUTPUT/probes/) are drawn as PCA
        # and patch-similarity maps; probe_size: their side in pixels (0: twice crops.global_crops_size).
        "probe_every": 1000,
        "probe_images": 4,
        "probe_size": 0,
        # Head warm-up: for this many first iterations the student backbone is frozen while the fresh heads train
        # (the teacher heads follow by EMA). null: 0 without student.pretrained_weights (or with
        # student.pretrained_heads), else the rule of head_warmup_iters() below. Then the backbone's lr may ramp up
        # linearly from 0 over backbone_lr_ramp_iters
        # (measured: no gain at tiny scale, so 0).
        "head_warmup_iters": None,
        "backbone_lr_ramp_iters": 0,
        # After each step the student backbone is pulled toward the weights it started from by lr * pretrained_anchor
        # times its distance from them (L2-SP; dinov3/train/anchor.py): it stays within about 1 / pretrained_anchor
        # of them per parameter. Keeps a copy of the starting backbone (in checkpoints too). 0: off. Off by default,
        # also with pretrained weights: on the digits demo it did not keep the old domain within 1 point and took
        # away the gain of continuing on the same images (README, "Keeping the old domain").
        "pretrained_anchor": 0.0,
        # Feature-space anchor to the starting backbone (continual self-supervised learning as in CaSSLe, Fini et
        # al. 2022): the student's CLS and patch tokens of the global crops, through a learnable linear predictor
        # (identity at iteration 0), are pulled by cosine toward the tokens that the starting backbone (frozen, kept
        # in checkpoints) gives for the same crops; this is the weight of that term (1 - cos, CLS + patch tokens) in
        # the loss. The features may change (the predictor absorbs it) as long as what the starting backbone
        # represented stays recoverable from them. On the digits demo, 20 kept the old domain within a point while a
        # new one gained 7-8 points, where train.pretrained_anchor kept it only by hardly adapting (README, "A
        # feature-space anchor"). Off by default: not in the released models' recipe. Needs
        # student.pretrained_weights. 0: off.
        "feature_anchor": 0.0,
    },
    # Alarms read off the health metrics written with each logged row (dinov3/train/health.py).
    "health": {
        # The DINO loss within this many nats of log K for `patience` logged rows after the teacher-temperature
        # warm-up: the DINO head's output is uniform.
        "dino_log_k_margin": 0.02,
        "patience": 3,
        # Mean cosine between different images' CLS tokens passing this from below (once it had come 0.1 under it):
        # a representation collapse.
        "cls_cos_threshold": 0.95,
        # A firing alarm is repeated at most once per this many iterations.
        "warn_every": 1000,
    },
    "optim": {
        "adamw_beta1": 0.9,
        "adamw_beta2": 0.99,
        "clip_grad": 3.0,
        "layerwise_decay": 0.98,
        "patch_embed_lr_mult": 0.2,
        "dino_head_wd_multiplier": 1.0,
        # The prototypes (last layer of both heads) get lr 0 for this many iterations. Official: 1 epoch of
        # OFFICIAL_EPOCH_LENGTH=1250 iterations (ssl_default_config.yaml); the 7B recipe: 5 epochs of 1000.
        "freeze_last_layer_iters": 1250,
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
    # Training the student from a frozen teacher (dinov3/train/distill.py). The teacher is never saved into
    # checkpoints: they hold its path and sha256, and --resume refuses a teacher file that changed.
    "distillation": {
        "enabled": False,
        # One of our training checkpoints (backbone + DINO/iBOT heads), or backbone weights only: an official
        # .pth/.safetensors, a Hugging Face DINOv3ViTModel folder, a dinov3-train backbone.pth.
        "teacher": None,
        # "heads": the teacher's DINO/iBOT heads give the targets of the student's heads (official
        # ssl_meta_arch.py with distillation.enabled; needs a training checkpoint); "features": the student's CLS
        # and patch tokens regress the teacher's backbone tokens; "auto": heads when the file has them.
        "mode": "auto",
        # Head distillation: the student's global crops masked as in pretraining (iBOT then predicts the teacher's
        # assignments of patches the student does not see). Official: false, the student sees them unmasked.
        "mask_student": False,
        # Feature distillation: the loss between the student's projected tokens and the teacher's.
        "loss": "cosine",  # "cosine" (1 - cos), "smooth_l1" or "l2" (mean squared error per element)
        "smooth_l1_beta": 1.0,
        # Weights of the student's global-crop CLS vs the teacher's (same view), the local crops' CLS vs the
        # teacher's global CLS (every pair, as DINO's cross-view term) and the global crops' patch tokens vs the
        # teacher's (resized over the patch grid when the grids differ).
        "cls_loss_weight": 1.0,
        "local_cls_loss_weight": 1.0,
        "patch_loss_weight": 1.0,
        "patch_resize_method": "bilinear",
    },
}


def _recipe(arch: str, batch: int, lr: float, drop_path: float, gram_crops: int | None = 512) -> dict:
    # DINOv3 pretraining recipe (dinov3_vit7b16_pretrain.yaml, then dinov3_vit7b16_gram_anchor.yaml for the Gram
    # phase) scaled to one node of 8 GPUs: constant lr/wd/momentum, teacher temp warm-up, 2 global crops at 256 px +
    # 8 local at 112 px, no horizontal flips, gradient clipping at 30, a separate norm for the local crops' CLS
    # token, prototypes frozen for 5 epochs of OFFICIAL_EPOCH_LENGTH=1000 iterations, and a Gram refinement phase
    # with 512 px teacher crops, teacher momentum 0.999 and 0.6x the lr (gram.* defaults).
    return {
        "student": {"arch": arch, "drop_path_rate": drop_path,
                    "model_kwargs": {"untie_global_and_local_cls_norm": True}},
        "crops": {"global_crops_size": 256, "local_crops_size": 112, "gram_teacher_crops_size": gram_crops,
                  "horizontal_flips": False},
        "optim": {"clip_grad": 30.0, "freeze_last_layer_iters": 5000},
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


# Official dinov3_vit7b16_high_res_adapt.yaml (after dinov3_vit7b16_gram_anchor.yaml), entry by entry: global crops of
# 512 px (30 %) or 768 px (70 %), the local crops paired with them 112/112/168/224/336 px, the Gram teacher at 1.5x
# the global crop (768/1152 px).
HIGHRES_RATIOS = [0.3, 0.3, 0.3, 0.05, 0.05]


def _highres(base: dict, *, global_sizes: list[int], local_sizes: list[int], gram_sizes: list[int], batch: int,
             iterations: int, ramp_iters: int, lr: float, momentum: float, period: int) -> dict:
    """The high-resolution adaptation stage on top of a recipe (README, "High-resolution adaptation"). Everything
    here is the official dinov3_vit7b16_high_res_adapt.yaml (HR) where it differs from the Gram-anchoring config it
    continues; the counts and sizes are scaled per recipe by the caller."""
    return deep_merge(base, {
        # HR: student.resume_from_teacher_chkpt, the teacher's backbone and heads (the heads need no warm-up).
        "student": {"pretrained_heads": True},
        # HR: mixed resolutions, one per iteration (CombinedDataLoader, GLOBAL_HOMOGENEOUS).
        "crops": {"global_crops_size": global_sizes, "local_crops_size": local_sizes,
                  "gram_teacher_crops_size": gram_sizes, "global_local_crop_pairs_ratios": list(HIGHRES_RATIOS)},
        # HR: batch_size_per_gpu 8 where the Gram phase had 16 (halved); 30 epochs of 1000 iterations.
        "train": {"batch_size_per_gpu": batch, "iterations": iterations},
        # HR: freeze_last_layer_epochs 0 (the heads come trained).
        "optim": {"freeze_last_layer_iters": 0},
        "schedules": {
            # HR: lr start 0, peak 0, end 1.25e-5, cosine_epochs 10 of 30: a cosine ramp 0 -> end over the first
            # third, then constant. 1.25e-5 = 0.25x the pretraining lr 5e-5 (0.42x the Gram phase's 3e-5).
            "lr": {"kind": "cosine", "start": 0.0, "peak": 0.0, "end": lr, "warmup_iters": 0,
                   "cosine_iters": ramp_iters},
            # HR: teacher temperature 0.07 from the start (no warm-up), momentum constant.
            "teacher_temp": {"kind": "constant", "start": 0.07, "peak": 0.07, "end": 0.07, "warmup_iters": 0},
            "momentum": {"kind": "constant", "start": momentum, "peak": momentum, "end": momentum,
                         "warmup_iters": 0},
        },
        # HR: Gram anchoring on from the first iteration, against a fixed Gram teacher (rep_update false; ours is
        # the starting weights, official gram.ckpt the Gram-anchored teacher), weight 1.5 constant; the lr and the
        # momentum are given above, so no Gram-phase multiplier.
        "gram": {"use_loss": True, "start_iter": 0, "rep_update": False, "loss_weight": 1.5,
                 "loss_weight_schedule": None, "teacher_momentum": None, "lr_multiplier": 1.0},
        # HR: local-crop DINO weight 0.5 constant (the value the Gram phase had ramped it to).
        "dino": {"local_loss_weight_schedule": {"kind": "constant", "start": 0.5, "peak": 0.5, "end": 0.5,
                                                "warmup_iters": 0, "cosine_iters": None}},
        # HR: checkpointing.period 250.
        "checkpointing": {"period": period},
    })


BUILTIN: dict[str, dict[str, Any]] = {
    # Runs on a laptop CPU in minutes: 32 px global crops, 16 px local crops, patch 8, two blocks.
    "tiny": {
        "student": {
            "arch": "vit_tiny",
            "patch_size": 8,
            "drop_path_rate": 0.0,
            # LayerScale 0.1 instead of 1e-5: two blocks trained for minutes, not a deep net trained for days.
            "model_kwargs": {"n_storage_tokens": 1, "layerscale_init": 0.1, "untie_global_and_local_cls_norm": True},
            "attn_backend": "auto",
        },
        # Narrow heads: a larger init std keeps the signal through the MLP (see DINOHead).
        "dino": {"head_n_prototypes": 256, "head_bottleneck_dim": 32, "head_hidden_dim": 128, "head_init_std": 0.1},
        "ibot": {"head_n_prototypes": 256, "head_bottleneck_dim": 32, "head_hidden_dim": 128, "head_init_std": 0.1},
        "crops": {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 4,
                  "gram_teacher_crops_size": 48, "global_crops_scale": [0.4, 1.0], "local_crops_scale": [0.1, 0.4],
                  "horizontal_flips": False},
        "train": {"batch_size_per_gpu": 16, "num_workers": 0, "iterations": 200, "log_every": 1, "probe_every": 50},
        "health": {"warn_every": 500},
        # Clipping, flips and the untied local CLS norm as the ViT recipes (7B pretrain config). The prototypes are
        # frozen for 80 iterations, about one pass over the digits demo's 1257 images (official: 1 to 5 epochs).
        "optim": {"clip_grad": 30.0, "layerwise_decay": 0.9, "scaling_rule": "none", "freeze_last_layer_iters": 80},
        "schedules": {
            "lr": {"kind": "cosine", "start": 0.0, "peak": 1.0e-3, "end": 1.0e-4, "warmup_iters": 10},
            "weight_decay": {"kind": "constant", "start": 0.04, "peak": 0.04, "end": 0.04, "warmup_iters": 0},
            "momentum": {"kind": "constant", "start": 0.99, "peak": 0.99, "end": 0.99, "warmup_iters": 0},
            "teacher_temp": {"kind": "constant", "start": 0.04, "peak": 0.07, "end": 0.07, "warmup_iters": 20},
        },
        # The official Gram phase raises the teacher momentum to 0.999 (a time constant of ~1000 iterations) and
        # lowers the lr to 0.6x; a tiny run's Gram phase lasts 50-500 iterations, over which such a teacher hardly
        # moves: on the digits demo (600 iterations) kNN 71.1 % with them, 74.3 % keeping momentum and lr.
        "gram": {"use_loss": True, "start_iter": 150, "update_frequency": 20, "max_updates": 2,
                 "teacher_momentum": None, "lr_multiplier": 1.0},
        "checkpointing": {"period": 50, "max_to_keep": 2},
    },
    "vits16": _recipe("vit_small", batch=64, lr=2.0e-4, drop_path=0.1),
    "vitb16": _recipe("vit_base", batch=64, lr=1.5e-4, drop_path=0.2),
    "vitl16": _recipe("vit_large", batch=32, lr=1.0e-4, drop_path=0.3),
}


class ConfigError(ValueError):
    """A config that cannot run: the message names the key path and what was expected."""


def deep_merge(base: dict, update: dict) -> dict:
    """Return a copy of ``base`` with ``update`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# High-resolution adaptation (`--config NAME-highres --init-from CHECKPOINT`). The ViT recipes pretrain at the official
# 256 px, so they take the official sizes as they are; their 200k iterations are 1/6 of the official 1.2M, so the
# stage's 30k iterations (10k of lr ramp) become 5000 (1667); lr 0.25x the recipe's. tiny pretrains at 32 px (256 / 8):
# global 64/96, Gram 96/144, local 112/168/224/336 / 8 rounded to its patch 8 (16/16/24/32/40); 100 iterations (the
# official stage is 2.5 % of the pretraining's length, 5 of tiny's 200: too few to move), a third of them the ramp;
# its EMA momentum 0.99 (0.999 has a time constant of 1000 iterations, ten times the stage); lr 0.25x its peak 1e-3.
# Official local 168 px is 10.5 patches of 16: its patch embedding drops the last 8 px, ours refuses sizes that are not
# a multiple of the patch, so 160 (the same 10 x 10 patches).
_OFFICIAL_HR = dict(global_sizes=[512, 768, 768, 768, 768], local_sizes=[112, 112, 160, 224, 336],
                    gram_sizes=[768, 1152, 1152, 1152, 1152], iterations=5000, ramp_iters=1667, momentum=0.999,
                    period=250)
BUILTIN.update({
    "tiny-highres": _highres(BUILTIN["tiny"], global_sizes=[64, 96, 96, 96, 96], local_sizes=[16, 16, 24, 32, 40],
                             gram_sizes=[96, 144, 144, 144, 144], batch=8, iterations=100, ramp_iters=33,
                             lr=2.5e-4, momentum=0.99, period=25),
    "vits16-highres": _highres(BUILTIN["vits16"], batch=32, lr=5.0e-5, **_OFFICIAL_HR),
    "vitb16-highres": _highres(BUILTIN["vitb16"], batch=32, lr=3.75e-5, **_OFFICIAL_HR),
    "vitl16-highres": _highres(BUILTIN["vitl16"], batch=16, lr=2.5e-5, **_OFFICIAL_HR),
})


def apply_override(cfg: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``1e-3``, ``[1, 2]``, ``null``).
    A new key is accepted here and rejected (with a did-you-mean) by :func:`validate_config`."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key component")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node or node[part] is None:
            node[part] = {}
        elif not isinstance(node[part], dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = node[part]
    try:
        value = parse_value(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
    node[parts[-1]] = value


def read_yaml(path: str) -> Any:
    """A YAML file's content; a syntax error names the file, line and column."""
    with open(path) as f:
        try:
            return yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"config file {path}: invalid YAML{where}: {problem}") from None


def load_config(config: str | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults <- built-in recipe or YAML file <- ``key=value`` overrides, then validated."""
    cfg = copy.deepcopy(DEFAULTS)
    base = cfg  # the defaults and the recipe, before the user's own settings
    if isinstance(config, dict):
        cfg = deep_merge(cfg, config)
    elif config is not None:
        if config in BUILTIN:
            cfg = deep_merge(cfg, BUILTIN[config])
            base = copy.deepcopy(cfg)
        elif os.path.isdir(config):
            raise ConfigError(f"config {config!r} is a folder, not a YAML file or a built-in recipe "
                              f"({', '.join(sorted(BUILTIN))})")
        elif os.path.isfile(config):
            loaded = read_yaml(config)
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {config} does not hold a mapping of sections")
            recipe = loaded.pop("base", None)  # a YAML file may start from a built-in recipe
            if recipe is not None:
                if recipe not in BUILTIN:
                    raise ConfigError(f"{config}: unknown base recipe {recipe!r}; choose from {sorted(BUILTIN)}")
                cfg = deep_merge(cfg, BUILTIN[recipe])
            base = copy.deepcopy(cfg)
            cfg = deep_merge(cfg, loaded)
        else:
            raise ConfigError(f"config {config!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) nor a file")
    for item in overrides:
        apply_override(cfg, item)
    validate_config(cfg)
    if cfg["student"]["pretrained_weights"]:
        from .pretrained import adopt_pretrained_model  # reads the weights (torch)

        cfg = adopt_pretrained_model(cfg, base)
        validate_config(cfg)
        if cfg["student"]["pretrained_heads"]:  # refused now, before a run folder is made, if the file has none
            from .pretrained import read_pretrained_heads

            read_pretrained_heads(cfg["student"]["pretrained_weights"])
    return cfg


def head_warmup_iters(cfg: dict) -> tuple[int, int]:
    """(frozen-backbone iterations, backbone lr ramp iterations after them) of this config. The warm-up left null
    with pretrained weights is the prototypes' freeze (optim.freeze_last_layer_iters) plus one time constant of the
    EMA teacher, 1 / (1 - momentum) iterations: the prototypes then train, and the teacher heads catch up with the
    student heads, before the backbone does (tiny: 80 + 100; README, "Starting from released weights")."""
    t = cfg["train"]
    warmup = t["head_warmup_iters"]
    if warmup is None:
        warmup = 0
        if cfg["student"]["pretrained_weights"] and not cfg["student"]["pretrained_heads"]:
            momentum = float(cfg["schedules"]["momentum"].get("start", cfg["schedules"]["momentum"]["peak"]))
            warmup = int(cfg["optim"]["freeze_last_layer_iters"]) + round(1 / max(1 - momentum, 1e-4))
    return int(warmup), int(t["backbone_lr_ramp_iters"])


def pretrained_anchor(cfg: dict) -> float:
    """Strength of the pull toward the starting backbone (train.pretrained_anchor; 0: none)."""
    return float(cfg["train"].get("pretrained_anchor") or 0.0)


def feature_anchor(cfg: dict) -> float:
    """Weight of the feature-space anchor to the starting backbone (train.feature_anchor; 0: none)."""
    return float(cfg["train"].get("feature_anchor") or 0.0)


# ------------------------------------------------------------------------------------------------ the schema
# Every key's type is that of its default (an int default takes ints, a float default ints or floats, a list
# default a list of the same length and element kinds). Keys whose default is null say here what else they take.
_SCHEDULE = "schedule"
NULLABLE: dict[str, Any] = {
    "dino.koleo_distributed_loss_group_size": int,
    "dino.local_loss_weight_schedule": _SCHEDULE,
    "gram.loss_weight_schedule": _SCHEDULE,
    "gram.ckpt": str,
    "gram.max_updates": int,
    "crops.gram_teacher_crops_size": int,
    "gram.teacher_momentum": float,
    "student.pretrained_weights": str,
    "train.head_warmup_iters": int,
    "distillation.teacher": str,
}
# Crop sizes: a number or a list of numbers (one per resolution, crops.global_local_crop_pairs_ratios); the Gram
# size may also be null. The ratios: null, a number or a list.
SIZE_LISTS = {"crops.global_crops_size": int, "crops.local_crops_size": int, "crops.gram_teacher_crops_size": int,
              "crops.global_local_crop_pairs_ratios": float}
# A schedule: {kind, start, peak, end, warmup_iters, cosine_iters}; peak is required, the others optional.
SCHEDULE_KEYS: dict[str, Any] = {"kind": str, "start": float, "peak": float, "end": float, "warmup_iters": int,
                                 "cosine_iters": int}
SCHEDULE_SECTIONS = ("schedules.lr", "schedules.weight_decay", "schedules.momentum", "schedules.teacher_temp")
# Free-form: checked against what the model accepts (DinoVisionTransformer's keyword arguments).
MODEL_KWARGS = "student.model_kwargs"
# Keys that only name a choice among strings.
CHOICES: dict[str, tuple[str, ...]] = {
    "student.arch": tuple(ARCHS),
    "student.attn_backend": ("auto", "reference", "fused"),
    "gram.tokens_used": ("all", "masked", "unmasked"),
    "gram.global_teacher_resize_method": ("bicubic", "bilinear", "nearest", "area"),
    "train.centering": ("sinkhorn_knopp", "softmax"),
    "train.parallel": ("ddp", "fsdp"),
    "train.autocast_dtype": ("bf16", "fp32", "fp16"),
    "train.augment_device": ("auto", "cpu", "cuda"),
    "train.kernel_backend": ("auto", "reference", "triton", "cuda"),
    "train.head_loss_backend": ("fused", "official"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
    "distillation.mode": ("auto", "heads", "features"),
    "distillation.loss": ("cosine", "smooth_l1", "l2"),
    "distillation.patch_resize_method": ("bilinear", "bicubic", "nearest", "area"),
}


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            dict: "a section (mapping)", _SCHEDULE: "a schedule mapping {kind, start, peak, end, warmup_iters}"}[t]


def _describe(value) -> str:
    return f"{value!r} ({'null' if value is None else type(value).__name__})"


def _check_scalar(path: str, value, expected, nullable: bool) -> None:
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{path}: expected {_type_name(expected)}, got null")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[expected](value)
    if not ok:
        null = " or null" if nullable else ""
        raise ConfigError(f"{path}: expected {_type_name(expected)}{null}, got {_describe(value)}")


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        out += _leaf_paths(value, path) if isinstance(value, dict) and value else [path]
    return out


def _unknown(path: str, key: str, known) -> ConfigError:
    full = f"{path}.{key}" if path else key
    guess = [f"{path}.{g}" if path else g for g in difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)]
    if not guess:  # a key put in the wrong section: look for it by its last name anywhere
        leaves = {p.rsplit(".", 1)[-1]: p for p in _leaf_paths(DEFAULTS)}
        guess = [leaves[g] for g in difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.7)]
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    where = f"section {path!r}" if path else "the config"
    return ConfigError(f"unknown key {full!r} in {where}{hint} (known: {', '.join(sorted(known))})")


def _check_schedule(path: str, sch) -> None:
    if not isinstance(sch, dict):
        raise ConfigError(f"{path}: expected {_type_name(_SCHEDULE)}, got {_describe(sch)}")
    for key, value in sch.items():
        if key not in SCHEDULE_KEYS:
            raise _unknown(path, key, SCHEDULE_KEYS)
        _check_scalar(f"{path}.{key}", value, SCHEDULE_KEYS[key], nullable=key == "cosine_iters")
    if "peak" not in sch:
        raise ConfigError(f"{path}: a schedule needs 'peak'")
    if sch.get("kind", "constant") not in ("constant", "cosine"):
        raise ConfigError(f"{path}.kind: expected 'constant' or 'cosine', got {sch['kind']!r}")
    if int(sch.get("warmup_iters", 0)) < 0:
        raise ConfigError(f"{path}.warmup_iters must be >= 0")
    if sch.get("cosine_iters") is not None and int(sch["cosine_iters"]) < 1:
        raise ConfigError(f"{path}.cosine_iters must be >= 1 or null")


def _check_model_kwargs(path: str, kwargs) -> None:
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{path}: expected {_type_name(dict)}, got {_describe(kwargs)}")
    import inspect

    from dinov3.models.vision_transformer import DinoVisionTransformer

    params = inspect.signature(DinoVisionTransformer.__init__).parameters.values()
    accepted = [p.name for p in params if p.name not in ("self", "device")
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    defaults = DEFAULTS["student"]["model_kwargs"]
    for key, value in kwargs.items():
        if key not in accepted:
            raise _unknown(path, key, accepted)
        if key in defaults and defaults[key] is not None:  # null: the model's own "off" (no LayerScale, ...)
            _check_scalar(f"{path}.{key}", value, type(defaults[key]), nullable=True)


def _check_number_or_list(path: str, value, kind) -> None:
    nullable = path in ("crops.gram_teacher_crops_size", "crops.global_local_crop_pairs_ratios")
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{path}: expected {_type_name(kind)} or a non-empty list of them, got []")
        for i, v in enumerate(value):
            _check_scalar(f"{path}[{i}]", v, kind, nullable=False)
        return
    try:
        _check_scalar(path, value, kind, nullable=nullable)
    except ConfigError:
        raise ConfigError(f"{path}: expected {_type_name(kind)}{' or null' if nullable else ''} or a list of them "
                          f"(one per resolution), got {_describe(value)}") from None


def _check_tree(path: str, value, default) -> None:
    if path in SIZE_LISTS:
        return _check_number_or_list(path, value, SIZE_LISTS[path])
    if path == MODEL_KWARGS:
        return _check_model_kwargs(path, value)
    if path in SCHEDULE_SECTIONS:
        return _check_schedule(path, value)
    if path in NULLABLE:
        kind = NULLABLE[path]
        if value is None:
            return
        return _check_schedule(path, value) if kind == _SCHEDULE else _check_scalar(path, value, kind, nullable=True)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(dict)}, got {_describe(value)}")
        for key, sub in value.items():
            if key not in default:
                raise _unknown(path, key, default)
            _check_tree(f"{path}.{key}" if path else key, sub, default[key])
        return None
    if isinstance(default, list):
        if not isinstance(value, list) or len(value) != len(default):
            raise ConfigError(f"{path}: expected a list of {len(default)} numbers, got {_describe(value)}")
        for i, (v, d) in enumerate(zip(value, default)):
            _check_scalar(f"{path}[{i}]", v, type(d), nullable=False)
        return None
    _check_scalar(path, value, type(default), nullable=False)
    if path in CHOICES and value not in CHOICES[path]:
        raise ConfigError(f"{path}: expected one of {', '.join(map(repr, CHOICES[path]))}, got {value!r}")
    return None


def _get(cfg: dict, path: str):
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def validate_config(cfg: dict) -> None:
    """Every key known, every value of its default's type, and the values that would fail later refused now."""
    _check_tree("", cfg, DEFAULTS)
    if set(cfg) != set(DEFAULTS):  # a section left out entirely (a dict config not built by load_config)
        missing = sorted(set(DEFAULTS) - set(cfg))
        raise ConfigError(f"config lacks section(s) {missing}: build it with load_config()")

    def need(path: str, ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{path}={_get(cfg, path)!r}: {what}")

    s, c, d, ib, g, t, o = (cfg[k] for k in ("student", "crops", "dino", "ibot", "gram", "train", "optim"))
    p = s["patch_size"]
    need("student.patch_size", p >= 1, "must be >= 1")
    need("student.drop_path_rate", 0 <= s["drop_path_rate"] < 1, "must be in [0, 1)")
    lengths = {name: len(c[name]) for name in ("global_crops_size", "local_crops_size", "gram_teacher_crops_size",
                                                "global_local_crop_pairs_ratios") if isinstance(c[name], list)}
    if len(set(lengths.values())) > 1:
        raise ConfigError("the crop-size lists must have one entry per resolution, the same number each: "
                          + ", ".join(f"crops.{k} has {n}" for k, n in lengths.items()))
    from .highres import crop_resolutions

    for res in crop_resolutions(cfg):
        for name, size in (("global_crops_size", res.global_size), ("local_crops_size", res.local_size),
                           ("gram_teacher_crops_size", res.gram_size)):
            if size is not None:
                need(f"crops.{name}", size >= p and size % p == 0,
                     f"must be a positive multiple of student.patch_size={p}" + (" (each entry)" if lengths else ""))
        if res.gram_size is not None:
            need("crops.gram_teacher_crops_size", res.gram_size >= res.global_size,
                 f"must be at least crops.global_crops_size={c['global_crops_size']}"
                 + (" (entry by entry)" if lengths else ""))
    ratios = c["global_local_crop_pairs_ratios"]
    if ratios is not None:
        ratios = ratios if isinstance(ratios, list) else [ratios]
        need("crops.global_local_crop_pairs_ratios", all(r >= 0 for r in ratios) and sum(ratios) > 0,
             "must be >= 0, not all 0")
    need("crops.local_crops_number", c["local_crops_number"] >= 1, "must be >= 1 (DINOv3 always uses local crops)")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = c[name]
        need(f"crops.{name}", 0 < lo <= hi <= 1, "must be [min, max] with 0 < min <= max <= 1")
    in_chans = s["model_kwargs"].get("in_chans", 3)
    for name in ("rgb_mean", "rgb_std"):
        need(f"crops.{name}", len(c[name]) == in_chans, f"needs {in_chans} values (student.model_kwargs.in_chans)")
    need("crops.rgb_std", all(v > 0 for v in c["rgb_std"]), "every value must be > 0")
    for name in ("color_jitter_probability", "grayscale_probability", "solarize_probability"):
        need(f"crops.{name}", 0 <= c[name] <= 1, "must be in [0, 1]")
    need("crops.blur_probabilities", all(0 <= v <= 1 for v in c["blur_probabilities"]),
         "must be 3 probabilities in [0, 1] (global crop 1, global crop 2, local crops)")
    for name in ("color_jitter_brightness", "color_jitter_contrast", "color_jitter_saturation"):
        need(f"crops.{name}", c[name] >= 0, "must be >= 0")
    need("crops.color_jitter_hue", 0 <= c["color_jitter_hue"] <= 0.5, "must be in [0, 0.5]")
    lo, hi = c["blur_sigma"]
    need("crops.blur_sigma", 0 < lo <= hi, "must be [min, max] with 0 < min <= max")
    lo, hi = ib["mask_ratio_min_max"]
    need("ibot.mask_ratio_min_max", 0 <= lo < hi <= 1, "must satisfy 0 <= min < max <= 1")
    need("ibot.mask_sample_probability", 0 <= ib["mask_sample_probability"] <= 1, "must be in [0, 1]")
    for head in ("dino", "ibot"):
        h = cfg[head]
        for name in ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim"):
            need(f"{head}.{name}", h[name] >= 1, "must be >= 1")
        need(f"{head}.student_temp", h["student_temp"] > 0, "must be > 0")
        need(f"{head}.head_init_std", h["head_init_std"] > 0, "must be > 0")
        need(f"{head}.loss_weight", h["loss_weight"] >= 0, "must be >= 0")
    need("dino.koleo_loss_weight", d["koleo_loss_weight"] >= 0, "must be >= 0")
    need("dino.koleo_topk", 1 <= d["koleo_topk"] <= 16, "must be in [1, 16] (the KoLeo kernels' limit)")
    if not d["koleo_loss_distributed"]:
        need("dino.koleo_topk", d["koleo_topk"] == 1, "> 1 needs dino.koleo_loss_distributed=true (as DINOv3)")
        if d["koleo_loss_weight"] > 0:
            need("train.batch_size_per_gpu", t["batch_size_per_gpu"] > d["koleo_topk"],
                 f"KoLeo (dino.koleo_loss_weight > 0) needs more than dino.koleo_topk={d['koleo_topk']} images per "
                 "batch: each CLS token's nearest neighbour is searched among the others of its crop "
                 "(or set dino.koleo_loss_weight=0, or dino.koleo_loss_distributed=true to search all ranks)")
    if d["koleo_distributed_loss_group_size"] is not None:
        need("dino.koleo_distributed_loss_group_size", d["koleo_distributed_loss_group_size"] >= 1, "must be >= 1")
    need("train.batch_size_per_gpu", t["batch_size_per_gpu"] >= 1, "must be >= 1")
    need("train.iterations", t["iterations"] >= 1, "must be >= 1")
    need("train.num_workers", t["num_workers"] >= 0, "must be >= 0")
    need("train.log_every", t["log_every"] >= 1, "must be >= 1")
    need("train.probe_every", t["probe_every"] >= 0, "must be >= 0 (0 turns the probes off)")
    need("train.probe_images", t["probe_images"] >= 1, "must be >= 1")
    need("train.probe_size", t["probe_size"] == 0 or (t["probe_size"] >= p and t["probe_size"] % p == 0),
         f"must be 0 (twice the largest crops.global_crops_size) or a positive multiple of student.patch_size={p}")
    hl = cfg["health"]
    need("health.dino_log_k_margin", hl["dino_log_k_margin"] >= 0, "must be >= 0")
    need("health.patience", hl["patience"] >= 1, "must be >= 1")
    need("health.cls_cos_threshold", -1 <= hl["cls_cos_threshold"] <= 1, "must be in [-1, 1]")
    need("health.warn_every", hl["warn_every"] >= 1, "must be >= 1")
    if t["head_warmup_iters"] is not None:
        need("train.head_warmup_iters", t["head_warmup_iters"] >= 0, "must be >= 0 or null")
    need("train.backbone_lr_ramp_iters", t["backbone_lr_ramp_iters"] >= 0, "must be >= 0")
    need("train.pretrained_anchor", t["pretrained_anchor"] >= 0, "must be >= 0")
    need("train.feature_anchor", t["feature_anchor"] >= 0, "must be >= 0")
    if t["feature_anchor"] > 0:
        need("train.feature_anchor", bool(cfg["student"]["pretrained_weights"]),
             "anchors the features to the backbone the run starts from: set student.pretrained_weights "
             "(--init-from), or train.feature_anchor=0")
    need("train.seed", t["seed"] >= 0, "must be >= 0")
    need("train.autocast_dtype", t["autocast_dtype"] != "fp16",
         "fp16 autocast needs loss scaling, which this trainer does not do (DINOv3 trains in bf16): "
         "use train.autocast_dtype=bf16 (or fp32)")
    need("optim.clip_grad", o["clip_grad"] >= 0, "must be >= 0 (0 turns clipping off)")
    need("optim.layerwise_decay", 0 < o["layerwise_decay"] <= 1, "must be in (0, 1]")
    for name in ("adamw_beta1", "adamw_beta2"):
        need(f"optim.{name}", 0 <= o[name] < 1, "must be in [0, 1)")
    for name in ("patch_embed_lr_mult", "dino_head_wd_multiplier"):
        need(f"optim.{name}", o[name] >= 0, "must be >= 0")
    need("optim.freeze_last_layer_iters", o["freeze_last_layer_iters"] >= 0, "must be >= 0")
    sch = cfg["schedules"]
    for name, lo_ok, what in (("lr", lambda v: v >= 0, ">= 0"), ("weight_decay", lambda v: v >= 0, ">= 0"),
                              ("momentum", lambda v: 0 <= v <= 1, "in [0, 1]"),
                              ("teacher_temp", lambda v: v > 0, "> 0")):
        for field in ("start", "peak", "end"):
            if field in sch[name]:
                need(f"schedules.{name}.{field}", lo_ok(sch[name][field]), f"must be {what}")
    if g["use_loss"]:
        need("gram.start_iter", g["start_iter"] >= 0, "must be >= 0")
        need("gram.loss_weight", g["loss_weight"] >= 0, "must be >= 0")
        need("gram.update_frequency", g["update_frequency"] >= 1, "must be >= 1")
        if g["max_updates"] is not None:
            need("gram.max_updates", g["max_updates"] >= 0, "must be >= 0 or null")
        if g["teacher_momentum"] is not None:
            need("gram.teacher_momentum", 0 <= g["teacher_momentum"] <= 1, "must be in [0, 1] or null")
        need("gram.lr_multiplier", g["lr_multiplier"] >= 0, "must be >= 0")
        if g["tokens_used"] != "all":
            need("gram.img_level", not g["img_level"],
                 "gram.tokens_used 'masked'/'unmasked' needs gram.img_level=false (as official DINOv3)")
    ds = cfg["distillation"]
    if ds["enabled"]:
        need("distillation.teacher", bool(ds["teacher"]), "distillation.enabled=true needs the teacher's weights "
             "(a training checkpoint for the head targets, or backbone weights for feature distillation)")
        need("student.pretrained_weights", not s["pretrained_weights"],
             "a distilled student starts from scratch (as official DINOv3): drop student.pretrained_weights "
             "(--init-from), or distillation.enabled")
        for name in ("cls_loss_weight", "local_cls_loss_weight", "patch_loss_weight"):
            need(f"distillation.{name}", ds[name] >= 0, "must be >= 0")
        need("distillation.smooth_l1_beta", ds["smooth_l1_beta"] > 0, "must be > 0")
    cp = cfg["checkpointing"]
    need("checkpointing.period", cp["period"] >= 1, "must be >= 1")
    need("checkpointing.max_to_keep", cp["max_to_keep"] >= 0, "must be >= 0 (0 keeps every checkpoint)")


def backbone_kwargs(cfg: dict) -> dict:
    """The DinoVisionTransformer keyword arguments for this config (also written to backbone.json)."""
    s = cfg["student"]
    kw = dict(ARCHS[s["arch"]])
    g = cfg["crops"]["global_crops_size"]
    # Several resolutions: the largest, as the official build_model_from_cfg (RoPE needs no image size anyway).
    kw.update(img_size=int(max(g) if isinstance(g, list) else g), patch_size=int(s["patch_size"]))
    kw.update(copy.deepcopy(s.get("model_kwargs") or {}))
    return kw


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


# ------------------------------------------------------------------------------------------------ resume
# Keys that --resume may change without touching the computation (the data stream does not depend on the number of
# loader workers). A longer train.iterations is also allowed; anything else breaks an exact continuation.
RESUME_HARMLESS = ("train.log_every", "train.num_workers", "train.progress_bar", "checkpointing.period",
                   "checkpointing.max_to_keep", "train.probe_every", "train.probe_images", "train.probe_size",
                   "health.dino_log_k_margin", "health.patience", "health.cls_cos_threshold", "health.warn_every")


def config_from_text(text: str) -> dict:
    """The config stored in a checkpoint (YAML text), completed with today's defaults for keys added since."""
    loaded = yaml.load(text, Loader=_Loader) or {}
    if isinstance(loaded.get("teacher"), dict) and not loaded["teacher"]:
        loaded.pop("teacher")  # an empty section that early checkpoints carried
    return deep_merge(DEFAULTS, loaded)


def config_differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted.key: (old, new)}`` for every leaf that differs (a dict replaced by null counts as one leaf)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_differences(a, b, path))
        elif a != b:
            out[path] = (a, b)
    return out


def resume_config(saved: dict, overrides: list[str] | tuple[str, ...], *, iteration: int,
                  allow_change: bool = False) -> tuple[dict, dict[str, tuple[Any, Any]]]:
    """The config of a resumed run: the checkpoint's config with the command line's ``key=value`` overrides.

    Returns (config, changes). Changes that break an exact continuation (anything but :data:`RESUME_HARMLESS` and a
    longer ``train.iterations``) raise :class:`ConfigError` listing them, unless ``allow_change``."""
    cfg = copy.deepcopy(saved)
    for item in overrides:
        apply_override(cfg, item)
    validate_config(cfg)
    return cfg, check_resume_changes(saved, cfg, iteration=iteration, allow_change=allow_change)


def check_resume_changes(saved: dict, cfg: dict, *, iteration: int,
                         allow_change: bool = False) -> dict[str, tuple[Any, Any]]:
    """The differences between a checkpoint's config and the config that resumes it; those that break an exact
    continuation raise :class:`ConfigError` (listing them) unless ``allow_change``."""
    changes = config_differences(saved, cfg)
    it_change = changes.get("train.iterations")
    if it_change is not None and it_change[1] < iteration:
        raise ConfigError(f"train.iterations={it_change[1]} is below the checkpoint's iteration {iteration}")
    breaking = {k: v for k, v in changes.items()
                if k not in RESUME_HARMLESS and not (k == "train.iterations" and v[1] > v[0])}
    if breaking and not allow_change:
        lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in breaking.items())
        raise ConfigError(
            "--resume continues the checkpoint's run with its own config; these overrides would change it, so the "
            f"run would no longer be one exact run:\n{lines}\n"
            "Drop them (the checkpoint's values are used without repeating them), start a new run in another "
            "--output folder, or pass --allow-config-change to apply them anyway.")
    return changes
