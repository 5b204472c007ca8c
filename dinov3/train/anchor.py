"""Anchoring a continued run to the weights it started from (``train.pretrained_anchor``; L2-SP, Li et al. 2018,
"Explicit inductive bias for transfer learning with convolutional networks").

After every optimizer step each backbone parameter is pulled toward its value at iteration 0 (the pretrained
weights): ``p <- p - lr * strength * (p - p0)``, with the parameter group's lr (layer-wise decay, warm-up factor
included), so the pull scales with the step like AdamW's decoupled weight decay does, which pulls toward 0. An Adam
step moves a parameter by about lr per iteration, so the distance from p0 settles near 1 / strength: the backbone
may move that far, whatever the length of the run.
"""

from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class PretrainedAnchor:
    """Pulls ``backbone``'s parameters toward ``reference``'s (a module of the same architecture holding the starting
    weights) after each optimizer step."""

    def __init__(self, backbone: nn.Module, reference: nn.Module, strength: float):
        if strength <= 0:
            raise ValueError(f"anchor strength must be > 0, got {strength}")
        self.strength = float(strength)
        ref = dict(reference.named_parameters())
        self.pairs = {id(p): (p, ref[name]) for name, p in backbone.named_parameters()}

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            rate = group["lr"] * self.strength
            if rate == 0:
                continue
            params, refs = [], []
            for p in group["params"]:
                pair = self.pairs.get(id(p))
                if pair is not None:
                    params.append(_local(p))
                    refs.append(_local(pair[1]))
            if params:
                # p <- p + rate * (p0 - p), i.e. (1 - rate) * p + rate * p0
                torch._foreach_lerp_(params, refs, min(rate, 1.0))
