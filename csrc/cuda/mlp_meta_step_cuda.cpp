// Torch-facing CUDA registration of fastmaml::mlp_meta_step: checks, allocates the tape and scratch,
// launches the persistent kernel (mlp_kernel.cu) and sums the per-task results over tasks.
// Compiled only in a CUDA build (fastmaml/build.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../mlp_meta_step.h"
#include "mlp_kernel.h"

namespace fastmaml {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step_cuda(
    const at::Tensor& theta_in, at::IntArrayRef sizes, const at::Tensor& sx_in, const at::Tensor& sy_in,
    const at::Tensor& qx_in, const at::Tensor& qy_in, const at::Tensor& alpha_in, bool second_order, bool lr_grad,
    int64_t activation, bool need_before) {
  const fastmaml_mlp::MlpShape shape =
      check_mlp_meta_step_args(theta_in, sizes, sx_in, sy_in, qx_in, qy_in, alpha_in, activation);
  const c10::cuda::CUDAGuard guard(theta_in.device());
  const at::Tensor theta = theta_in.contiguous(), sx = sx_in.contiguous(), sy = sy_in.contiguous(),
                   qx = qx_in.contiguous(), qy = qy_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t T = sx.size(0), ns = sx.size(1), nq = qx.size(1), P = shape.params, K = alpha.size(0);
  const int64_t n_max = ns > nq ? ns : nq;
  const auto opts = theta.options();
  at::Tensor task_grads = at::empty({T, P}, opts);
  at::Tensor task_dalpha = lr_grad ? at::empty({T, K, P}, opts) : at::Tensor();
  at::Tensor losses = at::empty({3, T}, opts);
  at::Tensor tape = at::empty({T, fastmaml_mlp::tape_elems(shape, static_cast<int>(K))}, opts);
  const int64_t scratch_elems = theta.scalar_type() == at::kDouble
                                    ? fastmaml_mlp::pass_scratch_elems<double>(shape, n_max)
                                    : fastmaml_mlp::pass_scratch_elems<float>(shape, n_max);
  at::Tensor scratch = at::empty({T, scratch_elems}, opts);
  const cudaError_t err = fastmaml_cuda::mlp_meta_step(
      theta.scalar_type() == at::kDouble, shape, theta.const_data_ptr(), sx.const_data_ptr(), sy.const_data_ptr(), ns,
      qx.const_data_ptr(), qy.const_data_ptr(), nq, alpha.const_data_ptr(), static_cast<int>(K), second_order,
      need_before, T,
      task_grads.mutable_data_ptr(), lr_grad ? task_dalpha.mutable_data_ptr() : nullptr, losses.mutable_data_ptr(),
      tape.mutable_data_ptr(), scratch.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fastmaml::mlp_meta_step: CUDA launch failed: ", cudaGetErrorString(err));
  at::Tensor dalpha = lr_grad ? task_dalpha.sum(0) : at::empty({0}, opts);
  at::Tensor q_before = need_before ? losses[1].clone() : at::empty({0}, opts);
  return {losses[0].clone(), task_grads.sum(0), dalpha, q_before, losses[2].clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CUDA, m) { m.impl("mlp_meta_step", &mlp_meta_step_cuda); }

}  // namespace fastmaml
