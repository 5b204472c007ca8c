"""A roofline model of every benchmarked op, written before any GPU measurement, so that the GPU run tests the model.

    python benchmarks/roofline.py [--out benchmarks/results/predicted.md]
    python benchmarks/roofline.py --auto-table [--measured RUN/results.json]   # dinov3_kernels/auto_table.json

For each op, backend and benchmark shape it counts
  flops        the useful work (the formula the benchmark reports TFLOP/s with; the same for every backend)
  flops_exec   what the design executes: both halves of a symmetric product, tile padding, recomputation in backward
  min_bytes    the fewest bytes that must cross HBM: every input read once, every output written once
  design_bytes the global-memory traffic the design issues per its tiling (loads, stores, atomics; L2 level)
  hbm_bytes    the part of design_bytes that must come from HBM: each byte once (about min_bytes plus scratch
               buffers) while the data the kernels re-read fits in half the L2, rising linearly with the fraction
               that does not fit, up to design_bytes
  exps         exponentials (attention's softmax), which run on the special-function units
and predicts the time as max(flops_exec / matrix rate, hbm_bytes / HBM bandwidth, design_bytes / L2 bandwidth,
exps / exp rate) + launches x launch overhead. Rates are peaks, so a prediction is a floor: a measured time should sit
above it, and measured/predicted says by how much. The assumptions behind each count are in the docstrings below.

Ceilings (leads: datasheets, except where "assumed"): H100 SXM and H200 SXM share the compute rates (dense bf16
989 TFLOP/s, dense TF32 495, fp32 SIMT 67) and a 50 MB L2; HBM 3.35 TB/s (H100) and 4.8 TB/s (H200); L2 bandwidth
assumed 10 TB/s on both (no datasheet figure: published measurements run from about 5.5 TB/s on an H100 PCIe with 114
SMs to about 12 TB/s; the GPU run will tell); exp2 at 16 per clock per SM (CUDA programming
guide, compute capability 9.0) x 132 SMs x 1.98 GHz = 4.2e12/s; 4 us per kernel launch (assumed). run_all.py
replaces HBM and the matrix rates by the ceilings it measures and records measured/predicted beside every record.
Not modelled: a whole training step (hundreds of ops) and the CPU-bound data loader.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
from dataclasses import dataclass, replace
from typing import Optional

import common


@dataclass(frozen=True)
class Ceilings:
    name: str
    tflops: dict  # matrix/SIMT rate per precision: "bf16" (tensor cores), "tf32" (tensor cores), "fp32" (SIMT FMA)
    hbm_gbps: float
    l2_gbps: float
    l2_mb: float
    sms: int
    exp_per_s: float
    launch_us: float
    # Warp instructions issued per second: 4 schedulers per SM, one instruction each per clock (a floor: dependent
    # chains and shuffles issue far slower with 2 warps per scheduler).
    issue_per_s: float = 132 * 4 * 1.98e9


_EXP = 132 * 16 * 1.98e9
H100 = Ceilings("H100 SXM (datasheet)", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}, 3350.0, 10000.0, 50.0, 132,
                _EXP, 4.0)
H200 = replace(H100, name="H200 SXM (datasheet)", hbm_gbps=4800.0)
DEVICES = (H100, H200)


def measured_ceilings(measured: dict, gpu: bool) -> Ceilings:
    """Ceilings with what run_all.py measured (copy bandwidth, matmul rates); the rest from the H200 datasheet on a GPU.
    On the CPU (--dry-run) the model runs only to check the pipeline: L2 is taken as twice the copy bandwidth, and a
    nominal 20 GB/s stands in for the copy where it was not measured (run_all.py --only without the ceilings)."""
    rates = {"bf16": measured.get("bf16_tflops"), "tf32": measured.get("tf32_tflops"),
             "fp32": measured.get("fp32_tflops")}
    base = H200 if gpu else Ceilings("CPU", {}, 20.0, 40.0, 32.0, 1, 1e9, 20.0)
    rates = {k: v or base.tflops.get(k) or measured.get("fp32_tflops") or 1e-3 for k, v in rates.items()}
    hbm = measured.get("copy_gbps") or base.hbm_gbps
    return replace(base, name=("measured: " if gpu else "CPU, measured: ") + base.name, tflops=rates, hbm_gbps=hbm,
                   l2_gbps=base.l2_gbps if gpu else 2 * hbm)


@dataclass
class Estimate:
    flops: float
    flops_exec: float
    precision: str
    min_bytes: float
    design_bytes: float
    hbm_bytes: float
    exps: float = 0.0
    launches: int = 1
    sm_fill: float = 1.0  # fraction of the SMs the design's matrix work keeps busy (a grid smaller than the GPU)
    # Warp instructions of the work between the matrix products that the model counts (so far: the Triton KoLeo
    # search's top-k selection), and whether they run after the products on the same warps (one CTA per SM: added to
    # the matrix time) or beside another CTA's products (the larger of the two).
    warp_instr: float = 0.0
    alu_serial: bool = True


def predict(est: Estimate, ceil: Ceilings) -> dict:
    alu = est.warp_instr / (ceil.issue_per_s * est.sm_fill)
    terms = {
        "compute": est.flops_exec / (ceil.tflops[est.precision] * 1e12 * est.sm_fill) + (alu if est.alu_serial else 0),
        "hbm": est.hbm_bytes / (ceil.hbm_gbps * 1e9),
        "l2": est.design_bytes / (ceil.l2_gbps * 1e9),
        "exp": est.exps / ceil.exp_per_s,
        "alu": 0.0 if est.alu_serial else alu,
    }
    bound = max(terms, key=terms.get)
    ms = (terms[bound] + est.launches * ceil.launch_us * 1e-6) * 1e3
    return {"ms": ms, "bound": bound, **{f"{k}_ms": v * 1e3 for k, v in terms.items()}}


def _precision(dtype: str, tf32: bool) -> str:
    if dtype in ("bfloat16", "float16"):
        return "bf16"
    return "tf32" if tf32 else "fp32"


def _hbm(resident: float, design: float, working_set: float, l2_mb: float = 50.0) -> float:
    """HBM bytes of a design that re-reads a working set through L2: `resident` (each byte once) when the working set
    fits in half the L2, rising linearly in the fraction that does not fit, up to every access (`design`)."""
    miss = max(0.0, 1.0 - 0.5 * l2_mb * 2**20 / max(working_set, 1.0))
    return resident + miss * max(0.0, design - resident)


def _cdiv(a, b):
    return -(-a // b)


# ---- Gram loss -------------------------------------------------------------------------------------------------------
GRAM_BACKENDS = ("official_tf32", "official_fp32", "compile", "composed", "triton", "cuda", "factored")
# What run_all.py times for bf16 features: official_fp32 would repeat official_tf32 (TF32 does not apply), and
# torch.compile is left out for the time budget.
GRAM_BF16_BACKENDS = ("official_tf32", "composed", "triton", "cuda", "factored")


def gram(G, P, D, dtype, backend, mode, tf32=True, sms=132) -> Estimate:
    """Gram loss, student requiring grad, no clamping (remove_neg=False), features of `dtype`.

    official*/compile: normalize (eager: a norm and a divide per tensor), two batched GEMMs writing G·P² fp32 each,
      MSE (eager: the squared difference written, then reduced); backward: MSE gradient (P²), two GEMMs per Gram
      (autograd of S Sᵀ differentiates both operands), their sum, the normalize backward. compile fuses the
      elementwise chains (normalize: one read + one write per tensor; MSE: one reduction) and keeps the GEMMs.
    cuda (tiled, 64x64 tiles, mma.sync): one program per 64x64 tile pair of the upper triangle loads S_i, S_j, T_i,
      T_j (64xD each), builds both Gram tiles and stores the student's weight tile W (T² in the input dtype); then a
      gradient kernel, one program per (row block, 64 columns of D), reads for every column block j the W tile
      (transposed left of the diagonal) and the rows S_j (64x64 each), and writes its 64x64 of the fp32 gradient once
      (no atomics); then a normalize-backward pass reads x and the fp32 gradient twice. The gradient is produced in
      "fwd"; "fwd+bwd" adds a scale (read and write G·P·D). HBM: S, T, W and the gradient, with the re-read sets of
      the groups in flight in L2 (see _hbm).
    triton (see _gram_triton): prologue writing [Ŝ | T̂] once in the compute dtype, a persistent forward over the
      upper-triangle 128x128 tile pairs (one dot chain over the 2·D columns) storing E', and a deterministic
      gradient GEMM E'·Ŝ with the normalize backward fused; no atomics.
    factored (see _gram_factored): Z = [Ŝ + T̂ | Ŝ - T̂] in fp16 (TF32 on or 16-bit input; IEEE fp32 otherwise),
      three D×D cuBLAS products and one gradient GEMM (10·P·D² FLOPs per group), Triton row passes.
    composed (dinov3_kernels/gram.py _gram_fwd_composed): Ŝ and T̂ normalised into one [Ŝ | T̂] buffer (a norm read
      and a divide per tensor: 3 passes each). fp32: ŜŜᵀ written (G·P² fp32), then an in-place baddbmm reads and
      rewrites it as E = ŜŜᵀ - T̂T̂ᵀ; 16-bit: [Ŝ | -T̂] built (4 passes) and ONE GEMM over 2D columns writes E
      (2 bytes).
      The loss reads E once, the gradient GEMM E·Ŝ again; the normalize backward from the stored Ŝ and norms is 9
      passes over G·P·D fp32 (plus the 16-bit casts: 76 bytes per element in all for 16-bit input). The gradient is
      formed in "fwd"; "fwd+bwd" adds the scale by grad_output. E round-trips HBM whenever G·P² does not fit in L2
      (67-134 MB at the benchmark shapes).
    """
    e = 2 if dtype in ("bfloat16", "float16") else 4
    useful = (4 if mode == "fwd" else 6) * G * P * P * D
    min_b = (2 if mode == "fwd" else 3) * G * P * D * e
    PD, PP = G * P * D, G * P * P
    prec = _precision(dtype, tf32 and backend != "official_fp32")
    if backend in ("official_tf32", "official_fp32", "compile"):
        fused = backend == "compile"
        fwd_b = (6 if fused else 8) * PD * e + (4 if fused else 6) * PP * 4
        bwd_b = 5 * PP * 4 + (8 if fused else 13) * PD * e
        flops_exec = 4 * G * P * P * D + (0 if mode == "fwd" else 4 * G * P * P * D)
        b = fwd_b + (0 if mode == "fwd" else bwd_b)
        launches = (5 if fused else 8) + (0 if mode == "fwd" else (5 if fused else 10))
        return Estimate(useful, flops_exec, prec, min_b, b, b, 0, launches)
    if backend == "factored":
        return _gram_factored(G, P, D, dtype, mode, tf32, useful, min_b)
    if backend == "composed":
        flops_exec = 6 * G * P * P * D
        if e == 2:
            b = 6 * PD * e + 4 * PD * e + PD * e + 76 * PD + 3 * PP * 2
        else:
            b = 6 * PD * 4 + 10 * PD * 4 + 5 * PP * 4
        b += 0 if mode == "fwd" else 2 * PD * e
        return Estimate(useful, flops_exec, prec, min_b, b, b, 0, 12 + (0 if mode == "fwd" else 1))
    if backend == "triton":
        return _gram_triton(G, P, D, dtype, mode, prec, useful, min_b, sms)
    if backend != "cuda":
        raise ValueError(f"gram: unknown backend {backend!r}")
    T = 64
    nb, nd = _cdiv(P, T), _cdiv(D, T)
    pairs = nb * (nb + 1) // 2
    tile_mm = 2 * T * T * D
    flops_exec = G * (pairs * 2 * tile_mm + nb * nb * tile_mm)
    loads = pairs * 4 * T * D * e
    w_bytes = pairs * T * T * e
    grad = nb * nd * nb * (T * T * e + T * T * e) + P * D * 4 + nb * 4 * T
    norm_bwd = 2 * P * D * e + 2 * P * D * 4 + P * D * e
    scale = 0 if mode == "fwd" else 2 * PD * e
    design = G * (loads + w_bytes + grad + norm_bwd) + scale
    in_flight = min(G, max(1, _cdiv(sms, pairs)))
    hbm = _hbm(4 * PD * e + 3 * PD * 4 + 2 * G * w_bytes + scale, design,
               in_flight * (P * D * (2 * e + 4) + w_bytes))
    return Estimate(useful, flops_exec, prec, min_b, design, hbm, 0, 6 + (0 if mode == "fwd" else 1))


def _gram_factored(G, P, D, dtype, mode, tf32, useful, min_b) -> Estimate:
    """The factored form as "auto" runs it on a GPU (dinov3_kernels/gram.py _gram_fwd_factored with the Triton row
    passes), normalised rows, student gradient only. Compute dtype c: fp16 for 16-bit input and for fp32 under TF32,
    IEEE fp32 otherwise.
      row pass: reads S and T once, writes Z = [Σ | Δ] (G·P·2D·c) and the norms.
      K11 = ΣᵀΣ, K22 = ΔᵀΔ, K12 = ΣᵀΔ: three cuBLAS GEMMs (2·P·D² FLOPs each per group, fp32 results), operands
        read once each from HBM; L2 traffic as 128 x 256 output tiles each loading its (128 + 256) x P operand strips.
      D x D pass (one Triton kernel): reads K11, K22 and K12 twice, writes the loss partials and the (2D x D)
        gradient operand in c.
      gradient GEMM Z·W (4·P·D² FLOPs per group, fp32 result: 128 x 256 output tiles over K = 2D), then the normalize
        backward row pass (reads x and g, writes the gradient). The gradient is formed in "fwd" (the op computes it
        with the loss); "fwd+bwd" adds autograd's scale by grad_output (read and write G·P·D).
    The roofline takes the largest term over the whole op; the phases run one after the other (GEMMs compute-bound,
    row passes HBM-bound), so their sum is the less favourable estimate NOTES.md gives beside it."""
    e = 2 if dtype in ("bfloat16", "float16") else 4
    c = 2 if (e == 2 or tf32) else 4
    prec = "bf16" if c == 2 else "fp32"
    PD = G * P * D
    DD = G * D * D
    flops_exec = 10 * G * P * D * D
    tile_mn = lambda m, n: _cdiv(m, 128) * _cdiv(n, 256)  # noqa: E731
    k_l2 = 3 * G * tile_mn(D, D) * (128 + 256) * P * c
    g_l2 = G * tile_mn(P, D) * (128 + 256) * 2 * D * c
    row_in = 2 * PD * e + 2 * PD * c + 2 * G * P * 4
    gemms = 6 * PD * c + 3 * DD * 4
    dd = 4 * DD * 4 + 2 * DD * c
    grad = 2 * PD * c + 2 * DD * c + PD * 4
    row_out = PD * e + PD * 4 + G * P * 4 + PD * e
    scale = 0 if mode == "fwd" else 2 * PD * e
    hbm = row_in + gemms + dd + grad + row_out + scale
    design = row_in + k_l2 + dd + g_l2 + PD * 4 + row_out + scale
    # launches: row pass, 3 GEMMs, the scale (diagonal maxima, frexp, ldexp: ~6), D x D pass, partial sum, loss (2),
    # gradient GEMM, factor (2), normalize backward; + autograd's scale
    return Estimate(useful, flops_exec, prec, min_b, design, hbm, 0, 18 + (0 if mode == "fwd" else 1))


def _gram_triton(G, P, D, dtype, mode, prec, useful, min_b, sms=132, clamp=False) -> Estimate:
    """The Triton Gram design (dinov3_kernels/_triton/gram.py), student gradient only, as the benchmark runs it.

    Tiles T = 128 (64 when clamping), P and D padded to whole tiles (Pp, Dp: D to a multiple of 128); compute dtype
    c = bf16/fp16 for 16-bit input; for fp32 input fp16 under TF32 (same 10-bit mantissa, fp16 tensor-core rate),
    fp32 with IEEE products otherwise (the normalised case, as benchmarked).
      prologue: reads S and T once (whole rows in registers up to 8192 columns), writes Y = [Ŝ | T̂] (G·Pp·2·Dp·c)
        and the norms.
      forward: per upper-triangle pair one tile product over the 2·Dp columns (2·T²·2·Dp FLOPs; diagonal tiles in
        full), loading Y_i and Y_j (2·T·2·Dp·c; a diagonal tile Y_i alone, for both operands, on the 16-bit paths);
        writes E' for the upper-triangle tiles only (G·pairs·T²·c) and the
        row-sum slots (2·2·T fp32 per pair side). HBM: Y of the groups in flight re-read through L2 (see _hbm), E'
        once. Y is freed at the end of the forward; E', the row sums and the norms are what autograd holds.
      backward ("fwd+bwd" only): one program per (2 row blocks, 128-column chunk) runs the GEMM E'_i:·x̂ over Pp
        for both blocks (2·Pp²·Dp FLOPs per group, plus the odd last block computed twice), E'_i: read from the
        stored tiles (transposed left of the diagonal) once per chunk (Dp/128 times) and x̂ once per PAIR of row
        blocks (Pp/2T times; each x̂ tile feeds two accumulators): from Y, kept in the compute dtype where Pp > Dp,
        else rebuilt from the INPUT x (e bytes per element) and its norm; then reads x and the row sums and writes
        the gradient, already multiplied by grad_output (no separate scale pass); for fp32 input the second block's
        dL/dx̂ is parked in the output and read back (its epilogue after the first's: registers).
      Launches: prologue + forward + the loss kernel (partials summed in fp64); the backward kernel.
    """
    e = 2 if dtype in ("bfloat16", "float16") else 4
    c = 2 if (e == 2 or prec == "tf32") else 4
    prec = "bf16" if c == 2 else prec
    T = 64 if clamp else 128
    Pp, Dp = _cdiv(P, T) * T, _cdiv(D, 128) * 128
    nb = Pp // T
    pairs = nb * (nb + 1) // 2
    n_chunks = Dp // 128
    fwd_flops = pairs * 2 * T * T * 2 * Dp
    progs = _cdiv(nb, 2)  # backward programs per group and chunk: 2 row blocks each
    bwd_flops = 2 * (2 * progs) * T * Pp * Dp  # the odd last block computed twice
    PD = G * P * D
    y_bytes = G * Pp * 2 * Dp * c
    e_bytes = G * pairs * T * T * c
    rs_bytes = G * 2 * nb * Pp * 4
    prologue = 2 * PD * e + y_bytes + G * 2 * Pp * 4
    # Y_i and Y_j per pair; a diagonal tile loads Y_i once for both operands (the wgmma paths: c = 2).
    fwd = G * (2 * pairs - (nb if c == 2 else 0)) * T * 2 * Dp * c + e_bytes + rs_bytes
    bwd = mode != "fwd"
    flops_exec = G * (fwd_flops + (bwd_flops if bwd else 0))
    # E'_i: (Pp·T elements) per row block and chunk; x̂ (Pp x 128) per program of 2 row blocks: from the kept Y in
    # the compute dtype where Pp > Dp, else rebuilt from x in the input dtype and the norms.
    keep_y = Pp > Dp
    xb = 128 * c if keep_y else 128 * e + 4
    park = T * 128 * 4 * 2 if e == 4 else 0  # fp32 output: the second block's dL/dx̂ parked and read back
    grad = (G * nb * n_chunks * Pp * T * c + G * progs * n_chunks * Pp * xb + G * (nb // 2) * n_chunks * park
            + G * nb * n_chunks * nb * T * 4 + 2 * PD * e) if bwd else 0
    design = prologue + fwd + grad
    # HBM per kernel: each byte once (inputs, Y written then read, E' written then read, row sums, x, gradient)
    # while the groups whose tiles are in flight keep their re-read set in L2 (forward: Y, with one 128-wide program
    # per SM (1 CTA/SM at ~250 registers), 2 for 64-wide tiles; gradient: E' and x, 1 program per SM).
    fwd_groups = min(G, _cdiv(sms * (1 if T == 128 else 2), pairs))
    bwd_groups = min(G, _cdiv(sms, progs * n_chunks))
    hbm = (prologue
           + _hbm(y_bytes + e_bytes + rs_bytes, fwd, fwd_groups * Pp * 2 * Dp * c)
           + (_hbm(e_bytes + (y_bytes // 2 if keep_y else PD * e) + rs_bytes + 2 * PD * e, grad,
                   bwd_groups * (pairs * T * T * c + Pp * Dp * (c if keep_y else e))) if bwd else 0))
    return Estimate(useful, flops_exec, prec, min_b, design, min(hbm, design), 0, 3 + (1 if bwd else 0))


# ---- KoLeo loss ------------------------------------------------------------------------------------------------------
KOLEO_BACKENDS = ("official_tf32", "official_fp32", "compile", "composed", "triton", "triton_chunked",
                  "triton_symmetric", "cuda")
KOLEO_COMPOSED_EXTRA = 8  # dinov3_kernels.koleo.COMPOSED_EXTRA
KOLEO_COMPOSED_BLOCK = 2**26  # dinov3_kernels.koleo.COMPOSED_BLOCK
KOLEO_TRITON_EXTRA = 8  # dinov3_kernels._triton.koleo.RERANK_EXTRA
# The widest d whose resident search tiles fit shared memory, per searched element size (dinov3_kernels._triton.koleo
# ._block_sizes: a 128-row query tile and two 64-row search tiles within RESIDENT_SMEM = 200 KB). The Triton search
# reads 16-bit rows for every input dtype since 2026-12-01; the CUDA one has no resident kernel.
KOLEO_TRITON_RESIDENT_D = {2: 384}
KOLEO_TRITON_RESIDENT_MAX_ROWS = 4096  # ... and below this many rows (dinov3_kernels._triton.koleo.RESIDENT_MAX_ROWS)
# The symmetric Triton search (dinov3_kernels._triton.koleo: query rows = the whole set, d past the resident reach,
# n >= SYMMETRIC_MIN_ROWS; half the tile pairs; at most SYMMETRIC_MAX_SLABS slabs).
KOLEO_TRITON_SYMMETRIC_MIN_ROWS = 4096
KOLEO_TRITON_SYMMETRIC_MAX_KC = 4  # ... for lists of up to 4 candidates, longer ones (fp32 input) from d = 2048
KOLEO_TRITON_SYMMETRIC_LONG_LIST_D = 2048
KOLEO_TRITON_SYMMETRIC_SUPER = 8  # dinov3_kernels._triton.koleo.SYMMETRIC_SUPER: super-columns of the pair order


def koleo_symmetric_order(nsb, sup=KOLEO_TRITON_SYMMETRIC_SUPER):
    """The slab pairs (a, b), a <= b < nsb, in the order the symmetric search's programs take them
    (dinov3_kernels._triton.koleo._grouped_pair; sup None: the column-by-column order it replaced)."""
    if sup is None:
        return [(i, j) for j in range(nsb) for i in range(j + 1)]
    order = []
    for m0 in range(0, nsb, sup):
        w = min(sup, nsb - m0)
        order += [(a, m0 + j) for a in range(m0) for j in range(w)]
        order += [(m0 + i, m0 + j) for j in range(w) for i in range(j + 1)]
    return order


@functools.lru_cache(maxsize=None)  # the same few (nsb, sup, window) for every row of the tables
def koleo_symmetric_slabs_in_flight(nsb, sup, window):
    """Distinct slabs the `window` programs running at once read, averaged over the run (the working set the L2
    must hold for each slab to come from HBM about once)."""
    order = koleo_symmetric_order(nsb, sup)
    if len(order) <= window:
        return float(nsb)
    counts = [len({x for pair in order[w:w + window] for x in pair}) for w in range(len(order) - window + 1)]
    return sum(counts) / len(counts)
KOLEO_TRITON_SYMMETRIC_MAX_SLABS = 64

# The top-k selection of the Triton searches, in warp instructions per (query tile, search tile) pair, read from the
# SASS of the default configs (Triton 3.9, sm_90, topk 1: tests/kernels/triton_compile.py's compile of
# koleo_fwd_triton at n = 9000 / 2048 / 4096, d = 1024 / 384; benchmarks/NOTES.md KoLeo section 10):
# (kernel, query-tile rows, candidates per list) -> (the tile's fixed epilogue, one round on the rows' lists, one on
# the columns' lists). Fixed: the tile loop's body less its K loop and its round loops. Lists of one candidate (16-bit
# input) and the resident kernel's unrolled rounds (KC of them wherever any row improves, i.e. every tile) are
# inline, so they are in the fixed count. The symmetric search's column rounds reduce across the warps of the
# transposed tile (shuffles and barriers through shared memory): 3.2x a row round.
KOLEO_TRITON_SELECT_INSTR = {
    ("chunked", 128, 9): (538, 472, 0), ("chunked", 128, 1): (1670, 0, 0),
    ("chunked", 64, 9): (606, 472, 0), ("chunked", 64, 1): (1127, 0, 0),
    ("symmetric", 128, 9): (1240, 464, 1471), ("symmetric", 128, 1): (3489, 0, 0),
    ("resident", 128, 9): (2923, 0, 0), ("resident", 128, 1): (874, 0, 0),
}


@functools.lru_cache(maxsize=None)
def koleo_select_rounds(tiles, kc, rows, width):
    """Mean top-k rounds per tile of a list that sees `tiles` tiles of `width` candidates, `rows` lists at once
    (benchmarks/koleo_topk_rounds.py: iid scores, 8 repetitions, fixed seed)."""
    import koleo_topk_rounds

    return float(koleo_topk_rounds.rounds_per_tile(tiles, kc, rows=rows, width=width, reps=8).mean())


def koleo_select_instr(kernel, bm, bn, kc, pairs, tiles_per_list):
    """Warp instructions of the Triton search's top-k selection over `pairs` tile pairs (see KOLEO_TRITON_SELECT_INSTR;
    while-loop rounds from koleo_select_rounds for lists that see `tiles_per_list` tiles)."""
    # Counts were read for lists of 1 (inline round) and of 9 (run-time rounds); other lengths take the latter's.
    fixed, row_round, col_round = KOLEO_TRITON_SELECT_INSTR[(kernel, bm, 1 if kc == 1 else 9)]
    rounds = koleo_select_rounds(tiles_per_list, kc, bm, bn) if row_round or col_round else 0.0
    per_warp = fixed + rounds * (row_round + col_round)
    return pairs * (8 if bm == 128 else 4) * per_warp


def koleo(n, d, dtype, backend, mode, tf32=True, sms=132) -> Estimate:
    """KoLeo loss (topk 1) of (n, d) features.

    official*/compile: normalize, the n×n fp32 product written, its row max read back, the neighbours gathered, the
      pairwise distance (eager: the difference written, then its norm); backward O(n·d) elementwise (~10 passes;
      compile ~5, and its forward elementwise ~5 passes instead of ~10).
    triton/cuda: a norm pass, then programs of BM query rows that stream the search set in BN-row tiles: CUDA
      BM = BN = 64 times splits of the set (since 2026-12-01; ranges of at least 2 tiles, enough for 2 programs per
      SM), then a merge-and-distance kernel; Triton (since issue 14) BN = 128 and BM = 128 where the
      grid keeps 2 programs per SM with it (n >= ~2300), else 64, times splits of the set, enough for 2 programs
      per SM (at most 32 splits for top-1 in fp32, 256 for 16-bit), then a merge kernel and a fixed-order sum.
      CUDA, and Triton where the tiles below do not fit: per (query tile, search tile) both tiles come from L2,
      n·M·d·e·(1/BM + 1/BN) bytes (see _hbm).
      Triton with the query tile resident (since issue 14, d <= KOLEO_TRITON_RESIDENT_D[2] = 384; since the
      thirteenth session only below n = KOLEO_TRITON_RESIDENT_MAX_ROWS, where its unrolled rounds cost less than
      the chunked and symmetric searches save): BM = 128,
      BN = 64 at any n, each program reads its query tile once, n·M·d·e/BM + programs·BM·d·e.
      Triton symmetric (since 2026-12-01: query rows = the whole set, not resident,
      n >= KOLEO_TRITON_SYMMETRIC_MIN_ROWS, 16-bit input or d >= KOLEO_TRITON_SYMMETRIC_LONG_LIST_D):
      128-row tiles against the 128-column (lists of <= 16 slots: every 16-bit topk, fp32 topk <= 8; else 64-column)
      tiles from their own start on (half the pairs, both tiles from L2 per pair, plus the columns' top-k lists read
      and written per pair), programs = NSB (NSB + 1) / 2 slab pairs, NSB + 1 candidate lists per row for the merge;
      HBM: the slabs its programs in flight read (one per SM), averaged over the run in the kernel's pair order
      (super-columns of KOLEO_TRITON_SYMMETRIC_SUPER slabs: koleo_symmetric_slabs_in_flight), as the re-read set.
      triton_chunked / triton_symmetric: the Triton kernel with the symmetric search off / with its list-length rule
      lifted (symmetric wherever the rows are the whole set, n >= KOLEO_TRITON_SYMMETRIC_MIN_ROWS, not resident).
      Triton's top-k selection (since the thirteenth session): warp instructions per tile pair read from its SASS
      (KOLEO_TRITON_SELECT_INSTR) times the rounds its lists take (koleo_select_rounds), issued at 4 per SM per
      clock, added to the matrix time where one CTA holds the SM (8 warps), beside it for two 4-warp CTAs
      (Estimate.warp_instr; benchmarks/NOTES.md KoLeo section 10). The CUDA kernels' selection is not modelled.
      The matrix rate is scaled by the SMs the grid fills (min(1, programs / SMs)). Both kernels search 16-bit rows
      in every case: fp32 input (since 2026-12-01; before, Triton ran TF32 on the raw rows and CUDA IEEE FMA) on an
      fp16 copy of u that the norm pass writes (it reads the rows twice, the second time from L2, and writes n·d·2
      bytes), keeping 1 + 8 candidates that the merge (CUDA: the finish kernel, lists of 16) re-ranks exactly from
      the fp32 rows (each candidate and neighbour row, and the query row with it, read once more: 2·(9 + 1)·n·d·4
      bytes); 16-bit input as it is, top-1 (2·2·n·d·e). Backward: the distance gradient (x_i and x_nn read, fp32 atomics
      for the neighbours), then a normalize backward.
    composed: the neighbour op normalises (read x, write fp32 u), then per block of R = 2^26 / n query rows one GEMM
      (TF32 for fp32 with TF32 on, bf16 for 16-bit, reading the block and the whole set) writing R·n fp32 scores, a
      diagonal fill, for 16-bit input a column scale (read + write), topk (read); re-ranking the K = 1 + 8 candidates
      with one Triton pass on CUDA (each candidate row read once: n·K·d fp32); sorts and the settled check on (n, K)
      are small; one host sync (counted as 5 launches); rows left unsettled (rare: near ties) are not modelled.
      Launches: ~29 + 4 per query block forward (normalise, blocks, re-rank, sorts, check, the loss's ~11 ops).
      The loss: the reference's autograd expression (normalise again, gather, pairwise distance, log: ~7 passes over
      n·d fp32 forward, ~10 backward, as the official eager path).
    """
    e = 2 if dtype in ("bfloat16", "float16") else 4
    nd = n * d
    useful = 2 * n * n * d
    min_b = (1 if mode == "fwd" else 2) * nd * e
    if backend in ("official_tf32", "official_fp32", "compile"):
        fused = backend == "compile"
        prec = _precision(dtype, tf32 and backend != "official_fp32")
        fwd_b = (5 if fused else 10) * nd * 4 + 2 * n * n * 4
        b = fwd_b + (0 if mode == "fwd" else (5 if fused else 10) * nd * 4)
        launches = (5 if fused else 10) + (0 if mode == "fwd" else (4 if fused else 12))
        return Estimate(useful, useful, prec, min_b, b, b, 0, launches)
    if backend == "composed":
        prec = _precision(dtype, tf32)
        K = 1 + KOLEO_COMPOSED_EXTRA
        blocks = _cdiv(n, min(n, max(1, KOLEO_COMPOSED_BLOCK // n)))
        f = nd * (e + 4) + nd * e * (1 + blocks) + n * n * 4 * (2 if e == 4 else 4) + n * K * d * 4 + nd * 4
        loss = nd * (e + 4) + 5 * nd * 4
        b = f + loss + (0 if mode == "fwd" else 10 * nd * 4)
        launches = 4 * blocks + 29 + (0 if mode == "fwd" else 12)
        return Estimate(useful, useful, prec, min_b, b, b, 0, launches)
    if backend not in ("triton", "triton_chunked", "triton_symmetric", "cuda"):
        raise ValueError(f"koleo: unknown backend {backend!r}")
    # triton_chunked / triton_symmetric: the Triton kernel with its symmetric search turned off / with the search's
    # list-length rule lifted (bench_koleo's rows of those names).
    chunked, forced = backend == "triton_chunked", backend == "triton_symmetric"
    backend = "triton" if chunked or forced else backend
    # Since 2026-12-01 both kernels search fp32 input on an fp16 copy of u (TF32's mantissa, 16-bit bytes and rate)
    # that the norm pass writes (re-reading the rows): es bytes per searched element, copy the pass's extra traffic.
    es = 2
    copy = nd * e + nd * 2 if e == 4 else 0
    if backend == "cuda":
        # dinov3_kernels/_cuda/koleo.py default_splits: ranges of >= 2 tiles, enough for 2 blocks per SM
        splits = max(1, min(_cdiv(_cdiv(n, 64), 2), _cdiv(2 * sms, _cdiv(n, 64))))
        bm, bn, prec, programs = 64, 64, "bf16", _cdiv(n, 64) * splits
        resident = symmetric = False
        kc = 1 if e == 2 else 1 + KOLEO_TRITON_EXTRA  # topk 1; fp32: + 8 spares re-ranked in the finish kernel
        kmax = 1 if kc == 1 else 16
        merge, launches = (2 * (kc + 1) if kc > 1 else 2) * nd * e + 2 * n * splits * kmax * 8, 3
    else:
        resident = d <= KOLEO_TRITON_RESIDENT_D[es] and n < KOLEO_TRITON_RESIDENT_MAX_ROWS
        kc = 1 if e == 2 else 1 + KOLEO_TRITON_EXTRA
        kcp = max(2, 1 << (kc - 1).bit_length())
        symmetric = (not resident and not chunked and n >= KOLEO_TRITON_SYMMETRIC_MIN_ROWS
                     and (forced or kc <= KOLEO_TRITON_SYMMETRIC_MAX_KC or d >= KOLEO_TRITON_SYMMETRIC_LONG_LIST_D))
        tiles = _cdiv(n, 128)  # the launcher's rule: 128-row tiles where the grid keeps 2 programs per SM
        bm = 128 if tiles * min(_cdiv(2 * sms, tiles), tiles) >= 2 * sms else 64
        if symmetric:
            bm, bn = 128, 128 if kcp <= 16 else 64  # 128 x 128 tiles for lists of up to 16 slots
        else:
            bm, bn = (128, 64) if resident else (bm, 128)
        prec = "bf16"
        if symmetric:
            group = _cdiv(tiles, min(KOLEO_TRITON_SYMMETRIC_MAX_SLABS, 1024 // kcp - 1))
            splits = _cdiv(tiles, group) + 1  # candidate lists per row: one per slab + the own slab's lower rows
            programs = (splits - 1) * splits // 2
        else:
            splits = max(1, min(_cdiv(2 * sms, _cdiv(n, bm)), _cdiv(n, bn), 512 // kcp))
            programs = _cdiv(n, bm) * splits
        merge, launches = 2 * (kc + 1) * nd * e + 2 * n * splits * kcp * 8, 4
    if symmetric:
        # Tile pairs: for each 128-row tile, the column tiles from its own start on (the half above the diagonal);
        # per pair both tiles from L2 and the columns' top-k state read and written (KCP (value, index) per column).
        pairs = sum(_cdiv(n, bn) - it * (bm // bn) for it in range(_cdiv(n, bm)))
        flops_exec = 2 * pairs * bm * bn * d
        search = pairs * ((bm + bn) * d * es + 2 * bn * kcp * 8)
    else:
        pairs = _cdiv(n, bm) * _cdiv(n, bn)
        flops_exec = 2 * pairs * bm * bn * d
        # The set per query tile; the query tile per search tile, or once per program when resident.
        search = _cdiv(n, bm) * nd * es + (programs * bm * d * es if resident else _cdiv(n, bn) * nd * es)
    warp_instr, alu_serial = 0.0, True
    if backend == "triton":
        # The selection (KOLEO_TRITON_SELECT_INSTR): the symmetric search's lists see the `group` tiles of their
        # program, the others the column tiles of their split. One CTA per SM (8 warps) runs it after its products;
        # two 4-warp CTAs per SM (64-row tiles) overlap one's selection with the other's products.
        kernel = "symmetric" if symmetric else "resident" if resident else "chunked"
        seen = group if symmetric else _cdiv(_cdiv(n, bn), splits)
        warp_instr = koleo_select_instr(kernel, bm, bn, kc, pairs, seen)
        alu_serial = bm == 128
    fwd_design = nd * e + copy + search + merge
    bwd_design = 2 * nd * e + 2 * nd * 8 + 2 * nd * e + nd * 4 + nd * e
    design = fwd_design + (0 if mode == "fwd" else bwd_design)
    # HBM: the input (norm pass, merge re-reads), the copy written and read back, with the searched set re-read
    # through L2. The symmetric search's working set: the slabs its programs in flight (1 per SM) read, on average
    # over the run, in its grouped pair order (koleo_symmetric_slabs_in_flight: ~26 of 64 slabs); the other searches
    # sweep the whole set.
    working = nd * es
    if symmetric:
        slab = min(n, group * bm) * d * es
        working = min(working, koleo_symmetric_slabs_in_flight(splits - 1, KOLEO_TRITON_SYMMETRIC_SUPER,
                                                               min(programs, sms)) * slab)
    fwd_hbm = _hbm(3 * nd * e + (2 * nd * 2 if copy else 0), fwd_design, working)
    hbm = fwd_hbm + (0 if mode == "fwd" else 2 * nd * e + 2 * nd * 4 + nd * e)
    return Estimate(useful, flops_exec, prec, min_b, design, hbm, 0, launches + 2 + (0 if mode == "fwd" else 4),
                    sm_fill=min(1.0, programs / sms), warp_instr=warp_instr, alu_serial=alu_serial)


# ---- RoPE attention --------------------------------------------------------------------------------------------------
ATTENTION_BACKENDS = ("official", "compile", "sdpa_flash", "sdpa_cudnn", "flash_attn", "flash_attn+apply_rope",
                      "composed", "triton", "cuda")
_EAGER_ROPE_BYTES = 68  # per element of q or k, per direction: fp32 casts, rotate_half, 2 muls, add, cat, cast back
_FUSED_ROPE_BYTES = 8   # compile: one read, one write per element, plus the sin/cos tables
# The Triton row-wise passes (dinov3_kernels._triton.attention._row_pass): a program rotates BLOCK_N tokens of a group
# of heads and loads their sin/cos rows once for the group; groups as large as keep ROW_PASS_MIN_PROGRAMS programs.
ATTN_ROW_PASS_MIN_PROGRAMS = 1024  # dinov3_kernels._triton.attention.ROW_PASS_MIN_PROGRAMS
ATTN_ROW_PASS_ELEMENTS = 4096  # ... ROW_PASS_ELEMENTS: BLOCK_N x the head dim padded to a power of two


def attention_heads_per_pass(B, H, N, D) -> int:
    """Heads per program of the Triton row-wise passes (their sin/cos rows are read once per group)."""
    block_n = max(16, min(64, ATTN_ROW_PASS_ELEMENTS // (1 << (D - 1).bit_length())))
    tiles = _cdiv(N, block_n)
    g = H
    while g > 1 and B * _cdiv(H, g) * tiles < ATTN_ROW_PASS_MIN_PROGRAMS:
        g = _cdiv(g, 2)
    return g


def attention(B, H, N, D, dtype, backend, mode, tf32=True, sms=132) -> Estimate:
    """Softmax attention over the packed qkv (B, N, 3·H·D) -> (B, N, H·D), RoPE on q and k (or not, for the floors).

    Flash-style kernels (ours, SDPA flash/cuDNN, flash-attn): the forward reads each q tile once and K, V once per q
    tile (ceil(N/BM) times, from L2), writes out and the logsumexp. Backward: one pass per k tile (Q, dO, lse, Delta
    re-read per k tile) with dQ accumulated in fp32 atomics (10·N²·D FLOPs, 1 exp per score) for the CUDA kernel,
    FA2/cuDNN and Triton (ours, since the FA2-style redesign; before it Triton ran separate dK/dV and dQ passes,
    14·N²·D and 2 exps). Tiles assumed: Triton BM=128 forward, 64x64 backward; CUDA and the others 64 (FA2 forward:
    128). RoPE sin/cos are the tied (HW, D/2) fp32 tables: 4·D bytes per token per load, from L2 (shared by all
    heads); the Triton row-wise passes (rotations, Delta, dQ finishing, the composed backend's split and merge) load
    them once per token tile for a group of g heads (attention_heads_per_pass: all H at the benchmark shapes), the
    tile kernels once per (batch, head) tile; the CUDA kernels read them as passed since issue 14 (before, the glue
    expanded them to (HW, D) with two cat launches per call, 8·D bytes per load). The CUDA tensor-core path (16-bit) rotates K once into a (B, N, C)
    scratch before the forward and Q once before the backward (one launch more each; 2 element moves of scratch
    traffic each), Q (forward) and K (backward) once per tile as they load; its fp32 SIMT path re-rotates K on every
    q-tile pass (tables read ceil(N/64) times per token) and Q on every k-tile pass. The model charges nothing for
    mma.sync instead of wgmma, nor for the loads the CUDA kernels leave unpipelined (all but the 16-bit K'/V tiles
    of the forward and Q'/dO tiles of the backward, streamed with cp.async since issue 14). Triton rotates K
    once into a (B, H, N, D) scratch (forward) and Q once (backward, with K, in the pass that computes Delta), so
    its tables are read a fixed number of times per token and head (forward: 1 for q in the attention kernel,
    1/g for k; backward: 1/g for q and k in the Delta pass, 1 for dK in the main kernel, 1/g for the dQ finishing
    pass, or 1 for the split backward's dQ kernel); for fp32 input with TF32 at D >= 128 its backward is split
    (dK/dV per k tile, dQ per 128-query tile: 14·N²·D FLOPs, no dQ atomics),
    for 2 element moves of scratch traffic per rotated tensor, an fp32 dQ accumulator (zeroed, added to, read) and
    one launch more each way. SDPA on the strided q/k/v views of qkv adds the copies of out (forward) and of the
    packed gradient (backward). The official path adds the eager RoPE chain, ~68 bytes per element of q and of k each
    way; compile fuses it to ~8. HBM: K and V (and Q, dO in backward) of the heads in flight, re-read through L2 (see _hbm).
    composed (dinov3_kernels "composed"): SDPA's flash kernels (the FA2 counts) on contiguous rotated q, k, v written
    by one Triton pass over the packed qkv (reads 3 elements, writes 3 per token and head dim, plus the tied tables
    once per token tile and group of g heads: 4·D/g bytes per token and head, from L2), and in backward one pass
    that reads dq, dk, dv and writes the packed gradient (6 element moves again); SDPA's output is already in the (B, N, C) layout (no copy)
    and dout is read in place. One launch more each way than SDPA alone.
    """
    e = 2 if dtype in ("bfloat16", "float16") else 4
    prec = _precision(dtype, tf32)
    X = B * H * N * D  # elements of one of q, k, v, out
    BH = B * H
    useful = (1.0 if mode == "fwd" else 3.5) * 4 * BH * N * N * D
    min_b = (4 if mode == "fwd" else 8) * X * e
    kernel = {"triton": "triton", "cuda": "cuda"}.get(backend, "fa2")
    bm_f = {"triton": 128, "cuda": 64, "fa2": 128}[kernel]
    bm_b = 64
    nq, nk = _cdiv(N, bm_f), _cdiv(N, 64)
    flops_exec = 4 * BH * nq * bm_f * nk * 64 * D
    exps = BH * N * N
    fwd_design = X * e + nq * 2 * X * e + X * e + BH * N * 4
    table = BH * N * D * 4  # one read of the tied tables per token and head
    scratch = 0.0  # rotated scratch (Triton, CUDA 16-bit forward) and dQ accumulator traffic (design and HBM)
    if kernel == "cuda" and e == 2:
        fwd_design += 2 * table
        scratch += 2 * X * e  # K' written once by the rotate kernel, read back (its nq reads are the K reads above)
    elif kernel == "cuda":
        fwd_design += table * (1 + nq)
    elif kernel == "triton":
        g = attention_heads_per_pass(B, H, N, D)
        fwd_design += table * (1 + 1 / g)
        scratch += 2 * X * e  # K rotated: written once, read back (its nq reads are the K reads above)
    bwd_flops, bwd_exps, bwd_design = 0.0, 0.0, 0.0
    split = False
    if mode != "fwd":
        nkb = _cdiv(N, bm_b)
        delta = 2 * X * e + BH * N * 4
        dkdv = 2 * X * e + nkb * (2 * X * e + BH * N * 8) + 2 * X * e
        dq = nkb * X * 8 + X * 4 + X * e  # fp32 atomics per k tile, then the finishing pass
        bwd_flops, bwd_exps = 10 * BH * N * N * D, exps
        split = kernel == "triton" and e == 4 and prec == "tf32" and D >= 128
        if split:
            # Triton's split backward for TF32 at Dh 128 (the single kernel spills there): dK/dV per k tile without
            # dQ, then dQ per 128-query tile re-reading K and V (and recomputing P: 14·N²·D FLOPs, 2 exps per
            # score), dQ stored once, no fp32 accumulator and no finishing pass.
            dq = _cdiv(N, 128) * 2 * X * e + 2 * X * e + BH * N * 8 + X * e
            bwd_flops, bwd_exps = 14 * BH * N * N * D, 2 * exps
        bwd_design = delta + dkdv + dq
        if kernel == "cuda" and e == 2:
            bwd_design += 2 * table  # Q rotated once by the rotate kernel, K once per k tile (once per token)
            scratch += 2 * X * e  # Q' written once, read back (its nkb reads are the Q reads above)
        elif kernel == "cuda":
            bwd_design += table * (nkb + 1)
        elif kernel == "triton":
            bwd_design += table * ((2 + 1 / g) if split else (1 + 2 / g))
            # Q and K rotated by the Delta pass (each written and read back); the dQ accumulator zeroed (single kernel).
            scratch += 4 * X * e + (0 if split else X * 4)
    design = fwd_design + bwd_design
    heads_in_flight = min(BH, max(1, _cdiv(sms, nq)))
    per_head = N * D * e * (2 if mode == "fwd" else 4)
    hbm = _hbm(min_b + BH * N * (4 if mode == "fwd" else 12), design, heads_in_flight * per_head)
    launches = 1 if mode == "fwd" else 4  # backward: Delta, dK/dV, dQ (or the dQ finishing pass)
    if kernel == "triton":
        # the rotate pass (forward); backward: rotate+Delta, zero dQ, main, finish (split: rotate+Delta, dK/dV, dQ)
        launches += 1 if mode == "fwd" or not split else 0
    elif kernel == "cuda" and e == 2:
        launches += 1 if mode == "fwd" else 2  # the K rotate kernel before the forward, the Q one in the backward
    extra = scratch
    if backend in ("official", "compile", "sdpa_flash", "sdpa_cudnn"):
        extra += 2 * X * e + (0 if mode == "fwd" else 2 * X * e + 6 * X * e)
        launches += 1 + (0 if mode == "fwd" else 2)
    if backend in ("official", "compile"):
        per_elem = _EAGER_ROPE_BYTES if backend == "official" else _FUSED_ROPE_BYTES
        extra += 2 * X * per_elem * (1 if mode == "fwd" else 2)
        launches += (16 if backend == "official" else 2) * (1 if mode == "fwd" else 2)
    if backend == "composed":
        passes = 1 if mode == "fwd" else 2
        extra += 6 * X * e * passes
        # the tables, from L2 (H·W·D·4 bytes in all, shared by every head), once per group of heads
        design += BH * N * D * 4 * passes / attention_heads_per_pass(B, H, N, D)
        launches += passes
    if backend == "flash_attn+apply_rope":
        extra += (4 * X * e + 2 * N * D * 4) * (1 if mode == "fwd" else 2)
        launches += 1 if mode == "fwd" else 2
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}")
    return Estimate(useful, flops_exec + bwd_flops, prec, min_b, design + extra, hbm + extra, exps + bwd_exps,
                    launches)


# ---- DINO / iBOT head losses ------------------------------------------------------------------------------------------
HEAD_BACKENDS = ("official_tf32", "compile", "composed", "triton")
_HEAD_TILES = {4: (64, 64), 2: (64, 64)}  # Triton (BLOCK_N, BLOCK_K) for TF32 / 16-bit input (fp32 IEEE: 64 x 32 bwd)


def head(n_s, n_t, T, K, d, dtype, backend, mode, tf32=True, iters=3, sms=132) -> Estimate:
    """DINO (n_s = 10·B student rows against T = 2 teacher rows each) or iBOT (n_s = n_t masked tokens, T = 1) loss
    from features (rows, d) and prototypes (K, d); L = rows · K logit entries, 4 bytes each in fp32.

    official_tf32: the two logit GEMMs write L_s and L_t; Sinkhorn-Knopp is ~9 + 10·iters full passes over the
      teacher's K × n_t fp32 matrix (exp, /τ, the total, and per iteration two sums and four in-place divisions, each
      a read or a read+write); the student side ~6 passes forward (cast, /τ, log_softmax, the einsum's reads) and ~8
      backward (the log_softmax and scale backward, the two GEMMs reading dL). compile fuses the elementwise chains:
      ~2 + 2·iters teacher passes, 3 student passes forward, 4 backward. Peak memory: several L-sized buffers.
    triton: 2·iters teacher sweeps (a column pass, then per iteration a row pass and a column pass, and the final
      row normaliser), one student sweep that recomputes each student row's T teacher rows (T + 1 logit GEMMs per
      student tile), and in backward two more such sweeps (dz: row tiles x K splits; dW: K tiles x row splits), each
      adding its gradient GEMM. Every sweep re-reads z and W tiles through L2 in (BLOCK_N, BLOCK_K) = 64 x 64 tiles:
      e·d·rows·K·(1/BLOCK_N + 1/BLOCK_K) bytes per sweep; HBM: W (K·d·e, larger than L2 at these K) once per sweep
      and row-tile group in flight (see _hbm). Nothing L-sized is written: extra memory O((rows + K)·d).
    composed: the kernels' sweeps with PyTorch GEMMs over row chunks, one sweep fewer in backward (dz and dW from the
      same recomputed chunk); each chunk's logits are written by the GEMM and read/written by ~6 elementwise ops
      (~28 bytes per logit entry and sweep).
    """
    e = 2 if dtype in ("bfloat16", "float16") else 4
    prec = _precision(dtype, tf32)
    fwd = mode == "fwd"
    g = 2 * K * d  # flops per logit row
    useful = g * (n_s + n_t) + (0 if fwd else 2 * g * n_s)
    inputs = e * d * (n_s + n_t + 2 * K)
    grads = 0 if fwd else e * d * (n_s + K)
    min_b = inputs + grads
    Ls, Lt = 4 * n_s * K, 4 * n_t * K
    if backend in ("official_tf32", "compile"):
        fused = backend == "compile"
        t_passes = (2 + 2 * iters) if fused else (9 + 10 * iters)
        s_passes = (3 if fused else 6) + (0 if fwd else (4 if fused else 8))
        b = min_b + 2 * inputs * (0 if fwd else 1) + t_passes * Lt + s_passes * Ls
        launches = (6 + 2 * iters if fused else 12 + 7 * iters) + (0 if fwd else (4 if fused else 10))
        return Estimate(useful, useful, prec, min_b, b, b, 0, launches)
    if backend not in ("composed", "triton"):
        raise ValueError(f"head: unknown backend {backend!r}")
    teacher_entries = 2 * iters * n_t * K
    student_sweep = n_s * K * (1 + T)
    sweeps_bwd = 1 if backend == "composed" else 2
    entries = teacher_entries + student_sweep + (0 if fwd else sweeps_bwd * student_sweep)
    flops_exec = 2 * d * entries + (0 if fwd else 2 * g * n_s)
    n_sweeps = 2 * iters + 1 + (0 if fwd else sweeps_bwd)
    if backend == "composed":
        design = n_sweeps * inputs + entries * 28 + grads + (0 if fwd else 4 * K * d)  # fp32 dW accumulator
        hbm = design
        launches = (2 * iters + 1) * 4 + 8 * (1 + T) + (0 if fwd else 10 * (1 + T))
        return Estimate(useful, flops_exec, prec, min_b, design, hbm, 0, launches)
    bn, bk = _HEAD_TILES[e]
    design = e * d * entries * (1 / bn + 1 / bk) + grads + (0 if fwd else 4 * d * (n_s * 8 + K))  # + split partials
    in_flight = sms * 2 * bn * d * e  # the z tiles the ~2 waves of programs hold
    hbm = n_sweeps * inputs + grads
    hbm = _hbm(hbm, design, in_flight + K * d * e)
    launches = 2 * iters + 1 + (0 if fwd else 2)
    return Estimate(useful, flops_exec, prec, min_b, design, min(hbm, design), 0, launches)


# ---- records ---------------------------------------------------------------------------------------------------------
def estimate(op: str, backend: str, params: dict, dtype: str, mode: str, tf32: Optional[bool],
             sms: int = 132) -> Optional[Estimate]:
    """The estimate for a benchmark record's (op, backend, shape, dtype, pass); None for what is not modelled."""
    tf = bool(tf32) if tf32 is not None else True
    if op == "gram_loss" and backend in GRAM_BACKENDS:
        return gram(params["G"], params["P"], params["D"], dtype, backend, mode, tf, sms)
    if op == "koleo_loss" and backend in KOLEO_BACKENDS:
        return koleo(params["n"], params["d"], dtype, backend, mode, tf, sms)
    if op in ("dino_head_loss", "ibot_head_loss") and backend in HEAD_BACKENDS:
        return head(params["n_s"], params["n_t"], params["T"], params["K"], params["d"], dtype, backend, mode, tf,
                    sms=sms)
    if op == "rope_attention" and backend in ATTENTION_BACKENDS:
        return attention(params["B"], params["H"], params["N"], params["D"], dtype, backend, mode, tf, sms)
    return None


def annotate(rec, ceil: Ceilings) -> None:
    """Adds the prediction at the measured ceilings (and at the H100/H200 datasheets) to a measured record."""
    est = estimate(rec.op, rec.backend, rec.params, rec.dtype, rec.mode, rec.tf32, ceil.sms)
    if est is None:
        return
    here = predict(est, ceil)
    rec.predicted_ms = here["ms"]
    rec.extra["predicted_bound"] = here["bound"]
    rec.extra["design_bytes"] = est.design_bytes
    rec.extra["hbm_bytes"] = est.hbm_bytes
    for dev in DEVICES:
        rec.extra["predicted_ms_" + dev.name.split()[0]] = predict(est, dev)["ms"]
    if rec.median_ms:
        rec.measured_over_predicted = rec.median_ms / here["ms"]
        secs = rec.median_ms * 1e-3
        rate = est.flops / secs / 1e12 / ceil.tflops[est.precision]
        bw = est.min_bytes / secs / 1e9 / ceil.hbm_gbps
        rec.fraction_of_ceiling = max(rate, bw)


# ---- the committed predictions ---------------------------------------------------------------------------------------
def benchmark_cases():
    """(op, backends, [(shape label, params)], dtype) for the GPU shapes of the benchmark scripts."""
    import bench_attention
    import bench_gram
    import bench_head
    import bench_koleo

    def head_params(kind, rows, K, d):
        n_s, n_t = (bench_head.S_CROPS * rows, bench_head.T_CROPS * rows) if kind == "dino" else (rows, rows)
        return dict(n_s=n_s, n_t=n_t, T=bench_head.T_CROPS if kind == "dino" else 1, K=K, d=d)

    return [
        ("gram_loss", GRAM_BACKENDS, [(f"G={G} P={P} D={D}", dict(G=G, P=P, D=D))
                                      for G, P, D in bench_gram.GPU_SHAPES + bench_gram.WIDE_GPU_SHAPES], "float32"),
        ("gram_loss", GRAM_BF16_BACKENDS,
         [(f"G={G} P={P} D={D}", dict(G=G, P=P, D=D)) for G, P, D in bench_gram.BF16_GPU_SHAPES], "bfloat16"),
        ("koleo_loss", KOLEO_BACKENDS, [(f"n={n} d={d}", dict(n=n, d=d)) for n, d in bench_koleo.GPU_SHAPES],
         "float32"),
        ("rope_attention", ATTENTION_BACKENDS,
         [(f"{m} B={B} H={H} D={D} N={N}", dict(B=B, H=H, N=N, D=D)) for m, H, D, B, N in bench_attention.gpu_cases()],
         "bfloat16"),
    ] + [
        (f"{kind}_head_loss", HEAD_BACKENDS,
         [(f"{kind} {'B' if kind == 'dino' else 'M'}={rows} K={K} d={d}", head_params(kind, rows, K, d))
          for k2, rows, K, d in bench_head.GPU_CASES if k2 == kind], "float32")
        for kind in ("dino", "ibot")
    ]


def rows():
    out = []
    for op, backends, shapes, dtype in benchmark_cases():
        for label, params in shapes:
            for mode in ("fwd", "fwd+bwd"):
                for backend in backends:
                    tf32 = backend != "official_fp32"
                    est = estimate(op, backend, params, dtype, mode, tf32)
                    out.append((op, label, dtype, mode, backend, tf32, est, [predict(est, d) for d in DEVICES]))
    return out


def markdown() -> str:
    g = common.fmt
    lines = [
        "# Predicted times (roofline model): PREDICTIONS, NOT MEASUREMENTS",
        "",
        f"Written by `python benchmarks/roofline.py` ({_dt.date.today().isoformat()}, commit {common.git_commit()}), "
        "before any GPU run. The model and every assumption are in `benchmarks/roofline.py`; `run_all.py` records "
        "measured/predicted beside each measurement, at the ceilings it measures. Times are floors at peak rates.",
        "",
        "Columns: GFLOP executed by the design; MB: the fewest bytes (min), the design's global traffic (design, L2 "
        "level) and what of it must come from HBM; bound: the largest term on the H200; predicted milliseconds.",
        "",
    ]
    current = None
    for op, label, dtype, mode, backend, tf32, est, (h100, h200) in rows():
        if (op, dtype) != current:
            current = op, dtype
            lines += ["", f"## {op} ({dtype}{', TF32 on except official_fp32' if dtype == 'float32' else ''})", "",
                      "| shape | pass | backend | GFLOP exec | min MB | design MB | HBM MB | bound (H200) | H100 ms "
                      "| H200 ms |", "|" + "---|" * 10]
        lines.append(f"| {label} | {mode} | {backend} | {g(est.flops_exec / 1e9)} | {g(est.min_bytes / 1e6)} | "
                     f"{g(est.design_bytes / 1e6)} | {g(est.hbm_bytes / 1e6)} | {h200['bound']} | {g(h100['ms'])} | "
                     f"{g(h200['ms'])} |")
    import goals  # imports this module: here, not at the top

    lines += [""] + goals.predicted_markdown()
    return "\n".join(lines).rstrip("\n") + "\n"


# ---- the table "auto" reads -----------------------------------------------------------------------------------------
AUTO_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dinov3_kernels",
                          "auto_table.json")
