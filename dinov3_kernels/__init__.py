"""dinov3_kernels: fused Triton and CUDA kernels for DINOv3 training, drop-in for the official modules."""

from ._backend import BackendUnavailableError, available_backends
from .gram import GramLoss, gram_loss, gram_loss_reference
from .koleo import KoLeoLoss, KoLeoLossDistributed, koleo_loss, koleo_loss_reference
from .rope import RopePositionEmbedding

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "GramLoss",
    "gram_loss",
    "gram_loss_reference",
    "KoLeoLoss",
    "KoLeoLossDistributed",
    "koleo_loss",
    "koleo_loss_reference",
    "RopePositionEmbedding",
]
