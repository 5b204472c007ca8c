"""Benchmark of the fused RoPE-box attention (packed qkv in, (B, N, C) out) against the official eager path.

    python benchmarks/bench_attention.py [--quick] [--no-compile] [--models S,B,L,H+,7B] [--seq 201,261,1029,4101]

Providers, all from the packed qkv (B, N, 3C) of the qkv linear to the (B, N, C) input of the output projection:
  reference     the official eager path: split, RoPE on q/k in fp32, concat the prefix, cast, SDPA, reshape
  compile       torch.compile(reference)
  sdpa_no_rope  SDPA alone, without RoPE: the floor a fused kernel should reach
  flash_attn    flash-attn (when installed) on the packed qkv without RoPE, another floor
  flash_attn+apply_rope  our apply_rope kernel, then flash-attn (the best unfused path)
  triton, cuda  dinov3_kernels.rope_attention

FLOPs: forward 4·B·H·N²·D (two matmuls); backward 2.5× forward, so forward+backward 3.5·(4·B·H·N²·D).
Goals on H100 (bf16, fwd+bwd): >= 1.5x the reference at N <= 261, >= 1.2x at N = 1029, >= 0.95x sdpa_no_rope speed.
"""

import importlib.util

import torch
import torch._functorch.config
import torch.nn.functional as F

import common
from dinov3_kernels import apply_rope, rope_attention, rope_attention_reference
from dinov3_kernels._backend import why_not

PREFIX = 5  # CLS + 4 registers
# name -> (heads, head_dim), the DINOv3 ViTs.
MODELS = {"S": (6, 64), "B": (12, 64), "L": (16, 64), "H+": (20, 64), "7B": (32, 128)}
GPU_SEQS = [201, 261, 1029, 4101]  # 14², 16², 32², 64² patches + 5
# Tokens per launch: enough (B·H·N/128 tiles) to fill every SM several times over at the shortest N.
GPU_TOKENS = {64: 131072, 128: 32768}
CPU_CASES = [("S-tiny", 2, 64, 1, PREFIX + 15), ("S-tiny", 2, 64, 1, PREFIX + 36)]


def _inputs(B, N, H, D, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    angles = torch.rand(N - PREFIX, D // 2, generator=g) * 6.2831853
    angles = torch.cat((angles, angles), dim=-1).to(device)
    dout = torch.randn(B, N, H * D, generator=g).to(device=device, dtype=dtype)
    return qkv, angles.sin(), angles.cos(), dout


def _sdpa_no_rope(qkv, H):
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)


def _flash_providers(H):
    if importlib.util.find_spec("flash_attn") is None:
        return {}
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


def _goal(N, speedup_ref, of_floor):
    want = 1.5 if N <= 261 else (1.2 if N <= 1029 else None)
    parts = []
    if want is not None and speedup_ref is not None:
        parts.append(f"{'meets' if speedup_ref >= want else 'MISSES'} {want}x-vs-reference goal")
    if of_floor is not None:
        parts.append(f"{of_floor:.2f}x of sdpa_no_rope speed ({'meets' if of_floor >= 0.95 else 'MISSES'} 0.95x)")
    return "; ".join(parts)


def main():
    p = common.parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--seq", default=",".join(map(str, GPU_SEQS)), help="comma-separated sequence lengths N")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    env = common.environment()
    gpu = common.has_gpu()
    device = "cuda" if gpu else "cpu"
    if gpu:
        models = [m for m in args.models.split(",") if m]
        seqs = [int(n) for n in args.seq.split(",") if n]
        if args.quick:
            models, seqs = [m for m in models if m in ("L", "7B")] or models[:1], [n for n in seqs if n in (261, 1029)]
        cases = []
        for m in models:
            H, D = MODELS[m]
            cases += [(f"ViT-{m}", H, D, max(1, GPU_TOKENS[D] // N), N) for N in seqs]
        dtype = getattr(torch, args.dtype)
        warmup, rep = 10, 50
    else:  # the interpreter (TRITON_INTERPRET=1) or nothing: tiny shapes, fp32
        cases, dtype, warmup, rep = CPU_CASES, torch.float32, 1, 3
    dname = str(dtype).replace("torch.", "")
    torch._functorch.config.donated_buffer = False
    compiled_ref = None if args.no_compile else torch.compile(rope_attention_reference)

    rows = []
    for name, H, D, B, N in cases:
        shape = f"{name} B={B} H={H} D={D} N={N}"
        flops_fwd = 4 * B * H * N * N * D
        qkv, sin, cos, dout = _inputs(B, N, H, D, dtype, device)
        providers = {
            "reference": lambda x, s, c: rope_attention_reference(x, s, c, num_heads=H),
            "compile": None if compiled_ref is None else (lambda x, s, c: compiled_ref(x, s, c, num_heads=H)),
            "sdpa_no_rope": lambda x, s, c: _sdpa_no_rope(x, H),
        }
        if gpu:
            providers.update(_flash_providers(H))
        for backend in ("triton", "cuda"):
            reason = why_not(backend, (qkv,))
            if reason is not None:
                rows.append(common.unavailable("rope_attention", shape, dname, backend, "fwd+bwd", reason))
                continue
            providers[backend] = (lambda be: lambda x, s, c: rope_attention(x, s, c, num_heads=H, backend=be))(
                backend)
        for prov, fn in providers.items():
            if fn is None:
                continue

            def fwd(fn=fn):
                return fn(qkv, sin, cos)

            def fwd_bwd(fn=fn):
                fn(qkv, sin, cos).backward(dout)
                qkv.grad = None

            rows.append(common.measure("rope_attention", shape, dname, prov, "fwd", fwd, flops=flops_fwd,
                                       warmup=warmup, rep=rep))
            rows.append(common.measure("rope_attention", shape, dname, prov, "fwd+bwd", fwd_bwd,
                                       flops=3.5 * flops_fwd, warmup=warmup, rep=rep))
        del qkv, dout
        if gpu:
            torch.cuda.empty_cache()

    common.add_speedups(rows)
    common.add_speedups(rows, baseline="sdpa_no_rope")
    if gpu:
        for r in rows:
            if r.provider in ("triton", "cuda") and r.mode == "fwd+bwd" and r.ms:
                N = int(r.shape.rsplit("N=", 1)[1])
                r.note = _goal(N, r.extra.get("speedup_vs_reference"), r.extra.get("speedup_vs_sdpa_no_rope"))
    common.report("bench_attention", rows, env, args)


if __name__ == "__main__":
    main()
