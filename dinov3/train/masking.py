"""iBOT block masking (BEiT-style rectangles) and the per-batch mask collation of DINOv2/DINOv3."""

from __future__ import annotations

import math
import random

import torch


class BlockMaskGenerator:
    """Masks about ``n`` patches of an (H, W) grid by pasting random rectangles with log-uniform aspect ratio.

    Each rectangle covers between ``min_num_patches`` and ``max_num_patches`` patches; one rectangle is retried up to
    10 times and the rectangles stop when one adds nothing; random single patches then complete the mask, so exactly
    ``n`` patches are masked (as the official MaskingGenerator.complete_mask_randomly).
    """

    def __init__(self, grid: tuple[int, int], *, min_num_patches: int = 4, max_num_patches: float | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _paste(self, mask: torch.Tensor, budget: float, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < self.height and w < self.width:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window.fill_(True)
                    return new
        return 0

    def __call__(self, n: int, rng: random.Random) -> torch.Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < n:
            added = self._paste(mask, min(n - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        if count < n:
            free = (~mask.flatten()).nonzero().flatten().tolist()
            mask.view(-1)[rng.sample(free, n - count)] = True
        return mask


def sample_masks(n_images: int, n_tokens: int, generator: BlockMaskGenerator, *, ratio_min_max: tuple[float, float],
                 probability: float, rng: random.Random) -> torch.Tensor:
    """(n_images, n_tokens) bool masks, as the official collate: ``m = int(n_images * probability)`` images are masked,
    image i with exactly ``int(n_tokens * r[i + 1])`` patches for ``r = linspace(min, max, m + 1)`` (float32: the upper
    edge of its slice of the ratio range), the others get none; the order is then shuffled."""
    n_masked_images = int(n_images * probability)
    edges = torch.linspace(*ratio_min_max, n_masked_images + 1)  # float32, as official, so the counts match exactly
    masks = [generator(int(n_tokens * edges[i + 1]), rng).flatten() for i in range(n_masked_images)]
    masks += [torch.zeros(n_tokens, dtype=torch.bool) for _ in range(n_masked_images, n_images)]
    rng.shuffle(masks)
    return torch.stack(masks) if masks else torch.zeros(0, n_tokens, dtype=torch.bool)


def mask_batch_fields(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Index and weight tensors the iBOT loss needs: flat indices of masked tokens and 1 / (#masked in its image)."""
    flat_idx = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1).clamp(min=1).to(torch.float32)
    weights = (1.0 / per_image).unsqueeze(-1).expand_as(masks)[masks]
    return {"masks": masks, "mask_indices": flat_idx, "masks_weight": weights,
            "n_masked_patches": torch.tensor([flat_idx.numel()], dtype=torch.long)}
