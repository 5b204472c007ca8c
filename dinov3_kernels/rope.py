"""RoPE-box position embedding: axial 2D rotary frequencies over patch-centre coordinates.

Same constructor, buffer and outputs as the official DINOv3 ``RopePositionEmbedding``:
``forward(H=, W=)`` returns ``(sin, cos)``, each ``(H*W, head_dim)`` in the rotate-half layout
(angles for the y axis then the x axis, ``head_dim // 4`` frequencies each, the block tiled twice).

``tables(H=, W=, count=)`` returns the tied half tables ``(H*W, head_dim/2)`` (the two halves of ``forward``'s
tables are equal), optionally ``count`` of them with independent training augmentations drawn in one pass: what the
model computes once per forward instead of once per block, and what the attention kernels read.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["RopePositionEmbedding", "rope_periods", "rope_patch_coords"]

_NORMALIZE_MODES = ("min", "max", "separate")


def rope_periods(
    head_dim: int,
    *,
    base: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``head_dim // 4`` periods of the RoPE-box frequencies.

    ``base``: ``base ** (4 i / head_dim)``, i = 0 .. head_dim/4 - 1 (a geometric series starting at 1).
    ``min_period``/``max_period``: a geometric series from ``min_period`` to ``max_period`` inclusive.
    """
    n = head_dim // 4
    dd = {"dtype": dtype, "device": device}
    if base is not None:
        # The exponent is written 2 i / (head_dim / 2) to reproduce the official rounding exactly.
        return base ** (2 * torch.arange(n, **dd) / (head_dim // 2))
    ratio = max_period / min_period
    # ratio ** t / ratio * max_period keeps the official operation order (bit-identical periods).
    return ratio ** torch.linspace(0, 1, n, **dd) / ratio * max_period


def rope_patch_coords(
    H: int, W: int, normalize_coords: str, *, dtype: torch.dtype | None = None, device=None
) -> Tensor:
    """Patch-centre coordinates in [-1, 1], shape (H*W, 2), row-major, columns (y, x)."""
    dd = {"dtype": dtype, "device": device}
    if normalize_coords == "separate":
        denom_h, denom_w = H, W
    elif normalize_coords == "max":
        denom_h = denom_w = max(H, W)
    elif normalize_coords == "min":
        denom_h = denom_w = min(H, W)
    else:
        raise ValueError(f"normalize_coords must be one of {_NORMALIZE_MODES}, got {normalize_coords!r}")
    # Centre of patch i is (i + 1/2) / n in [0, 1], mapped to [-1, 1].
    ys = torch.arange(0.5, H, **dd) / denom_h
    xs = torch.arange(0.5, W, **dd) / denom_w
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(H * W, 2)
    return 2.0 * grid - 1.0


def _check_optional_positive(name: str, value, minimum: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number or None, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} (or None), got {value}")


class RopePositionEmbedding(nn.Module):
    """Axial 2D RoPE with no learnable weights (the official DINOv3 module, same state_dict).

    Exactly one parametrization: ``base`` alone, or ``base=None`` with both ``min_period`` and
    ``max_period``. In training mode the coordinates are augmented, in this order: a uniform
    per-axis shift in [-shift_coords, shift_coords], a log-uniform per-axis jitter factor in
    [1/jitter_coords, jitter_coords], and a log-uniform factor common to both axes in
    [1/rescale_coords, rescale_coords]. Eval mode is deterministic.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: Literal["min", "max", "separate"] = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not isinstance(embed_dim, int) or not isinstance(num_heads, int) or embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive ints, got {embed_dim!r}, {num_heads!r}")
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by 4 * num_heads ({4 * num_heads}): "
                "each head splits its dims over 2 axes x (sin, cos) halves"
            )
        both_periods = min_period is not None and max_period is not None
        one_period = (min_period is None) != (max_period is None)
        if one_period:
            raise ValueError("min_period and max_period must be given together")
        if (base is None) != both_periods:
            raise ValueError("Give either `base` or `min_period`+`max_period` (with base=None), not both or neither.")
        if base is not None:
            _check_optional_positive("base", base, 0.0)
            if base <= 0:
                raise ValueError(f"base must be > 0, got {base}")
        else:
            _check_optional_positive("min_period", min_period, 0.0)
            _check_optional_positive("max_period", max_period, 0.0)
            if not 0 < min_period <= max_period:
                raise ValueError(f"need 0 < min_period <= max_period, got {min_period}, {max_period}")
        if normalize_coords not in _NORMALIZE_MODES:
            raise ValueError(f"normalize_coords must be one of {_NORMALIZE_MODES}, got {normalize_coords!r}")
        _check_optional_positive("shift_coords", shift_coords, 0.0)
        # log-uniform in [1/j, j] needs j >= 1
        _check_optional_positive("jitter_coords", jitter_coords, 1.0)
        _check_optional_positive("rescale_coords", rescale_coords, 1.0)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")

        head_dim = embed_dim // num_heads
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.D_head = head_dim
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        # Compute dtype, kept apart from the buffer's dtype (a later model.to(dtype) must not change it).
        self.dtype = dtype
        # Persistent: checkpoints carry it, and the teacher is initialised from the student's state_dict.
        self.register_buffer("periods", torch.empty(head_dim // 4, dtype=dtype, device=device), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        periods = rope_periods(
            self.D_head,
            base=self.base,
            min_period=self.min_period,
            max_period=self.max_period,
            dtype=self.dtype,
            device=self.periods.device,
        )
        with torch.no_grad():
            self.periods.copy_(periods)

    # Name used by the official DinoVisionTransformer.init_weights.
    _init_weights = reset_parameters

    @property
    def augments(self) -> bool:
        """True when a training-mode call draws random coordinate augmentations (shift, jitter or rescale)."""
        return self.training and any(
            v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    @staticmethod
    def _check_hw(H, W) -> None:
        for name, v in (("H", H), ("W", W)):
            # SymInt: H and W read off a traced input (torch.export / ONNX with dynamic height and width).
            if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def tables(self, *, H: int, W: int, count: int | None = None) -> tuple[Tensor, Tensor]:
        """Tied half tables: ``(sin, cos)``, each ``(H*W, head_dim/2)``, equal to either half of ``forward``'s.

        ``count``: ``(count, H*W, head_dim/2)`` tables instead, computed in one pass; in training with augmentation
        each gets its own draw (what ``count`` successive ``forward`` calls give, one per block as official), drawn
        as all shifts, then all jitters, then all rescales; otherwise they are one table expanded (no copy). With
        ``count=None`` the draws and values are those of one ``forward`` call.
        """
        self._check_hw(H, W)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"count must be a positive int or None, got {count!r}")
        dd = {"dtype": self.dtype, "device": self.periods.device}
        coords = rope_patch_coords(H, W, self.normalize_coords, **dd)  # (HW, 2)
        n = 1 if count is None else count
        if self.augments:
            coords = self._augment(coords, n, dd)  # (n, HW, 2)
        # angle[p, a, f] = 2 pi coord[p, a] / period[f], layout (y freqs, x freqs): one half of forward's table.
        angles = (2 * math.pi * coords[..., None] / self.periods).flatten(-2, -1)  # ([n,] HW, head_dim/2)
        sin, cos = torch.sin(angles), torch.cos(angles)
        if count is None:
            return (sin[0], cos[0]) if sin.dim() == 3 else (sin, cos)
        if sin.dim() == 2:
            return sin.expand(count, *sin.shape), cos.expand(count, *cos.shape)
        return sin, cos

    def _augment(self, coords: Tensor, n: int, dd: dict) -> Tensor:
        """(HW, 2) coordinates -> (n, HW, 2) with n independent draws of shift, jitter and rescale (in that order)."""
        coords = coords.expand(n, *coords.shape)
        if self.shift_coords is not None:
            shift = torch.empty(n, 2, **dd).uniform_(-self.shift_coords, self.shift_coords)
            coords = coords + shift[:, None, :]
        if self.jitter_coords is not None:
            log_j = math.log(self.jitter_coords)
            coords = coords * torch.empty(n, 2, **dd).uniform_(-log_j, log_j).exp()[:, None, :]
        if self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            coords = coords * torch.empty(n, 1, **dd).uniform_(-log_r, log_r).exp()[:, None, :]
        return coords

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        """The official (sin, cos), each (H*W, head_dim): the half tables of ``tables`` side by side."""
        self._check_hw(H, W)
        dd = {"dtype": self.dtype, "device": self.periods.device}
        coords = rope_patch_coords(H, W, self.normalize_coords, **dd)  # (HW, 2)
        if self.training:
            if self.shift_coords is not None:
                shift = torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
                coords = coords + shift
            if self.jitter_coords is not None:
                log_j = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, **dd).uniform_(-log_j, log_j).exp()
            if self.rescale_coords is not None:
                log_r = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, **dd).uniform_(-log_r, log_r).exp()
        # angle[p, a, f] = 2 pi coord[p, a] / period[f]; layout (y freqs, x freqs) repeated for both halves.
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)  # (HW, head_dim)
        return torch.sin(angles), torch.cos(angles)

    def extra_repr(self) -> str:
        period = f"base={self.base}" if self.base is not None else f"periods=[{self.min_period}, {self.max_period}]"
        return (
            f"head_dim={self.D_head}, {period}, normalize_coords={self.normalize_coords!r}, "
            f"shift={self.shift_coords}, jitter={self.jitter_coords}, rescale={self.rescale_coords}, dtype={self.dtype}"
        )
