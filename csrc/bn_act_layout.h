// The two layouts of the BatchNorm + leaky ReLU ops' activations x [T, N, C, S] and full-size outputs
// (bn_act.cpp, and the shape-only kernels of meta.cpp): contiguous (NCHW), or channels-last, strides
// (N*S*C, S*C, 1, C) (x.transpose(2, 3) contiguous: the [T, N, C, H*W] view of a channels-last
// [T, N, C, H, W]). With C == 1 or S == 1 the two are one: contiguous.
#pragma once
#include <ATen/ATen.h>

namespace fastmaml {

// x [T, N, C, S] is channels-last (and not contiguous)
inline bool channels_last(const at::Tensor& x) {
  return x.size(2) > 1 && x.size(3) > 1 && x.transpose(2, 3).is_contiguous();
}

// t (x's shape) in x's layout: itself where it is, else a copy
inline at::Tensor in_layout(const at::Tensor& t, bool x_channels_last) {
  if (!x_channels_last) return t.contiguous();
  return channels_last(t) ? t : t.transpose(2, 3).contiguous().transpose(2, 3);
}

// a new tensor of x's shape and options in x's layout
inline at::Tensor empty_in_layout(const at::Tensor& x, bool x_channels_last) {
  if (!x_channels_last) return at::empty(x.sizes(), x.options());
  return at::empty({x.size(0), x.size(1), x.size(3), x.size(2)}, x.options()).transpose(2, 3);
}

}  // namespace fastmaml
