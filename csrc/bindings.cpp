// PYBIND11_MODULE(_C): one binding per launch function. Pointers and streams arrive as integers
// (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); no torch headers anywhere.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace dinov3 {
// ---- gram_loss.cu ----
int64_t gram_num_partials(int64_t G, int64_t P);
void gram_fwd(std::uintptr_t s_ptr, std::uintptr_t t_ptr, std::uintptr_t acc_s_ptr, std::uintptr_t acc_t_ptr,
              std::uintptr_t w_s_ptr, std::uintptr_t w_t_ptr, std::uintptr_t rinv_s_ptr, std::uintptr_t rinv_t_ptr,
              std::uintptr_t partial_ptr, int64_t G, int64_t P, int64_t D, int64_t s_stride_g, int64_t s_stride_p,
              int64_t s_stride_d, int64_t t_stride_g, int64_t t_stride_p, int64_t t_stride_d, int dtype_code,
              double scale, double eps, bool apply_norm, bool clamp_s, bool clamp_t, bool grad_s, bool grad_t,
              bool allow_tf32, std::uintptr_t stream);
void gram_norm_bwd(std::uintptr_t x_ptr, std::uintptr_t gxh_ptr, std::uintptr_t out_ptr, int64_t R, int64_t D,
                   int64_t stride_r, int64_t stride_d, int dtype_code, double eps, bool apply_norm,
                   std::uintptr_t stream);
// ---- koleo_loss.cu ----
int64_t koleo_num_partials(int64_t n);
int koleo_kmax(int topk);
int koleo_candidates(int topk, int dtype, int64_t M, int spares);
void koleo_fwd_cuda(const void* s, int dtype, int64_t M, int64_t D, int64_t stride_m, int64_t stride_d,
                    int64_t offset, int64_t n, int topk, int candidates, float eps, float pdist_eps, int64_t splits,
                    float* part_val, int* part_idx, float* norm, void* u_ws, int* counter, int64_t* out_idx,
                    float* out_dist, float* partial, float* loss, cudaStream_t stream);
// ---- rope_attention.cu ----
void rope_attention_fwd_cuda(std::uintptr_t qkv, std::uintptr_t sin, std::uintptr_t cos, std::uintptr_t k_rot,
                             std::uintptr_t out, std::uintptr_t lse, int64_t B, int64_t N, int64_t H, int64_t Dh,
                             int64_t num_prefix, int64_t tab_cols, int64_t stride_b, int64_t stride_n, int dtype,
                             float scale, std::uintptr_t stream);
void rope_attention_bwd_cuda(std::uintptr_t qkv, std::uintptr_t sin, std::uintptr_t cos, std::uintptr_t out,
                             std::uintptr_t lse, std::uintptr_t dout, std::uintptr_t dqkv, std::uintptr_t dq_accum,
                             std::uintptr_t delta, std::uintptr_t q_rot, int64_t B, int64_t N, int64_t H, int64_t Dh,
                             int64_t num_prefix, int64_t tab_cols, int64_t stride_b, int64_t stride_n, int dtype,
                             float scale, std::uintptr_t stream);
}  // namespace dinov3

