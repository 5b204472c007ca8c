"""Weights files for other stacks: a Hugging Face folder, a timm state dict, and our own .safetensors with the model's
arguments inside. Each is read back by ``dinov3.models.from_pretrained`` (and ``--checkpoint``) without ``arch``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from dinov3.models.checkpoint import MODEL_KWARGS_METADATA

__all__ = ["export_safetensors", "export_hf", "export_timm", "model_kwargs_of"]


def model_kwargs_of(model: nn.Module) -> dict:
    """The DinoVisionTransformer arguments that rebuild ``model`` (the attention backend left to the reader)."""
    return {k: v for k, v in model.init_kwargs.items() if k != "attn_backend"}


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # Contiguous copies: conversions leave views that share storage (q, k, v of one qkv), which safetensors refuses.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", **metadata})


def export_safetensors(model: nn.Module, path: str | os.PathLike) -> None:
    """The official-layout state dict, with the model's arguments as JSON in the ``dinov3_model_kwargs`` metadata."""
    _save_safetensors(model.state_dict(), Path(path), {MODEL_KWARGS_METADATA: json.dumps(model_kwargs_of(model))})


def export_hf(model: nn.Module, folder: str | os.PathLike) -> None:
    """A folder that ``transformers.AutoModel.from_pretrained`` loads as ``DINOv3ViTModel``: config.json (written by
    ``DINOv3ViTConfig``) and model.safetensors (the hub files' "layer.N." names, which transformers 4.56+ and 5 read).

    ValueError for a model that DINOv3ViTModel cannot express (untied norms, RMSNorm, min/max RoPE periods).
    """
    from transformers import DINOv3ViTConfig

    from dinov3.models.convert import hf_config_kwargs, to_hf_state_dict

    config = DINOv3ViTConfig(**hf_config_kwargs(model), architectures=["DINOv3ViTModel"])
    tensors = to_hf_state_dict(model.state_dict(), layer_prefix="layer.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(os.fspath(folder))
    _save_safetensors(tensors, folder / "model.safetensors", {})


def export_timm(model: nn.Module, path: str | os.PathLike) -> tuple[str, dict]:
    """The state dict of timm's DINOv3 ``Eva`` (timm/models/eva.py). Returns the timm model name and the
    ``timm.create_model`` arguments that build the matching model (see ``dinov3.models.convert_timm``).

    ``.safetensors``: the timm name, its arguments and our model's arguments go in the metadata; ``.pth``/``.pt``: our
    model's arguments go in a ``.json`` beside it (so ``from_pretrained`` reads either back).
    """
    from dinov3.models.convert_timm import timm_model_args, to_timm_state_dict

    name, kwargs = timm_model_args(model)
    tensors = to_timm_state_dict(model.state_dict())
    path = Path(path)
    ours = json.dumps(model_kwargs_of(model))
    if path.suffix == ".safetensors":
        _save_safetensors(tensors, path, {"timm_model": name, "timm_kwargs": json.dumps(kwargs),
                                          MODEL_KWARGS_METADATA: ours})
    else:
        torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
        path.with_suffix(".json").write_text(ours + "\n")
    return name, kwargs
