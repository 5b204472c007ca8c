"""Starting a run from pretrained backbone weights: ``student.pretrained_weights`` (``dinov3-train --init-from``).

Unlike ``--resume``, which continues one run exactly (weights, heads, optimizer, schedules, data position), this
starts a new run whose student, EMA teacher and Gram teacher backbones are the given weights at iteration 0; heads,
optimizer and schedules start fresh. The weights may be:

- official DINOv3 weights (``.pth`` or ``.safetensors``, official key layout);
- a Hugging Face ``DINOv3ViTModel`` folder (config.json + model.safetensors) or safetensors file in its layout;
- a ``backbone.pth`` written by dinov3-train (with its ``backbone.json``);
- a dinov3-train checkpoint (its EMA teacher backbone).

The model is the one the weights hold: :func:`adopt_pretrained_model` writes what the files say (backbone.json, the
training config, the HF config.json; for bare state dicts what the tensors show) into the config, and a value the
user set that disagrees is an error listing the differing keys.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
from dataclasses import dataclass

import torch

from .config import ARCHS, ConfigError, backbone_kwargs

logger = logging.getLogger("dinov3.train")

KEY = "student.pretrained_weights"
_SIZE_KEYS = ("embed_dim", "depth", "num_heads", "ffn_ratio")  # what student.arch stands for


@dataclass
class PretrainedBackbone:
    state_dict: dict[str, torch.Tensor]  # official key layout
    model_kwargs: dict  # DinoVisionTransformer arguments the weights determine (all of them when a file says them)
    described_by: str  # where model_kwargs came from, for messages


# ------------------------------------------------------------------------------------------------------ reading
def read_pretrained(path: str, *, num_heads: int | None = None) -> PretrainedBackbone:
    """The backbone at ``path`` in the official layout, with what is known of its model (read by
    :func:`dinov3.models.checkpoint.read_backbone`). ``num_heads`` is needed only to convert a Hugging Face state
    dict that comes without its config.json."""
    from dinov3.models import DinoVisionTransformer
    from dinov3.models.checkpoint import (CheckpointMismatchError, WeightsFileError, load_pretrained, read_backbone,
                                          untie_flags)

    try:
        weights = read_backbone(path)
    except WeightsFileError as exc:  # messages about the file start with its path
        message = str(exc)
        raise ConfigError(f"{KEY}={message}" if message.startswith(str(path)) else message) from None
    sd, kwargs = weights.state_dict, weights.model_kwargs
    official = "cls_token" in sd and any(k.startswith("blocks.") for k in sd)
    if not official and kwargs is not None:
        # Another layout (Hugging Face, timm) whose model the files give: load_pretrained converts it. Neither
        # layout has the untied norms, so the model without them is the one they hold.
        model = DinoVisionTransformer(device="meta", **{**kwargs, **untie_flags({})})
        try:
            load_pretrained(model, sd)
        except CheckpointMismatchError as exc:
            raise ConfigError(f"{KEY}={path} does not fit the model {weights.described_by} gives: "
                              + " ".join(str(exc).splitlines()[1:])) from None
        sd = model.state_dict()
        kwargs = {**kwargs, **untie_flags(sd)}
    elif any(k.startswith("embeddings.") for k in sd):  # Hugging Face layout without its config.json
        from dinov3.models.convert import from_hf_state_dict

        if num_heads is None:
            raise ConfigError(f"{KEY}={path} is in the Hugging Face layout without a config.json beside it: give the "
                              "folder, or set student.arch to its size")
        sd = from_hf_state_dict(sd, num_heads=num_heads, mask_k_bias=not any(k.endswith("k_proj.bias") for k in sd))
    if kwargs is not None:
        return PretrainedBackbone(sd, dict(kwargs), weights.described_by)
    return PretrainedBackbone(sd, kwargs_from_state_dict(sd), f"the tensors of {path}")


def kwargs_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """The DinoVisionTransformer arguments that an official-layout state dict shows by its keys and shapes."""
    from dinov3.models.checkpoint import untie_flags

    out: dict = {}
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 4:  # (C, in_chans, p, p)
        out.update(embed_dim=int(w.shape[0]), in_chans=int(w.shape[1]), patch_size=int(w.shape[-1]))
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        out["depth"] = max(blocks) + 1
    periods = sd.get("rope_embed.periods")
    if periods is not None and "embed_dim" in out:  # head_dim / 4 periods
        out["num_heads"] = out["embed_dim"] // (4 * int(periods.numel()))
    st = sd.get("storage_tokens")
    out["n_storage_tokens"] = int(st.shape[1]) if st is not None else 0
    if "blocks.0.mlp.fc1.weight" in sd:
        out["ffn_layer"] = "mlp"
        if "embed_dim" in out:
            out["ffn_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / out["embed_dim"]
    elif "blocks.0.mlp.w1.weight" in sd and "embed_dim" in out:
        out.update(_swiglu_of_released_size(out["embed_dim"], int(sd["blocks.0.mlp.w1.weight"].shape[0])))
    if blocks:
        # LayerScale: its gammas are loaded, so only whether there is one matters (None: none).
        out["layerscale_init"] = LAYERSCALE if "blocks.0.ls1.gamma" in sd else None
        out["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
        out["mask_k_bias"] = "blocks.0.attn.qkv.bias_mask" in sd
        out["proj_bias"] = "blocks.0.attn.proj.bias" in sd
    out.update(untie_flags(sd))
    return out


def _swiglu_of_released_size(dim: int, hidden: int) -> dict:
    """ffn_layer and ffn_ratio of the released SwiGLU size whose FFN has this hidden width (the aligned hidden width
    does not give the ratio back), or nothing (the load then lists the mismatch)."""
    from dinov3.models.layers import make_ffn
    from dinov3.models.vision_transformer import ARCHS as RELEASED, size_kwargs

    for name in RELEASED:
        size = size_kwargs(name)
        kind = size.get("ffn_layer", "mlp")
        if kind != "mlp" and size["embed_dim"] == dim:
            ffn = make_ffn(kind, dim, int(dim * size["ffn_ratio"]), True, device="meta")
            if ffn.w1.out_features == hidden:
                return {"ffn_layer": kind, "ffn_ratio": float(size["ffn_ratio"])}
    return {}


# ------------------------------------------------------------------------------------------------ the config side
def _model_defaults() -> dict:
    from dinov3.models.vision_transformer import DinoVisionTransformer

    params = inspect.signature(DinoVisionTransformer.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def config_model(cfg: dict) -> dict:
    """Every DinoVisionTransformer argument the config gives, the model's defaults filling the rest."""
    return {**_model_defaults(), **backbone_kwargs(cfg)}


