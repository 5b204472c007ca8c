"""Benchmark of the DINO and iBOT head losses: fused (logits never stored) against the official formulation.

    python benchmarks/bench_head.py [--quick] [--no-compile] [--out DIR]

From the heads' L2-normalised bottleneck outputs z (rows, d) and last-layer weights W (K, d), fp32 (the heads' last
layer and the losses run in fp32 here; TF32 on, as the official trainer sets it), forward and forward+backward (the
gradients w.r.t. the student's z and W):
  dino  B = 64 images, 10 student crops (2 global + 8 local) against 2 teacher crops, the global diagonal ignored;
        K = 65,536 (d = 256, the default config) and 262,144 (d = 512, ViT-7B and the distilled ViT-L)
  ibot  7,500 masked tokens (ViT-L, batch 64 per GPU); K = 65,536 (d = 256) and 98,304 (d = 384)
Sinkhorn-Knopp with 3 iterations. Backends:
  official_tf32  logits = z @ Wᵀ, the official sinkhorn_knopp_teacher (exp without a maximum, in place on the
                 K × rows matrix) and DINOLoss.forward / iBOTPatchLoss.forward_masked, as upstream runs them
  compile        torch.compile of that formulation
  composed       dinov3_kernels backend="composed": the same passes as the kernels over chunks of rows with PyTorch
                 GEMMs (one chunk of logits alive at a time)
  triton         dinov3_kernels backend="triton": logit tiles recomputed by tl.dot in every pass, never stored
Error: vs the float64 reference (loss for "fwd", the gradient w.r.t. the student's z for "fwd+bwd"). Peak memory: the
extra CUDA memory of one call. Goals on an H100/H200 (issue 17): peak memory <= 1/8 of official_tf32, time <= it.
Without a GPU this runs small CPU shapes (the Triton kernels only under TRITON_INTERPRET=1) and says so.

FLOPs (the useful work, every backend): 2·K·d per logit row for the student and teacher logits, and twice that per
student row more in backward (the two GEMMs back to z and W).
"""

from __future__ import annotations

import torch
import torch._functorch.config
import torch.nn.functional as F

import common
from dinov3.train.losses import sinkhorn_knopp  # the official Sinkhorn-Knopp, as the trainer runs it
from dinov3_kernels import dino_head_loss, ibot_head_loss
from dinov3_kernels._backend import why_not

S_CROPS, T_CROPS, TEACHER_TEMP, STUDENT_TEMP = 10, 2, 0.07, 0.1
# (kind, rows: B images for dino / masked tokens for ibot, K, d)
GPU_CASES = [("dino", 64, 65536, 256), ("dino", 64, 262144, 512), ("ibot", 7500, 65536, 256),
             ("ibot", 7500, 98304, 384)]
QUICK_CASES = [("dino", 64, 65536, 256), ("ibot", 7500, 65536, 256)]
CPU_CASES = [("dino", 2, 200, 32), ("ibot", 48, 200, 32)]


# ---- the official formulation ----------------------------------------------------------------------------------------
def official_dino(zs, zt, Ws, Wt):
    """Official: head last layer, sinkhorn_knopp_teacher, DINOLoss.forward with the global diagonal ignored."""
    s_logits = zs @ Ws.T
    with torch.no_grad():
        probs = sinkhorn_knopp(zt @ Wt.T, TEACHER_TEMP)
    B = zs.shape[0] // S_CROPS
    log_p = F.log_softmax(s_logits.float().view(S_CROPS, B, -1) / STUDENT_TEMP, dim=-1)
    loss = -torch.einsum("sbk,tbk->st", log_p, probs.view(T_CROPS, B, -1))
    m = min(S_CROPS, T_CROPS)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(m))
    return loss.sum() / (B * S_CROPS * T_CROPS - B * m)


def official_ibot(zs, zt, Ws, Wt, masks_weight, n_images):
    """Official: head last layer, SinkhornKnoppTeacher, iBOTPatchLoss.forward_masked."""
    s_logits = zs @ Ws.T
    with torch.no_grad():
        probs = sinkhorn_knopp(zt @ Wt.T, TEACHER_TEMP)
    loss = torch.sum(probs * F.log_softmax(s_logits.float() / STUDENT_TEMP, dim=-1), dim=-1)
    return -(loss * masks_weight).sum() / n_images


