import pytest
import torch
import torch.nn.functional as F

from dinov3.eval.knn import extract_cls_features, knn_accuracy, knn_predict
from dinov3.models import DinoVisionTransformer


def test_knn_recovers_separated_clusters_and_weights_votes():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    labels = torch.arange(3).repeat_interleave(10)
    train = F.normalize(centers[labels] + 0.05 * torch.randn(30, 8, generator=g), dim=-1)
    test = F.normalize(centers + 0.05 * torch.randn(3, 8, generator=g), dim=-1)
    assert knn_predict(train, labels, test, k=5).tolist() == [0, 1, 2]
    assert knn_accuracy(train, labels, test, torch.arange(3), k=5) == 1.0
    # One very close neighbour of class 1 outvotes two far ones of class 0 thanks to exp(sim / T).
    tr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    q = F.normalize(torch.tensor([[1.0, 0.3]]), dim=-1)
    assert knn_predict(tr, torch.tensor([1, 0, 0]), q, k=3, temperature=0.07).item() == 1
    with pytest.raises(ValueError):
        knn_predict(train, labels, test, k=0)


def test_extract_cls_features_shape_and_norm():
    model = DinoVisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2).train()
    feats = extract_cls_features(model, torch.randn(5, 3, 16, 16), batch_size=2)
    assert feats.shape == (5, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5))
    assert model.training  # mode restored