def _location(cfg: dict, key: str) -> tuple[str, ...]:
    if key == "patch_size":
        return ("student", "patch_size")
    if key in _SIZE_KEYS and key not in cfg["student"]["model_kwargs"]:
        return ("student", "arch")
    return ("student", "model_kwargs", key)


def _lookup(cfg: dict, path: tuple[str, ...]):
    node = cfg
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


class _AnyNumber:
    """The value of an argument whose tensors are loaded anyway (LayerScale's initial value): any number matches."""

    def __eq__(self, other):
        return isinstance(other, (int, float)) and not isinstance(other, bool)

    def __repr__(self):
        return "a number"


LAYERSCALE = _AnyNumber()


def model_differences(cfg: dict, weights_kwargs: dict) -> dict[str, tuple]:
    """``{argument: (config's value, weights' value)}`` where they differ (img_size is the crop size, not theirs)."""
    have = config_model(cfg)
    return {k: (have.get(k), v) for k, v in weights_kwargs.items()
            if k != "img_size" and k in have and not v == have[k]}


def adopt_pretrained_model(cfg: dict, base: dict, weights: PretrainedBackbone | None = None) -> dict:
    """``cfg`` with the model of its pretrained weights (read from student.pretrained_weights unless given). ``base``
    is the config before the user's own settings (the defaults and the recipe): a differing value the user set is an
    error that lists every differing key; a recipe's value gives way to the weights'."""
    path = cfg["student"]["pretrained_weights"]
    if weights is None:
        heads = ARCHS.get(cfg["student"]["arch"], {}).get("num_heads")
        weights = read_pretrained(path, num_heads=cfg["student"]["model_kwargs"].get("num_heads", heads))
    diffs = model_differences(cfg, weights.model_kwargs)
    if not diffs:
        return cfg
    explicit = {k: v for k, v in diffs.items()
                if _lookup(cfg, _location(cfg, k)) != _lookup(base, _location(cfg, k))}
    if explicit:
        lines = "\n".join(f"  {k}: {theirs!r} in the weights, {ours!r} in the config "
                          f"({'.'.join(_location(cfg, k))})" for k, (ours, theirs) in sorted(explicit.items()))
        raise ConfigError(f"{KEY}={path} holds another model than the config asks for ({weights.described_by}):\n"
                          f"{lines}\nThe model comes from the weights: drop these settings, or give other weights.")
    out = copy.deepcopy(cfg)
    s = out["student"]
    sizes = {k: weights.model_kwargs[k] for k in _SIZE_KEYS if k in weights.model_kwargs}
    if any(k in diffs for k in _SIZE_KEYS):
        named = [name for name, a in ARCHS.items() if all(a[k] == v for k, v in sizes.items())]
        if len(named) == 1 and len(sizes) == len(_SIZE_KEYS):
            s["arch"] = named[0]
        else:
            s["model_kwargs"].update(sizes)
    for k, (_, theirs) in diffs.items():
        if k == "patch_size":
            s["patch_size"] = theirs
        elif k not in _SIZE_KEYS:
            s["model_kwargs"][k] = 1.0e-5 if theirs is LAYERSCALE else theirs  # the released models' value
    logger.info("%s: the model follows the weights (%s): %s", KEY, weights.described_by,
                ", ".join(f"{k}={v[1]!r}" for k, v in sorted(diffs.items())))
    return out


