"""Thin DINOv3 model and tools built on dinov3_kernels."""
