"""Data: a recursive image folder, a resumable sharded sampler, multi-crop geometry (PIL, in the loader workers),
per-batch iBOT masks (collate) and batched photometric augmentation on the training device.

Every random draw comes from a generator seeded by (seed, global sample position) or (seed, iteration, rank), so the
data stream depends only on the iteration: it is identical for any number of loader workers and an exact resume
needs nothing but the iteration counter.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinov3.images import IMAGE_EXTENSIONS, UnreadableImage, load_rgb  # 8-bit RGB of any image

from .masking import BlockMaskGenerator, mask_batch_fields, sample_masks



def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser), so nearby positions get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def find_images(root: str) -> list[str]:
    """Sorted paths of every file under ``root`` (recursively, following links) with an image extension."""
    if not os.path.isdir(root):
        raise ValueError(f"data directory {root!r} does not exist or is not a directory")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                paths.append(os.path.join(dirpath, name))
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
    return paths


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop: area fraction in ``scale``, log-uniform aspect ratio, 10 tries,
    then a centre crop with the aspect clamped to ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    # (H, W, 3) -> (3, H, W) in one numpy copy (a torch permute + contiguous after np.array took 2-3x longer).
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


# Fast decoding keeps every crop's source region at least this many times its output size (per side) before the
# final bicubic resample: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, "draft" mode) and larger factors
# are taken by PIL's box reduce (``reducing_gap``). Against decoding and resampling at full resolution, the crops
# of scikit-image's photos at ~1k and ~2k px differed by at most 0.49 grey levels on average (PSNR >= 49.7 dB;
# 0.26 and 53.9 dB with a gap of 3, which leaves 2k photos mostly undrafted); tests/train/test_data.py checks it.
REDUCING_GAP = 2.0


@dataclass
class CropSpec:
    global_size: int
    local_size: int
    n_local: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    gram_size: int | None = None
    horizontal_flips: bool = True
    # JPEG draft decoding and box reduction before large downscales (see REDUCING_GAP); False decodes every image
    # at full resolution and resamples from it (the loader before it had these).
    fast_decode: bool = True

    @classmethod
    def from_config(cls, cfg: dict, resolution: int = 0) -> "CropSpec":
        """The crops of one of the config's resolutions (dinov3/train/highres.py; pretraining has one)."""
        from .highres import crop_resolutions

        c, r = cfg["crops"], crop_resolutions(cfg)[resolution]
        return cls(r.global_size, r.local_size, int(c["local_crops_number"]), tuple(c["global_crops_scale"]),
                   tuple(c["local_crops_scale"]), r.gram_size, bool(c["horizontal_flips"]))


def crop_plan(width: int, height: int, spec: CropSpec, rng: random.Random, *, gram: bool = True) -> list[tuple]:
    """The geometry of one image's crops: ``(kind, (left, top, w, h), flip, size)`` for the 2 global crops (each
    followed by its Gram-teacher crop when ``gram`` and spec.gram_size: the same box at a higher resolution) and the
    local crops. The random draws do not depend on ``gram``, so the other crops are the same with or without it."""
    plan = []
    for _ in range(2):
        box = random_resized_crop_box(width, height, spec.global_scale, rng)
        flip = spec.horizontal_flips and rng.random() < 0.5
        plan.append(("global", box, flip, spec.global_size))
        if gram and spec.gram_size:
            plan.append(("gram", box, flip, spec.gram_size))
    for _ in range(spec.n_local):
        box = random_resized_crop_box(width, height, spec.local_scale, rng)
        flip = spec.horizontal_flips and rng.random() < 0.5
        plan.append(("local", box, flip, spec.local_size))
    return plan


def decode_size_needed(plan: list[tuple], width: int, height: int) -> tuple[int, int] | None:
    """The smallest decoded image size that keeps every crop's box at least REDUCING_GAP times its output size, or
    None when some crop is not downscaled that much (then the full resolution is needed)."""
    ratio = min(min(w, h) / size for _, (_, _, w, h), _, size in plan)  # source pixels per output pixel
    if ratio < 2 * REDUCING_GAP:  # not even a 1/2-scale decode would keep the margin
        return None
    return math.ceil(width * REDUCING_GAP / ratio), math.ceil(height * REDUCING_GAP / ratio)


