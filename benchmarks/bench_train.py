"""Benchmark of one whole DINOv3 training step: images/s and peak memory, fused kernels against the reference ops.

    python benchmarks/bench_train.py [--quick] [--no-compile] [--out DIR]

A step = EMA-teacher forward (2 global crops), student forward on 2 global + 8 local crops with iBOT masks, DINO +
iBOT + KoLeo (+ Gram) losses, backward, per-module gradient clipping, AdamW step, EMA update; bf16 autocast on GPU.
Data loading and augmentation are not part of it (the batch is synthetic, already on the device).

Providers: "reference" (attn_backend="reference", Gram/KoLeo backend "reference"), "fused" (attn_backend="fused",
Gram/KoLeo backend "auto" = CUDA/Triton kernels) and, unless --no-compile, "compile" (reference ops with
torch.compile on every transformer block). Rows for ViT-S/16 and ViT-L/16, Gram phase off and on (Gram teacher on
2x-resolution crops, features resized to the student grid). Without a GPU it runs the `tiny` recipe on the CPU and
says so: those numbers say nothing about kernel speed.
"""

from __future__ import annotations

import os
import random
import sys

import torch

import common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinov3.train.config import load_config  # noqa: E402
from dinov3.train.masking import BlockMaskGenerator, mask_batch_fields, sample_masks  # noqa: E402
from dinov3.train.param_groups import apply_optim_schedule, build_param_groups  # noqa: E402
from dinov3.train.ssl_arch import SSLMetaArch  # noqa: E402

# (name, recipe, batch per GPU, global px, local px, gram teacher px)
GPU_CASES = [("ViT-S/16", "vits16", 64, 224, 96, 448), ("ViT-L/16", "vitl16", 32, 224, 96, 448)]
CPU_CASES = [("tiny (CPU)", "tiny", 8, 32, 16, 48)]

PROVIDERS = {
    "reference": ["student.attn_backend=reference", "train.kernel_backend=reference"],
    "fused": ["student.attn_backend=fused", "train.kernel_backend=auto"],
    "compile": ["student.attn_backend=reference", "train.kernel_backend=reference", "train.compile=true"],
}


def synthetic_batch(cfg: dict, device) -> dict:
    c = cfg["crops"]
    B, n_local = int(cfg["train"]["batch_size_per_gpu"]), int(c["local_crops_number"])
    G, L = int(c["global_crops_size"]), int(c["local_crops_size"])
    g = torch.Generator().manual_seed(0)
    batch = {"global_crops": torch.randn(2 * B, 3, G, G, generator=g),
             "local_crops": torch.randn(n_local * B, 3, L, L, generator=g)}
    if cfg["gram"]["use_loss"] and c["gram_teacher_crops_size"]:
        T = int(c["gram_teacher_crops_size"])
        batch["gram_crops"] = torch.randn(2 * B, 3, T, T, generator=g)
    grid = G // int(cfg["student"]["patch_size"])
    gen = BlockMaskGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    masks = sample_masks(2 * B, grid * grid, gen, ratio_min_max=cfg["ibot"]["mask_ratio_min_max"],
                         probability=cfg["ibot"]["mask_sample_probability"], rng=random.Random(0))
    batch.update(mask_batch_fields(masks))
    return {k: v.to(device) for k, v in batch.items()}


def make_step(cfg: dict, device):
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg).to(device).train()
    if cfg["train"]["compile"]:
        for m in (arch.student.backbone, arch.teacher.backbone, arch.gram_teacher):
            if m is not None:
                for blk in m.blocks:
                    blk.compile()
    if arch.gram_use_loss:
        arch.load_gram_from_teacher()
    opt = torch.optim.AdamW(build_param_groups(arch.student, cfg["optim"]), lr=0.0, betas=(0.9, 0.99))
    apply_optim_schedule(opt, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
    batch = synthetic_batch(cfg, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else None
    it = int(cfg["gram"]["start_iter"]) if arch.gram_use_loss else 0

    def step():
        opt.zero_grad(set_to_none=True)
        arch.forward_backward(batch, teacher_temp=0.07, iteration=it, autocast=autocast)
        for name in ("backbone", "dino_head", "ibot_head"):
            torch.nn.utils.clip_grad_norm_(getattr(arch.student, name).parameters(), max_norm=3.0)
        opt.step()
        arch.update_teacher(0.994)

    return step


def main():
    args = common.parser(__doc__).parse_args()
    env = common.environment()
    gpu = common.has_gpu()
    device = "cuda" if gpu else "cpu"
    cases = GPU_CASES if gpu else CPU_CASES
    if args.quick:
        cases = cases[:1]
    providers = [p for p in PROVIDERS if not (args.no_compile and p == "compile")]
    warmup, rep = (3, 20) if gpu else (2, 5)
    rows = []
    for name, recipe, B, G, L, T in cases:
        for gram in (False, True):
            shape = f"{name} B={B} 2x{G}+8x{L}" + (f" gram {T}px" if gram else "")
            for provider in providers:
                overrides = PROVIDERS[provider] + [
                    f"train.batch_size_per_gpu={B}", f"crops.global_crops_size={G}", f"crops.local_crops_size={L}",
                    "crops.local_crops_number=8", f"crops.gram_teacher_crops_size={T}", f"gram.use_loss={gram}",
                    "gram.start_iter=0", "student.drop_path_rate=0.0"]
                cfg = load_config(recipe, overrides)
                try:
                    step = make_step(cfg, device)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    rows.append(common.unavailable("train_step", shape, "bf16" if gpu else "fp32", provider,
                                                   "fwd+bwd+opt", str(exc).splitlines()[0]))
                    continue
                row = common.measure("train_step", shape, "bf16" if gpu else "fp32", provider, "fwd+bwd+opt", step,
                                     warmup=warmup, rep=rep)
                if row.ms:
                    row.extra["images_per_s"] = B / (row.ms * 1e-3)
                    row.note = (row.note + f" {row.extra['images_per_s']:.1f} img/s").strip()
                rows.append(row)
                print(f"{shape:45s} {provider:10s} {row.ms} ms {row.note}", flush=True)
                del step
                if gpu:
                    torch.cuda.empty_cache()
    common.report("bench_train", rows, env, args)


if __name__ == "__main__":
    main()