PYBIND11_MODULE(_C, m) {
  m.doc() = "dinov3_kernels CUDA kernels (device pointers in, no torch headers)";
  m.def("cuda_runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  // ---- gram_loss.cu ----
  m.def("gram_num_partials", &dinov3::gram_num_partials, py::arg("G"), py::arg("P"),
        "Length of the fp32 partial-loss buffer gram_fwd writes: G * (number of 64x64 tile pairs i <= j).");
  m.def("gram_fwd", &dinov3::gram_fwd, py::arg("s_ptr"), py::arg("t_ptr"), py::arg("acc_s_ptr"), py::arg("acc_t_ptr"),
        py::arg("w_s_ptr"), py::arg("w_t_ptr"), py::arg("rinv_s_ptr"), py::arg("rinv_t_ptr"), py::arg("partial_ptr"), py::arg("G"), py::arg("P"), py::arg("D"), py::arg("s_stride_g"), py::arg("s_stride_p"),
        py::arg("s_stride_d"), py::arg("t_stride_g"), py::arg("t_stride_p"), py::arg("t_stride_d"),
        py::arg("dtype_code"), py::arg("scale"), py::arg("eps"), py::arg("apply_norm"), py::arg("clamp_s"),
        py::arg("clamp_t"), py::arg("grad_s"), py::arg("grad_t"), py::arg("allow_tf32"), py::arg("stream"),
        "Fused Gram loss: per-tile-pair partial losses and the fp32 gradients w.r.t. the normalised rows, every element "
        "written once (deterministic). Workspaces of the inputs that get a gradient: w_* holds "
        "gram_num_partials(G, P) * 4096 elements of the input dtype, rinv_* G * ceil(P / 64) * 64 fp32.");
  m.def("gram_norm_bwd", &dinov3::gram_norm_bwd, py::arg("x_ptr"), py::arg("gxh_ptr"), py::arg("out_ptr"), py::arg("R"),
        py::arg("D"), py::arg("stride_r"), py::arg("stride_d"), py::arg("dtype_code"), py::arg("eps"),
        py::arg("apply_norm"), py::arg("stream"),
        "Gradient w.r.t. x of x / max(|x|, eps) from the fp32 gradient w.r.t. the normalised rows; contiguous output.");
  // ---- koleo_loss.cu ----
  m.def("koleo_num_partials", &dinov3::koleo_num_partials, "size of the per-block partial buffer of koleo_fwd");
  m.def("koleo_kmax", &dinov3::koleo_kmax, py::arg("topk"),
        "length of one partial neighbour list of koleo_fwd (topk rounded up to 1, 2, 4, 8 or 16)");
  m.def("koleo_candidates", &dinov3::koleo_candidates, py::arg("topk"), py::arg("dtype_code"), py::arg("M"),
        py::arg("spares"),
        "candidates per row koleo_fwd keeps: topk for 16-bit input; for fp32 input (searched on its fp16 copy, then "
        "re-ranked exactly) min(topk + spares, 16, M - 1), at least topk");
  m.def(
      "koleo_fwd",
      [](std::uintptr_t s, int dtype, int64_t M, int64_t D, int64_t stride_m, int64_t stride_d, int64_t offset,
         int64_t n, int topk, int candidates, float eps, float pdist_eps, int64_t splits, std::uintptr_t part_val,
         std::uintptr_t part_idx, std::uintptr_t norm, std::uintptr_t u_ws, std::uintptr_t counter,
         std::uintptr_t idx, std::uintptr_t dist, std::uintptr_t partial, std::uintptr_t loss, std::uintptr_t stream) {
        dinov3::koleo_fwd_cuda(reinterpret_cast<const void*>(s), dtype, M, D, stride_m, stride_d, offset, n, topk,
                               candidates, eps, pdist_eps, splits, reinterpret_cast<float*>(part_val),
                               reinterpret_cast<int*>(part_idx), reinterpret_cast<float*>(norm),
                               reinterpret_cast<void*>(u_ws), reinterpret_cast<int*>(counter),
                               reinterpret_cast<int64_t*>(idx), reinterpret_cast<float*>(dist),
                               reinterpret_cast<float*>(partial), reinterpret_cast<float*>(loss),
                               reinterpret_cast<cudaStream_t>(stream));
      },
      "KoLeo forward: row norms (and for fp32 input the fp16 copy of the unit rows in u_ws, (M, D)), top-k search "
      "split over `splits` ranges of the search set (partial lists in part_val / part_idx: n * splits * "
      "koleo_kmax(candidates) fp32 / int32), merge (fp32: exact re-ranking of the candidates), distances and loss "
      "(three launches)");
  // ---- rope_attention.cu ----
  // qkv (B, N, 3C) with last stride 1, strides in elements; out / dout (B, N, C) and dqkv (B, N, 3C) contiguous;
  // lse, delta (B, H, N) float32; k_rot, q_rot (B, N, C) workspaces in the input dtype and dq_accum (B, N, C)
  // float32 workspace (bf16/fp16 only); sin, cos float32 (N - prefix, tab_cols) contiguous, tab_cols = Dh (full tables) or
  // Dh / 2 (tied halves).
  m.def("rope_attention_fwd_cuda", &dinov3::rope_attention_fwd_cuda, py::arg("qkv"), py::arg("sin"), py::arg("cos"),
        py::arg("k_rot"), py::arg("out"), py::arg("lse"), py::arg("B"), py::arg("N"), py::arg("H"), py::arg("Dh"), py::arg("num_prefix"),
        py::arg("tab_cols"), py::arg("stride_b"), py::arg("stride_n"), py::arg("dtype"), py::arg("scale"),
        py::arg("stream"));
  m.def("rope_attention_bwd_cuda", &dinov3::rope_attention_bwd_cuda, py::arg("qkv"), py::arg("sin"), py::arg("cos"),
        py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("dqkv"), py::arg("dq_accum"), py::arg("delta"),
        py::arg("q_rot"), py::arg("B"), py::arg("N"), py::arg("H"), py::arg("Dh"), py::arg("num_prefix"), py::arg("tab_cols"),
        py::arg("stride_b"), py::arg("stride_n"), py::arg("dtype"), py::arg("scale"), py::arg("stream"));
}
