"""dinov3_kernels: fused Triton and CUDA kernels for DINOv3 training, drop-in for the official modules."""

from ._backend import BackendUnavailableError, available_backends
from .attention import apply_rope, apply_rope_reference, rope_attention, rope_attention_reference
from .gram import GramLoss, gram_loss, gram_loss_reference
from .head_loss import (dino_head_loss, dino_head_loss_reference, ibot_head_loss, ibot_head_loss_reference,
                        sinkhorn_knopp_reference)
from .koleo import KoLeoLoss, KoLeoLossDistributed, koleo_loss, koleo_loss_reference
from .rope import RopePositionEmbedding

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "GramLoss",
    "gram_loss",
    "gram_loss_reference",
    "dino_head_loss",
    "dino_head_loss_reference",
    "ibot_head_loss",
    "ibot_head_loss_reference",
    "sinkhorn_knopp_reference",
    "KoLeoLoss",
    "KoLeoLossDistributed",
    "koleo_loss",
    "koleo_loss_reference",
    "RopePositionEmbedding",
    "rope_attention",
    "rope_attention_reference",
    "apply_rope",
    "apply_rope_reference",
]