PACKAGE_BACKENDS = ("composed", "triton", "cuda")  # what "auto" chooses among, with the reference
# The reference on CUDA tensors IS the official formulation (TF32 as torch allows): where the model predicts it faster
# than every kernel, "auto" takes it, so that "auto" is never predicted slower than the path users ran before. Not
# for the head losses: their reference materialises the (rows x K) logits, the memory the fused op exists to avoid
# (2 GB per iBOT call at the benchmark shape), so "auto" keeps the bounded-memory backends there.
REFERENCE_MODEL = {"gram_loss": "official_tf32", "koleo_loss": "official_tf32", "rope_attention": "official"}
AUTO_DTYPES = ("float32", "bfloat16", "float16")
# The model charges nothing for mma.sync instead of wgmma or for loads that do not overlap the math, which only the
# CUDA kernels have (WMMA / mma.sync, synchronous global->shared staging): a CUDA kernel predicted less than
# CUDA_MARGIN faster than another backend is ordered after it.
CUDA_MARGIN = 1.10
# op -> (what its size counts, the backends it implements, [(largest size of the bucket or None, the shape whose
# prediction decides the bucket)]). Shapes: the benchmark scripts' GPU shapes (ViT-L width, heads of 64 dims).
AUTO_OPS = {
    "gram_loss": ("P, patch tokens per Gram matrix", PACKAGE_BACKENDS,
                  [(512, dict(G=64, P=256, D=1024)), (2048, dict(G=32, P=1024, D=1024)),
                   (None, dict(G=8, P=4096, D=1024))]),
    "koleo_loss": ("n, rows of the search set", ("composed", "triton", "cuda"),
                   [(2048, dict(n=1024, d=1024)), (8192, dict(n=4096, d=1024)), (None, dict(n=16384, d=1024))]),
    "rope_attention": ("N, tokens per image", PACKAGE_BACKENDS,
                       [(512, dict(B=64, H=16, N=261, D=64)), (None, dict(B=16, H=16, N=1029, D=64))]),
    "apply_rope": ("N, tokens per image", ("triton",), [(None, None)]),
    "dino_head_loss": ("rows of student logits", ("composed", "triton"),
                       [(None, dict(n_s=640, n_t=128, T=2, K=65536, d=256))]),
    "ibot_head_loss": ("rows of student logits", ("composed", "triton"),
                       [(None, dict(n_s=7500, n_t=7500, T=1, K=65536, d=256))]),
}


