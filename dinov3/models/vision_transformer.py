"""The DINOv3 vision transformer: official constructor, state_dict layout and outputs."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from dinov3_kernels.rope import RopePositionEmbedding

from .layers import ATTN_BACKENDS, LayerScale, LinearKMaskedBias, PatchEmbed, RMSNorm, SelfAttentionBlock, make_norm

logger = logging.getLogger("dinov3")

_ROPE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = [
    "DinoVisionTransformer",
    "vit_small",
    "vit_small_plus",
    "vit_base",
    "vit_large",
    "vit_large_plus",
    "vit_huge_plus",
    "vit_7b",
    "ARCHS",
    "build_model",
    "check_model_kwargs",
    "model_kwarg_names",
    "released_kwargs",
    "size_kwargs",
]


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT. Keyword arguments and defaults are the official ones, plus ``attn_backend``.

    ``attn_backend``: "reference" (eager RoPE + scaled_dot_product_attention, the official path),
    "fused" (``dinov3_kernels.rope_attention`` on the packed qkv), "auto" (fused on CUDA tensors
    when the kernels are available, reference otherwise) or "math" (the reference path with attention as explicit
    matmul + softmax instead of SDPA: what the ONNX export traces).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str = "bf16",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = None,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        ffn_bias: bool = True,
        proj_bias: bool = True,
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        device: Any | None = None,
        attn_backend: str = "auto",
        **ignored_kwargs,
    ):
        super().__init__()
        # The constructor arguments (all keyword-only ones but device): what exports record to rebuild the model.
        self.init_kwargs = {k: v for k, v in locals().items() if k in model_kwarg_names()}
        if ignored_kwargs:
            logger.warning("DinoVisionTransformer ignored kwargs: %s", ignored_kwargs)
        if pos_embed_rope_dtype not in _ROPE_DTYPES:
            raise ValueError(f"pos_embed_rope_dtype must be one of {list(_ROPE_DTYPES)}, got {pos_embed_rope_dtype!r}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        for name, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                        ("patch_size", patch_size), ("in_chans", in_chans)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if n_storage_tokens < 0:
            raise ValueError(f"n_storage_tokens must be >= 0, got {n_storage_tokens}")

        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_storage_tokens = n_storage_tokens
        self.attn_backend = attn_backend

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, device=device)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, device=device))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim, device=device))
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads=num_heads,
            base=pos_embed_rope_base,
            min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period,
            normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
            dtype=_ROPE_DTYPES[pos_embed_rope_dtype],
            device=device,
        )
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                embed_dim,
                num_heads,
                ffn_ratio=ffn_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                init_values=layerscale_init,
                drop_path=drop_path_rate,
                norm_layer=norm_layer,
                ffn_layer=ffn_layer,
                mask_k_bias=mask_k_bias,
                attn_backend=attn_backend,
                device=device,
            )
            for _ in range(depth)
        )
        self.chunked_blocks = False
        # Applied to all tokens; when untied, only to patch tokens.
        self.norm = make_norm(norm_layer, embed_dim, device=device)
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.cls_norm = make_norm(norm_layer, embed_dim, device=device) if untie_cls_and_patch_norms else None
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm
        # CLS + storage norm of the local crops (second list entry) in training only.
        self.local_cls_norm = (
            make_norm(norm_layer, embed_dim, device=device) if untie_global_and_local_cls_norm else None
        )
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, device=device))
        # Unlike the official module (which leaves torch.empty memory until init_weights()), start initialised.
        self.init_weights()

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (trunc-normal 0.02 linears, zero biases, k-bias mask, ...)."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LinearKMaskedBias):
                    m.reset_bias_mask()
            elif isinstance(m, (nn.LayerNorm, LayerScale, PatchEmbed, RMSNorm)):
                m.reset_parameters()

    # ---------------------------------------------------------------------------------------- tokens
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        x = self.patch_embed(x)  # (B, h, w, D)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        if masks is not None:
            if masks.dtype != torch.bool:
                raise TypeError(f"masks must be a bool tensor, got {masks.dtype}")
            if tuple(masks.shape) != (B, H * W):
                raise ValueError(f"masks must have shape (B, h*w) = {(B, H * W)}, got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            # 0 * mask_token keeps mask_token in the graph (DDP expects every parameter to get a gradient).
            cls_token = self.cls_token + 0 * self.mask_token
        parts = [cls_token.expand(B, -1, -1)]
        if self.n_storage_tokens > 0:
            parts.append(self.storage_tokens.expand(B, -1, -1))
        parts.append(x)
        return torch.cat(parts, dim=1), (H, W)

    def _rope_tables(self, hws: Sequence[tuple[int, int]]) -> list[list[tuple[Tensor, Tensor]]]:
        """RoPE (sin, cos) per block and crop, computed once per forward: [block][crop] -> tied (H·W, Dh/2) tables.

        The official model calls its RoPE module in every block (about a dozen tiny launches each). In eval the tables
        are the same for every block; in training with coordinate augmentation each block has its own draw (official),
        and the depth tables of one crop come from one batched call (its draws are ordered shifts, jitters, rescales
        over the blocks, not block by block: the same distribution, another order of random numbers).
        """
        depth = len(self.blocks)
        per_crop = [self.rope_embed.tables(H=h, W=w, count=depth if self.rope_embed.augments else None)
                    for h, w in hws]
        if not self.rope_embed.augments:
            return [per_crop] * depth
        return [[(sin[i], cos[i]) for sin, cos in per_crop] for i in range(depth)]

    # -------------------------------------------------------------------------------------- forward
    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]) -> list[dict]:
        if len(x_list) == 0:
            raise ValueError("forward_features got an empty list of crops")
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} crops but {len(masks_list)} masks")
        xs, hws = [], []
        for x, m in zip(x_list, masks_list):
            t, hw = self.prepare_tokens_with_masks(x, m)
            xs.append(t)
            hws.append(hw)
        ropes = self._rope_tables(hws)
        for blk, rope in zip(self.blocks, ropes):
            xs = blk(xs, rope)
        n_prefix = self.n_storage_tokens + 1
        outputs = []
        for idx, (x, masks) in enumerate(zip(xs, masks_list)):
            if self.untie_cls_and_patch_norms or self.untie_global_and_local_cls_norm:
                if self.untie_global_and_local_cls_norm and self.training and idx == 1:
                    cls_reg = self.local_cls_norm(x[:, :n_prefix])
                elif self.untie_cls_and_patch_norms:
                    cls_reg = self.cls_norm(x[:, :n_prefix])
                else:
                    cls_reg = self.norm(x[:, :n_prefix])
                patch = self.norm(x[:, n_prefix:])
            else:
                x_norm = self.norm(x)
                cls_reg, patch = x_norm[:, :n_prefix], x_norm[:, n_prefix:]
            outputs.append(
                {
                    "x_norm_clstoken": cls_reg[:, 0],
                    "x_storage_tokens": cls_reg[:, 1:],
                    "x_norm_patchtokens": patch,
                    "x_prenorm": x,
                    "masks": masks,
                }
            )
        return outputs

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None):
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        if not isinstance(x, (list, tuple)) or not all(isinstance(t, Tensor) for t in x):
            raise TypeError(f"forward_features takes a tensor or a list of tensors, got {type(x).__name__}")
        return self.forward_features_list(list(x), masks)

    def forward(self, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        if isinstance(ret, list):
            return [self.head(r["x_norm_clstoken"]) for r in ret]
        return self.head(ret["x_norm_clstoken"])

    # --------------------------------------------------------------------------- intermediate layers
    def _get_intermediate_layers_not_chunked(self, x: Tensor, n: int | Sequence[int] = 1) -> list[Tensor]:
        x, hw = self.prepare_tokens_with_masks(x)
        total = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= total:
                raise ValueError(f"n must be in [1, {total}], got {n}")
            take = set(range(total - n, total))
            n_take = n
        else:
            take = list(n)
            bad = [i for i in take if not isinstance(i, int) or not 0 <= i < total]
            if bad or not take:
                raise ValueError(f"block indices must be in [0, {total - 1}], got {list(n)}")
            n_take = len(take)
        out = []
        ropes = self._rope_tables([hw])
        for i, blk in enumerate(self.blocks):
            x = blk(x, ropes[i][0])
            if i in take:
                out.append(x)
        if len(out) != n_take:
            raise ValueError(f"only {len(out)} / {n_take} requested blocks found (duplicates?)")
        return out

    def get_intermediate_layers(
        self,
        x: Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ):
        outputs = self._get_intermediate_layers_not_chunked(x, n)
        n_prefix = self.n_storage_tokens + 1
        if norm:
            if self.untie_cls_and_patch_norms:
                outputs = [torch.cat((self.cls_norm(o[:, :n_prefix]), self.norm(o[:, n_prefix:])), 1) for o in outputs]
            else:
                outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        extra_tokens = [o[:, 1:n_prefix] for o in outputs]
        patches = [o[:, n_prefix:] for o in outputs]
        if reshape:
            B, _, h, w = x.shape
            hp, wp = h // self.patch_size, w // self.patch_size
            patches = [p.reshape(B, hp, wp, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens))
        return tuple(patches)


# ------------------------------------------------------------------------------------------ sizes
# Shared by every released ViT backbone (dinov3/hub/backbones.py).
_RELEASED = dict(
    img_size=224,
    patch_size=16,
    in_chans=3,
    pos_embed_rope_base=100,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2,
    pos_embed_rope_dtype="fp32",
    qkv_bias=True,
    drop_path_rate=0.0,
    layerscale_init=1.0e-05,
    norm_layer="layernormbf16",
    ffn_layer="mlp",
    ffn_bias=True,
    proj_bias=True,
    n_storage_tokens=4,
    mask_k_bias=True,
)

_SIZES = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4),
    "vit_small_plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4),
    "vit_large_plus": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6, ffn_layer="swiglu"),
    "vit_huge_plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6, ffn_layer="swiglu"),
    # The released 7B has no qkv bias and untied global/local CLS norms.
    "vit_7b": dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3, ffn_layer="swiglu64", qkv_bias=False,
                   untie_global_and_local_cls_norm=True),
}

# Names of the released checkpoints (hub function names) -> our constructors.
ALIASES = {
    "vits16": "vit_small",
    "vits16plus": "vit_small_plus",
    "vitb16": "vit_base",
    "vitl16": "vit_large",
    "vitl16plus": "vit_large_plus",
    "vith16plus": "vit_huge_plus",
    "vit7b16": "vit_7b",
}


def released_kwargs() -> dict:
    """The keyword arguments every released backbone shares (patch 16, 4 storage tokens, RoPE settings, ...)."""
    return dict(_RELEASED)


def size_kwargs(arch: str) -> dict:
    """What sets one released size apart (embed_dim, depth, num_heads, ffn_ratio, ...), by name or hub alias."""
    key = arch.lower().replace("-", "_").replace("dinov3_", "")
    key = ALIASES.get(key, key)
    if key not in _SIZES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(_SIZES) + sorted(ALIASES)}")
    return dict(_SIZES[key])


def model_kwarg_names() -> list[str]:
    """The DinoVisionTransformer keyword arguments a user or a file describing a model may set."""
    params = inspect.signature(DinoVisionTransformer.__init__).parameters.values()
    return sorted(p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name != "device")


def check_model_kwargs(kwargs: Mapping, source: str) -> None:
    """ValueError naming ``source`` when ``kwargs`` has keys the constructor would ignore (it only warns)."""
    unknown = sorted(set(kwargs) - set(model_kwarg_names()))
    if unknown:
        raise ValueError(f"{source}: unknown DinoVisionTransformer argument(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(model_kwarg_names())}")


def build_model(arch: str, **kwargs) -> DinoVisionTransformer:
    """Build a released size by name (``vit_small`` ... or ``vits16`` ...); kwargs override."""
    return DinoVisionTransformer(**{**_RELEASED, **size_kwargs(arch), **kwargs})


def vit_small(**kwargs) -> DinoVisionTransformer:
    """ViT-S/16 as released: 384 wide, 12 blocks, 6 heads, MLP x4, 4 storage tokens."""
    return build_model("vit_small", **kwargs)


def vit_small_plus(**kwargs) -> DinoVisionTransformer:
    """ViT-S+/16 as released: 384 wide, 12 blocks, 6 heads, SwiGLU x6."""
    return build_model("vit_small_plus", **kwargs)


def vit_base(**kwargs) -> DinoVisionTransformer:
    """ViT-B/16 as released: 768 wide, 12 blocks, 12 heads, MLP x4."""
    return build_model("vit_base", **kwargs)


def vit_large(**kwargs) -> DinoVisionTransformer:
    """ViT-L/16 as released (LVD-1689M weights; pass untie_global_and_local_cls_norm=True for SAT-493M)."""
    return build_model("vit_large", **kwargs)


def vit_large_plus(**kwargs) -> DinoVisionTransformer:
    """ViT-L+/16 as released: 1024 wide, 24 blocks, 16 heads, SwiGLU x6."""
    return build_model("vit_large_plus", **kwargs)


def vit_huge_plus(**kwargs) -> DinoVisionTransformer:
    """ViT-H+/16 as released: 1280 wide, 32 blocks, 20 heads, SwiGLU x6."""
    return build_model("vit_huge_plus", **kwargs)


def vit_7b(**kwargs) -> DinoVisionTransformer:
    """ViT-7B/16 as released: 4096 wide, 40 blocks, 32 heads, SwiGLU (align 64) x3, no qkv bias."""
    return build_model("vit_7b", **kwargs)


ARCHS = {name: globals()[name] for name in _SIZES}
