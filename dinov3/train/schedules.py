"""Per-iteration schedules (lr, weight decay, EMA momentum, teacher temperature, loss weights)."""

from __future__ import annotations

import math


class Schedule:
    """Linear warm-up ``start -> peak`` over ``warmup_iters``, then ``peak`` (constant) or a cosine ``peak -> end``
    ending at ``total_iters`` (or lasting ``cosine_iters``); past the end the value stays at ``end``. Evaluated on the fly, so it has no state."""

    def __init__(self, *, start: float, peak: float, end: float, warmup_iters: int, total_iters: int,
                 kind: str = "constant", offset: int = 0, cosine_iters: int | None = None):
        if kind not in ("constant", "cosine"):
            raise ValueError(f"schedule kind must be 'constant' or 'cosine', got {kind!r}")
        if warmup_iters < 0 or total_iters < 0:
            raise ValueError("schedule lengths must be non-negative")
        self.start, self.peak, self.end = float(start), float(peak), float(end)
        self.warmup_iters, self.total_iters, self.kind, self.offset = int(warmup_iters), int(total_iters), kind, offset
        # A cosine may last cosine_iters and then hold ``end`` (DINOv3's loss-weight ramps do this).
        self.cosine_iters = None if cosine_iters is None else int(cosine_iters)

    @classmethod
    def from_config(cls, sch: dict, total_iters: int, offset: int = 0) -> "Schedule":
        return cls(start=sch.get("start", sch["peak"]), peak=sch["peak"], end=sch.get("end", sch["peak"]),
                   warmup_iters=int(sch.get("warmup_iters", 0)), total_iters=total_iters,
                   kind=sch.get("kind", "constant"), offset=offset, cosine_iters=sch.get("cosine_iters"))

    def __call__(self, it: int) -> float:
        it = it - self.offset
        if it < 0:
            return self.start
        if it < self.warmup_iters:
            return self.start + (self.peak - self.start) * it / self.warmup_iters
        if self.kind == "constant":
            return self.peak
        n = self.total_iters - self.warmup_iters if self.cosine_iters is None else self.cosine_iters
        if n <= 0 or it >= self.warmup_iters + n:
            return self.end
        t = (it - self.warmup_iters) / n
        return self.end + 0.5 * (self.peak - self.end) * (1.0 + math.cos(math.pi * t))
