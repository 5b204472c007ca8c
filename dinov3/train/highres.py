"""High-resolution adaptation: several crop resolutions in one run, one resolution per iteration.

The official stage (dinov3_vit7b16_high_res_adapt.yaml) gives ``crops.global_crops_size``, ``local_crops_size`` and
``gram_teacher_crops_size`` as lists, entry i being one resolution, and ``global_local_crop_pairs_ratios`` their
probabilities. Its train.py builds one data loader per entry (masks on that entry's patch grid) and a
CombinedDataLoader in GLOBAL_HOMOGENEOUS mode picks, per iteration, which one gives the batch, from a NumPy generator
seeded alike on every rank: all ranks train on the same resolution in an iteration, a batch has one resolution.

Here the pick is the same (every rank, whole batch), but a function of (train.seed, iteration) instead of a
generator's state, so a resumed run draws what the uninterrupted one drew (the official stream restarts from its seed
on resume). One sampler serves all resolutions: the sample positions advance every iteration whatever its resolution
(officially each resolution's loader has its own stream, advanced only when picked). The model needs nothing: RoPE
coordinates are normalised to the patch grid (RoPE-box), so no embedding is interpolated for the new grids.
"""

from __future__ import annotations

import bisect
import random
from typing import NamedTuple


class Resolution(NamedTuple):
    global_size: int
    local_size: int
    gram_size: int | None
    probability: float


def crop_resolutions(cfg: dict) -> list[Resolution]:
    """The config's resolutions: one per entry of the crop-size lists (a number stands for every entry), with the
    normalised probabilities of crops.global_local_crop_pairs_ratios (null: all equal). One entry when no size is a
    list (pretraining)."""
    c = cfg["crops"]
    keys = ("global_crops_size", "local_crops_size", "gram_teacher_crops_size", "global_local_crop_pairs_ratios")
    n = max(len(c[k]) if isinstance(c[k], list) else 1 for k in keys)

    def entry(key, i):
        v = c[key]
        return v[i] if isinstance(v, list) else v

    ratios = [1.0 if entry("global_local_crop_pairs_ratios", i) is None
              else float(entry("global_local_crop_pairs_ratios", i)) for i in range(n)]
    total = sum(ratios) or 1.0
    grams = [entry("gram_teacher_crops_size", i) for i in range(n)]
    return [Resolution(int(entry("global_crops_size", i)), int(entry("local_crops_size", i)),
                       None if grams[i] is None else int(grams[i]), ratios[i] / total) for i in range(n)]


class ResolutionSchedule:
    """Iteration -> index of its resolution: a categorical draw with the resolutions' probabilities from a generator
    seeded by (seed, iteration) only, so every rank, any number of loader workers and a resumed run agree."""

    def __init__(self, probabilities: list[float], seed: int):
        self.seed = int(seed)
        self.n = len(probabilities)
        acc, self.cumulative = 0.0, []
        for p in probabilities:
            acc += p
            self.cumulative.append(acc)

    @classmethod
    def from_config(cls, cfg: dict) -> "ResolutionSchedule":
        return cls([r.probability for r in crop_resolutions(cfg)], int(cfg["train"]["seed"]))

    def __call__(self, iteration: int) -> int:
        if self.n == 1:
            return 0
        from .data import _mix

        u = random.Random(_mix(self.seed, 0x4E5, iteration)).random() * self.cumulative[-1]
        return min(bisect.bisect_right(self.cumulative, u), self.n - 1)
