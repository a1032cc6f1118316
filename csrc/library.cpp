// The schemas of every fastmaml op (one place); implementations register per device with
// TORCH_LIBRARY_IMPL(fastmaml, CPU|CUDA, m) in their own files.
#include <torch/library.h>

TORCH_LIBRARY(fastmaml, m) {
  // phi [T, P] (row stride may be 0), g [T, P], alpha [] or [P] -> phi - alpha * g  [T, P]
  m.def("inner_update(Tensor phi, Tensor g, Tensor alpha) -> Tensor");
  // v, hu, g [T, P], alpha [] or [P] -> (v - hu [T, P], -sum_t g*v reduced to alpha's shape, or [0] if !lr_grad)
  m.def("adjoint_update(Tensor v, Tensor hu, Tensor g, Tensor alpha, bool lr_grad) -> (Tensor, Tensor)");
  // g, v [T, P], alpha [] or [P] -> -sum_t g*v reduced to alpha's shape (first-order reverse step)
  m.def("alpha_grad(Tensor g, Tensor v, Tensor alpha) -> Tensor");
  // Whole inner loop + reverse sweep of an MLP (Linear layers, ReLU or Tanh between), MSE loss.
  // theta [P] in nn.Linear order, sizes [L+1], sx [T, Ns, d0], sy [T, Ns, dL], qx [T, Nq, d0],
  // qy [T, Nq, dL], alpha [K, P], activation 0 = ReLU, 1 = Tanh.
  // -> (query loss after [T], meta-gradient [P] (mean over tasks), alpha-gradient [K, P] or [0],
  //     query loss before [T] or [0] if !need_before, support loss before [T])
  m.def(
      "mlp_meta_step(Tensor theta, int[] sizes, Tensor sx, Tensor sy, Tensor qx, Tensor qy, "
      "Tensor alpha, bool second_order, bool lr_grad, int activation, bool need_before=True) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // BatchNorm (batch statistics per task) + ReLU + k x k max-pooling (stride k), fused (CPU).
  // x [T, N, C, H, W], w, b [T, C] -> (z [T, N, C, H/k, W/k], idx int64 (PyTorch's max-pool indices),
  //                                   mean [T, C], invstd [T, C])
  m.def("bn_relu_maxpool_fwd(Tensor x, Tensor w, Tensor b, float eps, int k) -> (Tensor, Tensor, Tensor, Tensor)");
  // gz, z, idx [T, N, C, Ho, Wo], x [T, N, C, H, W], mean, invstd, w [T, C]
  // -> (gx [T, N, C, H, W] or [0] if !need_x, gw [T, C], gb [T, C])
  m.def(
      "bn_relu_maxpool_bwd(Tensor gz, Tensor z, Tensor idx, Tensor x, Tensor mean, Tensor invstd, Tensor w, "
      "bool need_x) -> (Tensor, Tensor, Tensor)");
  // The same block with its tangent (R-op) along (xd, wd, bd), all [T, ...] like x, w, b:
  // -> (z, zd, idx, mean, invstd, a = mean(xhat xd) [T, C], dmean = mean(xd) [T, C])
  m.def(
      "bn_relu_maxpool_tangent_fwd(Tensor x, Tensor xd, Tensor w, Tensor b, Tensor wd, Tensor bd, float eps, int k) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The backward and its tangent -> (gx, gxd ([0] if !need_x), gw, gwd, gb, gbd [T, C])
  m.def(
      "bn_relu_maxpool_tangent_bwd(Tensor gz, Tensor gzd, Tensor z, Tensor idx, Tensor x, Tensor xd, Tensor mean, "
      "Tensor invstd, Tensor a, Tensor dmean, Tensor w, Tensor wd, bool need_x) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ReLU + k x k max-pooling (stride k), fused (CPU): x [T, N, C, H, W] -> (z [T, N, C, H/k, W/k], idx int64
  // (PyTorch's max-pool indices of relu(x)))
  m.def("relu_maxpool_fwd(Tensor x, int k) -> (Tensor, Tensor)");
  // A first conv block, fused: conv2d (per-task weights) + BatchNorm (batch statistics per task) + ReLU + k x k
  // max-pooling (CPU). x [T, N, Ci, H, W], cw [T, C, Ci, kh, kw], cb, w, b [T, C]
  // -> (z [T, N, C, Hc/k, Wc/k], idx int64, mean [T, C], invstd [T, C], pmean [T, D], pcov [T, D, D] (float64,
  //     the input patches' moments, D = Ci*kh*kw))
  m.def(
      "conv_bn_relu_maxpool_fwd(Tensor x, Tensor cw, Tensor cb, Tensor w, Tensor b, float eps, int k, int[2] stride, "
      "int[2] padding, int[2] dilation) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its backward (no gradient w.r.t. x) -> (gcw [T, C, Ci, kh, kw], gcb [T, C], gw [T, C], gb [T, C])
  m.def(
      "conv_bn_relu_maxpool_bwd(Tensor gz, Tensor z, Tensor idx, Tensor x, Tensor cw, Tensor cb, Tensor w, "
      "Tensor pmean, Tensor pcov, float eps, int k, int[2] stride, int[2] padding, int[2] dilation) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The block with its tangent along (dcw, dcb, dw, db [T, ...] like cw, cb, w, b; x has none)
  // -> (z, zd, idx, mean, invstd, pmean, pcov)
  m.def(
      "conv_bn_relu_maxpool_tangent_fwd(Tensor x, Tensor cw, Tensor cb, Tensor w, Tensor b, Tensor dcw, Tensor dcb, "
      "Tensor dw, Tensor db, float eps, int k, int[2] stride, int[2] padding, int[2] dilation) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The backward and its tangent -> (gcw, gcb, gw, gb, and their tangents in the same order)
  m.def(
      "conv_bn_relu_maxpool_tangent_bwd(Tensor gz, Tensor gzd, Tensor z, Tensor idx, Tensor x, Tensor cw, Tensor cb, "
      "Tensor w, Tensor dcw, Tensor dw, Tensor pmean, Tensor pcov, float eps, int k, int[2] stride, int[2] padding, "
      "int[2] dilation) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // BatchNorm (batch statistics per task) + leaky ReLU with `slope` (1: none, 0: ReLU), fused (CPU).
  // x [T, N, C, S], w, b [T, C] -> (z [T, N, C, S], mean [T, C], invstd [T, C])
  m.def("bn_act_fwd(Tensor x, Tensor w, Tensor b, float eps, float slope) -> (Tensor, Tensor, Tensor)");
  // gz, z (unused and optional when slope == 1), x [T, N, C, S], mean, invstd, w [T, C]
  // -> (gx [T, N, C, S] or [0] if !need_x, gw [T, C], gb [T, C])
  m.def(
      "bn_act_bwd(Tensor gz, Tensor? z, Tensor x, Tensor mean, Tensor invstd, Tensor w, float slope, bool need_x) "
      "-> (Tensor, Tensor, Tensor)");
  // The forward with its tangent (R-op) along (xd (None: zero), wd, bd [T, C])
  // -> (z, zd, mean, invstd, a = mean(xhat xd) [T, C], dmean = mean(xd) [T, C])
  m.def(
      "bn_act_tangent_fwd(Tensor x, Tensor? xd, Tensor w, Tensor b, Tensor wd, Tensor bd, float eps, float slope) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The backward and its tangent -> (gx, gxd ([0] if !need_x), gw, gwd, gb, gbd [T, C])
  m.def(
      "bn_act_tangent_bwd(Tensor gz, Tensor gzd, Tensor? z, Tensor x, Tensor? xd, Tensor mean, Tensor invstd, "
      "Tensor a, Tensor dmean, Tensor w, Tensor wd, float slope, bool need_x) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
