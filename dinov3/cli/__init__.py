"""Console scripts: dinov3-features, dinov3-viz."""
