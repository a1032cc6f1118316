// C++ CPU op `fastmaml::mlp_meta_step`: the whole inner loop and reverse sweep of a small MLP for
// every task, one task per at::parallel_for item (mlp_inner_loop.h). Per-task meta-gradients and
// alpha-gradients are summed over tasks afterwards in task order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "mlp_inner_loop.h"
#include "mlp_meta_step.h"
#include "mlp_meta_step_avx2.h"

namespace fastmaml {
namespace {

using fastmaml_mlp::MlpShape;

// The AVX2 + FMA build of the per-task loop where the CPU has it, unless $FASTMAML_CPU_ISA is
// "baseline" (read per call: the tests run both builds).
bool use_avx2() {
  const char* isa = std::getenv("FASTMAML_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
  return fastmaml_mlp_avx2::usable();
}

void check_task_tensor(const at::Tensor& t, const char* name, const at::Tensor& theta, int64_t T, int64_t width) {
  TORCH_CHECK(t.dim() == 3, name, ": expected a [T, N, features] tensor, got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == T, name, ": expected T=", T, " tasks (as sx), got ", t.size(0));
  TORCH_CHECK(t.size(2) == width, name, ": expected ", width, " features per example, got ", t.size(2));
  TORCH_CHECK(t.scalar_type() == theta.scalar_type(), name, ": expected dtype ", theta.scalar_type(), " (as theta), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == theta.device(), name, ": expected device ", theta.device(), ", got ", t.device());
}

}  // namespace

// Shared by the CPU and CUDA registrations: checks every argument and builds the shape.
MlpShape check_mlp_meta_step_args(const at::Tensor& theta, at::IntArrayRef sizes, const at::Tensor& sx,
                                  const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy,
                                  const at::Tensor& alpha, int64_t activation) {
  TORCH_CHECK(theta.dim() == 1, "theta: expected a flat [P] parameter vector, got shape ", theta.sizes());
  TORCH_CHECK(theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble,
              "theta: expected float32 or float64, got ", theta.scalar_type());
  TORCH_CHECK(activation == fastmaml_mlp::kReLU || activation == fastmaml_mlp::kTanh,
              "activation: expected 0 (ReLU) or 1 (Tanh), got ", activation);
  MlpShape shape;
  TORCH_CHECK(fastmaml_mlp::make_shape(sizes.data(), static_cast<int>(sizes.size()), static_cast<int>(activation),
                                       &shape),
              "sizes: expected 2 to ", fastmaml_mlp::kMaxLayers + 1, " positive layer widths, got ", sizes);
  TORCH_CHECK(theta.size(0) == shape.params, "theta: sizes ", sizes, " need ", shape.params,
              " parameters (nn.Linear order W0, b0, W1, b1, ...), got ", theta.size(0));
  TORCH_CHECK(sx.dim() == 3, "sx: expected a [T, Ns, ", sizes[0], "] tensor, got shape ", sx.sizes());
  const int64_t T = sx.size(0), L = shape.layers;
  TORCH_CHECK(T > 0, "sx: expected at least one task, got shape ", sx.sizes());
  check_task_tensor(sx, "sx", theta, T, shape.dims[0]);
  check_task_tensor(sy, "sy", theta, T, shape.dims[L]);
  check_task_tensor(qx, "qx", theta, T, shape.dims[0]);
  check_task_tensor(qy, "qy", theta, T, shape.dims[L]);
  TORCH_CHECK(sy.size(1) == sx.size(1), "sy: expected Ns=", sx.size(1), " examples (as sx), got ", sy.size(1));
  TORCH_CHECK(qy.size(1) == qx.size(1), "qy: expected Nq=", qx.size(1), " examples (as qx), got ", qy.size(1));
  TORCH_CHECK(sx.size(1) > 0 && qx.size(1) > 0, "sx, qx: expected at least one example per task");
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(1) == shape.params,
              "alpha: expected [K, P=", shape.params, "] (one row per inner step), got shape ", alpha.sizes());
  TORCH_CHECK(alpha.scalar_type() == theta.scalar_type() && alpha.device() == theta.device(),
              "alpha: expected dtype ", theta.scalar_type(), " on ", theta.device(), ", got ", alpha.scalar_type(),
              " on ", alpha.device());
  return shape;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step_cpu(
    const at::Tensor& theta_in, at::IntArrayRef sizes, const at::Tensor& sx_in, const at::Tensor& sy_in,
    const at::Tensor& qx_in, const at::Tensor& qy_in, const at::Tensor& alpha_in, bool second_order, bool lr_grad,
    int64_t activation) {
  const MlpShape shape = check_mlp_meta_step_args(theta_in, sizes, sx_in, sy_in, qx_in, qy_in, alpha_in, activation);
  const at::Tensor theta = theta_in.contiguous(), sx = sx_in.contiguous(), sy = sy_in.contiguous(),
                   qx = qx_in.contiguous(), qy = qy_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t T = sx.size(0), ns = sx.size(1), nq = qx.size(1), P = shape.params, K = alpha.size(0);
  const auto opts = theta.options();
  at::Tensor q_after = at::empty({T}, opts), q_before = at::empty({T}, opts), s_before = at::empty({T}, opts);
  at::Tensor task_grads = at::empty({T, P}, opts);
  at::Tensor task_dalpha = lr_grad ? at::empty({T, K, P}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml::mlp_meta_step", [&] {
    using S = scalar_t;
    const int64_t n_max = ns > nq ? ns : nq;
    const int64_t scratch = fastmaml_mlp::pass_scratch_elems<S>(shape, n_max);
    const int64_t per_task = 3 * P + 2 * K * P + scratch;
    const S inv_tasks = S(1) / S(T);
    const bool avx2 = use_avx2();
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      std::vector<S> work(static_cast<size_t>(per_task));
      for (int64_t t = begin; t < end; ++t) {
        fastmaml_mlp::TaskBuffers<S> b;
        b.phi = work.data();
        b.u = b.phi + P;
        b.vec = b.u + P;
        b.phis = b.vec + P;
        b.grads = b.phis + K * P;
        b.scratch = fastmaml_mlp::carve_pass_scratch<S>(shape, n_max, b.grads + K * P);
        b.v = task_grads.data_ptr<S>() + t * P;
        b.dalpha = lr_grad ? task_dalpha.data_ptr<S>() + t * K * P : nullptr;
        const S* tsx = sx.const_data_ptr<S>() + t * ns * shape.dims[0];
        const S* tsy = sy.const_data_ptr<S>() + t * ns * shape.dims[shape.layers];
        const S* tqx = qx.const_data_ptr<S>() + t * nq * shape.dims[0];
        const S* tqy = qy.const_data_ptr<S>() + t * nq * shape.dims[shape.layers];
        const auto losses =
            avx2 ? fastmaml_mlp_avx2::task_meta_step<S>(shape, theta.const_data_ptr<S>(), tsx, tsy, ns, tqx, tqy, nq,
                                                        alpha.const_data_ptr<S>(), static_cast<int>(K), second_order,
                                                        inv_tasks, b)
                 : fastmaml_mlp::mlp_task_meta_step<S>(fastmaml_mlp::SerialExec{}, shape, theta.const_data_ptr<S>(),
                                                       tsx, tsy, ns, tqx, tqy, nq, alpha.const_data_ptr<S>(),
                                                       static_cast<int>(K), second_order, inv_tasks, b);
        q_after.data_ptr<S>()[t] = S(losses.query_after);
        q_before.data_ptr<S>()[t] = S(losses.query_before);
        s_before.data_ptr<S>()[t] = S(losses.support_before);
      }
    });
  });
  // sums over tasks in task order (at::sum may split differently with the thread count)
  at::Tensor grad = task_grads[0].clone();
  for (int64_t t = 1; t < T; ++t) grad.add_(task_grads[t]);
  at::Tensor dalpha = at::empty({0}, opts);
  if (lr_grad) {
    dalpha = task_dalpha[0].clone();
    for (int64_t t = 1; t < T; ++t) dalpha.add_(task_dalpha[t]);
  }
  return {q_after, grad, dalpha, q_before, s_before};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) { m.impl("mlp_meta_step", &mlp_meta_step_cpu); }

}  // namespace fastmaml
