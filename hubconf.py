"""torch.hub entry points with the official DINOv3 names:

    model = torch.hub.load("path/to/dinov3-kernels", "dinov3_vits16", source="local", weights="W.pth")

``weights``: any file or folder ``dinov3.models.from_pretrained`` reads (official .pth/.safetensors, a backbone.pth
from dinov3-train, a dinov3-train checkpoint, an export of dinov3-export). This repository downloads nothing: with
``weights=None`` the model is randomly initialised (with a warning unless ``pretrained=False``). Other keyword
arguments override DinoVisionTransformer arguments (``attn_backend="reference"``, ...). The model is in eval mode.
"""

from dinov3.models.pretrained import hub_backbone

dependencies = ["torch", "numpy", "safetensors"]


def dinov3_vits16(*, pretrained: bool = True, weights=None, **kwargs):
    """ViT-S/16 (21M parameters): 384 wide, 12 blocks, 6 heads. weights=None: random initialisation."""
    return hub_backbone("vit_small", pretrained=pretrained, weights=weights, **kwargs)


def dinov3_vits16plus(*, pretrained: bool = True, weights=None, **kwargs):
    """ViT-S+/16 (29M): 384 wide, 12 blocks, 6 heads, SwiGLU. weights=None: random initialisation."""
    return hub_backbone("vit_small_plus", pretrained=pretrained, weights=weights, **kwargs)


def dinov3_vitb16(*, pretrained: bool = True, weights=None, **kwargs):
    """ViT-B/16 (86M): 768 wide, 12 blocks, 12 heads. weights=None: random initialisation."""
    return hub_backbone("vit_base", pretrained=pretrained, weights=weights, **kwargs)


def dinov3_vitl16(*, pretrained: bool = True, weights=None, **kwargs):
    """ViT-L/16 (300M): 1024 wide, 24 blocks, 16 heads. weights=None: random initialisation."""
    return hub_backbone("vit_large", pretrained=pretrained, weights=weights, **kwargs)


def dinov3_vitl16plus(*, pretrained: bool = True, weights=None, **kwargs):
    """ViT-L+/16: 1024 wide, 24 blocks, 16 heads, SwiGLU. weights=None: random initialisation."""
    return hub_backbone("vit_large_plus", pretrained=pretrained, weights=weights, **kwargs)


def dinov3_vith16plus(*, pretrained: bool = True, weights=None, **kwargs):
    """ViT-H+/16 (840M): 1280 wide, 32 blocks, 20 heads, SwiGLU. weights=None: random initialisation."""
    return hub_backbone("vit_huge_plus", pretrained=pretrained, weights=weights, **kwargs)


def dinov3_vit7b16(*, pretrained: bool = True, weights=None, **kwargs):
    """ViT-7B/16 (6.7B): 4096 wide, 40 blocks, 32 heads, SwiGLU, no qkv bias. weights=None: random initialisation
    (pass device="meta" to build it without allocating memory)."""
    return hub_backbone("vit_7b", pretrained=pretrained, weights=weights, **kwargs)
