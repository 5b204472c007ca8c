"""Conversion between the official DINOv3 state_dict and timm's DINOv3 models (``Eva`` in timm/models/eva.py).

timm names: ``storage_tokens`` -> ``reg_token``; ``ls{1,2}.gamma`` -> ``gamma_{1,2}``; the qkv bias is split into
``attn.q_bias`` / ``attn.v_bias`` (timm's key bias is a fixed zero buffer, as the released models mask it); SwiGLU
``mlp.w1, w2, w3`` -> ``mlp.fc1_g, fc1_x, fc2``. ``mask_token`` (pretraining only), ``local_cls_norm`` (local crops in
training only) and the RoPE periods (timm recomputes them) are not part of timm's state dict.

A timm model is chosen by name (``vit_small_patch16_dinov3_qkvb`` ...) plus ``timm.create_model`` keyword arguments for
whatever differs from that name's configuration (``timm_model_args``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["to_timm_state_dict", "from_timm_state_dict", "is_timm_state_dict", "timm_model_args", "TIMM_MODELS"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Official block suffix -> timm block suffix, where they differ.
_BLOCK_RENAMES = {
    "ls1.gamma": "gamma_1",
    "ls2.gamma": "gamma_2",
    "mlp.w1.weight": "mlp.fc1_g.weight",
    "mlp.w1.bias": "mlp.fc1_g.bias",
    "mlp.w2.weight": "mlp.fc1_x.weight",
    "mlp.w2.bias": "mlp.fc1_x.bias",
    "mlp.w3.weight": "mlp.fc2.weight",
    "mlp.w3.bias": "mlp.fc2.bias",
}
_DROPPED = ("mask_token", "rope_embed.periods")

# The DINOv3 models registered in timm (eva.py, timm 1.0.20 and later): the arguments that matter for the weights
# and the outputs. "_qkvb" variants (q and v biases) exist for every name but vit_7b.
# Layer scale is left out: every timm DINOv3 model has it (init_values 1e-5), and models without get gamma = 1.
_COMMON = dict(patch_size=16, num_reg_tokens=4, rope_temperature=100.0, qkv_bias=False)
TIMM_MODELS: dict[str, dict[str, Any]] = {
    "vit_small_patch16_dinov3": dict(_COMMON, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_small_plus_patch16_dinov3": dict(_COMMON, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                                          swiglu_mlp=True, swiglu_align_to=8),
    "vit_base_patch16_dinov3": dict(_COMMON, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large_patch16_dinov3": dict(_COMMON, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_huge_plus_patch16_dinov3": dict(_COMMON, embed_dim=1280, depth=32, num_heads=20, mlp_ratio=4.0,
                                         swiglu_mlp=True, swiglu_align_to=8),
    "vit_7b_patch16_dinov3": dict(_COMMON, embed_dim=4096, depth=40, num_heads=32, mlp_ratio=2.0, swiglu_mlp=True,
                                  swiglu_align_to=64),
}
for _name in [n for n in TIMM_MODELS if not n.startswith("vit_7b")]:
    TIMM_MODELS[_name + "_qkvb"] = dict(TIMM_MODELS[_name], qkv_bias=True)
_DEFAULTS = dict(swiglu_mlp=False, swiglu_align_to=0)


def to_timm_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official DINOv3 state_dict -> the state_dict of timm's DINOv3 ``Eva`` (raises if timm cannot express it)."""
    if any(k.startswith("cls_norm.") for k in sd):
        raise ValueError("untie_cls_and_patch_norms=True has no timm equivalent (one final norm only)")
    if "norm.weight" in sd and "norm.bias" not in sd:
        raise ValueError("RMSNorm models (norms without bias) have no timm DINOv3 equivalent")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _DROPPED or key.startswith("local_cls_norm."):
            continue
        if key == "storage_tokens":
            out["reg_token"] = value
            continue
        m = _BLOCK.match(key)
        if m is None:
            out[key] = value  # cls_token, patch_embed.proj.*, norm.*: same names
            continue
        pre, rest = f"blocks.{m.group(1)}.", m.group(2)
        if rest == "attn.qkv.bias_mask":
            continue
        if rest == "attn.qkv.bias":
            mask = sd.get(pre + "attn.qkv.bias_mask")
            q, k, v = (value if mask is None else value * mask.to(value.dtype)).chunk(3)
            if bool(k.any()):
                raise ValueError(f"{key}: the key bias is not zero, but timm's DINOv3 attention has a fixed zero key "
                                 "bias (the released models mask it: mask_k_bias=True)")
            out[pre + "attn.q_bias"], out[pre + "attn.v_bias"] = q, v
            continue
        out[pre + _BLOCK_RENAMES.get(rest, rest)] = value
    # Without layer scale the official block is timm's with gamma = 1 (timm.create_model drops init_values=None, so
    # every timm DINOv3 model has gammas).
    ones = torch.ones(sd["cls_token"].shape[-1], dtype=sd["cls_token"].dtype)
    for block in sorted({k.split(".")[1] for k in sd if _BLOCK.match(k)}, key=int):
        for j in (1, 2):
            out.setdefault(f"blocks.{block}.gamma_{j}", ones)
    return out


def is_timm_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """Whether a backbone state_dict is in timm's layout rather than the official one.

    The official layout always has ``mask_token`` and ``rope_embed.periods``; timm's never does.
    """
    return "cls_token" in sd and "mask_token" not in sd and "rope_embed.periods" not in sd


