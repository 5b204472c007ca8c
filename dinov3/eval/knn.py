"""Weighted k-nearest-neighbour probe on L2-normalised CLS features (the DINO kNN protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_cls_features(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 256,
                         device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, 3, H, W) normalised images -> (N, D) L2-normalised ``x_norm_clstoken`` features (float32, on CPU)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        out.append(model.forward_features(x)["x_norm_clstoken"].float().cpu())
    model.train(was_training)
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> torch.Tensor:
    """Each test sample votes over its k most cosine-similar training samples with weight exp(sim / T)."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels differ in length")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be in [1, {train_features.shape[0]}], got {k}")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    sim = test_features @ train_features.t()  # (N_test, N_train), cosine similarity for normalised features
    top_sim, top_idx = sim.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    votes = torch.zeros(test_features.shape[0], num_classes, dtype=weights.dtype)
    votes.scatter_add_(1, train_labels[top_idx], weights)
    return votes.argmax(1)


def knn_accuracy(train_features, train_labels, test_features, test_labels, **kwargs) -> float:
    pred = knn_predict(train_features, train_labels, test_features, **kwargs)
    return float((pred == test_labels).float().mean())
