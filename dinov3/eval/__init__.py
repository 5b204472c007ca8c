"""Evaluation probes for DINOv3 backbones."""

from .knn import extract_cls_features, knn_accuracy, knn_predict

__all__ = ["extract_cls_features", "knn_accuracy", "knn_predict"]
