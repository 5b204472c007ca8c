import random

import pytest
import torch

from dinov3.train.masking import BlockMaskGenerator, mask_batch_fields, sample_masks


@pytest.mark.parametrize("grid,n_images,prob,ratio", [((4, 4), 8, 0.5, (0.1, 0.5)), ((14, 14), 6, 1.0, (0.2, 0.4)),
                                                       ((7, 5), 3, 0.0, (0.1, 0.5))])
def test_sample_masks_shape_count_and_ratio(grid, n_images, prob, ratio):
    n_tokens = grid[0] * grid[1]
    gen = BlockMaskGenerator(grid, max_num_patches=0.5 * n_tokens)
    masks = sample_masks(n_images, n_tokens, gen, ratio_min_max=ratio, probability=prob, rng=random.Random(0))
    assert masks.shape == (n_images, n_tokens) and masks.dtype == torch.bool
    per_image = masks.sum(-1)
    # int(n * p) images are candidates for masking; none gets more than max ratio of its tokens.
    assert int((per_image > 0).sum()) <= int(n_images * prob)
    assert int(per_image.max()) <= int(ratio[1] * n_tokens)
    if prob == 1.0:
        assert (per_image > 0).all()
    if prob == 0.0:
        assert not masks.any()


def test_block_masks_are_deterministic_and_exact():
    gen = BlockMaskGenerator((10, 10), max_num_patches=50)
    a = gen(30, random.Random(3))
    b = gen(30, random.Random(3))
    assert torch.equal(a, b)
    # Rectangles first, then single patches up to the exact count (official complete_mask_randomly).
    for n in (0, 1, 7, 30, 50, 99, 100):
        assert int(gen(n, random.Random(n)).sum()) == n


@pytest.mark.parametrize("grid,n_images,prob,ratio", [((16, 16), 32, 0.5, (0.1, 0.5)), ((14, 14), 6, 1.0, (0.2, 0.4)),
                                                       ((7, 5), 9, 0.5, (0.1, 0.5)), ((4, 4), 8, 0.0, (0.1, 0.5))])
def test_sample_masks_counts_are_the_official_collates(grid, n_images, prob, ratio):
    # Official collate_data_and_cast: n = int(B * p) masked images, probs = torch.linspace(min, max, n + 1) (float32),
    # image i gets mask_generator(int(N * probs[i + 1])) patches, which the generator fills to exactly that count.
    n_tokens = grid[0] * grid[1]
    n = int(n_images * prob)
    probs = torch.linspace(*ratio, n + 1)
    expected = sorted([int(n_tokens * probs[i + 1]) for i in range(n)] + [0] * (n_images - n))
    gen = BlockMaskGenerator(grid, max_num_patches=0.5 * n_tokens)
    masks = sample_masks(n_images, n_tokens, gen, ratio_min_max=ratio, probability=prob, rng=random.Random(1))
    assert sorted(masks.sum(-1).tolist()) == expected


def test_mask_batch_fields():
    masks = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    f = mask_batch_fields(masks)
    assert f["mask_indices"].tolist() == [0, 2, 7]
    torch.testing.assert_close(f["masks_weight"], torch.tensor([0.5, 0.5, 1.0]))
    assert f["n_masked_patches"].tolist() == [3]
