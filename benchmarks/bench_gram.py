"""Benchmark of the Gram-anchoring loss: our kernels against the official formulation as training runs it.

    python benchmarks/bench_gram.py [--quick] [--no-compile] [--dtypes float32,bfloat16] [--out DIR]

Backends (student and teacher features (G, P, D), the student requiring grad, remove_neg=False as in the recipes):
  official_tf32   the official GramLoss computation (normalize, two P×P Gram matrices, MSE) on fp32 features with
                  torch.backends.cuda.matmul.allow_tf32 = True, as the official trainer sets it
  official_fp32   the same in IEEE fp32 (TF32 off); not for 16-bit features, where TF32 does not apply
  compile         torch.compile of the official computation, TF32 on
  triton, cuda    our fused tiled kernels (method="tiled"), TF32 on (the kernels follow the flag)
  factored        our factored form (O(P·D²): D×D products of the rows' sum and difference, cuBLAS GEMMs in fp16
                  under TF32 and for 16-bit features, Triton row passes where Triton runs); method="auto" takes it
                  on tall groups (dinov3_kernels/gram.py _factored_wins)
No outside library computes this loss; the official formulation is the alternative.

FLOPs (useful work, the same for every backend): forward 4·G·P²·D (two Gram matrices); forward+backward 6·G·P²·D
(plus the student gradient; the Gram teacher is frozen, as in training). The "fwd" pass of the fused kernels already
produces the gradient (the loss of a student that requires grad), so their "fwd+bwd" adds only a scale.
"""

from __future__ import annotations

import torch
import torch._functorch.config

import common
from dinov3_kernels import gram_loss, gram_loss_reference
from dinov3_kernels._backend import why_not
from dinov3_kernels.gram import _choose_method

# (G, P, D): G Gram matrices (images: 2 global crops x batch), P patches, D dims.
GPU_SHAPES = [  # the goal shapes (P >= 1024) first, then the most asked-about: a time budget cuts the last
    (32, 1024, 1024),  # 512 px crops (the Gram teacher's resolution), ViT-L width
    (8, 4096, 1024),   # 1024 px, high-resolution adaptation ("auto" takes the factored form there)
    (64, 256, 1024),   # ViT-L/16 training: 2 x 32 images at 256 px
    (64, 256, 4096),   # ViT-7B at 256 px
]
QUICK_SHAPES = GPU_SHAPES[:2]
# fp32 shapes the goal's "P >= 1024" also covers at other widths and resolutions: ViT-7B (D = 4096, the model DINOv3
# trains with Gram anchoring) at 512 px, ViT-L at 768 px, ViT-7B at 768 px. run_all.py times them after the bf16
# shapes, in what is left of the phase's budget, without torch.compile (its recompilation would take that budget), so
# that the bf16 goal's shapes are never cut for them; roofline.py and goals.py --predicted count them as well.
WIDE_GPU_SHAPES = [(32, 1024, 4096), (14, 2304, 1024), (14, 2304, 4096)]
# bf16 features (run_all.py, after every fp32 shape): P = 1024 first (the 40 %-of-bf16-peak goal is stated at
# P >= 1024), then 4096 and 256, at ViT-L width: the auto table's deciding shapes.
BF16_GPU_SHAPES = [(32, 1024, 1024), (8, 4096, 1024), (64, 256, 1024)]
CPU_SHAPES = [(2, 48, 24), (2, 96, 24)]  # P < 2D and P >= 2D: both sides of the factored-form rule
OPTS = dict(remove_neg=False, img_level=True)


def flops(G, P, D, mode):
    return (4 if mode == "fwd" else 6) * G * P * P * D


def min_bytes(G, P, D, elem, mode):
    """Read S and T once; forward+backward also writes the student gradient."""
    return (2 if mode == "fwd" else 3) * G * P * D * elem


def _inputs(G, P, D, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randn(G, P, D, generator=g)
    s = t + 0.5 * torch.randn(G, P, D, generator=g)
    return s.to(device=device, dtype=dtype).requires_grad_(True), t.to(device=device, dtype=dtype)


def _reference64(s, t):
    s64 = s.detach().double().requires_grad_(True)
    loss = gram_loss_reference(s64, t.double(), **OPTS)
    loss.backward()
    return loss.detach(), s64.grad


def _fused(backend, method):
    return lambda a, b, **kw: gram_loss(a, b, backend=backend, method=method, **kw)


def providers(s, t, settings):
    """name -> (fn(s, t, **OPTS) -> loss, tf32 flag), or the reason it cannot run here."""
    out = {"official_tf32": (gram_loss_reference, True)}
    sixteen = s.dtype in (torch.bfloat16, torch.float16)
    if not sixteen:  # 16-bit features: TF32 does not apply, this would be official_tf32 again
        out["official_fp32"] = (gram_loss_reference, False)
    if settings.compile:
        out["compile"] = (common.compiled(gram_loss_reference), True)
    # The composed yardstick (batched vendor GEMMs) runs wherever PyTorch does.
    out["composed"] = why_not("composed", (s, t)) or (_fused("composed", "tiled"), True)
    for backend in ("triton", "cuda"):
        out[backend] = why_not(backend, (s, t)) or (_fused(backend, "tiled"), True)
    # The factored form as "auto" runs it: with the Triton row passes where Triton runs, torch ops otherwise.
    out["factored"] = (_fused("triton", "factored"), True) if why_not("triton", (s, t)) is None else \
        (why_not("composed", (s, t)) or (_fused("composed", "factored"), True))
    return out


def run(settings: common.Settings, shapes=None, dtypes=None) -> list:
    shapes = shapes or (CPU_SHAPES if not settings.gpu else (QUICK_SHAPES if settings.quick else GPU_SHAPES))
    dtypes = dtypes or [torch.float32]
    torch._functorch.config.donated_buffer = False
    records = []
    for G, P, D in shapes:
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            s, t = _inputs(G, P, D, dtype, settings.device)
            ref_loss, ref_grad = _reference64(s, t)
            auto = _choose_method("auto", s.detach(), False)
            for name, entry in providers(s, t, settings).items():
                for mode in ("fwd", "fwd+bwd"):
                    rec = common.Record(
                        "gram_loss", name, f"G={G} P={P} D={D}", dname, mode,
                        params=dict(G=G, P=P, D=D), series=f"D={D}", size=P,
                        flops=flops(G, P, D, mode), bytes=min_bytes(G, P, D, s.element_size(), mode),
                        note=f"auto picks {auto}" if name in ("triton", "cuda", "factored") else
                        "batched GEMMs over [S | T]" if name == "composed" else "")
                    records.append(common.measure_pass(rec, entry, lambda fn, s=s, t=t: fn(s, t, **OPTS), s,
                                                       settings, refs={"fwd": ref_loss, "fwd+bwd": ref_grad}))
            del s, t
            if settings.gpu:
                torch.cuda.empty_cache()
    return records


def standalone_shapes(settings):
    """The shapes `python bench_gram.py` times: on a GPU (not --quick) every goal shape, the wide ones last (run_all.py
    times those after its bf16 shapes instead); None (run's default) otherwise."""
    return GPU_SHAPES + WIDE_GPU_SHAPES if settings.gpu and not settings.quick else None


def main():
    p = common.parser(__doc__)
    p.add_argument("--dtypes", default="float32", help="comma-separated feature dtypes (training uses float32)")
    args = p.parse_args()
    settings = common.settings_from_args(args)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    records = run(settings, shapes=standalone_shapes(settings), dtypes=dtypes)
    common.report("bench_gram", records, common.environment(), args, speedup_vs="official_tf32")


if __name__ == "__main__":
    main()