def _predicted_row(op: str, dtype: str, max_size, params, backends) -> dict:
    """One predicted row of the auto table: the op's backends ordered by the predicted H200 time of a forward+backward
    pass at TF32 (as the official trainer runs; CUDA_MARGIN for the CUDA kernels), headed by "reference" (the
    official formulation) where it is predicted faster than all of them; backends the model does not cover go last,
    in the op's order."""
    ms = {}
    for b in backends:
        est = estimate(op, b, params, dtype, "fwd+bwd", True) if params else None
        if est is not None:
            ms[b] = round(predict(est, H200)["ms"], 4)
    ref = (estimate(op, REFERENCE_MODEL[op], params, dtype, "fwd+bwd", True)
           if op in REFERENCE_MODEL and params else None)
    ref_ms = round(predict(ref, H200)["ms"], 4) if ref is not None else None
    order = sorted(ms, key=ms.get)
    while "cuda" in order[:-1]:  # CUDA_MARGIN, above
        i = order.index("cuda")
        if ms["cuda"] * CUDA_MARGIN <= ms[order[i + 1]]:
            break
        order[i], order[i + 1] = order[i + 1], "cuda"
    order += [b for b in backends if b not in ms]
    if ref_ms is not None and ms and ref_ms < min(ms.values()):
        order.insert(0, "reference")  # a kernel backend stays next, for what the reference cannot take
    if ref_ms is not None:
        ms["reference"] = ref_ms
    source = ("predicted: benchmarks/roofline.py, H200 datasheet, fwd+bwd at "
              + ", ".join(f"{k}={v}" for k, v in params.items()) if ms else
              "predicted: the only kernel backend of this op (not modelled)")
    return dict(op=op, dtype=dtype, max_size=max_size, order=order, source=source, predicted_ms_h200=ms)


