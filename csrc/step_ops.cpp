// C++ CPU kernels of the inner-loop step ops over the flat task-batched buffers [T, P].
//
//   inner_update(phi, g, alpha)            = phi - alpha * g
//   adjoint_update(v, hu, g, alpha, lr)    = (v - hu, -sum_t g * v reduced to alpha's shape)
//   alpha_grad(g, v, alpha)                = -sum_t g * v reduced to alpha's shape
//
// Work is split over fixed blocks of kBlock parameters (at::parallel_for); every reduction over
// tasks runs in task order inside one block and the per-block partial sums of a scalar alpha are
// added in block order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

#include <algorithm>
#include <vector>

namespace fastmaml {
namespace {

constexpr int64_t kBlock = 2048;        // parameters per work item (fixed: determinism)
constexpr int64_t kWorkPerThread = 32768;  // elements below which a range stays on one thread

int64_t grain_items(int64_t item_elems) {
  return std::max<int64_t>(1, kWorkPerThread / std::max<int64_t>(1, item_elems));
}

at::Tensor inner_update_cpu(const at::Tensor& phi_in, const at::Tensor& g_in, const at::Tensor& alpha_in) {
  check_matrix(phi_in, "phi", at::kCPU);
  check_like(g_in, "g", phi_in, "phi");
  check_alpha(alpha_in, phi_in);
  const at::Tensor phi = unit_inner_stride(phi_in), g = unit_inner_stride(g_in), alpha = alpha_in.contiguous();
  const int64_t T = phi.size(0), P = phi.size(1);
  at::Tensor out = at::empty({T, P}, phi.options().memory_format(at::MemoryFormat::Contiguous));
  if (T == 0 || P == 0) return out;
  const int64_t nb = (P + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, phi.scalar_type(), "fastmaml::inner_update", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* pp = phi.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* ap = alpha.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t rs_phi = phi.stride(0), rs_g = g.stride(0);
    const bool per_param = alpha.dim() == 1;
    at::parallel_for(0, T * nb, grain_items(std::min(P, kBlock)), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / nb, p0 = (item % nb) * kBlock, p1 = std::min(P, p0 + kBlock);
        const scalar_t* prow = pp + t * rs_phi;
        const scalar_t* grow = gp + t * rs_g;
        scalar_t* orow = op + t * P;
        if (per_param) {
          for (int64_t p = p0; p < p1; ++p)
            orow[p] = static_cast<scalar_t>(acc_t(prow[p]) - acc_t(ap[p]) * acc_t(grow[p]));
        } else {
          const acc_t a = acc_t(ap[0]);
          for (int64_t p = p0; p < p1; ++p)
            orow[p] = static_cast<scalar_t>(acc_t(prow[p]) - a * acc_t(grow[p]));
        }
      }
    });
  });
  return out;
}

// Shared body of adjoint_update and alpha_grad: out = v - hu (if out is defined) and
// d_alpha = -sum_t g * v reduced to alpha's shape (if d_alpha is defined).
void adjoint_body(const at::Tensor& v, const at::Tensor* hu, const at::Tensor& g, const at::Tensor& alpha,
                  at::Tensor* out, at::Tensor* d_alpha) {
  const int64_t T = v.size(0), P = v.size(1);
  if (P == 0) return;
  const int64_t nb = (P + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, v.scalar_type(), "fastmaml::adjoint_update", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* hp = hu ? hu->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out ? out->mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = d_alpha ? d_alpha->mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t rs_v = v.stride(0), rs_h = hu ? hu->stride(0) : 0, rs_g = g.stride(0);
    const bool per_param = alpha.dim() == 1;
    std::vector<acc_t> partial(per_param ? 0 : nb, acc_t(0));
    at::parallel_for(0, nb, grain_items(T * std::min(P, kBlock)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(dp ? kBlock : 0);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t p0 = b * kBlock, p1 = std::min(P, p0 + kBlock), n = p1 - p0;
        if (dp) std::fill(acc.begin(), acc.begin() + n, acc_t(0));
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* vrow = vp + t * rs_v + p0;
          const scalar_t* grow = gp + t * rs_g + p0;
          if (op) {
            const scalar_t* hrow = hp + t * rs_h + p0;
            scalar_t* orow = op + t * P + p0;
            for (int64_t i = 0; i < n; ++i) orow[i] = static_cast<scalar_t>(acc_t(vrow[i]) - acc_t(hrow[i]));
          }
          if (dp)
            for (int64_t i = 0; i < n; ++i) acc[i] += acc_t(grow[i]) * acc_t(vrow[i]);
        }
        if (!dp) continue;
        if (per_param) {
          for (int64_t i = 0; i < n; ++i) dp[p0 + i] = static_cast<scalar_t>(-acc[i]);
        } else {
          acc_t s = 0;
          for (int64_t i = 0; i < n; ++i) s += acc[i];
          partial[b] = s;
        }
      }
    });
    if (dp && !per_param) {
      acc_t s = 0;
      for (int64_t b = 0; b < nb; ++b) s += partial[b];
      dp[0] = static_cast<scalar_t>(-s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> adjoint_update_cpu(const at::Tensor& v_in, const at::Tensor& hu_in,
                                                      const at::Tensor& g_in, const at::Tensor& alpha_in,
                                                      bool lr_grad) {
  check_matrix(v_in, "v", at::kCPU);
  check_like(hu_in, "hu", v_in, "v");
  check_like(g_in, "g", v_in, "v");
  check_alpha(alpha_in, v_in);
  const at::Tensor v = unit_inner_stride(v_in), hu = unit_inner_stride(hu_in), g = unit_inner_stride(g_in);
  at::Tensor out = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor d_alpha = lr_grad ? alpha_grad_like(alpha_in) : at::empty({0}, v.options());
  adjoint_body(v, &hu, g, alpha_in, &out, lr_grad ? &d_alpha : nullptr);
  return {out, d_alpha};
}

at::Tensor alpha_grad_cpu(const at::Tensor& g_in, const at::Tensor& v_in, const at::Tensor& alpha_in) {
  check_matrix(g_in, "g", at::kCPU);
  check_like(v_in, "v", g_in, "g");
  check_alpha(alpha_in, g_in);
  const at::Tensor v = unit_inner_stride(v_in), g = unit_inner_stride(g_in);
  at::Tensor d_alpha = alpha_grad_like(alpha_in);
  adjoint_body(v, nullptr, g, alpha_in, nullptr, &d_alpha);
  return d_alpha;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("inner_update", &inner_update_cpu);
  m.impl("adjoint_update", &adjoint_update_cpu);
  m.impl("alpha_grad", &alpha_grad_cpu);
}

}  // namespace fastmaml
