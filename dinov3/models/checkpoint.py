"""Loading official DINOv3 checkpoints (.pth or .safetensors) into DinoVisionTransformer."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "load_pretrained",
    "read_state_dict",
    "extract_backbone_state_dict",
    "untie_flags",
    "read_hf_folder",
    "CheckpointMismatchError",
]

_NESTING_KEYS = ("teacher", "model", "state_dict", "module")
# Backbone prefixes of training checkpoints, in order of preference (the teacher is the model evaluated).
_BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.", "student.backbone.")
# Wrapper prefixes that cover the whole dict, and wrapper names that torch.compile / FSDP insert anywhere.
_WHOLE_PREFIXES = ("module.", "model.", "teacher.", "student.")
_WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a raw tensor dict from ``.pth``/``.pt`` (torch.load, weights_only) or ``.safetensors``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def extract_backbone_state_dict(obj: Mapping) -> dict[str, Tensor]:
    """Find the backbone tensors in a raw or wrapped checkpoint.

    Descends into "teacher"/"model"/"state_dict"/"module" entries until the values are tensors, drops
    torch.compile/FSDP wrapper names, keeps only the "teacher.backbone." (else "backbone.", else
    "student.backbone.") keys of a full SSL checkpoint with heads, and strips prefixes that every key
    carries ("module.", ...).
    """
    seen = 0
    while not any(isinstance(v, Tensor) for v in obj.values()):
        for k in _NESTING_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            raise CheckpointMismatchError(
                f"no tensors found in checkpoint; top-level keys: {sorted(obj)[:20]} "
                f"(expected a state_dict, possibly nested under one of {_NESTING_KEYS})"
            )
        seen += 1
        if seen > 4:
            raise CheckpointMismatchError("checkpoint is nested too deeply")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    for part in _WRAPPER_PARTS:
        sd = {k.replace(part, ""): v for k, v in sd.items()}
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WHOLE_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd

def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor]) -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    lines = ["checkpoint does not match the model"]
    if misshaped:
        lines.append(f"  mis-shaped ({len(misshaped)}): {_describe(misshaped, 6)}")
    if missing:
        lines.append(f"  missing ({len(missing)}): {_describe(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_describe(unexpected)}")
    if "cls_token" in sd and "cls_token" in expected and sd["cls_token"].shape != expected["cls_token"].shape:
        lines.append(
            f"  the checkpoint has embed_dim {sd['cls_token'].shape[-1]} but the model {expected['cls_token'].shape[-1]}:"
            " is it for another size (--arch)?"
        )
    # Constructor arguments read off the shapes: patch_embed.proj.weight (C, 3, p, p), storage_tokens (1, R, C).
    for key, dim, flag in (("patch_embed.proj.weight", -1, "patch_size"), ("storage_tokens", 1, "n_storage_tokens")):
        if key in sd and key in expected and sd[key].dim() == expected[key].dim() > 0:
            ours, theirs = expected[key].shape[dim], sd[key].shape[dim]
            if ours != theirs:
                lines.append(f"  the checkpoint has {flag} {theirs} but the model {ours}")
    for key, flag in (("local_cls_norm.weight", "untie_global_and_local_cls_norm"),
                      ("cls_norm.weight", "untie_cls_and_patch_norms")):
        if key in sd and key not in expected:
            lines.append(f"  the checkpoint has {key.split('.')[0]}: build the model with {flag}=True")
        elif key in expected and key not in sd:
            lines.append(f"  the checkpoint has no {key.split('.')[0]}: build the model with {flag}=False")
    raise CheckpointMismatchError("\n".join(lines))


def untie_flags(sd: Mapping[str, Tensor]) -> dict[str, bool]:
    """The untie_* constructor flags a backbone state_dict was saved with (ViT-L SAT-493M and 7B untie)."""
    return {
        "untie_global_and_local_cls_norm": "local_cls_norm.weight" in sd,
        "untie_cls_and_patch_norms": "cls_norm.weight" in sd,
    }


def load_pretrained(model: nn.Module, path_or_state_dict, *, strict: bool = True) -> nn.Module:
    """Load an official checkpoint (path or dict) into ``model`` and return the model.

    Accepts ``.pth`` files from the DINOv3 release (raw state_dict), training checkpoints with the
    backbone nested under "teacher"/"model"/"state_dict" and "backbone." prefixes, ``.safetensors``
    files in the official layout, and Hugging Face ``DINOv3ViTModel`` state dicts (converted on the fly).
    A model built on the meta device is materialised from the checkpoint tensors.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw = path_or_state_dict
    else:
        raw = read_state_dict(path_or_state_dict)
    sd = extract_backbone_state_dict(raw)
    if any(k.startswith("embeddings.") for k in sd):
        from .convert import from_hf_state_dict

        sd = from_hf_state_dict(
            sd,
            num_heads=model.num_heads,
            rope_base=getattr(model.rope_embed, "base", None) or 100.0,
            mask_k_bias=any(k.endswith("qkv.bias_mask") for k in model.state_dict()),
        )
    if strict:
        check_state_dict(model, sd)
    on_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    result = model.load_state_dict(sd, strict=strict, assign=on_meta)
    if on_meta:
        # assign=True keeps the checkpoint dtype; the buffer stays in the rope compute dtype as official.
        rope = getattr(model, "rope_embed", None)
        if rope is not None and rope.dtype is not None:
            rope.periods = rope.periods.to(rope.dtype)
    if not strict and (result.missing_keys or result.unexpected_keys):
        import logging

        logging.getLogger("dinov3").warning(
            "non-strict load: missing %s, unexpected %s", result.missing_keys, result.unexpected_keys
        )
    return model


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """A Hugging Face ``DINOv3ViTModel`` folder (config.json + model.safetensors, or shards with their index) as
    (official-layout state dict, DinoVisionTransformer keyword arguments). Needs transformers for the config's
    defaults (``save_pretrained`` writes only the values that differ from them)."""
    import json

    from safetensors.torch import load_file

    from .convert import dinov3_kwargs_from_hf_config, from_hf_state_dict

    folder = os.fspath(folder)
    config_file = os.path.join(folder, "config.json")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "dinov3_vit":
        raise ValueError(f"{config_file} describes a {model_type!r} model, not a DINOv3 ViT ('dinov3_vit')")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    else:
        files = [os.path.join(folder, "model.safetensors")]
    missing = [os.path.basename(p) for p in files if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{folder}: no {', '.join(missing)} beside its config.json")
    try:
        from transformers import DINOv3ViTConfig
    except ImportError:
        raise ValueError(f"{folder}: reading a Hugging Face folder needs transformers "
                         "(pip install transformers)") from None
    config = DINOv3ViTConfig.from_pretrained(folder)
    kwargs = dinov3_kwargs_from_hf_config(config)
    hf_sd: dict[str, Tensor] = {}
    for p in files:
        hf_sd.update(load_file(p, device="cpu"))
    sd = from_hf_state_dict(hf_sd, num_heads=config.num_attention_heads, rope_base=config.rope_theta,
                            mask_k_bias=kwargs.get("mask_k_bias", True))
    return sd, {**kwargs, **untie_flags(sd)}  # the layout has neither untied norm
