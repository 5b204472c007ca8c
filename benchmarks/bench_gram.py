"""Benchmark of the fused Gram-anchoring loss against the eager reference and torch.compile(reference).

    python benchmarks/bench_gram.py [--quick] [--no-compile] [--out DIR]

FLOPs (dense count, per the DINOv3 definition of the loss): forward 4·G·P²·D (two Gram matrices);
forward+backward 6·G·P²·D (plus the student gradient; the Gram teacher is frozen, as in training).
"""

import torch
import torch._functorch.config

import common
from dinov3_kernels import gram_loss, gram_loss_reference
from dinov3_kernels._backend import why_not

# (B, N, D, img_level) from the DINOv3 recipes.
GPU_SHAPES = [
    (32, 256, 4096, True),   # ViT-7B Gram anchoring
    (16, 1024, 1024, True),
    (16, 256, 1024, False),  # img_level=False: one Gram over B·N = 4096 rows
    (8, 4096, 1024, True),
]
CPU_SHAPES = [(2, 64, 32, True), (4, 64, 32, False)]


def _inputs(B, N, D, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    s = (t.float() + 0.5 * torch.randn(B, N, D, generator=g).to(device)).to(dtype)
    return s.requires_grad_(True), t


def main():
    args = common.parser(__doc__).parse_args()
    env = common.environment()
    gpu = common.has_gpu()
    device = "cuda" if gpu else "cpu"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    dtypes = [torch.bfloat16, torch.float32] if gpu else [torch.float32]
    if args.quick:
        shapes = shapes[:2]
    warmup, rep = (10, 50) if gpu else (3, 10)
    # The "bwd" rows replay one graph with retain_graph, which donated buffers forbid.
    torch._functorch.config.donated_buffer = False
    compiled_ref = None if args.no_compile else torch.compile(gram_loss_reference)
    opts = dict(remove_neg=False)

    rows = []
    for B, N, D, img_level in shapes:
        P, G = (N, B) if img_level else (B * N, 1)
        shape = f"B={B} N={N} D={D}" + ("" if img_level else " img_level=False")
        flops_fwd, flops_all = 4 * G * P * P * D, 6 * G * P * P * D
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            s, t = _inputs(B, N, D, dtype, device)
            providers = {
                "reference": lambda a, b: gram_loss_reference(a, b, img_level=img_level, **opts),
                "compile": None if compiled_ref is None else
                (lambda a, b: compiled_ref(a, b, img_level=img_level, **opts)),
            }
            for backend in ("triton", "cuda"):
                reason = why_not(backend, (s, t))
                if reason is not None:
                    rows.append(common.unavailable("gram_loss", shape, dname, backend, "fwd+bwd", reason))
                    continue
                providers[backend] = (lambda be: lambda a, b: gram_loss(a, b, img_level=img_level, backend=be,
                                                                        **opts))(backend)
            for name, fn in providers.items():
                if fn is None:
                    continue

                def fwd(fn=fn):
                    return fn(s, t)

                def fwd_bwd(fn=fn):
                    fn(s, t).backward()
                    s.grad = None

                rows.append(common.measure("gram_loss", shape, dname, name, "fwd", fwd, flops=flops_fwd,
                                           warmup=warmup, rep=rep))
                try:
                    loss = fn(s, t)
                    bwd_row = common.measure("gram_loss", shape, dname, name, "bwd",
                                             lambda: loss.backward(retain_graph=True), warmup=warmup, rep=rep,
                                             memory=False)
                except Exception as exc:  # noqa: BLE001
                    bwd_row = common.Row("gram_loss", shape, dname, name, "bwd", note=f"failed: {exc}"[:120])
                rows.append(bwd_row)
                s.grad = None
                rows.append(common.measure("gram_loss", shape, dname, name, "fwd+bwd", fwd_bwd, flops=flops_all,
                                           warmup=warmup, rep=rep))
    common.report("bench_gram", rows, env, args)


if __name__ == "__main__":
    main()
