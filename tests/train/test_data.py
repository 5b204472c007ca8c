import os

import torch

from dinov3.train.config import load_config
from dinov3.train.data import (BatchAugment, CropSpec, ImageFolderDataset, ResumableBatchSampler, build_loader,
                               find_images)


def test_find_images_is_recursive_and_ignores_non_images(image_dir):
    paths = find_images(image_dir)
    assert len(paths) == 13  # 12 images + the corrupt .png (found by name; skipped when decoded)
    assert not any(p.endswith(".txt") for p in paths)
    assert any(os.sep + os.path.join("nested", "deeper") + os.sep in p for p in paths)


def test_corrupt_file_is_replaced_by_the_next_readable_one(image_dir):
    spec = CropSpec(32, 16, 2, (0.3, 1.0), (0.1, 0.3), gram_size=48)
    ds = ImageFolderDataset(image_dir, spec)
    bad = next(i for i, p in enumerate(ds.paths) if p.endswith("corrupt.png"))
    item = ds[(bad, 123)]
    [(path, reason)] = item["skipped"]
    assert path == ds.paths[bad] and reason == "not an image file Pillow can decode"  # the path and why
    assert [t.shape for t in item["crops"]["global"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in item["crops"]["gram"]] == [(3, 48, 48)] * 2
    assert [t.shape for t in item["crops"]["local"]] == [(3, 16, 16)] * 2
    assert all(t.dtype == torch.uint8 for t in item["crops"]["local"])
    # Same (index, seed) -> same crops; another seed -> other crops.
    good = ds[(0, 5)]
    assert torch.equal(good["crops"]["global"][0], ds[(0, 5)]["crops"]["global"][0])
    assert not torch.equal(good["crops"]["global"][0], ds[(0, 6)]["crops"]["global"][0])


def test_sampler_is_resumable_and_shards_ranks():
    full = ResumableBatchSampler(10, 3, seed=1, world_size=2, rank=0, end_iter=8)
    tail = ResumableBatchSampler(10, 3, seed=1, world_size=2, rank=0, start_iter=5, end_iter=8)
    assert list(full)[5:] == list(tail)
    other = ResumableBatchSampler(10, 3, seed=1, world_size=2, rank=1, end_iter=8)
    # Within one epoch (first 10 global positions) the two ranks never draw the same image.
    r0 = [i for b in list(full)[:1] for i, _ in b] + [i for i, _ in full.batch(1)][:2]
    r1 = [i for i, _ in other.batch(0)]
    assert not set(r0) & set(r1)
    epoch0 = [ResumableBatchSampler(10, 1, seed=1).batch(i)[0][0] for i in range(10)]
    assert sorted(epoch0) == list(range(10))  # a permutation per epoch


def test_loader_batch_shapes_masks_and_augmentation(image_dir, tiny_overrides):
    cfg = load_config("tiny", tiny_overrides + ["ibot.mask_sample_probability=0.5"])
    ds, loader = build_loader(cfg, root=image_dir, rank=0, world_size=1, start_iter=0, end_iter=2)
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    B, G, L, T, P = 4, 32, 16, 48, (32 // 8) ** 2
    assert b["global_crops"].shape == (2 * B, 3, G, G) and b["local_crops"].shape == (2 * B, 3, L, L)
    assert b["gram_crops"].shape == (2 * B, 3, T, T)
    assert b["masks"].shape == (2 * B, P) and b["masks"].dtype == torch.bool
    assert int((b["masks"].sum(-1) > 0).sum()) <= int(2 * B * 0.5)
    assert b["mask_indices"].tolist() == b["masks"].flatten().nonzero().flatten().tolist()
    aug = BatchAugment(cfg, torch.device("cpu"))
    out1 = aug(b, iteration=0, rank=0)
    out2 = aug(b, iteration=0, rank=0)
    out3 = aug(b, iteration=1, rank=0)
    assert out1["global_crops"].dtype == torch.float32 and out1["global_crops"].shape == (2 * B, 3, G, G)
    assert torch.equal(out1["local_crops"], out2["local_crops"])
    assert not torch.equal(out1["local_crops"], out3["local_crops"])
    # Normalised with the ImageNet statistics: [0, 1] maps to [(0 - mean) / std, (1 - mean) / std].
    lo = (0 - torch.tensor(cfg["crops"]["rgb_mean"])) / torch.tensor(cfg["crops"]["rgb_std"])
    hi = (1 - torch.tensor(cfg["crops"]["rgb_mean"])) / torch.tensor(cfg["crops"]["rgb_std"])
    x = out1["global_crops"].transpose(0, 1).flatten(1)
    assert (x.min(1).values >= lo - 1e-5).all() and (x.max(1).values <= hi + 1e-5).all()
    # Gram crops have no distortion by default: they are the normalised uint8 crops.
    expected = (b["gram_crops"].float() / 255 - torch.tensor(cfg["crops"]["rgb_mean"]).view(1, 3, 1, 1)) / \
        torch.tensor(cfg["crops"]["rgb_std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(out1["gram_crops"], expected)
    # The batch the loader yields was not modified by the augmentation.
    assert b["global_crops"].dtype == torch.uint8