def _ours(kind, backend, mw, n_images):
    if kind == "dino":
        return lambda zs, zt, Ws, Wt: dino_head_loss(
            zs, zt, Ws, Wt, n_student_crops=S_CROPS, n_teacher_crops=T_CROPS, student_temp=STUDENT_TEMP,
            teacher_temp=TEACHER_TEMP, backend=backend)
    return lambda zs, zt, Ws, Wt: ibot_head_loss(zs, zt, Ws, Wt, student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP,
                                                masks_weight=mw, n_images=n_images, backend=backend)


def flops(n_s, n_t, K, d, mode):
    return 2 * K * d * (n_s + n_t) + (0 if mode == "fwd" else 4 * K * d * n_s)


def min_bytes(n_s, n_t, K, d, mode, elem=4):
    """Read the features and prototypes once; forward+backward also writes the two gradients."""
    return elem * d * (n_s + n_t + 2 * K) + (0 if mode == "fwd" else elem * d * (n_s + K))


def providers(kind, tensors, mw, n_images, settings):
    official = official_dino if kind == "dino" else (lambda *a: official_ibot(*a, mw, n_images))
    out = {"official_tf32": (official, True)}
    if settings.compile:
        out["compile"] = (common.compiled(official), True)
    out["composed"] = (_ours(kind, "composed", mw, n_images), True)
    reason = why_not("triton", tensors)
    out["triton"] = reason or (_ours(kind, "triton", mw, n_images), True)
    return out


def _data(kind, rows, K, d, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    n_s, n_t = (S_CROPS * rows, T_CROPS * rows) if kind == "dino" else (rows, rows)
    zs = F.normalize(torch.randn(n_s, d, generator=g), dim=-1)
    zt = F.normalize(torch.randn(n_t, d, generator=g), dim=-1)
    Ws = torch.randn(K, d, generator=g) * 0.3  # logits of a few units, as trained heads give
    Wt = Ws + 0.01 * torch.randn(K, d, generator=g)
    n_images = 2 * 64 if kind == "ibot" else 0
    mw = torch.full((n_s,), n_images / n_s) if kind == "ibot" else None
    to = (lambda x: x.to(device)) if device != "cpu" else (lambda x: x)
    return [to(x) for x in (zs, zt, Ws, Wt)], (to(mw) if mw is not None else None), n_images


def run(settings: common.Settings, cases=None) -> list:
    cases = cases or (CPU_CASES if not settings.gpu else (QUICK_CASES if settings.quick else GPU_CASES))
    torch._functorch.config.donated_buffer = False
    records = []
    for kind, rows, K, d in cases:
        (zs, zt, Ws, Wt), mw, n_images = _data(kind, rows, K, d, settings.device)
        n_s, n_t = zs.shape[0], zt.shape[0]
        zs.requires_grad_(True)
        Ws.requires_grad_(True)
        # float64 reference: the loss and the gradient w.r.t. the student's z.
        zs64 = zs.detach().double().requires_grad_(True)
        ref_loss = _ours(kind, "reference", mw.double() if mw is not None else None, n_images)(
            zs64, zt.double(), Ws.detach().double(), Wt.double())
        ref_loss.backward()
        refs = {"fwd": ref_loss.detach(), "fwd+bwd": zs64.grad}
        del zs64, ref_loss
        label = f"{kind} {'B' if kind == 'dino' else 'M'}={rows} K={K} d={d}"
        params = dict(kind=kind, n_s=n_s, n_t=n_t, T=T_CROPS if kind == "dino" else 1, K=K, d=d)
        for name, entry in providers(kind, (zs, zt, Ws, Wt), mw, n_images, settings).items():
            for mode in ("fwd", "fwd+bwd"):
                rec = common.Record(f"{kind}_head_loss", name, label, "float32", mode, params=params,
                                    series=f"{kind} d={d}", size=K, flops=flops(n_s, n_t, K, d, mode),
                                    bytes=min_bytes(n_s, n_t, K, d, mode))

                def forward(fn, a=(zs, zt, Ws, Wt)):
                    return fn(*a)

                records.append(common.measure_pass(rec, entry, forward, zs, settings, refs=refs))
                Ws.grad = None
        del zs, zt, Ws, Wt
        if settings.gpu:
            torch.cuda.empty_cache()
    return records


def main():
    args = common.parser(__doc__).parse_args()
    records = run(common.settings_from_args(args))
    common.report("bench_head", records, common.environment(), args, speedup_vs="official_tf32")


if __name__ == "__main__":
    main()