# ---- measured rows: a GPU run's results.json orders the backends -----------------------------------------------------
# The shape parameter that only repeats the work (images, Gram matrices): a measurement at the bucket's deciding shape
# with another batch stands for it (the benchmarks size the batch to fill the GPU, the table's shapes are nominal).
BATCH_PARAM = {"gram_loss": "G", "rope_attention": "B"}
# A backend whose measured result was further than this from float64 (forward loss or input gradient, relative) is
# not ranked by its time: the GPU tests say what is wrong with it, "auto" does not reward it.
MAX_MEASURED_ERROR = 0.05


def _measured_row(results: dict, op: str, dtype: str, max_size, params, backends):
    """The row a run measured at the bucket's deciding shape (forward+backward medians), or None where it measured
    no kernel backend there. Kernel backends measured there go first, fastest first; then those it could not time
    (not available on that machine: in predicted order); then those that failed or were too far from float64.
    "reference" (the official path as users run it, TF32 on) heads the row where it was faster than every kernel."""
    if not params:
        return None
    key = {k: v for k, v in params.items() if k != BATCH_PARAM.get(op)}
    official = REFERENCE_MODEL.get(op)
    ok, failed, shape = {}, {}, None
    for r in results.get("records", []):
        if (r.get("op") != op or r.get("dtype") != dtype or r.get("pass") != "fwd+bwd"
                or any((r.get("params") or {}).get(k) != v for k, v in key.items())):
            continue
        name = "reference" if r.get("backend") == official else r.get("backend")
        if name != "reference" and name not in backends:
            continue  # a yardstick the table does not choose (compile, SDPA without RoPE, ...)
        if r.get("status") != "ok" or not r.get("median_ms"):
            if r.get("status") == "failed":
                failed[name] = r.get("note") or "failed"
            continue
        if r.get("error") is not None and r["error"] > MAX_MEASURED_ERROR:
            failed[name] = f"relative error {r['error']:.3g} against float64 (> {MAX_MEASURED_ERROR})"
            continue
        ok[name] = min(ok.get(name, float("inf")), float(r["median_ms"]))
        shape = r.get("shape")
    kernels = {b: ms for b, ms in ok.items() if b != "reference"}
    if not kernels:
        return None
    predicted = _predicted_row(op, dtype, max_size, params, backends)
    order = sorted(kernels, key=kernels.get)
    order += [b for b in predicted["order"] if b not in order and b != "reference" and b not in failed]
    order += [b for b in backends if b not in order]
    if "reference" in ok and ok["reference"] < min(kernels.values()):
        order.insert(0, "reference")
    env = results.get("environment", {})
    dry = " (DRY RUN on the CPU: not a GPU result)" if results.get("dry_run") else ""
    row = dict(op=op, dtype=dtype, max_size=max_size, order=order,
               source=f"measured{dry}: {env.get('device', '?')}, commit {env.get('commit', '?')}, "
                      f"{env.get('date', '?')}, fwd+bwd median at {shape}",
               measured_ms={b: round(v, 4) for b, v in sorted(ok.items(), key=lambda kv: kv[1])},
               predicted_ms_h200=predicted["predicted_ms_h200"])
    if failed:
        row["not_ranked"] = failed
    return row


