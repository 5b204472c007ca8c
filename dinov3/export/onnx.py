"""ONNX export of a DINOv3 backbone, and its check with onnxruntime against PyTorch.

The graph: one input ``pixel_values`` (B, 3, H, W) with dynamic batch, height and width (multiples of the patch size
p); outputs ``cls_token`` (B, C), ``patch_tokens`` (B, H/p * W/p, C) and, for models with storage tokens,
``register_tokens`` (B, R, C), all after the final norm (``forward_features``' ``x_norm_*``). No mask input. RoPE sin/cos
are computed inside the graph from the runtime H and W (Range, Sin, Cos), so any resolution works; attention is
MatMul + Softmax (no SDPA, no custom op). Exported with the dynamo exporter (``torch.export`` with dynamic dimensions,
H and W declared as p times a free integer) at opset ``OPSET``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["OPSET", "OnnxBackbone", "export_onnx", "check_onnx", "OnnxCheck", "output_names"]

# Opset 18: LayerNormalization is native (17+), and onnxruntime and TensorRT 10 run it.
OPSET = 18
# Per-token cosine similarity that an fp32 graph must reach against PyTorch (fp16: see FP16_MIN_COSINE).
FP32_MIN_COSINE = 0.9999
FP16_MIN_COSINE = 0.99


def output_names(model) -> list[str]:
    return ["cls_token", "patch_tokens"] + (["register_tokens"] if model.n_storage_tokens > 0 else [])


class OnnxBackbone(nn.Module):
    """What the graph computes: ``pixel_values`` -> (cls_token, patch_tokens[, register_tokens])."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        out = self.backbone.forward_features(pixel_values)
        tokens = (out["x_norm_clstoken"], out["x_norm_patchtokens"])
        return tokens + ((out["x_storage_tokens"],) if self.backbone.n_storage_tokens > 0 else ())


@contextlib.contextmanager
def _traceable(model: nn.Module):
    """Eval mode (no RoPE augmentation, no stochastic depth), attention as MatMul + Softmax, and RoPE tables in fp32
    when the model computes them in bf16 (ONNX Sin/Cos have no bf16 version); restored on exit."""
    training = model.training
    backends = [blk.attn.attn_backend for blk in model.blocks]
    rope = model.rope_embed
    rope_dtype, periods = rope.dtype, rope.periods
    model.eval()
    for blk in model.blocks:
        blk.attn.attn_backend = "math"
    if rope_dtype == torch.bfloat16:
        rope.dtype, rope.periods = torch.float32, periods.float()
    try:
        yield model
    finally:
        for blk, backend in zip(model.blocks, backends):
            blk.attn.attn_backend = backend
        rope.dtype, rope.periods = rope_dtype, periods
        model.train(training)


# Says, once per process, that torchvision's operators have no ONNX translation: irrelevant here.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def _quiet(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _half_copy(model: nn.Module) -> nn.Module:
    """An fp16 copy whose RoPE periods stay in their own dtype (``.half()`` would round them; the RoPE tables are
    computed in the model's RoPE dtype, fp32 for the released models, and cast to fp16 after the rotation)."""
    periods = model.rope_embed.periods.detach().clone()
    half = copy.deepcopy(model).half()
    half.rope_embed.periods = periods
    return half


def export_onnx(model: nn.Module, path: str | os.PathLike, *, fp16: bool = False, opset: int = OPSET) -> list[str]:
    """Write ``model`` as an ONNX graph at ``path`` (weights over 2 GB go to an external data file beside it).

    ``fp16``: input, weights and outputs in float16 (softmax and RoPE stay in fp32 inside the graph). The model is not
    changed. Returns the output names.
    """
    if fp16:
        model = _half_copy(model)
    dtype = torch.float16 if fp16 else torch.float32
    p = model.patch_size
    # Non-square example, batch 2: no dimension is specialised to a constant or to another one.
    example = torch.zeros(2, model.patch_embed.in_chans, 4 * p, 6 * p, dtype=dtype)
    batch = torch.export.Dim("batch", min=1)
    patches_h = torch.export.Dim("patches_h", min=1)
    patches_w = torch.export.Dim("patches_w", min=1)
    names = output_names(model)
    with _traceable(model), torch.no_grad(), warnings.catch_warnings(), _quiet(_REGISTRATION_LOGGER):
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # inside torch.export
        program = torch.onnx.export(
            OnnxBackbone(model).eval(),
            (example,),
            input_names=["pixel_values"],
            output_names=names,
            dynamic_shapes={"pixel_values": {0: batch, 2: p * patches_h, 3: p * patches_w}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(os.fspath(path))
    return names


@dataclass
class OnnxCheck:
    """onnxruntime against PyTorch at one input shape."""

    height: int
    width: int
    batch: int
    min_cosine: float  # the smallest cosine similarity over every output token of every image
    max_abs_err: float
    finite: bool


def check_onnx(path: str | os.PathLike, model: nn.Module, sizes: list[tuple[int, int]], batches=(1, 3),
               seed: int = 0) -> list[OnnxCheck]:
    """Run the graph at ``path`` with onnxruntime (CPU) on random inputs of each (H, W) in ``sizes`` and each batch
    size, and compare every output token with ``model.forward_features`` (an fp32 model, on its own attention path).

    ValueError for a size that is not a positive multiple of the patch size.
    """
    import numpy as np
    import onnxruntime as ort

    p = model.patch_size
    bad = [f"{h}x{w}" for h, w in sizes if h <= 0 or w <= 0 or h % p or w % p]
    if bad:
        raise ValueError(f"check size(s) {', '.join(bad)} are not positive multiples of the patch size {p}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about unused initialisers
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    np_dtype = np.float16 if graph_input.type == "tensor(float16)" else np.float32
    names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    training = model.training
    model.eval()
    try:
        for h, w in sizes:
            for b in batches:
                x = torch.randn(b, model.patch_embed.in_chans, h, w, generator=generator)
                got = dict(zip(names, session.run(None, {graph_input.name: x.numpy().astype(np_dtype)})))
                with torch.no_grad():
                    ref = model.forward_features(x)
                rows.append(_compare(h, w, b, got, ref))
    finally:
        model.train(training)
    return rows


def _compare(h: int, w: int, b: int, got: dict, ref: dict) -> OnnxCheck:
    """Per-token cosine similarity and largest absolute difference of the graph's outputs ``got`` (numpy, by output
    name) against ``forward_features``' ``ref``."""
    expected = {"cls_token": ref["x_norm_clstoken"], "patch_tokens": ref["x_norm_patchtokens"],
                "register_tokens": ref["x_storage_tokens"]}
    cosines, errors, finite = [], [], True
    for name, value in got.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"ONNX output {name} at {b}x{h}x{w} has shape {tuple(value.shape)}, PyTorch "
                             f"{tuple(expected[name].shape)}")
        e = expected[name].reshape(b, -1, expected[name].shape[-1])  # (B, tokens, C)
        g = torch.from_numpy(value).float().reshape(e.shape)
        finite &= bool(torch.isfinite(g).all())
        cosines.append(torch.nn.functional.cosine_similarity(g.double(), e.double(), dim=-1).min().item())
        errors.append((g - e).abs().max().item())
    return OnnxCheck(h, w, b, min(cosines), max(errors), finite)
