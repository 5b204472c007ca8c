"""Triton kernels, one module per op. Imported lazily by the ops, so `import dinov3_kernels` never needs triton."""
