"""Loading official DINOv3 checkpoints (.pth or .safetensors) into DinoVisionTransformer, and reading the files this
package writes (backbone.pth + backbone.json, training checkpoints, exported .safetensors, Hugging Face folders)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .convert_timm import from_timm_state_dict, is_timm_state_dict

__all__ = [
    "load_pretrained",
    "read_state_dict",
    "read_backbone",
    "extract_backbone_state_dict",
    "untie_flags",
    "BackboneWeights",
    "CheckpointMismatchError",
    "WeightsFileError",
    "MODEL_KWARGS_METADATA",
]

# safetensors metadata key holding the JSON of the DinoVisionTransformer keyword arguments (dinov3-export writes it).
MODEL_KWARGS_METADATA = "dinov3_model_kwargs"

_NESTING_KEYS = ("teacher", "model", "state_dict", "module")
# Backbone prefixes of training checkpoints, in order of preference (the teacher is the model evaluated).
_BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.", "student.backbone.")
# Wrapper prefixes that cover the whole dict, and wrapper names that torch.compile / FSDP insert anywhere.
_WHOLE_PREFIXES = ("module.", "model.", "teacher.", "student.")
_WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model."""


class WeightsFileError(ValueError):
    """A file or folder that cannot be used as backbone weights. Messages about the weights file itself start with
    its path (the console scripts put the option name in front)."""


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
    files in the official layout, and Hugging Face ``DINOv3ViTModel`` and timm DINOv3 state dicts (converted on the
    fly).
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
    elif is_timm_state_dict(sd):
        from dinov3_kernels.rope import rope_periods

        rope = model.rope_embed
        periods = rope_periods(rope.D_head, base=rope.base, min_period=rope.min_period, max_period=rope.max_period,
                               dtype=rope.dtype)
        names = model.state_dict()
        sd = from_timm_state_dict(sd, periods=periods, mask_k_bias=any(k.endswith("qkv.bias_mask") for k in names),
                                  layer_scale=any(k.endswith("ls1.gamma") for k in names))
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


# ------------------------------------------------------------------------------------ files that say their model
@dataclass
class BackboneWeights:
    """Backbone tensors read from a file or folder and, when it says so, the model they belong to."""

    state_dict: dict[str, Tensor]  # official layout, or the Hugging Face / timm layout (load_pretrained converts)
    model_kwargs: dict | None  # DinoVisionTransformer keyword arguments, or None: the caller must name the size
    described_by: str | None  # where model_kwargs came from, for messages


def read_backbone(path: str | os.PathLike) -> BackboneWeights:
    """Read backbone weights and, where the files say it, their model.

    - a ``.pth``/``.safetensors`` state dict (official, Hugging Face or timm layout); its model from a ``<name>.json``
      beside it (as dinov3-train writes backbone.json) or, for ``.safetensors``, from the ``dinov3_model_kwargs``
      metadata that dinov3-export writes;
    - a dinov3-train checkpoint (the EMA teacher; the model from the training config inside);
    - a Hugging Face folder (config.json of a ``DINOv3ViTModel`` and model.safetensors).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_hf_folder(path)
        found = [p for p in (path / "backbone.pth",) if p.is_file()] + sorted(path.glob("checkpoints/checkpoint_*.pth"))
        hint = f", e.g. {found[0]}" if found else ""
        raise WeightsFileError(f"{path} is a folder; give a weights file{hint} (folders are read when they hold a "
                               "Hugging Face config.json)")
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file")
    if path.suffix == ".onnx":
        raise WeightsFileError(f"{path}: an ONNX graph runs in an ONNX runtime; give the weights it was exported from "
                               "(.pth, .safetensors or a Hugging Face folder)")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt", device="cpu") as f:
                metadata = f.metadata() or {}
                obj = {k: f.get_tensor(k) for k in f.keys()}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the reader raises, the file is not usable weights
        raise WeightsFileError(f"{path}: cannot be read as weights: {_why_unreadable(exc)}") from None
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    kwargs = described_by = None
    sidecar = path.with_suffix(".json")
    if _is_training_checkpoint(obj):
        from dinov3.train.config import backbone_kwargs, parse_value  # the trainer owns its config format

        described_by = f"the training config in {path}"
        try:
            kwargs = backbone_kwargs(parse_value(obj["config"]))
        except Exception as exc:  # noqa: BLE001 - a config this trainer cannot read
            raise WeightsFileError(f"{path}: cannot read its training config ({type(exc).__name__}: {exc})") from None
        obj = obj["model"]  # extract_backbone_state_dict takes its "teacher.backbone." keys
    elif MODEL_KWARGS_METADATA in metadata:
        described_by = f"the {MODEL_KWARGS_METADATA} metadata of {path}"
        try:
            kwargs = json.loads(metadata[MODEL_KWARGS_METADATA])
        except json.JSONDecodeError as exc:
            raise WeightsFileError(f"{path}: its {MODEL_KWARGS_METADATA} metadata is not valid JSON: {exc}") from None
    elif sidecar.is_file():
        described_by = str(sidecar)
        try:
            kwargs = json.loads(sidecar.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsFileError(f"{sidecar} (the model of {path}) cannot be read: {exc}") from None
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise WeightsFileError(f"{described_by} must hold a JSON object of DinoVisionTransformer arguments")
        from .vision_transformer import check_model_kwargs

        try:
            check_model_kwargs(kwargs, described_by)
        except ValueError as exc:
            raise WeightsFileError(str(exc)) from None
    try:
        state_dict = extract_backbone_state_dict(obj)
    except CheckpointMismatchError as exc:
        raise WeightsFileError(f"{path}: {exc}") from None
    return BackboneWeights(state_dict, kwargs, described_by)


def _read_hf_folder(path: Path) -> BackboneWeights:
    """A folder written by ``save_pretrained`` of a ``DINOv3ViTModel`` (or by dinov3-export --format hf)."""
    from .convert import dinov3_kwargs_from_hf_config

    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise WeightsFileError(f"{config_file} cannot be read: {exc}") from None
    if model_type != "dinov3_vit":
        raise WeightsFileError(f"{path}: its config.json describes a {model_type!r} model, not a DINOv3 ViT "
                               "(model_type 'dinov3_vit')")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [path / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WeightsFileError(f"{path}: no {', '.join(missing)} beside its config.json")
    try:
        from transformers import DINOv3ViTConfig
    except ImportError:
        raise WeightsFileError(f"{path}: reading a Hugging Face folder needs transformers "
                               "(pip install transformers)") from None
    from safetensors.torch import load_file

    state_dict: dict[str, Tensor] = {}
    for f in files:
        state_dict.update(load_file(str(f), device="cpu"))
    kwargs = dinov3_kwargs_from_hf_config(DINOv3ViTConfig.from_pretrained(str(path)))
    return BackboneWeights(state_dict, kwargs, str(config_file))


def _is_training_checkpoint(obj) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and isinstance(obj.get("config"), str)


def _why_unreadable(exc: Exception) -> str:
    """A short reason from what torch.load / safetensors raised (torch's messages run to paragraphs)."""
    import pickle
    import re

    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", text, re.S)
        detail = f" ({found.group(1)})" if found else ""
        return f"not a PyTorch weights file, or one holding objects other than tensors{detail}"
    first = re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