def from_timm_state_dict(sd: Mapping[str, Tensor], *, periods: Tensor, mask_k_bias: bool = True,
                         layer_scale: bool = True) -> dict[str, Tensor]:
    """timm DINOv3 ``Eva`` state_dict -> official state_dict.

    ``periods``: the model's RoPE periods (timm does not store them); ``mask_k_bias``: add the ``bias_mask`` buffer
    (zero on the key third); ``layer_scale``: whether the model has layer scale (if not, timm's gammas must be ones
    and are dropped). ``mask_token`` is restored as zeros, as the official initialisation leaves it.
    """
    renames = {v: k for k, v in _BLOCK_RENAMES.items()}
    swiglu = any(k.endswith("mlp.fc1_g.weight") for k in sd)
    out: dict[str, Tensor] = {}
    biases: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key == "reg_token":
            out["storage_tokens"] = value
            continue
        if key.startswith("rope."):
            continue
        m = _BLOCK.match(key)
        if m is None:
            out[key] = value
            continue
        pre, rest = f"blocks.{m.group(1)}.", m.group(2)
        if rest in ("attn.q_bias", "attn.v_bias"):
            biases.setdefault(pre, {})[rest[5]] = value
            continue
        if rest in ("gamma_1", "gamma_2") and not layer_scale:
            if not bool((value == 1).all()):
                raise ValueError(f"{key} is not all ones, but the model has no layer scale (layerscale_init=None)")
            continue
        if rest.startswith("mlp.fc2.") and not swiglu:
            out[key] = value  # fc2 of the plain MLP keeps its name
            continue
        out[pre + renames.get(rest, rest)] = value
    for pre, qv in biases.items():
        q, v = qv["q"], qv["v"]
        out[pre + "attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        if mask_k_bias:
            mask = torch.ones(3 * q.shape[0], dtype=q.dtype)
            mask[q.shape[0]: 2 * q.shape[0]] = 0
            out[pre + "attn.qkv.bias_mask"] = mask
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = out["cls_token"].new_zeros(1, dim)
    out["rope_embed.periods"] = periods.detach().clone()
    return out


def timm_model_args(model) -> tuple[str, dict[str, Any]]:
    """The timm model name and the ``timm.create_model`` keyword arguments that build ``model``'s architecture.

    The name is the registered DINOv3 model closest to it (the same size when there is one: exact match, no
    arguments); the arguments are what differs from that name's configuration.
    """
    from .layers import Mlp, RMSNorm, SwiGLUFFN

    rope = model.rope_embed
    if rope.base is None or rope.normalize_coords != "separate":
        raise ValueError("timm's DINOv3 RoPE takes a base (temperature) with normalize_coords='separate' only")
    if model.untie_cls_and_patch_norms or isinstance(model.norm, RMSNorm):
        raise ValueError("timm's DINOv3 models have one LayerNorm for all tokens: untied or RMS norms do not map")
    if abs(model.norm.eps - 1e-5) > 1e-12:
        raise ValueError(f"timm's DINOv3 models use LayerNorm eps 1e-5 (norm_layer='layernormbf16'); this model has "
                         f"eps {model.norm.eps}")
    blk = model.blocks[0]
    mlp = blk.mlp
    if not isinstance(mlp, (Mlp, SwiGLUFFN)):
        raise ValueError(f"unsupported FFN {type(mlp).__name__}")
    if not (blk.attn.proj.bias is not None and (mlp.w1 if isinstance(mlp, SwiGLUFFN) else mlp.fc1).bias is not None):
        raise ValueError("timm's DINOv3 models have biases in the attention projection and the FFN")
    dim = model.embed_dim
    swiglu = isinstance(mlp, SwiGLUFFN)
    hidden = mlp.w1.out_features if swiglu else mlp.fc1.out_features
    # timm's hidden width is int(dim * mlp_ratio) (then aligned, for SwiGLU): pick a ratio that lands on ours.
    mlp_ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim
    want = dict(
        patch_size=model.patch_size,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=model.num_heads,
        mlp_ratio=mlp_ratio,
        swiglu_mlp=swiglu,
        swiglu_align_to=8 if swiglu else 0,  # any alignment: our width is already a multiple of 8
        qkv_bias=blk.attn.qkv.bias is not None,
        num_reg_tokens=model.n_storage_tokens,
        rope_temperature=float(rope.base),
    )
    if model.patch_embed.in_chans != 3:
        want["in_chans"] = model.patch_embed.in_chans

    def differences(name: str) -> dict[str, Any]:
        have = {**_DEFAULTS, **TIMM_MODELS[name]}
        diff = {}
        for k, v in want.items():
            h = have.get(k)
            if k == "swiglu_align_to" and swiglu and h:
                continue  # any alignment that keeps our width
            if isinstance(v, float) and isinstance(h, (int, float)) and abs(v - h) <= 1e-9 * max(1.0, abs(h)):
                continue
            if v != h:
                diff[k] = v
        return diff

    # Fewest differences, then the nearest width (a small model reads best as a changed vit_small).
    name = min(TIMM_MODELS, key=lambda n: (len(differences(n)), abs(TIMM_MODELS[n]["embed_dim"] - dim), n))
    return name, differences(name)
