from .checkpoint import CheckpointMismatchError, WeightsFileError, load_pretrained
from .pretrained import from_pretrained
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
    "WeightsFileError",
    "build_model",
    "from_pretrained",
    "load_pretrained",
    "vit_7b",
    "vit_base",
    "vit_huge_plus",
    "vit_large",
    "vit_large_plus",
    "vit_small",
    "vit_small_plus",
]
