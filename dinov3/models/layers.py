"""Building blocks of the DINOv3 ViT, with the official parameter and buffer names."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# "math": the reference path with softmax(q k^T / sqrt(d)) v written out as matmuls (no SDPA), for export to runtimes
# that have no fused attention op (ONNX).
ATTN_BACKENDS = ("auto", "reference", "fused", "math")

# (sin, cos) of one crop: (H·W, head_dim) tables, or the tied (H·W, head_dim/2) halves the model computes.
Rope = tuple[Tensor, Tensor]


def flat_apply(fn: Callable[[Tensor], Tensor], xs: Sequence[Tensor]) -> list[Tensor]:
    """Apply a token-wise ``fn`` to several (B_i, N_i, C) tensors in one call on their concatenated tokens."""
    if len(xs) == 1:
        return [fn(xs[0])]
    shapes = [x.shape[:-1] for x in xs]
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], dim=0)
    out = fn(flat)
    sizes = [math.prod(s) for s in shapes]
    return [o.reshape(*s, o.shape[-1]) for o, s in zip(out.split(sizes, dim=0), shapes)]


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, H/p, W/p, D) by a strided convolution (kept unflattened, as official)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, device=None) -> None:
        super().__init__()
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        p = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.img_size = img_hw
        self.patch_size = p
        self.patches_resolution = (img_hw[0] // p[0], img_hw[1] // p[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, device=device)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {c} (input shape {tuple(x.shape)})")
        ph, pw = self.patch_size
        if h % ph or w % pw or h == 0 or w == 0:
            raise ValueError(
                f"image size {h}x{w} is not a positive multiple of the patch size {ph}x{pw}; "
                f"resize or crop it (e.g. to {max(ph, h // ph * ph)}x{max(pw, w // pw * pw)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got {x.dtype}")
        return self.proj(x).permute(0, 2, 3, 1)  # (B, h, w, D)

    def reset_parameters(self) -> None:
        # Uniform(+-1/sqrt(fan_in)) with fan_in computed from the patch height only, as official.
        bound = 1 / math.sqrt(self.in_chans * self.patch_size[0] ** 2)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        if self.proj.bias is not None:
            nn.init.uniform_(self.proj.bias, -bound, bound)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5, device=None) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) computed in fp32, then scaled by ``weight`` (official rms_norm.py)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """w3(silu(w1 x) * w2 x); hidden width int(2/3 * hidden_features) rounded up to ``align_to``."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, align_to: int = 8,
                 device=None) -> None:
        super().__init__()
        d = int(hidden_features * 2 / 3)
        hidden = d + (-d % align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w3 = nn.Linear(hidden, in_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


FFN_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def make_ffn(kind: str, dim: int, hidden: int, bias: bool, device=None) -> nn.Module:
    if kind == "mlp":
        return Mlp(dim, hidden, bias=bias, device=device)
    if kind in FFN_ALIGN:
        return SwiGLUFFN(dim, hidden, bias=bias, align_to=FFN_ALIGN[kind], device=device)
    raise ValueError(f"ffn_layer must be one of {['mlp', *FFN_ALIGN]}, got {kind!r}")


def make_norm(kind: str, dim: int, device=None) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6, device=device)
    if kind == "layernormbf16":
        return nn.LayerNorm(dim, eps=1e-5, device=device)
    if kind == "rmsnorm":
        return RMSNorm(dim, device=device)
    raise ValueError(f"norm_layer must be one of ['layernorm', 'layernormbf16', 'rmsnorm'], got {kind!r}")


class LinearKMaskedBias(nn.Linear):
    """qkv projection whose key bias is multiplied by the ``bias_mask`` buffer (zero on the k third).

    The mask is a persistent buffer because released checkpoints contain it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device)
        if out_features % 3:
            raise ValueError("LinearKMaskedBias needs out_features divisible by 3")
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.empty_like(self.bias))
            self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        if self.bias is not None:
            o = self.out_features
            with torch.no_grad():
                self.bias_mask.fill_(1)
                self.bias_mask[o // 3: 2 * o // 3].fill_(0)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


def rope_rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] along the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_eager(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate the last sin.shape[-2] tokens of q, k (B, h, N, d); earlier (prefix) tokens pass unchanged.

    Computed in sin's dtype and cast back, as official (the released models use fp32 RoPE). sin/cos: (H·W, d) or
    the tied half tables (H·W, d/2) the model passes, expanded here to the official full tables (same values).
    """
    if sin.shape[-1] * 2 == q.shape[-1]:
        sin, cos = torch.cat((sin, sin), dim=-1), torch.cat((cos, cos), dim=-1)
    n_patch = sin.shape[-2]
    prefix = q.shape[-2] - n_patch
    if prefix < 0:
        raise ValueError(f"RoPE has {n_patch} positions but the sequence has only {q.shape[-2]} tokens")
    out = []
    for t in (q, k):
        tr = t.to(sin.dtype)
        patches = tr[:, :, prefix:]
        rotated = patches * cos + rope_rotate_half(patches) * sin
        out.append(torch.cat((tr[:, :, :prefix], rotated), dim=-2).to(t.dtype))
    return out[0], out[1]


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v for (B, h, N, d) inputs, with the softmax in fp32.

    q is scaled before the product so that fp16 logits stay in range; fp32 softmax keeps fp16 exports finite.
    """
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, h, N, N)
    return logits.float().softmax(dim=-1).to(v.dtype) @ v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 mask_k_bias: bool = False, attn_backend: str = "auto", device=None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_backend = attn_backend
        linear_cls = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear_cls(dim, 3 * dim, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def _use_fused(self, qkv: Tensor, rope: Rope | None) -> bool:
        if rope is None or self.attn_backend in ("reference", "math"):
            return False
        if self.attn_backend == "fused":
            return True
        return qkv.is_cuda and _rope_attention_available()

    def compute_attention(self, qkv: Tensor, rope: Rope | None) -> Tensor:
        """Packed qkv (B, N, 3C) -> attention output (B, N, C) before the output projection."""
        B, N, three_c = qkv.shape
        C = three_c // 3
        if self._use_fused(qkv, rope):
            from dinov3_kernels import rope_attention  # lazy: only the fused path needs the kernels

            sin, cos = rope
            return rope_attention(qkv, sin, cos, num_heads=self.num_heads, num_prefix_tokens=N - sin.shape[-2])
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope_eager(q, k, rope[0], rope[1])
        if self.attn_backend == "math":
            out = softmax_attention(q, k, v, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return out.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: Tensor, rope: Rope | None = None) -> Tensor:
        return self.forward_list([x], [rope])[0]

    def forward_list(self, xs: Sequence[Tensor], ropes: Sequence[Rope | None]) -> list[Tensor]:
        qkvs = flat_apply(self.qkv, xs)
        outs = [self.compute_attention(qkv, rope) for qkv, rope in zip(qkvs, ropes)]
        return flat_apply(self.proj, outs)


_ROPE_ATTENTION_OK: bool | None = None


def _rope_attention_available() -> bool:
    global _ROPE_ATTENTION_OK
    if _ROPE_ATTENTION_OK is None:
        try:
            from dinov3_kernels import rope_attention  # noqa: F401

            _ROPE_ATTENTION_OK = True
        except ImportError:
            _ROPE_ATTENTION_OK = False
    return _ROPE_ATTENTION_OK


class SelfAttentionBlock(nn.Module):
    """Pre-norm block x + ls1(attn(norm1 x)), then + ls2(ffn(norm2 x)).

    Stochastic depth as official: in training, each residual branch runs on a random subset of
    max(int(B (1 - p)), 1) samples and is added back scaled by B / subset_size.
    """

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float | None = None,
                 drop_path: float = 0.0, norm_layer: str = "layernorm", ffn_layer: str = "mlp",
                 mask_k_bias: bool = False, attn_backend: str = "auto", device=None) -> None:
        super().__init__()
        self.norm1 = make_norm(norm_layer, dim, device=device)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias,
                                  attn_backend=attn_backend, device=device)
        self.ls1 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.norm2 = make_norm(norm_layer, dim, device=device)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * ffn_ratio), bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path}")
        self.sample_drop_ratio = drop_path

    def forward(self, x: Tensor | list[Tensor], rope: Rope | None | list[Rope | None] = None):
        if isinstance(x, Tensor):
            return self._forward_list([x], [rope])[0]
        ropes = rope if rope is not None else [None] * len(x)
        return self._forward_list(list(x), list(ropes))

    def _forward_list(self, xs: list[Tensor], ropes: list[Rope | None]) -> list[Tensor]:
        if self.training and self.sample_drop_ratio > 0.0:
            xs = self._residual_subset(xs, lambda ys: self.attn.forward_list(flat_apply(self.norm1, ys), ropes),
                                       self.ls1)
            return self._residual_subset(xs, lambda ys: flat_apply(lambda t: self.mlp(self.norm2(t)), ys), self.ls2)
        attn = self.attn.forward_list(flat_apply(self.norm1, xs), ropes)
        xs = [x + self.ls1(a) for x, a in zip(xs, attn)]
        ffn = flat_apply(lambda t: self.mlp(self.norm2(t)), xs)
        return [x + self.ls2(f) for x, f in zip(xs, ffn)]

    def _residual_subset(self, xs: list[Tensor], branch, ls: nn.Module) -> list[Tensor]:
        subsets = []
        for x in xs:
            b = x.shape[0]
            keep = max(int(b * (1 - self.sample_drop_ratio)), 1)
            subsets.append((torch.randperm(b, device=x.device)[:keep], b / keep))
        residuals = branch([x[idx] for x, (idx, _) in zip(xs, subsets)])
        return [
            torch.index_add(x, 0, idx, ls(r).to(x.dtype), alpha=scale)
            for x, r, (idx, scale) in zip(xs, residuals, subsets)
        ]