def measured_rows(results: dict, allow_dry_run: bool = False) -> dict:
    """(op, dtype, max_size) -> the auto-table row that a run's results.json (benchmarks/run_all.py) measured, for
    every row whose deciding shape it timed; rows it did not time are absent (they stay as they are). A dry run or a
    run without a GPU orders nothing unless allow_dry_run (its rows then say so)."""
    env = results.get("environment") or {}
    if not allow_dry_run and (results.get("dry_run") or not env.get("gpu")):
        raise ValueError("these results are not from a GPU run (a dry run, or no GPU): their times cannot order the "
                         "backends of the auto table")
    rows = {}
    for op, (_, backends, buckets) in AUTO_OPS.items():
        for dtype in AUTO_DTYPES:
            for max_size, params in buckets:
                row = _measured_row(results, op, dtype, max_size, params, backends)
                if row is not None:
                    rows[op, dtype, max_size] = row
    return rows


def auto_table(existing: Optional[dict] = None, measured: Optional[dict] = None) -> dict:
    """The auto table: per op, dtype and size bucket the order "auto" tries the op's backends in. A row of `measured`
    (measured_rows) replaces the row; else a row of `existing` whose source is a measurement is kept; else the row is
    predicted (_predicted_row)."""
    kept = {(r["op"], r["dtype"], r["max_size"]): r for r in (existing or {}).get("rows", [])
            if not r["source"].startswith("predicted")}
    kept.update(measured or {})
    rows = []
    for op, (_, backends, buckets) in AUTO_OPS.items():
        for dtype in AUTO_DTYPES:
            for max_size, params in buckets:
                row = kept.get((op, dtype, max_size))
                rows.append(row if row is not None else _predicted_row(op, dtype, max_size, params, backends))
    return {
        "about": "backend=\"auto\" on CUDA tensors: the first backend of `order` that can run, from the row of the "
                 "op and dtype with the smallest max_size >= size (null: no bound). Written by `python "
                 "benchmarks/roofline.py --auto-table`; GPU measurements replace the predicted rows.",
        "sizes": {op: what for op, (what, _, _) in AUTO_OPS.items()},
        "rows": rows,
    }


