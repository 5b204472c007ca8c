from dinov3_kernels.rope import RopePositionEmbedding

__all__ = ["RopePositionEmbedding"]
