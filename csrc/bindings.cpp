// PYBIND11_MODULE(_C): one binding per launch function. Pointers and streams arrive as integers
// (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); no torch headers anywhere.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace dinov3 {
// ---- gram_loss.cu ----
// ---- koleo_loss.cu ----
// ---- rope_attention.cu ----
void rope_attention_fwd_cuda(std::uintptr_t qkv, std::uintptr_t sin, std::uintptr_t cos, std::uintptr_t out,
                             std::uintptr_t lse, int64_t B, int64_t N, int64_t H, int64_t Dh, int64_t num_prefix,
                             int64_t stride_b, int64_t stride_n, int dtype, float scale, std::uintptr_t stream);
void rope_attention_bwd_cuda(std::uintptr_t qkv, std::uintptr_t sin, std::uintptr_t cos, std::uintptr_t out,
                             std::uintptr_t lse, std::uintptr_t dout, std::uintptr_t dqkv, std::uintptr_t dq_accum,
                             std::uintptr_t delta, int64_t B, int64_t N, int64_t H, int64_t Dh, int64_t num_prefix,
                             int64_t stride_b, int64_t stride_n, int dtype, float scale, std::uintptr_t stream);
}  // namespace dinov3

PYBIND11_MODULE(_C, m) {
  m.doc() = "dinov3_kernels CUDA kernels (device pointers in, no torch headers)";
  m.def("cuda_runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  // ---- gram_loss.cu ----
  // ---- koleo_loss.cu ----
  // ---- rope_attention.cu ----
  // qkv (B, N, 3C) with last stride 1, strides in elements; out / dout (B, N, C) and dqkv (B, N, 3C) contiguous;
  // lse, delta (B, H, N) float32; dq_accum (B, N, C) float32 workspace (bf16/fp16 only); sin, cos (N - prefix, Dh).
  m.def("rope_attention_fwd_cuda", &dinov3::rope_attention_fwd_cuda, py::arg("qkv"), py::arg("sin"), py::arg("cos"),
        py::arg("out"), py::arg("lse"), py::arg("B"), py::arg("N"), py::arg("H"), py::arg("Dh"), py::arg("num_prefix"),
        py::arg("stride_b"), py::arg("stride_n"), py::arg("dtype"), py::arg("scale"), py::arg("stream"));
  m.def("rope_attention_bwd_cuda", &dinov3::rope_attention_bwd_cuda, py::arg("qkv"), py::arg("sin"), py::arg("cos"),
        py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("dqkv"), py::arg("dq_accum"), py::arg("delta"),
        py::arg("B"), py::arg("N"), py::arg("H"), py::arg("Dh"), py::arg("num_prefix"), py::arg("stride_b"),
        py::arg("stride_n"), py::arg("dtype"), py::arg("scale"), py::arg("stream"));
}