def load_measured(paths) -> dict:
    """measured_rows of each results.json in paths, later files replacing earlier ones row by row."""
    import json

    rows = {}
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        if not isinstance(results, dict) or not isinstance(results.get("records"), list):
            raise ValueError(f"{path}: not a results.json of benchmarks/run_all.py (no list of records)")
        try:
            rows.update(measured_rows(results))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return rows


def write_auto_table(path: str = AUTO_TABLE, measured: Optional[dict] = None) -> str:
    import json

    existing = None
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    text = json.dumps(auto_table(existing, measured), indent=1) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def table_changes(before: dict, after: dict) -> list:
    """(op, dtype, max_size, order before, order after, source after) for each row whose order or source changed."""
    old = {(r["op"], r["dtype"], r["max_size"]): r for r in before.get("rows", [])}
    out = []
    for r in after["rows"]:
        b = old.get((r["op"], r["dtype"], r["max_size"]))
        if b is None or b["order"] != r["order"] or b["source"] != r["source"]:
            out.append((r["op"], r["dtype"], r["max_size"], b["order"] if b else None, r["order"], r["source"]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the tables to this markdown file "
                                               "(the committed one is benchmarks/results/predicted.md)")
    p.add_argument("--auto-table", action="store_true",
                   help="write dinov3_kernels/auto_table.json from the predictions (keeps measured rows)")
    p.add_argument("--measured", action="append", default=[], metavar="RESULTS_JSON",
                   help="with --auto-table: a GPU run's results.json (benchmarks/run_all.py); the rows whose deciding "
                        "shape it timed are ordered by its measured times (repeatable: later files win)")
    args = p.parse_args()
    if args.measured and not args.auto_table:
        p.error("--measured goes with --auto-table")
    if args.auto_table:
        import json

        try:
            measured = load_measured(args.measured)
        except (OSError, ValueError, KeyError) as exc:
            p.exit(2, f"roofline.py: cannot read the measurements: {exc}\n")
        with open(AUTO_TABLE) as f:
            before = json.load(f)
        path = write_auto_table(measured=measured)
        with open(path) as f:
            changes = table_changes(before, json.load(f))
        print(f"wrote {path}: {len(measured)} measured rows from {len(args.measured)} file(s), "
              f"{len(changes)} rows changed")
        for op, dtype, size, old_order, new_order, source in changes:
            print(f"  {op} {dtype} <= {size}: {old_order} -> {new_order} ({source})")
        return
    text = markdown()
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
