// Python binding of the wgmma attention prototype (csrc/cuda/attention_wgmma.cu,
// attention_wgmma_backward.cu) and of the mma.sync kernels it is compared with
// (csrc/cuda/attention_mma.cu), for scripts/try_wgmma.py and
// try_wgmma_backward.py, which build these files with
// torch.utils.cpp_extension.load. Not part of the nanoblock package.
#include <torch/extension.h>

#include "cuda/attention_wgmma.cuh"

namespace nanoblock::cuda {
// From attention_mma.cuh, which a host compiler cannot include (it pulls in
// common.cuh's device code).
bool mma_attention_supported(const at::Tensor& qkv, int64_t hd, const at::Tensor& other);
void mma_attention_forward(const at::Tensor& qkv, int64_t n_head, const at::Tensor& out,
                           const at::Tensor& lse);
void mma_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                            const at::Tensor& lse, const at::Tensor& row_dot, int64_t n_head,
                            const at::Tensor& grad_qkv);
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

// The mma.sync backward (its grad_kv kernel, then its grad_q kernel) as the
// op calls it: grad_qkv [B, T, 3C] from grad_out [B, T, C], qkv, lse and
// row_dot = rowsum(grad_out * out) [B, n_head, T] (float32).
at::Tensor mma_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse,
                        const at::Tensor& row_dot, int64_t n_head) {
  TORCH_CHECK(qkv.is_cuda() && qkv.dim() == 3 && qkv.is_contiguous(),
              "mma_backward: qkv [B, T, 3C] contiguous on the GPU");
  TORCH_CHECK(grad_out.is_contiguous() && lse.is_contiguous() && row_dot.is_contiguous(),
              "mma_backward: grad_out, lse, row_dot contiguous");
  const int64_t C = qkv.size(2) / 3;
  TORCH_CHECK(n_head > 0 && C % n_head == 0, "mma_backward: C % n_head != 0");
  TORCH_CHECK(nanoblock::cuda::mma_attention_supported(qkv, C / n_head, grad_out),
              "mma_backward: the mma.sync kernels do not take this dtype / head dim");
  const c10::DeviceGuard guard(qkv.device());
  at::Tensor grad_qkv = at::empty_like(qkv);
  if (qkv.size(0) * qkv.size(1) > 0) {
    nanoblock::cuda::mma_attention_backward(grad_out, qkv, lse, row_dot, n_head, grad_qkv);
  }
  return grad_qkv;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wgmma_available", &nanoblock::cuda::wgmma_attention_available,
        "True when the wgmma kernels were built for sm_90a and the GPU is compute capability 9.0");
  m.def("wgmma_forward", &nanoblock::cuda::wgmma_attention_forward, "(out, lse) = f(qkv, n_head)",
        py::arg("qkv"), py::arg("n_head"));
  m.def("wgmma_forward_tiles", &nanoblock::cuda::wgmma_attention_forward_tiles,
        "(out, lse) = f(qkv, n_head, key_tile, warpgroups, schedule: 0 serial, 1 pipelined, "
        "2 producer)",
        py::arg("qkv"), py::arg("n_head"), py::arg("key_tile"), py::arg("warpgroups"),
        py::arg("schedule"));
  m.def("mma_forward", &mma_forward, "the mma.sync forward: (out, lse) = f(qkv, n_head)",
        py::arg("qkv"), py::arg("n_head"));
  m.def("mma_backward", &mma_backward,
        "the mma.sync backward: grad_qkv = f(grad_out, qkv, lse, row_dot, n_head)",
        py::arg("grad_out"), py::arg("qkv"), py::arg("lse"), py::arg("row_dot"),
        py::arg("n_head"));
  m.def("wgmma_grad_kv", &nanoblock::cuda::wgmma_attention_grad_kv,
        "writes the k and v columns of grad_qkv: f(grad_out, qkv, lse, row_dot, n_head, "
        "grad_qkv, query_tile, warpgroups, schedule: 0 serial, 1 overlap, 2 pipelined)",
        py::arg("grad_out"), py::arg("qkv"), py::arg("lse"), py::arg("row_dot"),
        py::arg("n_head"), py::arg("grad_qkv"), py::arg("query_tile"), py::arg("warpgroups"),
        py::arg("schedule") = 0);
  m.def("wgmma_grad_q", &nanoblock::cuda::wgmma_attention_grad_q,
        "writes the q columns of grad_qkv: f(grad_out, qkv, lse, row_dot, n_head, grad_qkv, "
        "key_tile, warpgroups, schedule: 0 serial, 2 pipelined)",
        py::arg("grad_out"), py::arg("qkv"), py::arg("lse"), py::arg("row_dot"),
        py::arg("n_head"), py::arg("grad_qkv"), py::arg("key_tile"), py::arg("warpgroups"),
        py::arg("schedule") = 0);
}
