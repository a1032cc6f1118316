// Memory layouts of the C++ CPU ops' activations, contiguous ("NCHW") or channels-last ("NHWC"), and their
// Meta kernels in meta.cpp:
// - the block ops' 5-D [T, N, C, H, W] (bn_relu_maxpool.cpp): channels-last = the strides of a contiguous
//   [T, N, H, W, C] permuted to [T, N, C, H, W]: (N*H*W*C, H*W*C, 1, W*C, C), each pixel's C values adjacent.
//   Strides of dimensions of size 1 are not compared (as is_contiguous does).
// - the BatchNorm + leaky ReLU ops' [T, N, C, S] (bn_act.cpp): channels-last = strides (N*S*C, S*C, 1, C)
//   (x.transpose(2, 3) contiguous: the [T, N, C, H*W] view of a channels-last [T, N, C, H, W]). With C == 1 or
//   S == 1 the two are one: contiguous.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace fastmaml {

enum class ActivationLayout { kContiguous, kChannelsLast, kStrided };

inline bool is_channels_last_5d(const at::Tensor& t) {
  if (t.dim() != 5) return false;
  const int64_t C = t.size(2), H = t.size(3), W = t.size(4);
  const int64_t expected[5] = {t.size(1) * H * W * C, H * W * C, 1, W * C, C};
  for (int64_t d = 0; d < 5; ++d)
    if (t.size(d) > 1 && t.stride(d) != expected[d]) return false;
  return true;
}

// Contiguous first: where both hold (C == 1, or H = W = 1) the contiguous kernels run.
inline ActivationLayout activation_layout(const at::Tensor& t) {
  if (t.is_contiguous()) return ActivationLayout::kContiguous;
  return is_channels_last_5d(t) ? ActivationLayout::kChannelsLast : ActivationLayout::kStrided;
}

// An uninitialized [T, N, C, H, W] tensor with channels-last strides.
inline at::Tensor empty_channels_last(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty({sizes[0], sizes[1], sizes[3], sizes[4], sizes[2]}, options).permute({0, 1, 4, 2, 3});
}

// t itself when channels-last, else a channels-last copy.
inline at::Tensor channels_last(const at::Tensor& t) {
  return is_channels_last_5d(t) ? t : empty_channels_last(t.sizes(), t.options()).copy_(t);
}

// Whether the block ops run their channels-last kernels on x: channels-last (not also contiguous), its
// planes' positions h * W + w within int32 (the kernels' picks); any other x is made contiguous.
inline bool runs_channels_last(const at::Tensor& x) {
  return activation_layout(x) == ActivationLayout::kChannelsLast && x.size(3) * x.size(4) <= INT32_MAX;
}

// An uninitialized tensor of these sizes in the layout of the block ops' outputs for x: channels-last where
// they run the channels-last kernels, contiguous otherwise.
inline at::Tensor empty_in_layout_of(const at::Tensor& x, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return runs_channels_last(x) ? empty_channels_last(sizes, options) : at::empty(sizes, options);
}

// x [T, N, C, S] is channels-last (and not contiguous)
inline bool channels_last_planes(const at::Tensor& x) {
  return x.size(2) > 1 && x.size(3) > 1 && x.transpose(2, 3).is_contiguous();
}

// t [T, N, C, S] (x's shape) in x's layout: itself where it is, else a copy
inline at::Tensor in_layout(const at::Tensor& t, bool x_channels_last) {
  if (!x_channels_last) return t.contiguous();
  return channels_last_planes(t) ? t : t.transpose(2, 3).contiguous().transpose(2, 3);
}

// a new tensor of x's shape [T, N, C, S] and options in x's layout
inline at::Tensor empty_in_layout(const at::Tensor& x, bool x_channels_last) {
  if (!x_channels_last) return at::empty(x.sizes(), x.options());
  return at::empty({x.size(0), x.size(1), x.size(3), x.size(2)}, x.options()).transpose(2, 3);
}

}  // namespace fastmaml
