"""torch.library schemas and fake (meta) implementations of the ops.

Schemas live here, in Python, so the ops exist (for torch.compile, opcheck, export) whether or not the CUDA
extension was built. Each op module registers its real kernel (CPU and CUDA) and its autograd formula next to its
reference, in dinov3_kernels/<op>.py.
"""

import torch

LIB = torch.library.Library("dinov3_kernels", "DEF")  # noqa: TOR901 (kept alive for the process)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- gram_loss -------------------------------------------------------------------------------------------------
# (G, P, D) student and teacher -> (loss, d loss/d student, d loss/d teacher). The gradients are for a loss weight of
# one and are empty (numel 0) when not asked for; the autograd formula scales them by the incoming gradient.
LIB.define(
    "gram_loss_fwd(Tensor student, Tensor teacher, bool apply_norm, bool clamp_student, bool clamp_teacher, "
    "bool grad_student, bool grad_teacher, str backend, str method) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("dinov3_kernels::gram_loss_fwd")
def _gram_loss_fwd_fake(student, teacher, apply_norm, clamp_student, clamp_teacher, grad_student, grad_teacher,
                        backend, method):
    loss = student.new_empty((), dtype=_loss_dtype(student.dtype))
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if grad_teacher else teacher.new_empty(0)
    return loss, gs, gt


# The Triton tiled form computes its gradient in the backward, not in the forward: the forward returns (loss, E' (its
# upper-triangle tiles in the compute dtype), row-sum slots fp32, row norms fp32, Y = [Ŝ | T̂] or empty); the backward
# reads Ŝ and T̂ from Y when it was kept (P > D), else rebuilds them from the inputs and the norms. Shapes come from
# dinov3_kernels._triton.gram.saved_shapes.
LIB.define(
    "gram_loss_tiled_fwd(Tensor student, Tensor teacher, bool apply_norm, bool clamp_student, bool clamp_teacher, "
    "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("dinov3_kernels::gram_loss_tiled_fwd")
def _gram_loss_tiled_fwd_fake(student, teacher, apply_norm, clamp_student, clamp_teacher, grad_student, grad_teacher):
    from ._triton.gram import saved_shapes

    loss = student.new_empty((), dtype=torch.float32)
    saved = saved_shapes(student, apply_norm, clamp_student, clamp_teacher, grad_student, grad_teacher)
    return (loss,) + tuple(student.new_empty(shape, dtype=dtype) for shape, dtype in saved)


# Gradients (grad · d loss/d student or empty, grad · d loss/d teacher or empty) from gram_loss_tiled_fwd's outputs.
LIB.define(
    "gram_loss_tiled_bwd(Tensor grad, Tensor student, Tensor teacher, Tensor e, Tensor rowsums, Tensor norms, "
    "Tensor y, bool apply_norm, bool clamp_student, bool clamp_teacher, bool grad_student, bool grad_teacher) "
    "-> (Tensor, Tensor)"
)


@torch.library.register_fake("dinov3_kernels::gram_loss_tiled_bwd")
def _gram_loss_tiled_bwd_fake(grad, student, teacher, e, rowsums, norms, y, apply_norm, clamp_student, clamp_teacher,
                              grad_student, grad_teacher):
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student else student.new_empty(0)
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if grad_teacher else teacher.new_empty(0)
    return gs, gt


# ---- koleo_loss ------------------------------------------------------------------------------------------------
# search (M, D) raw features; the n query rows are search[offset : offset + n]. Returns (loss, indices (n, topk)
# int64 into search, distances (n, topk) fp32, row norms (M,) fp32); the last three are saved for the backward.
LIB.define("koleo_loss_fwd(Tensor search, int offset, int n, int topk, float eps, str backend) -> "
           "(Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake("dinov3_kernels::koleo_loss_fwd")
def _koleo_loss_fwd_fake(search, offset, n, topk, eps, backend):
    loss = search.new_empty((), dtype=_loss_dtype(search.dtype))
    idx = search.new_empty((n, topk), dtype=torch.int64)
    dist = search.new_empty((n, topk), dtype=torch.float32)
    norm = search.new_empty((search.shape[0],), dtype=torch.float32)
    return loss, idx, dist, norm


# Gradient of loss · grad w.r.t. search (M, D), from the saved outputs of koleo_loss_fwd; in search.dtype.
LIB.define("koleo_loss_bwd(Tensor grad, Tensor search, Tensor indices, Tensor dist, Tensor norm, int offset, int n, "
           "float eps, str backend) -> Tensor")


@torch.library.register_fake("dinov3_kernels::koleo_loss_bwd")
def _koleo_loss_bwd_fake(grad, search, indices, dist, norm, offset, n, eps, backend):
    return torch.empty_like(search, memory_format=torch.contiguous_format)


# The composed backend's neighbour search (no gradient): indices (n, topk) int64 into search of the topk rows most
# cosine-similar to each query row search[offset + i], itself excluded, ties to the lowest index.
LIB.define("nearest_neighbors(Tensor search, int offset, int n, int topk, float eps) -> Tensor")


@torch.library.register_fake("dinov3_kernels::nearest_neighbors")
def _nearest_neighbors_fake(search, offset, n, topk, eps):
    return search.new_empty((n, topk), dtype=torch.int64)


# ---- dino_head_loss / ibot_head_loss -------------------------------------------------------------------------------
# Logits are recomputed from features z (N, d) and prototypes W (K, d), never stored. backend: "triton" | "composed".
# Per prototype k: (max_n x_nk, Σ_n exp(x_nk - max)), x = scale · z Wᵀ + col_bias_k + row_bias_n; (K,) fp32 each. An
# empty bias means zero.
LIB.define("head_loss_col_lse(Tensor z, Tensor W, Tensor col_bias, Tensor row_bias, float scale, str backend) -> "
           "(Tensor, Tensor)")
# Per row n: logsumexp_k(scale · z_n·W_k + col_bias_k); (N,) fp32.
LIB.define("head_loss_row_lse(Tensor z, Tensor W, Tensor col_bias, float scale, str backend) -> Tensor")
# Student rows i against their teacher rows j = t·B + i mod B (B = N_t / T, T = pair_weight.shape[1]) with weights
# pair_weight (N_s, T): -> (row loss (N_s,), student logsumexp (N_s,)) fp32, where with S = student_scale · z_s W_sᵀ
# and teacher probabilities P_jk = exp(teacher_scale · z_t,j·W_t,k + teacher_bias_k - teacher_lse_j),
#   row loss_i = Σ_t w_it (logsumexp_k S_ik - Σ_k P_jk S_ik)   (the soft-target cross-entropy).
LIB.define("head_loss_ce(Tensor student_z, Tensor student_W, Tensor teacher_z, Tensor teacher_W, Tensor teacher_bias, "
           "Tensor teacher_lse, Tensor pair_weight, float student_scale, float teacher_scale, str backend) "
           "-> (Tensor, Tensor)")
# Gradients of Σ_i grad_rows_i · row loss_i w.r.t. student_z and student_W (empty when not asked for).
LIB.define("head_loss_ce_bwd(Tensor grad_rows, Tensor student_z, Tensor student_W, Tensor teacher_z, "
           "Tensor teacher_W, Tensor teacher_bias, Tensor teacher_lse, Tensor pair_weight, Tensor student_lse, "
           "float student_scale, float teacher_scale, bool grad_z, bool grad_W, str backend) -> (Tensor, Tensor)")


@torch.library.register_fake("dinov3_kernels::head_loss_col_lse")
def _head_loss_col_lse_fake(z, W, col_bias, row_bias, scale, backend):
    return W.new_empty((W.shape[0],), dtype=torch.float32), W.new_empty((W.shape[0],), dtype=torch.float32)


@torch.library.register_fake("dinov3_kernels::head_loss_row_lse")
def _head_loss_row_lse_fake(z, W, col_bias, scale, backend):
    return z.new_empty((z.shape[0],), dtype=torch.float32)


@torch.library.register_fake("dinov3_kernels::head_loss_ce")
def _head_loss_ce_fake(student_z, student_W, teacher_z, teacher_W, teacher_bias, teacher_lse, pair_weight,
                       student_scale, teacher_scale, backend):
    n = student_z.shape[0]
    return student_z.new_empty((n,), dtype=torch.float32), student_z.new_empty((n,), dtype=torch.float32)


@torch.library.register_fake("dinov3_kernels::head_loss_ce_bwd")
def _head_loss_ce_bwd_fake(grad_rows, student_z, student_W, teacher_z, teacher_W, teacher_bias, teacher_lse,
                           pair_weight, student_lse, student_scale, teacher_scale, grad_z, grad_W, backend):
    gz = torch.empty_like(student_z, memory_format=torch.contiguous_format) if grad_z else student_z.new_empty(0)
    gw = torch.empty_like(student_W, memory_format=torch.contiguous_format) if grad_W else student_W.new_empty(0)
    return gz, gw


# ---- rope_attention / apply_rope ---------------------------------------------------------------------------------
# Packed qkv (B, N, 3C) -> (out (B, N, C) in qkv.dtype, lse (B, num_heads, N) fp32: natural-log logsumexp of the
# scaled scores, saved for backward). sin/cos: (H·W, head_dim) fp32 contiguous. backend: "triton" | "cuda".
LIB.define(
    "rope_attention_fwd(Tensor qkv, Tensor sin, Tensor cos, int num_heads, int num_prefix_tokens, float scale, "
    "str backend) -> (Tensor, Tensor)"
)
# -> d qkv, (B, N, 3C) contiguous in qkv.dtype.
LIB.define(
    "rope_attention_bwd(Tensor qkv, Tensor sin, Tensor cos, Tensor out, Tensor lse, Tensor dout, int num_heads, "
    "int num_prefix_tokens, float scale, str backend) -> Tensor"
)
# (B, heads, N, Dh) q and k -> new contiguous rotated q and k; inverse=True applies the transposed rotation.
LIB.define(
    "apply_rope(Tensor q, Tensor k, Tensor sin, Tensor cos, int num_prefix_tokens, bool inverse, str backend) "
    "-> (Tensor, Tensor)"
)

# The composed backend's passes around SDPA. Split: packed qkv (B, N, 3C) -> q, k, v (B, heads, N, Dh) contiguous,
# q and k rotated on their patch tokens; merge (its backward): dq, dk, dv -> d qkv (B, N, 3C) contiguous, the
# transposed rotation on dq and dk. backend: "triton" (one Triton pass each) | "reference" (plain PyTorch, any dtype).
LIB.define(
    "rope_qkv_split(Tensor qkv, Tensor sin, Tensor cos, int num_heads, int num_prefix_tokens, str backend) "
    "-> (Tensor, Tensor, Tensor)"
)
LIB.define(
    "rope_qkv_merge(Tensor dq, Tensor dk, Tensor dv, Tensor sin, Tensor cos, int num_prefix_tokens, str backend) "
    "-> Tensor"
)


@torch.library.register_fake("dinov3_kernels::rope_qkv_split")
def _rope_qkv_split_fake(qkv, sin, cos, num_heads, num_prefix_tokens, backend):
    B, N, C3 = qkv.shape
    shape = (B, num_heads, N, C3 // (3 * num_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


@torch.library.register_fake("dinov3_kernels::rope_qkv_merge")
def _rope_qkv_merge_fake(dq, dk, dv, sin, cos, num_prefix_tokens, backend):
    B, H, N, Dh = dq.shape
    return dq.new_empty((B, N, 3 * H * Dh))


@torch.library.register_fake("dinov3_kernels::rope_attention_fwd")
def _rope_attention_fwd_fake(qkv, sin, cos, num_heads, num_prefix_tokens, scale, backend):
    B, N, C3 = qkv.shape
    out = qkv.new_empty((B, N, C3 // 3))
    lse = qkv.new_empty((B, num_heads, N), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("dinov3_kernels::rope_attention_bwd")
def _rope_attention_bwd_fake(qkv, sin, cos, out, lse, dout, num_heads, num_prefix_tokens, scale, backend):
    return qkv.new_empty(qkv.shape)


@torch.library.register_fake("dinov3_kernels::apply_rope")
def _apply_rope_fake(q, k, sin, cos, num_prefix_tokens, inverse, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)
