"""Benchmark of one whole DINOv3 training step: images/s and peak memory, the official ops against ours.

    python benchmarks/bench_train.py [--quick] [--no-compile] [--out DIR]

A step = EMA-teacher forward (2 global crops), student forward on 2 global + 8 local crops with iBOT masks, DINO +
iBOT + KoLeo (+ Gram) losses, backward, per-module gradient clipping, AdamW step, EMA update; bf16 autocast and
torch.backends.cuda.matmul.allow_tf32 = True on GPU, every transformer block torch.compile'd: as the official trainer
runs. Data loading and augmentation are not part of it (the batch is synthetic, already on the device; see
bench_data.py for the loader).

Backends: "official" (attn_backend="reference": the official eager attention path; Gram/KoLeo backend "reference":
the official formulations) and "fused" (attn_backend="fused", Gram/KoLeo backend "auto": our CUDA/Triton kernels),
each "+compile" (blocks compiled) unless --no-compile. ViT-S/16 (batch 64) and ViT-L/16 (batch 32) at their recipe
crops (2 x 256 px + 8 x 112 px), without and with the Gram phase (Gram teacher on 512 px crops, features resized to
the student grid). Without a GPU it runs the `tiny` recipe on the CPU and says so: those numbers say nothing about
kernel speed.
"""

from __future__ import annotations

import gc
import random

import torch

import common
from dinov3.train.config import load_config
from dinov3.train.masking import BlockMaskGenerator, mask_batch_fields, sample_masks
from dinov3.train.param_groups import apply_optim_schedule, build_param_groups
from dinov3.train.ssl_arch import SSLMetaArch

# (name, recipe, batch per GPU, global px, local px, gram teacher px); ViT-L first: a time budget cuts the last.
GPU_CASES = [("ViT-L/16", "vitl16", 32, 256, 112, 512), ("ViT-S/16", "vits16", 64, 256, 112, 512)]
CPU_CASES = [("tiny (CPU)", "tiny", 4, 32, 16, 48)]

MIN_SECONDS_COMPILED, MIN_SECONDS = 40.0, 5.0  # what one configuration needs at least (H200 estimate)

PROVIDERS = {
    "official": ["student.attn_backend=reference", "train.kernel_backend=reference"],
    "fused": ["student.attn_backend=fused", "train.kernel_backend=auto"],
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
        common.allow_recompiles()
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
        with common.tf32(True):
            opt.zero_grad(set_to_none=True)
            arch.forward_backward(batch, teacher_temp=0.07, iteration=it, autocast=autocast)
            for name in ("backbone", "dino_head", "ibot_head"):
                torch.nn.utils.clip_grad_norm_(getattr(arch.student, name).parameters(), max_norm=3.0)
            opt.step()
            arch.update_teacher(0.994)

    n_params = sum(p.numel() for p in arch.student.backbone.parameters())
    return step, n_params


def run(settings: common.Settings, cases=None) -> list:
    if cases is None:
        cases = (GPU_CASES[:1] if settings.quick else GPU_CASES) if settings.gpu else CPU_CASES
    dtype = "bf16-autocast" if settings.gpu else "float32"
    records = []
    for name, recipe, B, G, L, T in cases:
        for gram in (True, False):
            shape = f"{name} B={B} 2x{G}+8x{L}" + (f" gram {T}px" if gram else "")
            for provider, overrides in PROVIDERS.items():
                backend = provider + ("+compile" if settings.compile else "")
                rec = common.Record("train_step", backend, shape, dtype, "step",
                                    params=dict(model=name, B=B, global_px=G, local_px=L, gram_px=T if gram else None),
                                    series="Gram phase" if gram else "no Gram", tf32=True)
                # A configuration is started only with time to build, compile and time it: one cut short would be lost.
                if settings.deadline.remaining() < (MIN_SECONDS_COMPILED if settings.compile else MIN_SECONDS):
                    records.append(common.skipped(rec))
                    continue
                cfg = load_config(recipe, overrides + [
                    f"train.compile={settings.compile}", f"train.batch_size_per_gpu={B}",
                    f"crops.global_crops_size={G}", f"crops.local_crops_size={L}", "crops.local_crops_number=8",
                    f"crops.gram_teacher_crops_size={T}", f"gram.use_loss={gram}", "gram.start_iter=0",
                    "student.drop_path_rate=0.0"])
                try:
                    step, n_params = make_step(cfg, settings.device)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    records.append(common.failed(rec, exc))
                    continue
                rec.params["backbone_params"] = n_params
                rec.size = n_params / 1e6
                common.measure(rec, step, settings)
                if rec.median_ms:
                    rec.extra["images_per_s"] = B / (rec.median_ms * 1e-3)
                    rec.note = f"{rec.extra['images_per_s']:.1f} img/s"
                records.append(rec)
                print(f"{shape:45s} {backend:16s} {common.fmt(rec.median_ms)} ms {rec.note}", flush=True)
                del step
                gc.collect()
                if settings.compile:
                    torch._dynamo.reset()
                if settings.gpu:
                    torch.cuda.empty_cache()
    backends = sorted({r.backend for r in records if r.backend.startswith("official")})
    if backends:
        common.add_speedups(records, backends[0])
    return records


def main():
    args = common.parser(__doc__).parse_args()
    records = run(common.settings_from_args(args))
    common.report("bench_train", records, common.environment(), args)


if __name__ == "__main__":
    main()