# ------------------------------------------------------------------------------------------------- the trainer side
def load_into_arch(arch, cfg: dict) -> PretrainedBackbone:
    """Loads the weights into the student, EMA teacher and Gram teacher backbones (strictly: every key and shape)."""
    from dinov3.models.checkpoint import CheckpointMismatchError, load_pretrained

    path = cfg["student"]["pretrained_weights"]
    weights = read_pretrained(path, num_heads=arch.backbone_kwargs["num_heads"])
    diffs = model_differences(cfg, weights.model_kwargs)
    if diffs:
        lines = "\n".join(f"  {k}: {theirs!r} in the weights, {ours!r} in the config"
                          for k, (ours, theirs) in sorted(diffs.items()))
        raise ConfigError(f"{KEY}={path} holds another model than the config ({weights.described_by}):\n{lines}\n"
                          "Build the config with load_config(), which takes the model from the weights.")
    try:
        load_pretrained(arch.student.backbone, weights.state_dict)
    except CheckpointMismatchError as exc:
        raise ConfigError(f"{KEY}={path} does not fit the model: " + "\n".join(str(exc).splitlines()[1:])) from None
    sd = arch.student.backbone.state_dict()
    arch.teacher.backbone.load_state_dict(sd)
    if arch.gram_teacher is not None:
        arch.gram_teacher.load_state_dict(sd)
    logger.info("student, EMA teacher%s backbones loaded from %s", " and Gram teacher" if arch.gram_teacher else "",
                os.fspath(path))
    return weights


def read_pretrained_heads(path: str) -> dict[str, torch.Tensor]:
    """The EMA teacher's ``dino_head.*`` and ``ibot_head.*`` tensors of a dinov3-train training checkpoint; a
    ConfigError naming the way out for any other file (released weights and backbone.pth hold no heads)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a folder, a safetensors file, ...: not a training checkpoint
        state = None
    model = state.get("model") if isinstance(state, dict) else None
    heads = {k[len("teacher."):]: v for k, v in (model or {}).items()
             if k.startswith(("teacher.dino_head.", "teacher.ibot_head."))}
    if not heads:
        raise ConfigError(f"student.pretrained_heads=true: {path} holds no DINO/iBOT heads (not a dinov3-train "
                          "training checkpoint): give one (OUTPUT/checkpoints/checkpoint_*.pth), or set "
                          "student.pretrained_heads=false to start fresh heads after a head warm-up")
    return heads


def load_heads_into_arch(arch, cfg: dict) -> None:
    """student.pretrained_heads: the DINO and iBOT heads of the EMA teacher of the training checkpoint
    student.pretrained_weights, into the student and teacher heads (the official student.resume_from_teacher_chkpt
    loads the teacher's backbone and heads into the student, then the EMA teacher <- student)."""
    path = cfg["student"]["pretrained_weights"]
    heads = read_pretrained_heads(path)
    for net in (arch.student, arch.teacher):
        for name in ("dino_head", "ibot_head"):
            sub = {k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(name + ".")}
            try:
                getattr(net, name).load_state_dict(sub)
            except RuntimeError as exc:
                raise ConfigError(f"student.pretrained_heads: the {name} of {path} does not fit the config's "
                                  f"({name.split('_')[0]}.head_* keys): {str(exc).strip().splitlines()[-1].strip()}"
                                  ) from None
    logger.info("student and EMA teacher heads loaded from %s", os.fspath(path))
