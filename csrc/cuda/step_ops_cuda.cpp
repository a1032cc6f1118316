// Torch-facing CUDA registration of the step ops: checks arguments, allocates outputs and calls the
// torch-free launchers of step_kernels.cu. Compiled only in a CUDA build (fastmaml/build.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "step_kernels.h"

namespace fastmaml {
namespace {

fastmaml_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastmaml_cuda::DType::kFloat32;
    case at::kDouble: return fastmaml_cuda::DType::kFloat64;
    case at::kBFloat16: return fastmaml_cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastmaml CUDA step ops: expected float32, float64 or bfloat16, got ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastmaml::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor inner_update_cuda(const at::Tensor& phi_in, const at::Tensor& g_in, const at::Tensor& alpha_in) {
  check_matrix(phi_in, "phi", at::kCUDA);
  check_like(g_in, "g", phi_in, "phi");
  check_alpha(alpha_in, phi_in);
  const c10::cuda::CUDAGuard guard(phi_in.device());
  const at::Tensor phi = unit_inner_stride(phi_in), g = unit_inner_stride(g_in), alpha = alpha_in.contiguous();
  const int64_t T = phi.size(0), P = phi.size(1);
  at::Tensor out = at::empty({T, P}, phi.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(fastmaml_cuda::inner_update(dtype_of(phi), phi.const_data_ptr(), phi.stride(0), g.const_data_ptr(),
                                           g.stride(0), alpha.const_data_ptr(), alpha.dim() == 1,
                                           out.mutable_data_ptr(), T, P, c10::cuda::getCurrentCUDAStream()),
               "inner_update");
  return out;
}

void adjoint_launch(const at::Tensor& v, const at::Tensor* hu, const at::Tensor& g, const at::Tensor& alpha,
                    at::Tensor* out, at::Tensor* d_alpha) {
  const auto dtype = dtype_of(v);
  at::Tensor workspace;
  if (d_alpha && alpha.dim() == 0)
    workspace = at::empty({static_cast<int64_t>(fastmaml_cuda::adjoint_workspace_bytes(dtype, v.size(1)))},
                          v.options().dtype(at::kByte));
  check_launch(fastmaml_cuda::adjoint_update(
                   dtype, v.const_data_ptr(), v.stride(0), hu ? hu->const_data_ptr() : nullptr,
                   hu ? hu->stride(0) : 0, g.const_data_ptr(), g.stride(0), alpha.dim() == 1,
                   out ? out->mutable_data_ptr() : nullptr, d_alpha ? d_alpha->mutable_data_ptr() : nullptr,
                   workspace.defined() ? workspace.mutable_data_ptr() : nullptr, v.size(0), v.size(1),
                   c10::cuda::getCurrentCUDAStream()),
               "adjoint_update");
}

std::tuple<at::Tensor, at::Tensor> adjoint_update_cuda(const at::Tensor& v_in, const at::Tensor& hu_in,
                                                       const at::Tensor& g_in, const at::Tensor& alpha,
                                                       bool lr_grad) {
  check_matrix(v_in, "v", at::kCUDA);
  check_like(hu_in, "hu", v_in, "v");
  check_like(g_in, "g", v_in, "v");
  check_alpha(alpha, v_in);
  const c10::cuda::CUDAGuard guard(v_in.device());
  const at::Tensor v = unit_inner_stride(v_in), hu = unit_inner_stride(hu_in), g = unit_inner_stride(g_in);
  at::Tensor out = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor d_alpha = lr_grad ? alpha_grad_like(alpha) : at::empty({0}, v.options());
  adjoint_launch(v, &hu, g, alpha, &out, lr_grad ? &d_alpha : nullptr);
  return {out, d_alpha};
}

at::Tensor alpha_grad_cuda(const at::Tensor& g_in, const at::Tensor& v_in, const at::Tensor& alpha) {
  check_matrix(g_in, "g", at::kCUDA);
  check_like(v_in, "v", g_in, "g");
  check_alpha(alpha, g_in);
  const c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor v = unit_inner_stride(v_in), g = unit_inner_stride(g_in);
  at::Tensor d_alpha = alpha_grad_like(alpha);
  adjoint_launch(v, nullptr, g, alpha, nullptr, &d_alpha);
  return d_alpha;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CUDA, m) {
  m.impl("inner_update", &inner_update_cuda);
  m.impl("adjoint_update", &adjoint_update_cuda);
  m.impl("alpha_grad", &alpha_grad_cuda);
}

}  // namespace fastmaml
