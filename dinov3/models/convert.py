"""Conversion between the official DINOv3 state_dict and Hugging Face ``DINOv3ViTModel``.

Official -> HF: qkv split into q/k/v projections; the k bias (zeroed by ``bias_mask`` in the
released models) dropped; ``storage_tokens`` -> ``register_tokens``; ``ls{1,2}.gamma`` ->
``layer_scale{1,2}.lambda1``; ``mask_token`` (1, C) -> (1, 1, C); RoPE periods dropped (HF
recomputes them). HF -> official restores all of these, with a zero k bias and the mask buffer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dinov3_kernels.rope import rope_periods

__all__ = ["to_hf_state_dict", "from_hf_state_dict", "hf_config_kwargs", "dinov3_kwargs_from_hf_config"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")

# Per-block names that map one to one (official suffix -> HF suffix).
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1.weight": "mlp.up_proj.weight",
    "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight",
    "mlp.fc2.bias": "mlp.down_proj.bias",
    # SwiGLU: w3(silu(w1 x) * w2 x) == down(act(gate x) * up x)
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w1.bias": "mlp.gate_proj.bias",
    "mlp.w2.weight": "mlp.up_proj.weight",
    "mlp.w2.bias": "mlp.up_proj.bias",
    "mlp.w3.weight": "mlp.down_proj.weight",
    "mlp.w3.bias": "mlp.down_proj.bias",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "storage_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def to_hf_state_dict(sd: Mapping[str, Tensor], *, layer_prefix: str = "model.layer.") -> dict[str, Tensor]:
    """Official DINOv3 state_dict -> ``DINOv3ViTModel`` state_dict.

    ``layer_prefix``: "model.layer." for transformers >= 5, "layer." for the layout of the files on
    the Hugging Face hub (both load in transformers 5).
    """
    if any(k.startswith("cls_norm.") for k in sd):
        raise ValueError("untie_cls_and_patch_norms=True has no DINOv3ViTModel equivalent (one final norm only)")
    if "norm.weight" in sd and "norm.bias" not in sd:
        raise ValueError("RMSNorm models (norms without bias) have no DINOv3ViTModel equivalent")
    out: dict[str, Tensor] = {}
    n_blocks_with_ls = set()
    n_blocks = set()
    for key, value in sd.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        if key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, -1)
            continue
        if key.startswith("local_cls_norm.") or key == "rope_embed.periods":
            continue  # local_cls_norm is unused at inference; HF recomputes the RoPE periods
        m = _BLOCK.match(key)
        if m is None:
            raise ValueError(f"unexpected key in official state_dict: {key}")
        i, rest = m.group(1), m.group(2)
        n_blocks.add(i)
        pre = f"{layer_prefix}{i}."
        if rest in _BLOCK_RENAMES:
            out[pre + _BLOCK_RENAMES[rest]] = value
            if rest.startswith("ls"):
                n_blocks_with_ls.add(i)
        elif rest == "attn.qkv.weight":
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[pre + f"attention.{name}_proj.weight"] = part
        elif rest == "attn.qkv.bias":
            mask = sd.get(f"blocks.{i}.attn.qkv.bias_mask")
            bias = value if mask is None else value * mask.to(value.dtype)
            q, k, v = bias.chunk(3, dim=0)
            out[pre + "attention.q_proj.bias"] = q
            out[pre + "attention.v_proj.bias"] = v
            if mask is None or bool(mask.chunk(3)[1].any()):
                out[pre + "attention.k_proj.bias"] = k
        elif rest == "attn.qkv.bias_mask":
            continue
        else:
            raise ValueError(f"unexpected key in official state_dict: {key}")
    # Without layer scale the official block is the HF block with lambda = 1.
    dim = sd["cls_token"].shape[-1]
    for i in n_blocks - n_blocks_with_ls:
        for j in (1, 2):
            out[f"{layer_prefix}{i}.layer_scale{j}.lambda1"] = torch.ones(dim, dtype=sd["cls_token"].dtype)
    if "embeddings.register_tokens" not in out:
        out["embeddings.register_tokens"] = sd["cls_token"].new_zeros(1, 0, dim)
    return out


def from_hf_state_dict(
    hf_sd: Mapping[str, Tensor],
    *,
    num_heads: int,
    rope_base: float = 100.0,
    mask_k_bias: bool = True,
    rope_dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """``DINOv3ViTModel`` state_dict (either layer prefix) -> official DINOv3 state_dict.

    ``mask_k_bias``: produce the ``bias_mask`` buffer (zero k third), as in the released models. A
    missing k bias becomes zeros. ``rope_base``/``num_heads`` rebuild ``rope_embed.periods``.
    """
    top = {v: k for k, v in _TOP_RENAMES.items()}
    block = {}
    for k, v in _BLOCK_RENAMES.items():
        block.setdefault(v, []).append(k)
    gated = any(k.endswith("mlp.gate_proj.weight") for k in hf_sd)
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in hf_sd.items():
        if key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, -1)
            continue
        if key == "embeddings.register_tokens":
            if value.shape[1] > 0:
                out["storage_tokens"] = value
            continue
        if key in top:
            out[top[key]] = value
            continue
        if key.startswith("rope_embeddings."):
            continue
        m = _HF_LAYER.match(key)
        if m is None:
            raise ValueError(f"unexpected key in Hugging Face state_dict: {key}")
        i, rest = m.group(1), m.group(2)
        am = re.match(r"attention\.([qkv])_proj\.(weight|bias)$", rest)
        if am:
            qkv.setdefault(i, {})[f"{am.group(1)}.{am.group(2)}"] = value
            continue
        names = block.get(rest)
        if names is None:
            raise ValueError(f"unexpected key in Hugging Face state_dict: {key}")
        if len(names) > 1:  # mlp.up_proj / mlp.down_proj: fc1/fc2 or w2/w3
            names = [n for n in names if n.startswith("mlp.w") == gated]
        out[f"blocks.{i}.{names[0]}"] = value
    for i, parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]], 0)
        biases = [parts.get(f"{n}.bias") for n in "qkv"]
        if any(b is not None for b in biases):
            ref = next(b for b in biases if b is not None)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros_like(ref)
                                                           for b in biases], 0)
            if mask_k_bias:
                mask = torch.ones(3 * ref.shape[0], dtype=ref.dtype)
                mask[ref.shape[0]: 2 * ref.shape[0]] = 0
                out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    dim = out["cls_token"].shape[-1]
    out["rope_embed.periods"] = rope_periods(dim // num_heads, base=rope_base, dtype=rope_dtype)
    return out


def hf_config_kwargs(model) -> dict[str, Any]:
    """``DINOv3ViTConfig`` keyword arguments describing a DinoVisionTransformer (raises if inexpressible)."""
    from .layers import Mlp, RMSNorm, SwiGLUFFN

    rope = model.rope_embed
    if rope.base is None or rope.normalize_coords != "separate":
        raise ValueError("DINOv3ViTModel supports only base-parametrised RoPE with normalize_coords='separate'")
    if model.untie_cls_and_patch_norms:
        raise ValueError("untie_cls_and_patch_norms=True has no DINOv3ViTModel equivalent")
    if isinstance(model.norm, RMSNorm):
        raise ValueError("RMSNorm models have no DINOv3ViTModel equivalent")
    blk = model.blocks[0]
    mlp = blk.mlp
    gated = isinstance(mlp, SwiGLUFFN)
    inter = mlp.w1.out_features if gated else mlp.fc1.out_features
    qkv = blk.attn.qkv
    has_bias = qkv.bias is not None
    masked = has_bias and hasattr(qkv, "bias_mask")
    if not isinstance(mlp, (Mlp, SwiGLUFFN)):
        raise ValueError(f"unsupported FFN {type(mlp).__name__}")
    return dict(
        patch_size=model.patch_size,
        hidden_size=model.embed_dim,
        intermediate_size=inter,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=model.num_heads,
        hidden_act="silu" if gated else "gelu",
        layer_norm_eps=model.norm.eps,
        rope_theta=float(rope.base),
        image_size=model.patch_embed.img_size[0],
        num_channels=model.patch_embed.in_chans,
        query_bias=has_bias,
        key_bias=has_bias and not masked,
        value_bias=has_bias,
        proj_bias=blk.attn.proj.bias is not None,
        mlp_bias=(mlp.w1 if gated else mlp.fc1).bias is not None,
        layerscale_value=1.0,
        use_gated_mlp=gated,
        num_register_tokens=model.n_storage_tokens,
        pos_embed_shift=_opt_float(rope.shift_coords),
        pos_embed_jitter=_opt_float(rope.jitter_coords),
        pos_embed_rescale=_opt_float(rope.rescale_coords),
    )


def _opt_float(v):
    return None if v is None else float(v)


def dinov3_kwargs_from_hf_config(config) -> dict[str, Any]:
    """DinoVisionTransformer keyword arguments for a ``DINOv3ViTConfig``."""
    c = config
    dim, inter = c.hidden_size, c.intermediate_size
    if c.use_gated_mlp:
        if c.hidden_act != "silu":
            raise ValueError(f"gated MLP with {c.hidden_act!r} is not SwiGLU")
        # SwiGLU hidden = int(2/3 * int(dim * ratio)) rounded up to the alignment: pick ratio = 1.5 inter / dim.
        ffn_layer = "swiglu"
        ffn_ratio = 1.5 * inter / dim
        d = int(int(dim * ffn_ratio) * 2 / 3)
        if d + (-d % 8) != inter:
            raise ValueError(f"intermediate_size {inter} is not reachable by the official SwiGLU sizing (align 8)")
    else:
        if c.hidden_act != "gelu":
            raise ValueError(f"MLP activation {c.hidden_act!r} is not supported (official uses exact GELU)")
        ffn_layer, ffn_ratio = "mlp", inter / dim
        if int(dim * ffn_ratio) != inter:
            raise ValueError(f"intermediate_size {inter} is not reachable as int(hidden_size * ffn_ratio)")
    any_bias = c.query_bias or c.key_bias or c.value_bias
    if c.layer_norm_eps == 1e-5:
        norm_layer = "layernormbf16"
    elif c.layer_norm_eps == 1e-6:
        norm_layer = "layernorm"
    else:
        raise ValueError(f"layer_norm_eps {c.layer_norm_eps} matches no official norm_layer")
    patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
    image = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
    return dict(
        img_size=image,
        patch_size=patch,
        in_chans=c.num_channels,
        pos_embed_rope_base=c.rope_theta,
        pos_embed_rope_normalize_coords="separate",
        pos_embed_rope_shift_coords=c.pos_embed_shift,
        pos_embed_rope_jitter_coords=c.pos_embed_jitter,
        pos_embed_rope_rescale_coords=c.pos_embed_rescale,
        pos_embed_rope_dtype="fp32",
        embed_dim=dim,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        ffn_ratio=ffn_ratio,
        qkv_bias=bool(any_bias),
        drop_path_rate=float(c.drop_path_rate),
        layerscale_init=float(c.layerscale_value),
        norm_layer=norm_layer,
        ffn_layer=ffn_layer,
        ffn_bias=c.mlp_bias,
        proj_bias=c.proj_bias,
        n_storage_tokens=c.num_register_tokens,
        mask_k_bias=bool(any_bias and not c.key_bias),
    )
