from .checkpoint import CheckpointMismatchError, load_pretrained
from .vision_transformer import (
    ARCHS,
    DinoVisionTransformer,
    build_model,
    vit_7b,
    vit_base,
    vit_huge_plus,
    vit_large,
    vit_large_plus,
    vit_small,
    vit_small_plus,
)

__all__ = [
    "ARCHS",
    "CheckpointMismatchError",
    "DinoVisionTransformer",
    "build_model",
    "load_pretrained",
    "vit_7b",
    "vit_base",
    "vit_huge_plus",
    "vit_large",
    "vit_large_plus",
    "vit_small",
    "vit_small_plus",
]
