"""Benchmark of the fused KoLeo loss against the eager reference, torch.compile(reference) and the official
formulation (normalise, x xᵀ, fill the diagonal, max, pairwise distance, all in the input dtype, as upstream).

    python benchmarks/bench_koleo.py [--quick] [--no-compile] [--out DIR]

FLOPs (dense count of the neighbour search): 2·n²·d for the forward and for forward+backward alike (the backward is
O(n·d)). Memory: the fused kernels need O(n·d); the reference and the official formulation hold an n×n matrix.
On CUDA the "fwd" rows of the kernel backends also record the number of kernel launches of one forward.
"""

import torch
import torch._functorch.config
import torch.nn.functional as F

import common
from dinov3_kernels import koleo_loss, koleo_loss_reference
from dinov3_kernels._backend import why_not

GPU_SHAPES = [(n, d) for n in (64, 1024, 8192, 65536) for d in (384, 1024, 4096)]
CPU_SHAPES = [(64, 64), (256, 384)]


def official_koleo(x, eps=1e-8):
    """The upstream KoLeoLoss computation, in the input dtype (what a DINOv3 user runs today)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = x @ x.t()
        dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
        idx = dots.max(dim=1).indices
    return -torch.log(F.pairwise_distance(x, x[idx], p=2, eps=1e-8).float() + eps).mean()


def _count_launches(fn):
    """Kernel launches of one fn() call (CUDA only), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    common.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        common.sync()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower())


def main():
    args = common.parser(__doc__).parse_args()
    env = common.environment()
    gpu = common.has_gpu()
    device = "cuda" if gpu else "cpu"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    dtypes = [torch.bfloat16, torch.float32] if gpu else [torch.float32]
    if args.quick:
        shapes = [s for s in shapes if s[1] == 384]
    warmup, rep = (10, 50) if gpu else (2, 5)
    torch._functorch.config.donated_buffer = False  # the "bwd" rows replay one graph with retain_graph
    compiled_ref = None if args.no_compile else torch.compile(koleo_loss_reference)

    rows = []
    for n, d in shapes:
        shape = f"n={n} d={d}"
        flops = 2 * n * n * d
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
            providers = {"reference": koleo_loss_reference, "official": official_koleo}
            if compiled_ref is not None:
                providers["compile"] = compiled_ref
            for backend in ("triton", "cuda"):
                reason = why_not(backend, (x,))
                if reason is not None:
                    rows.append(common.unavailable("koleo_loss", shape, dname, backend, "fwd+bwd", reason))
                    continue
                providers[backend] = (lambda be: lambda a: koleo_loss(a, backend=be))(backend)
            for name, fn in providers.items():
                def fwd(fn=fn):
                    return fn(x)

                def fwd_bwd(fn=fn):
                    fn(x).backward()
                    x.grad = None

                row = common.measure("koleo_loss", shape, dname, name, "fwd", fwd, flops=flops, warmup=warmup,
                                     rep=rep)
                if gpu and name in ("triton", "cuda") and row.ms is not None:
                    try:
                        row.extra["launches"] = _count_launches(fwd)
                        row.note = f"{row.extra['launches']} kernel launches"
                    except Exception as exc:  # noqa: BLE001 - the count is a bonus, never fatal
                        row.note = f"launch count failed: {exc}"[:120]
                rows.append(row)
                try:
                    loss = fn(x)
                    bwd_row = common.measure("koleo_loss", shape, dname, name, "bwd",
                                             lambda: loss.backward(retain_graph=True), warmup=warmup, rep=rep,
                                             memory=False)
                    del loss
                except Exception as exc:  # noqa: BLE001
                    bwd_row = common.Row("koleo_loss", shape, dname, name, "bwd", note=f"failed: {exc}"[:120])
                rows.append(bwd_row)
                x.grad = None
                rows.append(common.measure("koleo_loss", shape, dname, name, "fwd+bwd", fwd_bwd, flops=flops,
                                           warmup=warmup, rep=rep))
                x.grad = None
            del x
            if gpu:
                torch.cuda.empty_cache()
    common.report("bench_koleo", rows, env, args)


if __name__ == "__main__":
    main()
