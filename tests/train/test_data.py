import math
import os
import random

import pytest
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
    r0 = [i for b in list(full)[:1] for i, *_ in b] + [i for i, *_ in full.batch(1)][:2]
    r1 = [i for i, *_ in other.batch(0)]
    assert not set(r0) & set(r1)
    epoch0 = [ResumableBatchSampler(10, 1, seed=1).batch(i)[0][0] for i in range(10)]
    assert sorted(epoch0) == list(range(10))  # a permutation per epoch


def test_loader_batch_shapes_masks_and_augmentation(image_dir, tiny_overrides):
    cfg = load_config("tiny", tiny_overrides + ["ibot.mask_sample_probability=0.5"])
    ds, loader = build_loader(cfg, root=image_dir, rank=0, world_size=1, start_iter=0, end_iter=3)
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    B, G, L, T, P = 4, 32, 16, 48, (32 // 8) ** 2
    assert b["global_crops"].shape == (2 * B, 3, G, G) and b["local_crops"].shape == (2 * B, 3, L, L)
    # Gram-teacher crops only from gram.start_iter=2 on.
    assert "gram_crops" not in batches[0] and "gram_crops" not in batches[1]
    assert batches[2]["gram_crops"].shape == (2 * B, 3, T, T)
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
    b = batches[2]
    out1 = aug(b, iteration=2, rank=0)
    expected = (b["gram_crops"].float() / 255 - torch.tensor(cfg["crops"]["rgb_mean"]).view(1, 3, 1, 1)) / \
        torch.tensor(cfg["crops"]["rgb_std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(out1["gram_crops"], expected)
    # The batch the loader yields was not modified by the augmentation.
    assert b["global_crops"].dtype == torch.uint8


# ------------------------------------------------------------------------------------------ photometric settings
def _normalised(x, cfg):
    mean = torch.tensor(cfg["crops"]["rgb_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["crops"]["rgb_std"]).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def _uint8_batch(B=4, G=32, L=16, n_local=2):
    g = torch.Generator().manual_seed(0)
    batch = {"global_crops": torch.randint(0, 256, (2 * B, 3, G, G), generator=g, dtype=torch.uint8),
             "local_crops": torch.randint(0, 256, (n_local * B, 3, L, L), generator=g, dtype=torch.uint8)}
    from dinov3.train.masking import mask_batch_fields

    batch.update(mask_batch_fields(torch.zeros(2 * B, (G // 8) ** 2, dtype=torch.bool)))
    return batch


def test_photometric_augmentations_off_leave_the_crops_as_they_are(tiny_overrides):
    cfg = load_config("tiny", tiny_overrides + ["crops.color_jitter_probability=0", "crops.grayscale_probability=0",
                                                "crops.blur_probabilities=[0, 0, 0]", "crops.solarize_probability=0"])
    b = _uint8_batch()
    out = BatchAugment(cfg, torch.device("cpu"))(b, iteration=3, rank=0)
    torch.testing.assert_close(out["global_crops"], _normalised(b["global_crops"], cfg))
    torch.testing.assert_close(out["local_crops"], _normalised(b["local_crops"], cfg))


def test_blur_probabilities_apply_per_crop_kind(tiny_overrides):
    # Only blur, with probability 1 on global crop 2 and 0 elsewhere: global crop 1 and the local crops are unchanged.
    cfg = load_config("tiny", tiny_overrides + ["crops.color_jitter_probability=0", "crops.grayscale_probability=0",
                                                "crops.blur_probabilities=[0, 1, 0]", "crops.solarize_probability=0"])
    b = _uint8_batch()
    out = BatchAugment(cfg, torch.device("cpu"))(b, iteration=0, rank=0)
    ref = _normalised(b["global_crops"], cfg)
    torch.testing.assert_close(out["global_crops"][:4], ref[:4])
    assert ((out["global_crops"][4:] - ref[4:]).abs().flatten(1).amax(1) > 1e-3).all()
    torch.testing.assert_close(out["local_crops"], _normalised(b["local_crops"], cfg))


# ------------------------------------------------------------------------------------------------ crops and decoding
def test_gram_crops_only_when_asked_and_the_other_crops_unchanged(image_dir):
    spec = CropSpec(32, 16, 2, (0.3, 1.0), (0.1, 0.3), gram_size=48)
    ds = ImageFolderDataset(image_dir, spec)
    with_gram, without = ds[(0, 11, True)], ds[(0, 11, False)]
    assert len(with_gram["crops"]["gram"]) == 2 and without["crops"]["gram"] == []
    for kind in ("global", "local"):
        for a, b in zip(with_gram["crops"][kind], without["crops"][kind]):
            assert torch.equal(a, b)


def _photo(path, size=(1600, 1200), exif=None):
    """A smooth image with texture at several scales, saved as a JPEG (quality 90)."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    img = np.stack([128 + 60 * np.sin(x / 37 + c) * np.cos(y / 53 - c) + 30 * np.sin((x + y) / 7 + c)
                    for c in range(3)], -1)
    img += rng.normal(0, 6, img.shape)
    kwargs = {"quality": 90} | ({"exif": exif} if exif is not None else {})
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, **kwargs)
    return path


def _psnr(a, b):
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-10))


@pytest.mark.parametrize("orientation", [1, 6])
def test_fast_decoding_gives_the_same_crops_at_the_same_quality(tmp_path, orientation):
    """JPEG draft decoding + box reduction against the full-resolution decode and resample: the same boxes (the same
    random draws, in the file's upright coordinates, EXIF rotation included) and crops within about one grey level on
    average. The test image's pixel noise (sigma 6) is a hard case: on photos the mean difference stayed under 0.5
    (PSNR >= 49.7 dB, see REDUCING_GAP)."""
    from PIL import Image

    from dinov3.images import load_rgb
    from dinov3.train.data import crop_plan, decode_size_needed, load_multi_crop, render_crops

    exif = None
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
    path = _photo(str(tmp_path / "photo.jpg"), exif=exif)
    spec = CropSpec(64, 32, 4, (0.32, 1.0), (0.05, 0.32), gram_size=128)
    full = load_rgb(path)
    assert full.size == ((1200, 1600) if orientation == 6 else (1600, 1200))
    reduced, diffs = 0, []
    for seed in range(4):
        for gram in (False, True):
            plan = crop_plan(*full.size, spec, random.Random(seed), gram=gram)
            reduced += decode_size_needed(plan, *full.size) is not None
            fast = load_multi_crop(path, spec, random.Random(seed), gram=gram)
            slow = render_crops(full, plan, fast=False)
            for kind in ("global", "local", "gram"):
                assert len(fast[kind]) == len(slow[kind])
                for a, b in zip(fast[kind], slow[kind]):
                    assert a.shape == b.shape
                    diffs.append(((a.float() - b.float()).abs().mean().item(), _psnr(a, b)))
    # Measured here: mean difference <= 0.99 grey levels, PSNR >= 46.6 dB.
    assert max(d for d, _ in diffs) < 1.25 and min(p for _, p in diffs) > 42
    assert reduced >= 4  # the draft path was taken
    # The draft really decodes fewer pixels: a 1/4-scale request on this 1600x1200 JPEG.
    smaller = load_rgb(path, reduce_for=lambda size: (size[0] // 4, size[1] // 4))
    assert smaller.size == (full.size[0] // 4, full.size[1] // 4)


def _noisy_image(w=200, h=150):
    """Smooth structure plus strong pixel noise (sigma 25): a hard case for resampling differences."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 80 * np.sin(x / 5 + c) * np.cos(y / 7 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8))


def _pil_resized_crop(img, box, size, flip):
    """The official loader's RandomResizedCrop + flip on a PIL image: crop, bicubic resize, transpose."""
    import numpy as np
    from PIL import Image

    left, top, w, h = box
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out).transpose(2, 0, 1).copy())


# (box, size): up- and downscales, both at once (37 px wide -> 48 up, 51 high -> 48 down), boxes on the image's
# edges, the whole image, a single pixel, odd sizes.
RESIZE_CASES = [((10, 20, 40, 30), 64), ((0, 0, 150, 150), 32), ((50, 0, 150, 150), 16), ((3, 7, 37, 51), 48),
                ((0, 0, 200, 150), 200), ((199, 149, 1, 1), 5), ((120, 90, 80, 60), 37), ((0, 0, 200, 150), 7)]


@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_equals_pillows_crop_and_resize(flip):
    """torch's antialiased uint8 bicubic against Pillow's: within rounding. Each does two separable 8-bit passes;
    where one side is upscaled and the other downscaled the two libraries take the passes in a different order,
    which moves pixels by up to 3 levels (0.27 on average on this noisy image), else by at most 1."""
    from dinov3.train.data import image_tensor, resized_crop

    img = _noisy_image()
    src = image_tensor(img)
    before = src.clone()
    for box, size in RESIZE_CASES:
        out = resized_crop(src, box, size, flip)
        ref = _pil_resized_crop(img, box, size, flip)
        assert out.shape == (3, size, size) and out.dtype == torch.uint8 and out.is_contiguous()
        diff = (out.int() - ref.int()).abs()
        mixed = (box[2] < size) != (box[3] < size)
        assert diff.max() <= (3 if mixed else 1), (box, size)
        assert diff.float().mean() < (0.5 if mixed else 0.02), (box, size)
    assert torch.equal(src, before)
    with pytest.raises(ValueError, match="RGB"):
        image_tensor(img.convert("L"))


def test_full_resolution_crops_are_the_planned_boxes_resized(tmp_path):
    """Without a draft decode (a PNG; the Gram phase's large crops), every crop of load_multi_crop is the
    straightforward crop + bicubic resize of its planned box (the same random draws as crop_plan with the same seed)."""
    from dinov3.train.data import crop_plan, load_multi_crop

    img = _noisy_image()
    path = str(tmp_path / "noisy.png")
    img.save(path)
    spec = CropSpec(64, 32, 3, (0.32, 1.0), (0.05, 0.32), gram_size=96)
    for seed in range(3):
        plan = crop_plan(*img.size, spec, random.Random(seed), gram=True)
        crops = load_multi_crop(path, spec, random.Random(seed), gram=True)
        seen = {"global": 0, "local": 0, "gram": 0}
        for kind, box, flip, size in plan:
            out, ref = crops[kind][seen[kind]], _pil_resized_crop(img, box, size, flip)
            seen[kind] += 1
            diff = (out.int() - ref.int()).abs()
            assert diff.max() <= 3 and diff.float().mean() < 0.5, (kind, box, size)
        assert seen == {k: len(v) for k, v in crops.items()} == {"global": 2, "local": 3, "gram": 2}
