"""The DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> linear prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """``nlayers`` linear layers with GELU between them map (N, in_dim) to a ``bottleneck_dim`` code, which is
    L2-normalised and scored against ``out_dim`` prototypes (``last_layer``). With ``weight_norm=True`` the prototypes
    are weight-normalised as in DINOv2; DINOv3 uses a plain linear layer (the default).

    Linear weights start trunc-normal with ``init_std`` (official: 0.02). That keeps the signal only for wide layers
    (0.02**2 * 2048 ~ 0.8); narrow heads need a larger value or the code vanishes and Adam-driven biases take over."""

    def __init__(self, in_dim: int, out_dim: int, *, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, weight_norm: bool = False, mlp_bias: bool = True,
                 init_std: float = 0.02):
        super().__init__()
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.weight_norm = weight_norm
        self.init_std = init_std
        self.init_weights()
        if weight_norm:
            self.last_layer = nn.utils.parametrizations.weight_norm(self.last_layer)
            self.last_layer.parametrizations.weight.original0.data.fill_(1.0)

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck code z (N, bottleneck_dim): logits are z @ prototypes()ᵀ."""
        x = self.mlp(x)
        return F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)

    def prototypes(self) -> torch.Tensor:
        """The last layer's (out_dim, bottleneck_dim) weight (weight-normalised when weight_norm=True)."""
        return self.last_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))
