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
}
