// C++ CPU op `fastmaml::mlp_meta_step`: the whole inner loop and reverse sweep of a small MLP for
// every task, one task per at::parallel_for item (mlp_cpu.h). Per-task meta-gradients and
// alpha-gradients are summed over tasks afterwards in task order (the same sums with any thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>

#include "cpu_isa.h"
#include "mlp_cpu.h"
#include "mlp_meta_step.h"
#include "mlp_meta_step_avx2.h"

namespace fastmaml {
namespace {

using fastmaml_mlp::MlpShape;

// the AVX2 + FMA build of the per-task loop (cpu_isa.h)
bool use_avx2() { return use_avx2_build(fastmaml_mlp_avx2::usable()); }

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

// dst[i] = sum_t src[t * n + i] over t = 0..T-1 in order, i < n (split over i: the same sums with any
// thread count; at least GRAIN_SIZE outputs per thread, so the small sums of small models take no second
// parallel region, whose threads can each wait a scheduler slice on a busy machine)
template <typename S>
void sum_over_tasks(const S* src, int64_t T, int64_t n, S* dst) {
  at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = src[i];
    for (int64_t t = 1; t < T; ++t) {
      const S* row = src + t * n;
      for (int64_t i = begin; i < end; ++i) dst[i] += row[i];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step_cpu(
    const at::Tensor& theta_in, at::IntArrayRef sizes, const at::Tensor& sx_in, const at::Tensor& sy_in,
    const at::Tensor& qx_in, const at::Tensor& qy_in, const at::Tensor& alpha_in, bool second_order, bool lr_grad,
    int64_t activation, bool need_before) {
  const MlpShape shape = check_mlp_meta_step_args(theta_in, sizes, sx_in, sy_in, qx_in, qy_in, alpha_in, activation);
  const at::Tensor theta = theta_in.contiguous(), sx = sx_in.contiguous(), sy = sy_in.contiguous(),
                   qx = qx_in.contiguous(), qy = qy_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t T = sx.size(0), ns = sx.size(1), nq = qx.size(1), P = shape.params, K = alpha.size(0);
  const auto opts = theta.options();
  at::Tensor q_after = at::empty({T}, opts), s_before = at::empty({T}, opts);
  at::Tensor q_before = at::empty({need_before ? T : 0}, opts);
  at::Tensor grad = at::empty({P}, opts), task_grads = at::empty({T, P}, opts);
  at::Tensor dalpha = at::empty({lr_grad ? K : 0, P}, opts);
  at::Tensor task_dalpha = at::empty({lr_grad ? T : 0, K, P}, opts);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastmaml::mlp_meta_step", [&] {
    using S = scalar_t;
    const int64_t work_elems = fastmaml_mlp::cpu_task_elems(shape, static_cast<int>(K), ns > nq ? ns : nq);
    const S inv_tasks = S(1) / S(T);
    const bool avx2 = use_avx2();
    const S *th = theta.const_data_ptr<S>(), *al = alpha.const_data_ptr<S>();
    const S *sxp = sx.const_data_ptr<S>(), *syp = sy.const_data_ptr<S>();
    const S *qxp = qx.const_data_ptr<S>(), *qyp = qy.const_data_ptr<S>();
    S* tg = task_grads.mutable_data_ptr<S>();
    S* tda = lr_grad ? task_dalpha.mutable_data_ptr<S>() : nullptr;
    S *qa = q_after.mutable_data_ptr<S>(), *sb = s_before.mutable_data_ptr<S>();
    S* qb = need_before ? q_before.mutable_data_ptr<S>() : nullptr;
    const int64_t d0 = shape.dims[0], dL = shape.dims[shape.layers];
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      const std::unique_ptr<S[]> work(new S[static_cast<size_t>(work_elems)]);
      for (int64_t t = begin; t < end; ++t) {
        const S *tsx = sxp + t * ns * d0, *tsy = syp + t * ns * dL;
        const S *tqx = qxp + t * nq * d0, *tqy = qyp + t * nq * dL;
        S* v = tg + t * P;
        S* da = tda ? tda + t * K * P : nullptr;
        const auto losses =
            avx2 ? fastmaml_mlp_avx2::task_meta_step<S>(shape, th, tsx, tsy, ns, tqx, tqy, nq, al, static_cast<int>(K),
                                                        second_order, need_before, inv_tasks, work.get(), v, da)
                 : fastmaml_mlp::cpu_task_meta_step<S>(shape, th, tsx, tsy, ns, tqx, tqy, nq, al, static_cast<int>(K),
                                                       second_order, need_before, inv_tasks, work.get(), v, da);
        qa[t] = S(losses.query_after);
        sb[t] = S(losses.support_before);
        if (qb) qb[t] = S(losses.query_before);
      }
    });
    sum_over_tasks(tg, T, P, grad.mutable_data_ptr<S>());
    if (lr_grad) sum_over_tasks(tda, T, K * P, dalpha.mutable_data_ptr<S>());
  });
  if (!lr_grad) dalpha = at::empty({0}, opts);
  return {q_after, grad, dalpha, q_before, s_before};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) { m.impl("mlp_meta_step", &mlp_meta_step_cpu); }

}  // namespace fastmaml
