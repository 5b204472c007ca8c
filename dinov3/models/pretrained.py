"""A DinoVisionTransformer from weights in any form this package reads or writes: ``from_pretrained``.

The model's arguments come from the weights when they say them (backbone.json, a training checkpoint's config, the
metadata of an exported .safetensors, a Hugging Face config.json), else from a size name (``arch``) with the released
defaults. The weights must then fit the model exactly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .checkpoint import BackboneWeights, CheckpointMismatchError, load_pretrained, read_backbone, untie_flags
from .vision_transformer import (
    ALIASES,
    ARCHS,
    DinoVisionTransformer,
    build_model,
    check_model_kwargs,
    released_kwargs,
    size_kwargs,
)

__all__ = ["from_pretrained", "arch_kwargs", "build_from_weights", "hub_backbone"]

logger = logging.getLogger("dinov3")


def arch_kwargs(arch: str, option: str = "arch") -> dict:
    """The size entries of ``arch``: a released size (``vit_small`` ... or the hub names ``vits16`` ...), else one
    that dinov3-train builds (``vit_tiny``). ValueError naming ``option`` for an unknown name."""
    try:
        return size_kwargs(arch)
    except ValueError:
        pass
    from dinov3.train.config import ARCHS as TRAIN_ARCHS  # imports the trainer: only for sizes it alone has

    if arch in TRAIN_ARCHS:
        return dict(TRAIN_ARCHS[arch])
    names = sorted(set(ARCHS) | set(TRAIN_ARCHS)) + sorted(ALIASES)
    raise ValueError(f"{option} {arch!r} is unknown; choose from {', '.join(names)}")


def build_from_weights(weights: BackboneWeights, path, arch: str | None = None, overrides: dict | None = None, *,
                       option: str = "arch") -> DinoVisionTransformer:
    """The model ``weights`` hold, built on the meta device and materialised from them (no wasted random init).

    Arguments, later ones winning: what the weights say (else the released defaults and the untie flags read off the
    weights, with ``arch`` required), the size entries of ``arch``, ``overrides``. ``option`` is how messages name
    ``arch`` ("--arch" in the console scripts). Raises ValueError (unknown or missing size, a model that cannot be
    built) or CheckpointMismatchError (the differing keys and shapes, and where the model came from).
    """
    size = arch_kwargs(arch, option) if arch else {}
    sidecar = Path(path).with_suffix(".json").name
    if weights.model_kwargs is not None:
        kwargs = {**weights.model_kwargs, **size}
        hint = f"the model is the one {weights.described_by} gives" + (
            f", with the size of {option} {arch}: leave out {option}" if arch else "")
    elif arch:
        kwargs = {**released_kwargs(), **size, **untie_flags(weights.state_dict)}
        hint = (f"the model is {option} {arch} with the released defaults, as there is no {sidecar} beside the "
                "weights (a backbone.pth from dinov3-train needs its backbone.json)")
    else:
        raise ValueError(f"{option} is needed: {path} has no {sidecar} beside it and is not a dinov3-train "
                         "checkpoint, so it does not say which model it holds")
    kwargs.update(overrides or {})
    try:
        model = DinoVisionTransformer(device="meta", **kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot build the model: {exc} ({hint})") from None
    try:
        load_pretrained(model, weights.state_dict)
    except CheckpointMismatchError as exc:
        details = str(exc).splitlines()[1:]  # after its "checkpoint does not match the model"
        raise CheckpointMismatchError("\n".join([f"{path} does not fit the model", *details, f"  {hint}"])) from None
    return model


def from_pretrained(path: str | os.PathLike, *, arch: str | None = None, device="cpu",
                    **model_kwargs) -> DinoVisionTransformer:
    """Load a backbone, in eval mode, from any of:

    - a ``backbone.pth`` written by dinov3-train (with its ``backbone.json``), or a dinov3-train checkpoint (the EMA
      teacher);
    - a ``.safetensors`` written by ``dinov3-export --format safetensors`` (the model is in its metadata);
    - a Hugging Face folder (config.json + model.safetensors of a ``DINOv3ViTModel``, e.g. ``--format hf``);
    - a timm DINOv3 state dict (``--format timm``: .safetensors with the model in its metadata, or .pth with a
      .json beside it);
    - official weights (``.pth``/``.safetensors``), with ``arch`` (``"vit_small"`` ... or ``"vits16"`` ...).

    ``arch`` with a file that says its model replaces that model's size and must then fit the weights.
    ``model_kwargs`` override DinoVisionTransformer arguments (``attn_backend="reference"``, ...).
    """
    check_model_kwargs(model_kwargs, "from_pretrained")
    weights = read_backbone(path)
    return build_from_weights(weights, path, arch, model_kwargs).to(device).eval()


def hub_backbone(arch: str, *, pretrained: bool = True, weights: str | os.PathLike | None = None,
                 **kwargs) -> DinoVisionTransformer:
    """What the hubconf.py entry points return: size ``arch`` with the weights at ``weights`` (any form
    ``from_pretrained`` reads), or randomly initialised when ``weights`` is None (nothing is downloaded)."""
    if weights is None:
        if pretrained:
            logger.warning("dinov3 hub: no weights= given, so %s is randomly initialised (this repository downloads "
                           "nothing; pass weights=PATH, or pretrained=False to silence this)", arch)
        return build_model(arch, **kwargs).eval()
    if not pretrained:
        raise ValueError("pretrained=False with weights= given: drop one of them")
    return from_pretrained(weights, arch=arch, **kwargs)
