// Python binding of the wgmma attention prototype (csrc/cuda/attention_wgmma.cu)
// and of the mma.sync forward it is compared with (csrc/cuda/attention_mma.cu),
// for scripts/try_wgmma.py, which builds the three files with
// torch.utils.cpp_extension.load. Not part of the nanoblock package.
#include <torch/extension.h>

#include "cuda/attention_wgmma.cuh"

namespace nanoblock::cuda {
// From attention_mma.cuh, which a host compiler cannot include (it pulls in
// common.cuh's device code).
bool mma_attention_supported(const at::Tensor& qkv, int64_t hd, const at::Tensor& other);
void mma_attention_forward(const at::Tensor& qkv, int64_t n_head, const at::Tensor& out,
                           const at::Tensor& lse);
}  // namespace nanoblock::cuda

namespace {

// The mma.sync forward as the op calls it: out [B, T, C], lse [B, n_head, T].
std::tuple<at::Tensor, at::Tensor> mma_forward(const at::Tensor& qkv_in, int64_t n_head) {
  TORCH_CHECK(qkv_in.is_cuda() && qkv_in.dim() == 3, "mma_forward: qkv [B, T, 3C] on the GPU");
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  TORCH_CHECK(n_head > 0 && C % n_head == 0, "mma_forward: C % n_head != 0");
  TORCH_CHECK(nanoblock::cuda::mma_attention_supported(qkv, C / n_head, at::Tensor()),
              "mma_forward: the mma.sync kernels do not take this dtype / head dim");
  const c10::DeviceGuard guard(qkv.device());
  at::Tensor out = at::empty({B, T, C}, qkv.options());
  at::Tensor lse = at::empty({B, n_head, T}, qkv.options().dtype(at::kFloat));
  if (B * T > 0) nanoblock::cuda::mma_attention_forward(qkv, n_head, out, lse);
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wgmma_available", &nanoblock::cuda::wgmma_attention_available,
        "True when the wgmma kernels were built for sm_90a and the GPU is compute capability 9.0");
  m.def("wgmma_forward", &nanoblock::cuda::wgmma_attention_forward, "(out, lse) = f(qkv, n_head)",
        py::arg("qkv"), py::arg("n_head"));
  m.def("wgmma_forward_tiles", &nanoblock::cuda::wgmma_attention_forward_tiles,
        "(out, lse) = f(qkv, n_head, key_tile, warpgroups, pipelined)", py::arg("qkv"),
        py::arg("n_head"), py::arg("key_tile"), py::arg("warpgroups"), py::arg("pipelined"));
  m.def("mma_forward", &mma_forward, "the mma.sync forward: (out, lse) = f(qkv, n_head)",
        py::arg("qkv"), py::arg("n_head"));
}
