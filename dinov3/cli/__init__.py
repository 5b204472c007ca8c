"""Console scripts: dinov3-features, dinov3-viz, dinov3-export."""
