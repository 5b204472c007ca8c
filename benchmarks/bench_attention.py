"""Benchmark of the fused RoPE-box attention (packed qkv in, (B, N, C) out) against the official path and the best
attention without RoPE.

    python benchmarks/bench_attention.py [--quick] [--no-compile] [--models S,B,L,H+,7B] [--seq 201,261,1029,4101]
                                         [--dtype bfloat16]

Backends, all from the packed qkv (B, N, 3C) of the qkv linear to the (B, N, C) input of the output projection, in
bf16 as the official trainer's blocks run (the TF32 flag, on as in training, changes nothing in bf16; fp32 rows with
--dtype float32):
  official               the official eager path: split, RoPE on q/k in fp32, concat the prefix, cast, SDPA, reshape
  compile                torch.compile of the official path
  sdpa_flash, sdpa_cudnn SDPA without RoPE through its flash and cuDNN backends: the floor a fused kernel should reach
  flash_attn             flash-attn (when installed) on the packed qkv without RoPE, another floor
  flash_attn+apply_rope  our apply_rope kernel, then flash-attn (the best unfused path)
  composed               dinov3_kernels.rope_attention(backend="composed"): one Triton pass from qkv to rotated q, k, v,
                         SDPA (PyTorch picks flash / cuDNN / efficient), one pass back to the packed gradient
  triton, cuda           dinov3_kernels.rope_attention

RoPE tables as each path's model computes them: (H·W, D) sin/cos with equal halves for the official paths, the tied
(H·W, D/2) halves for the package's backends (dinov3.models passes those), built before timing.
FLOPs: forward 4·B·H·N²·D (two matmuls); backward 2.5x forward, so forward+backward 3.5·(4·B·H·N²·D).
Errors are measured on one image (B = 1) against the float64 official path; the rows without RoPE compute another
function and carry no error. Goals on H100 (bf16, fwd+bwd): >= 1.5x the official path at N <= 261, >= 1.2x at N = 1029,
>= 0.95x the speed of SDPA without RoPE.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch._functorch.config
import torch.nn.functional as F

import common
from dinov3_kernels import apply_rope, rope_attention, rope_attention_reference
from dinov3_kernels._backend import why_not

PREFIX = 5  # CLS + 4 registers
# name -> (heads, head_dim), the DINOv3 ViTs; run in this order, so a time budget cuts the last ones.
MODELS = {"L": (16, 64), "7B": (32, 128), "S": (6, 64), "B": (12, 64), "H+": (20, 64)}
GPU_SEQS = [201, 261, 1029, 4101]  # 14², 16², 32², 64² patches + 5
# Tokens per launch: enough (B·H·N/128 tiles) to fill every SM several times over at the shortest N.
GPU_TOKENS = {64: 131072, 128: 32768}
CPU_CASES = [("S-tiny", 2, 32, 1, PREFIX + 16), ("S-tiny", 2, 32, 1, PREFIX + 36)]
NO_ROPE = ("sdpa_flash", "sdpa_cudnn", "flash_attn")
# What each path is given, as its model computes it: the official RopePositionEmbedding returns (H·W, Dh) sin/cos
# whose halves are equal; dinov3.models passes the tied (H·W, Dh/2) halves to the package's backends. Built outside
# the timed calls.
TIED_TABLES = ("composed", "triton", "cuda", "flash_attn+apply_rope")


def _halves(sin, cos):
    half = sin.shape[-1] // 2
    assert torch.equal(sin[:, :half], sin[:, half:]) and torch.equal(cos[:, :half], cos[:, half:])
    return sin[:, :half].contiguous(), cos[:, :half].contiguous()


def gpu_cases(models=None, seqs=None, quick=False):
    models = list(models or MODELS)
    seqs = list(seqs or GPU_SEQS)
    if quick:
        models, seqs = [m for m in models if m in ("L", "7B")] or models[:1], [n for n in seqs if n in (261, 1029)]
    return [(f"ViT-{m}", *MODELS[m], max(1, GPU_TOKENS[MODELS[m][1]] // N), N) for m in models for N in seqs]


def flops(B, H, N, D, mode):
    return (1.0 if mode == "fwd" else 3.5) * 4 * B * H * N * N * D


def min_bytes(B, H, N, D, elem, mode):
    """qkv read and out written once; forward+backward also reads dout and writes the qkv gradient."""
    return (4 if mode == "fwd" else 8) * B * N * H * D * elem


def _inputs(B, N, H, D, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, N, 3 * H * D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    angles = torch.rand(N - PREFIX, D // 2, generator=g) * 6.2831853
    angles = torch.cat((angles, angles), dim=-1).to(device)
    dout = torch.randn(B, N, H * D, generator=g).to(device=device, dtype=dtype)
    return qkv, angles.sin(), angles.cos(), dout


def _sdpa_no_rope(qkv, H, backend=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4)
    ctx = sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext()
    with ctx:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)


def _flash_providers(H):
    if importlib.util.find_spec("flash_attn") is None:
        reason = "flash-attn is not installed"
        return {"flash_attn": reason, "flash_attn+apply_rope": reason}
    from flash_attn import flash_attn_func, flash_attn_qkvpacked_func

    def packed(qkv, sin, cos):
        B, N, C3 = qkv.shape
        return flash_attn_qkvpacked_func(qkv.view(B, N, 3, H, C3 // (3 * H))).reshape(B, N, C3 // 3)

    def with_rope(qkv, sin, cos):
        B, N, C3 = qkv.shape
        q, k, v = qkv.view(B, N, 3, H, C3 // (3 * H)).unbind(2)  # (B, N, H, D)
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), sin, cos, backend="triton")
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v).reshape(B, N, C3 // 3)

    return {"flash_attn": packed, "flash_attn+apply_rope": with_rope}


def providers(qkv, H, settings):
    """name -> fn(qkv, sin, cos) -> (B, N, C), or the reason it cannot run here."""
    out = {"official": lambda x, s, c: rope_attention_reference(x, s, c, num_heads=H)}
    if settings.compile:
        compiled_ref = common.compiled(rope_attention_reference)
        out["compile"] = lambda x, s, c: compiled_ref(x, s, c, num_heads=H)
    out["sdpa_flash"] = lambda x, s, c: _sdpa_no_rope(x, H, "FLASH_ATTENTION")
    out["sdpa_cudnn"] = (lambda x, s, c: _sdpa_no_rope(x, H, "CUDNN_ATTENTION")) if settings.gpu else \
        "cuDNN attention needs a CUDA GPU"
    if settings.gpu:
        out.update(_flash_providers(H))
    for backend in ("composed", "triton", "cuda"):
        reason = why_not(backend, (qkv,))
        out[backend] = reason or (lambda be: lambda x, s, c: rope_attention(x, s, c, num_heads=H, backend=be))(
            backend)
    return out


def _goal(N, speedup_ref, of_floor):
    want = 1.5 if N <= 261 else (1.2 if N <= 1029 else None)
    parts = []
    if want is not None and speedup_ref is not None:
        parts.append(f"{'meets' if speedup_ref >= want else 'MISSES'} {want}x-vs-official goal")
    if of_floor is not None:
        parts.append(f"{of_floor:.2f}x of sdpa_flash speed ({'meets' if of_floor >= 0.95 else 'MISSES'} 0.95x)")
    return "; ".join(parts)


def run(settings: common.Settings, cases=None, dtype=torch.bfloat16) -> list:
    if cases is None:
        cases = gpu_cases(quick=settings.quick) if settings.gpu else CPU_CASES
    if not settings.gpu:
        dtype = torch.float32  # the interpreter (TRITON_INTERPRET=1) runs fp32 only
    dname = str(dtype).replace("torch.", "")
    torch._functorch.config.donated_buffer = False
    records = []
    for name, H, D, B, N in cases:
        qkv, sin, cos, dout = _inputs(B, N, H, D, dtype, settings.device)
        # The error is measured on one image against the float64 official path.
        qkv1, sin1, cos1, dout1 = _inputs(1, N, H, D, dtype, settings.device, seed=1)
        x64 = qkv1.detach().double().requires_grad_(True)
        out64 = rope_attention_reference(x64, sin1.double(), cos1.double(), num_heads=H)
        out64.backward(dout1.double())
        ref = {"fwd": out64.detach(), "fwd+bwd": x64.grad}
        del x64, out64
        tables = {False: (sin, cos), True: _halves(sin, cos)}
        tables1 = {False: (sin1, cos1), True: _halves(sin1, cos1)}
        for prov, fn in providers(qkv, H, settings).items():
            tied = prov in TIED_TABLES
            for mode in ("fwd", "fwd+bwd"):
                rec = common.Record("rope_attention", prov, f"{name} B={B} H={H} D={D} N={N}", dname, mode,
                                    params=dict(B=B, H=H, N=N, D=D), series=f"{name} (H={H}, Dh={D})", size=N,
                                    flops=flops(B, H, N, D, mode),
                                    bytes=min_bytes(B, H, N, D, qkv.element_size(), mode), tf32=True)
                entry = fn if isinstance(fn, str) else (fn, True)
                if prov in NO_ROPE:
                    rec.note = "no RoPE: another function, no error"
                records.append(common.measure_pass(
                    rec, entry, lambda f, x=qkv, t=tables[tied]: f(x, *t), qkv, settings, grad_out=dout,
                    refs=None if prov in NO_ROPE else ref,
                    check=(lambda f, x=qkv1, t=tables1[tied]: f(x, *t), qkv1, dout1)))
        del qkv, dout, qkv1, dout1
        if settings.gpu:
            torch.cuda.empty_cache()
    common.add_speedups(records, "official")
    common.add_speedups(records, "sdpa_flash")
    for r in records:
        if settings.gpu and r.backend in ("composed", "triton", "cuda") and r.mode == "fwd+bwd" and r.median_ms:
            r.note = _goal(r.params["N"], r.extra.get("speedup_vs_official"), r.extra.get("speedup_vs_sdpa_flash"))
    return records


def main():
    p = common.parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--seq", default=",".join(map(str, GPU_SEQS)), help="comma-separated sequence lengths N")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    settings = common.settings_from_args(args)
    cases = None
    if settings.gpu:
        cases = gpu_cases([m for m in args.models.split(",") if m], [int(n) for n in args.seq.split(",") if n],
                          args.quick)
    records = run(settings, cases, getattr(torch, args.dtype))
    common.report("bench_attention", records, common.environment(), args, speedup_vs="official")


if __name__ == "__main__":
    main()
