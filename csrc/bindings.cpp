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
int64_t koleo_num_partials(int64_t n);
void koleo_fwd_cuda(const void* s, int dtype, int64_t M, int64_t D, int64_t stride_m, int64_t stride_d,
                    int64_t offset, int64_t n, int topk, float eps, float pdist_eps, float* norm, int* counter,
                    int64_t* out_idx, float* out_dist, float* partial, float* loss, cudaStream_t stream);
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
  m.def("koleo_num_partials", &dinov3::koleo_num_partials, "size of the per-block partial buffer of koleo_fwd");
  m.def(
      "koleo_fwd",
      [](std::uintptr_t s, int dtype, int64_t M, int64_t D, int64_t stride_m, int64_t stride_d, int64_t offset,
         int64_t n, int topk, float eps, float pdist_eps, std::uintptr_t norm, std::uintptr_t counter,
         std::uintptr_t idx, std::uintptr_t dist, std::uintptr_t partial, std::uintptr_t loss, std::uintptr_t stream) {
        dinov3::koleo_fwd_cuda(reinterpret_cast<const void*>(s), dtype, M, D, stride_m, stride_d, offset, n, topk, eps,
                               pdist_eps, reinterpret_cast<float*>(norm), reinterpret_cast<int*>(counter),
                               reinterpret_cast<int64_t*>(idx), reinterpret_cast<float*>(dist),
                               reinterpret_cast<float*>(partial), reinterpret_cast<float*>(loss),
                               reinterpret_cast<cudaStream_t>(stream));
      },
      "KoLeo forward: row norms, fused top-k search, distances and loss (two launches)");
  // ---- rope_attention.cu ----
}