def render_crops(img: Image.Image, plan: list[tuple], *, scale: int = 1,
                 fast: bool = True) -> dict[str, list[torch.Tensor]]:
    """Bicubic resized crops of ``img`` as uint8 (3, S, S), following ``plan`` (boxes in the coordinates of an image
    ``scale`` times larger than ``img``: the file's size when it was decoded at 1/scale)."""
    out = {"global": [], "local": [], "gram": []}
    for kind, (left, top, w, h), flip, size in plan:
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        if fast:
            crop = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=REDUCING_GAP)
        else:
            crop = img.resize((size, size), Image.BICUBIC, box=box)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[kind].append(_to_uint8_tensor(crop))
    return out


def multi_crop(img: Image.Image, spec: CropSpec, rng: random.Random, *,
               gram: bool = True) -> dict[str, list[torch.Tensor]]:
    """The geometric half of DINO multi-crop on a decoded image: random resized crops (bicubic) and flips, as uint8
    (3, S, S). ``gram=False`` leaves out the Gram-teacher crops (before the Gram phase)."""
    return render_crops(img, crop_plan(*img.size, spec, rng, gram=gram), fast=spec.fast_decode)


def load_multi_crop(path: str, spec: CropSpec, rng: random.Random, *,
                    gram: bool = True) -> dict[str, list[torch.Tensor]]:
    """:func:`multi_crop` of the image file at ``path``. With spec.fast_decode, a JPEG whose crops are all downscaled
    enough is decoded at a reduced scale (the crops' boxes are the same, in the file's coordinates)."""
    if not spec.fast_decode:
        return multi_crop(load_rgb(path), spec, rng, gram=gram)
    planned = {}

    def need(size):
        planned["size"] = size
        planned["plan"] = crop_plan(*size, spec, rng, gram=gram)
        return decode_size_needed(planned["plan"], *size)

    img = load_rgb(path, reduce_for=need)
    if "plan" not in planned:  # not a file whose decoding can be reduced: the plan is drawn on the image itself
        return render_crops(img, crop_plan(*img.size, spec, rng, gram=gram))
    (width, height), (w, h) = planned["size"], img.size
    scale = next((s for s in (1, 2, 4, 8) if (width + s - 1) // s == w and (height + s - 1) // s == h), None)
    if scale is None:
        raise RuntimeError(f"{path}: decoded at {w}x{h}, not a 1/2^k scale of {width}x{height}")
    return render_crops(img, planned["plan"], scale=scale)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every image under a folder, no labels. Items are addressed by ``(index, seed, gram)`` (``gram``: build the
    Gram-teacher crops too; ``(index, seed)`` builds them) or ``(index, seed, gram, resolution)`` (the crops of
    ``specs[resolution]``); a file that cannot be decoded is replaced by the next readable one and ``(path, reason)``
    is returned in ``skipped`` (so batches keep their size)."""

    def __init__(self, root: str, spec: CropSpec, specs: list[CropSpec] | None = None):
        self.root = root
        self.paths = find_images(root)
        self.spec = spec
        self.specs = list(specs) if specs else [spec]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple) -> dict:
        index, seed, *rest = item
        gram = bool(rest[0]) if rest else True
        spec = self.specs[rest[1]] if len(rest) > 1 else self.spec
        skipped = []
        for attempt in range(len(self.paths)):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                crops = load_multi_crop(path, spec, random.Random(seed), gram=gram)
            except UnreadableImage as exc:
                skipped.append((path, exc.reason))
                continue
            return {"crops": crops, "skipped": skipped}
        raise RuntimeError(f"none of the {len(self.paths)} image files under {self.root!r} could be decoded")


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Infinite stream of per-rank batches of ``(index, seed, gram)``. Global sample position
    ``p = (iteration * world + rank) * batch + slot`` walks through one seeded permutation per epoch, so starting at
    any iteration reproduces the uninterrupted stream exactly. ``gram`` is true from iteration ``gram_from`` on (never
    when it is None): the Gram-teacher crops are built only for the Gram phase. With ``resolution_of`` (iteration ->
    resolution index, the same on every rank: highres.ResolutionSchedule) the items carry the iteration's resolution
    as a fourth field."""

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0, end_iter: int | None = None, gram_from: int | None = None,
                 resolution_of=None):
        if n < 1 or batch_size < 1:
            raise ValueError("sampler needs a non-empty dataset and batch_size >= 1")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_iter, self.end_iter = start_iter, end_iter
        self.gram_from = gram_from
        self.resolution_of = resolution_of
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, 0xE90C, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[offset]

    def batch(self, it: int) -> list[tuple[int, int]]:
        base = (it * self.world_size + self.rank) * self.batch_size
        gram = self.gram_from is not None and it >= self.gram_from
        extra = () if self.resolution_of is None else (self.resolution_of(it),)
        return [(self._index(base + k), _mix(self.seed, 0x5A11, base + k), gram, *extra)
                for k in range(self.batch_size)]

    def __iter__(self):
        it = self.start_iter
        while self.end_iter is None or it < self.end_iter:
            yield self.batch(it)
            it += 1

    def __len__(self) -> int:
        if self.end_iter is None:
            raise TypeError("infinite sampler has no length")
        return max(0, self.end_iter - self.start_iter)


class MultiCropCollate:
    """Stacks crops crop-major ((n_crops * B, 3, S, S), as official) and draws the iBOT masks for the global crops.
    With ``patch_size`` the masks are drawn on the patch grid of each batch's global crops (several resolutions:
    officially each resolution's loader has its own mask generator for its grid); else on ``grid``."""

    def __init__(self, *, n_tokens: int, grid: tuple[int, int], ratio_min_max, probability: float, seed: int,
                 patch_size: int | None = None):
        self.n_tokens, self.ratio, self.probability = n_tokens, tuple(ratio_min_max), float(probability)
        self.patch_size = patch_size
        self.generators: dict[tuple[int, int], BlockMaskGenerator] = {}
        self.generator = self._generator(grid)
        self.seed = seed

    def _generator(self, grid: tuple[int, int]) -> BlockMaskGenerator:
        if grid not in self.generators:
            # At most half the grid per rectangle, as the official trainer configures its generator.
            self.generators[grid] = BlockMaskGenerator(grid, max_num_patches=0.5 * grid[0] * grid[1])
        return self.generators[grid]

    def __call__(self, samples: list[dict]) -> dict:
        # The mask RNG is keyed on the first sample's seed, which the sampler derives from the (iteration, rank)
        # position of the batch.
        key = samples[0].get("_seed", 0)
        n_global = len(samples[0]["crops"]["global"])
        batch = {
            "global_crops": torch.stack([s["crops"]["global"][i] for i in range(n_global) for s in samples]),
            "local_crops": torch.stack([s["crops"]["local"][i] for i in range(len(samples[0]["crops"]["local"]))
                                        for s in samples]),
            "skipped": [p for s in samples for p in s["skipped"]],
        }
        if samples[0]["crops"]["gram"]:
            batch["gram_crops"] = torch.stack([s["crops"]["gram"][i] for i in range(n_global) for s in samples])
        rng = random.Random(_mix(self.seed, 0x3A5C, key))
        n_tokens, generator = self.n_tokens, self.generator
        if self.patch_size is not None:
            side = batch["global_crops"].shape[-2:]
            grid = (side[0] // self.patch_size, side[1] // self.patch_size)
            n_tokens, generator = grid[0] * grid[1], self._generator(grid)
        masks = sample_masks(len(batch["global_crops"]), n_tokens, generator, ratio_min_max=self.ratio,
                             probability=self.probability, rng=rng)
        batch.update(mask_batch_fields(masks))
        return batch


class _SeedTaggingDataset(torch.utils.data.Dataset):
    """Forwards to the folder dataset and keeps the sample seed (the collate keys its mask RNG on it)."""

    def __init__(self, dataset: ImageFolderDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        out = self.dataset[item]
        out["_seed"] = item[1]
        return out


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the trainer finishes its step and checkpoints, so the loader workers
    # must not die under it (they end with the trainer).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(cfg: dict, *, root: str, rank: int, world_size: int, start_iter: int, end_iter: int,
                 pin_memory: bool = False):
    from .highres import ResolutionSchedule, crop_resolutions

    specs = [CropSpec.from_config(cfg, i) for i in range(len(crop_resolutions(cfg)))]
    spec = specs[0]
    dataset = ImageFolderDataset(root, spec, specs)
    seed = int(cfg["train"]["seed"])
    g = cfg["gram"]
    several = len(specs) > 1  # mixed resolutions (high-resolution adaptation): one per iteration, same on all ranks
    sampler = ResumableBatchSampler(len(dataset), int(cfg["train"]["batch_size_per_gpu"]), seed=seed, rank=rank,
                                    world_size=world_size, start_iter=start_iter, end_iter=end_iter,
                                    gram_from=int(g["start_iter"]) if g["use_loss"] else None,
                                    resolution_of=ResolutionSchedule.from_config(cfg) if several else None)
    patch = int(cfg["student"]["patch_size"])
    grid = spec.global_size // patch
    collate = MultiCropCollate(n_tokens=grid * grid, grid=(grid, grid), ratio_min_max=cfg["ibot"]["mask_ratio_min_max"],
                               probability=cfg["ibot"]["mask_sample_probability"], seed=seed,
                               patch_size=patch if several else None)
    workers = int(cfg["train"]["num_workers"])
    loader = torch.utils.data.DataLoader(_SeedTaggingDataset(dataset), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=workers, pin_memory=pin_memory,
                                         # Own generator: creating the iterator must not draw from the global RNG.
                                         generator=torch.Generator().manual_seed(seed),
                                         persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                                         worker_init_fn=_ignore_sigint if workers > 0 else None)
    return dataset, loader


# ----------------------------------------------------------------------------------------------------------------
# Photometric augmentation, batched on the training device. The distributions of the official DataAugmentationDINO,
# each configurable (crops.*): ColorJitter(brightness, contrast, saturation, hue) with probability 0.8 in a random
# order per image, RandomGrayscale 0.2, GaussianBlur kernel 9 with sigma ~ U(0.1, 2) with probability 0 on global
# crop 1, 0.9 on global crop 2 and 0.5 on local crops (the effective official values, see crops.blur_probabilities),
# RandomSolarize(128) 0.2 on global crop 2; then normalisation with crops.rgb_mean/rgb_std.
# ----------------------------------------------------------------------------------------------------------------

_GRAY = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0:1] * _GRAY[0] + x[:, 1:2] * _GRAY[1] + x[:, 2:3] * _GRAY[2])


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f.view(-1, 1, 1, 1) * a + (1 - f.view(-1, 1, 1, 1)) * b).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    from kornia.color import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(x)  # hue in [0, 2*pi)
    h = torch.remainder(hsv[:, 0:1] + shift.view(-1, 1, 1, 1) * 2 * math.pi, 2 * math.pi)
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1)).clamp_(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    k = min(kernel_size, (min(x.shape[-2:]) - 1) // 2 * 2 + 1)  # reflect padding needs k // 2 < side
    if k < 3:
        return x
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    w = torch.exp(-(r.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    w = w / w.sum(-1, keepdim=True)  # (N, k) separable kernel, one per image
    n, c, hh, ww = x.shape
    y = F.pad(x.reshape(1, n * c, hh, ww), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    wk = w.repeat_interleave(c, 0)
    y = F.conv2d(y, wk.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, wk.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, hh, ww)


@dataclass(frozen=True)
class Photometric:
    """The photometric augmentation's settings (crops.* keys); the defaults are the official ones."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: tuple[float, float, float] = (0.0, 0.9, 0.5)  # global crop 1, global crop 2, local crops
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2  # global crop 2

    @classmethod
    def from_config(cls, cfg: dict) -> "Photometric":
        c = cfg["crops"]
        return cls(float(c["color_jitter_probability"]), float(c["color_jitter_brightness"]),
                   float(c["color_jitter_contrast"]), float(c["color_jitter_saturation"]),
                   float(c["color_jitter_hue"]), float(c["grayscale_probability"]),
                   tuple(float(v) for v in c["blur_probabilities"]), tuple(float(v) for v in c["blur_sigma"]),
                   float(c["solarize_probability"]))


def sample_photometric_params(n: int, *, blur_p: float, solarize_p: float, generator: torch.Generator,
                              device, settings: Photometric = Photometric()) -> dict[str, torch.Tensor]:
    """Per-image draws for :func:`apply_photometric`; the draw order is fixed, so the stream does not depend on the
    settings' values."""
    s = settings

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator, device=device)

    return {
        "jitter": torch.rand(n, generator=generator, device=device) < s.jitter_p,
        "order": torch.argsort(torch.rand(n, 4, generator=generator, device=device), dim=1),
        "brightness": u(max(0.0, 1 - s.brightness), 1 + s.brightness),
        "contrast": u(max(0.0, 1 - s.contrast), 1 + s.contrast),
        "saturation": u(max(0.0, 1 - s.saturation), 1 + s.saturation),
        "hue": u(-s.hue, s.hue),
        "gray": torch.rand(n, generator=generator, device=device) < s.gray_p,
        "blur": torch.rand(n, generator=generator, device=device) < blur_p, "sigma": u(*s.blur_sigma),
        "solarize": torch.rand(n, generator=generator, device=device) < solarize_p,
    }


def apply_photometric(x: torch.Tensor, p: dict[str, torch.Tensor], *, sigma_scale: float = 1.0) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1] -> distorted floats in [0, 1]; ``p`` from ``sample_photometric_params``."""
    x = x.clone()
    ops = [
        lambda t, i: t * p["brightness"][i].view(-1, 1, 1, 1),
        lambda t, i: _blend(t, _gray(t).mean((1, 2, 3), keepdim=True), p["contrast"][i]),
        lambda t, i: _blend(t, _gray(t), p["saturation"][i]),
        lambda t, i: _adjust_hue(t, p["hue"][i]),
    ]
    for stage in range(4):
        for op_id, op in enumerate(ops):
            idx = (p["jitter"] & (p["order"][:, stage] == op_id)).nonzero().flatten()
            if idx.numel():
                x[idx] = op(x[idx], idx).clamp(0, 1)
    idx = p["gray"].nonzero().flatten()
    if idx.numel():
        x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
    idx = p["blur"].nonzero().flatten()
    if idx.numel():
        x[idx] = _gaussian_blur(x[idx], p["sigma"][idx] * sigma_scale)
    idx = p["solarize"].nonzero().flatten()
    if idx.numel():
        t = x[idx]
        x[idx] = torch.where(t >= 128 / 255, 1 - t, t)
    return x


class BatchAugment:
    """Turns a collated uint8 batch into normalised float crops on ``device`` (photometric part of DINO multi-crop)."""

    def __init__(self, cfg: dict, device: torch.device):
        c = cfg["crops"]
        self.device = torch.device(device)
        self.mean = torch.tensor(c["rgb_mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(c["rgb_std"], device=self.device).view(1, 3, 1, 1)
        self.gram_no_distortions = bool(c["gram_teacher_no_distortions"])
        self.seed = int(cfg["train"]["seed"])
        self.settings = Photometric.from_config(cfg)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __call__(self, batch: dict, *, iteration: int, rank: int) -> dict:
        g = torch.Generator(device=self.device).manual_seed(_mix(self.seed, 0xA06, iteration, rank))
        out = dict(batch)
        gl = batch["global_crops"].to(self.device, non_blocking=True).float().div_(255)
        lo = batch["local_crops"].to(self.device, non_blocking=True).float().div_(255)
        B = gl.shape[0] // 2
        st = self.settings
        p1 = sample_photometric_params(B, blur_p=st.blur_p[0], solarize_p=0.0, generator=g, device=self.device,
                                       settings=st)
        p2 = sample_photometric_params(B, blur_p=st.blur_p[1], solarize_p=st.solarize_p, generator=g,
                                       device=self.device, settings=st)
        pl = sample_photometric_params(lo.shape[0], blur_p=st.blur_p[2], solarize_p=0.0, generator=g,
                                       device=self.device, settings=st)
        out["global_crops"] = self._norm(torch.cat([apply_photometric(gl[:B], p1), apply_photometric(gl[B:], p2)]))
        out["local_crops"] = self._norm(apply_photometric(lo, pl))
        if "gram_crops" in batch:
            gr = batch["gram_crops"].to(self.device, non_blocking=True).float().div_(255)
            if not self.gram_no_distortions:
                # Same distortion as the matching global crop; blur radius scaled to the higher resolution.
                s = gr.shape[-1] / gl.shape[-1]
                gr = torch.cat([apply_photometric(gr[:B], p1, sigma_scale=s), apply_photometric(gr[B:], p2, sigma_scale=s)])
            out["gram_crops"] = self._norm(gr)
        for key in ("masks", "mask_indices", "masks_weight", "n_masked_patches"):
            out[key] = batch[key].to(self.device, non_blocking=True)
        return out
