// Shape-only (Meta) implementations of every fastmaml op: what FakeTensor, torch.compile and
// torch.library.opcheck use. They allocate outputs with the shapes (and, for the block ops' full-size
// outputs, the layouts: activation_layout.h) the real kernels return.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "activation_layout.h"

namespace fastmaml {
namespace {

at::Tensor alpha_shaped(const at::Tensor& alpha) {
  return alpha.dim() == 0 ? at::empty({}, alpha.options()) : at::empty({alpha.size(0)}, alpha.options());
}

at::Tensor inner_update_meta(const at::Tensor& phi, const at::Tensor& g, const at::Tensor& alpha) {
  TORCH_CHECK(phi.dim() == 2 && g.sizes() == phi.sizes(), "phi, g: expected equal [T, P] shapes, got ",
              phi.sizes(), " and ", g.sizes());
  return at::empty(phi.sizes(), phi.options());
}

std::tuple<at::Tensor, at::Tensor> adjoint_update_meta(const at::Tensor& v, const at::Tensor& hu,
                                                       const at::Tensor& g, const at::Tensor& alpha,
                                                       bool lr_grad) {
  TORCH_CHECK(v.dim() == 2 && hu.sizes() == v.sizes() && g.sizes() == v.sizes(),
              "v, hu, g: expected equal [T, P] shapes");
  return {at::empty(v.sizes(), v.options()), lr_grad ? alpha_shaped(alpha) : at::empty({0}, v.options())};
}

at::Tensor alpha_grad_meta(const at::Tensor& g, const at::Tensor& v, const at::Tensor& alpha) {
  TORCH_CHECK(g.dim() == 2 && v.sizes() == g.sizes(), "g, v: expected equal [T, P] shapes");
  return alpha_shaped(alpha);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step_meta(
    const at::Tensor& theta, at::IntArrayRef sizes, const at::Tensor& sx, const at::Tensor& sy,
    const at::Tensor& qx, const at::Tensor& qy, const at::Tensor& alpha, bool second_order, bool lr_grad,
    int64_t activation, bool need_before) {
  const int64_t T = sx.size(0);
  auto per_task = at::empty({T}, theta.options());
  return {per_task, at::empty(theta.sizes(), theta.options()),
          lr_grad ? at::empty(alpha.sizes(), alpha.options()) : at::empty({0}, theta.options()),
          at::empty({need_before ? T : 0}, theta.options()), at::empty({T}, theta.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_fwd_meta(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, int64_t k) {
  TORCH_CHECK(x.dim() == 5 && k >= 1, "x: expected activations [T, N, C, H, W] and k >= 1");
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2);
  std::vector<int64_t> pooled{T, N, C, x.size(3) / k, x.size(4) / k};
  return {empty_in_layout_of(x, pooled, x.options()), empty_in_layout_of(x, pooled, x.options().dtype(at::kLong)),
          at::empty({T, C}, x.options()), at::empty({T, C}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_bwd_meta(
    const at::Tensor& gz, const at::Tensor& z, const at::Tensor& idx, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& w, bool need_x) {
  TORCH_CHECK(x.dim() == 5, "x: expected activations [T, N, C, H, W]");
  const int64_t T = x.size(0), C = x.size(2);
  return {need_x ? empty_in_layout_of(x, x.sizes(), x.options()) : at::empty({0}, x.options()),
          at::empty({T, C}, x.options()), at::empty({T, C}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_relu_maxpool_tangent_fwd_meta(const at::Tensor& x, const at::Tensor& xd, const at::Tensor& w, const at::Tensor& b,
                                 const at::Tensor& wd, const at::Tensor& bd, double eps, int64_t k) {
  auto [z, idx, mean, invstd] = bn_relu_maxpool_fwd_meta(x, w, b, eps, k);
  return {z, at::empty_strided(z.sizes(), z.strides(), z.options()), idx, mean, invstd,
          at::empty(mean.sizes(), mean.options()), at::empty(mean.sizes(), mean.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_tangent_bwd_meta(
    const at::Tensor& gz, const at::Tensor& gzd, const at::Tensor& z, const at::Tensor& idx, const at::Tensor& x,
    const at::Tensor& xd, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& a,
    const at::Tensor& dmean, const at::Tensor& w, const at::Tensor& wd, bool need_x) {
  auto [gx, gw, gb] = bn_relu_maxpool_bwd_meta(gz, z, idx, x, mean, invstd, w, need_x);
  return {gx, at::empty_strided(gx.sizes(), gx.strides(), gx.options()), gw, at::empty(gw.sizes(), gw.options()), gb,
          at::empty(gb.sizes(), gb.options())};
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_meta(const at::Tensor& x, const at::Tensor& w,
                                                               const at::Tensor& b, double eps, double slope) {
  TORCH_CHECK(x.dim() == 4, "x: expected activations [T, N, C, S]");
  const int64_t T = x.size(0), C = x.size(2);
  return {empty_in_layout(x, channels_last_planes(x)), at::empty({T, C}, x.options()), at::empty({T, C}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_meta(const at::Tensor& gz, const std::optional<at::Tensor>& z,
                                                               const at::Tensor& x, const at::Tensor& mean,
                                                               const at::Tensor& invstd, const at::Tensor& w,
                                                               double slope, bool need_x) {
  TORCH_CHECK(x.dim() == 4, "x: expected activations [T, N, C, S]");
  const int64_t T = x.size(0), C = x.size(2);
  return {need_x ? empty_in_layout(x, channels_last_planes(x)) : at::empty({0}, x.options()),
          at::empty({T, C}, x.options()), at::empty({T, C}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_tangent_fwd_meta(
    const at::Tensor& x, const std::optional<at::Tensor>& xd, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& wd, const at::Tensor& bd, double eps, double slope) {
  auto [z, mean, invstd] = bn_act_fwd_meta(x, w, b, eps, slope);
  return {z, at::empty_like(z), mean, invstd, at::empty(mean.sizes(), mean.options()),
          at::empty(mean.sizes(), mean.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_tangent_bwd_meta(
    const at::Tensor& gz, const at::Tensor& gzd, const std::optional<at::Tensor>& z, const at::Tensor& x,
    const std::optional<at::Tensor>& xd, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& a,
    const at::Tensor& dmean, const at::Tensor& w, const at::Tensor& wd, double slope, bool need_x) {
  auto [gx, gw, gb] = bn_act_bwd_meta(gz, z, x, mean, invstd, w, slope, need_x);
  return {gx, at::empty_like(gx), gw, at::empty(gw.sizes(), gw.options()), gb,
          at::empty(gb.sizes(), gb.options())};
}

// The conv block's sizes: (Hc, Wc) of conv2d(x, cw) with this geometry
std::pair<int64_t, int64_t> conv_block_output(const at::Tensor& x, const at::Tensor& cw, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 5 && cw.dim() == 5, "x, cw: expected [T, N, Ci, H, W] and [T, C, Ci, kh, kw]");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding, dilation: expected two values each");
  const int64_t Hc = (x.size(3) + 2 * padding[0] - dilation[0] * (cw.size(3) - 1) - 1) / stride[0] + 1;
  const int64_t Wc = (x.size(4) + 2 * padding[1] - dilation[1] * (cw.size(4) - 1) - 1) / stride[1] + 1;
  return {Hc, Wc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_maxpool_fwd_meta(
    const at::Tensor& x, const at::Tensor& cw, const at::Tensor& cb, const at::Tensor& w, const at::Tensor& b,
    double eps, int64_t k, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto [Hc, Wc] = conv_block_output(x, cw, stride, padding, dilation);
  TORCH_CHECK(k >= 1, "k: expected k >= 1");
  const int64_t T = x.size(0), C = cw.size(1), D = cw.size(2) * cw.size(3) * cw.size(4);
  const std::vector<int64_t> pooled{T, x.size(1), C, Hc / k, Wc / k};
  const auto f64 = x.options().dtype(at::kDouble);
  return {at::empty(pooled, x.options()), at::empty(pooled, x.options().dtype(at::kLong)),
          at::empty({T, C}, x.options()),  at::empty({T, C}, x.options()),
          at::empty({T, D}, f64),          at::empty({T, D, D}, f64)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_maxpool_bwd_meta(
    const at::Tensor& gz, const at::Tensor& z, const at::Tensor& idx, const at::Tensor& x, const at::Tensor& cw,
    const at::Tensor& cb, const at::Tensor& w, const at::Tensor& pmean, const at::Tensor& pcov, double eps,
    int64_t k, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  conv_block_output(x, cw, stride, padding, dilation);
  const int64_t T = x.size(0), C = cw.size(1);
  return {at::empty(cw.sizes(), x.options()), at::empty({T, C}, x.options()), at::empty({T, C}, x.options()),
          at::empty({T, C}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_maxpool_tangent_fwd_meta(const at::Tensor& x, const at::Tensor& cw, const at::Tensor& cb,
                                      const at::Tensor& w, const at::Tensor& b, const at::Tensor& dcw,
                                      const at::Tensor& dcb, const at::Tensor& dw, const at::Tensor& db, double eps,
                                      int64_t k, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation) {
  auto [z, idx, mean, invstd, pmean, pcov] =
      conv_bn_relu_maxpool_fwd_meta(x, cw, cb, w, b, eps, k, stride, padding, dilation);
  return {z, at::empty(z.sizes(), z.options()), idx, mean, invstd, pmean, pcov};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_maxpool_tangent_bwd_meta(const at::Tensor& gz, const at::Tensor& gzd, const at::Tensor& z,
                                      const at::Tensor& idx, const at::Tensor& x, const at::Tensor& cw,
                                      const at::Tensor& cb, const at::Tensor& w, const at::Tensor& dcw,
                                      const at::Tensor& dw, const at::Tensor& pmean, const at::Tensor& pcov,
                                      double eps, int64_t k, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation) {
  auto [gcw, gcb, gw, gb] =
      conv_bn_relu_maxpool_bwd_meta(gz, z, idx, x, cw, cb, w, pmean, pcov, eps, k, stride, padding, dilation);
  return {gcw, gcb, gw, gb, at::empty(gcw.sizes(), gcw.options()), at::empty(gcb.sizes(), gcb.options()),
          at::empty(gw.sizes(), gw.options()), at::empty(gb.sizes(), gb.options())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> relu_maxpool_fwd_meta(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 5 && k >= 1, "x: expected activations [T, N, C, H, W] and k >= 1");
  std::vector<int64_t> pooled{x.size(0), x.size(1), x.size(2), x.size(3) / k, x.size(4) / k};
  return {at::empty(pooled, x.options()), at::empty(pooled, x.options().dtype(at::kLong))};
}

TORCH_LIBRARY_IMPL(fastmaml, Meta, m) {
  m.impl("relu_maxpool_fwd", &relu_maxpool_fwd_meta);
  m.impl("conv_bn_relu_maxpool_tangent_fwd", &conv_bn_relu_maxpool_tangent_fwd_meta);
  m.impl("conv_bn_relu_maxpool_tangent_bwd", &conv_bn_relu_maxpool_tangent_bwd_meta);
  m.impl("conv_bn_relu_maxpool_fwd", &conv_bn_relu_maxpool_fwd_meta);
  m.impl("conv_bn_relu_maxpool_bwd", &conv_bn_relu_maxpool_bwd_meta);
  m.impl("bn_act_fwd", &bn_act_fwd_meta);
  m.impl("bn_act_bwd", &bn_act_bwd_meta);
  m.impl("bn_act_tangent_fwd", &bn_act_tangent_fwd_meta);
  m.impl("bn_act_tangent_bwd", &bn_act_tangent_bwd_meta);
  m.impl("bn_relu_maxpool_tangent_fwd", &bn_relu_maxpool_tangent_fwd_meta);
  m.impl("bn_relu_maxpool_tangent_bwd", &bn_relu_maxpool_tangent_bwd_meta);
  m.impl("bn_relu_maxpool_fwd", &bn_relu_maxpool_fwd_meta);
  m.impl("bn_relu_maxpool_bwd", &bn_relu_maxpool_bwd_meta);
  m.impl("inner_update", &inner_update_meta);
  m.impl("adjoint_update", &adjoint_update_meta);
  m.impl("alpha_grad", &alpha_grad_meta);
  m.impl("mlp_meta_step", &mlp_meta_step_meta);
}

}  // namespace fastmaml
