// C++ CPU kernel of ReLU + non-overlapping k×k max-pooling (stride k, no padding, floor), the block tail
// of a conv net without BatchNorm (or with a norm that runs its own kernels, GroupNorm):
//
//   relu_maxpool_fwd(x [T,N,C,H,W], k) -> (z [T,N,C,H/k,W/k], idx int64 [T,N,C,H/k,W/k])
//     z = max-pool(relu(x)) and idx = h * W + w of the window element it came from, chosen exactly as
//     PyTorch's max_pool2d chooses on relu(x) (first maximum; NaN wins), so idx is interchangeable with
//     PyTorch's indices (the backward is PyTorch's max-pool backward of the masked gradient).
//
// x contiguous (NCHW; anything else is made contiguous). Work items are planes (one image's H x W of one
// channel), pooled by the block tail's plane kernel (bn_relu_maxpool_plane.h) with scale 1 and shift 0, so
// relu(x) is never written: one read of the plane for its sum (a plane whose sum is finite holds no NaN and
// takes the vectorized 2×2 kernel) and one for the pooling, from cache. Results do not depend on the number
// of threads.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "bn_relu_maxpool_plane.h"

namespace fastmaml {
namespace {

constexpr int64_t kValuesPerGrain = 16384;  // x values below which planes share a thread

std::tuple<at::Tensor, at::Tensor> relu_maxpool_fwd_cpu(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK(x_in.dim() == 5, "x: expected activations [T, N, C, H, W], got ", x_in.dim(), " dims");
  TORCH_CHECK(k >= 1 && x_in.size(3) >= k && x_in.size(4) >= k, "k: expected a pooling window 1 <= k <= min(H, W) = ",
              std::min(x_in.size(3), x_in.size(4)), ", got ", k);
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(3), W = x.size(4), Ho = H / k, Wo = W / k, plane = H * W, oplane = Ho * Wo;
  const int64_t planes = x.size(0) * x.size(1) * x.size(2);
  at::Tensor z = at::empty({x.size(0), x.size(1), x.size(2), Ho, Wo}, x.options());
  at::Tensor idx = at::empty(z.sizes(), x.options().dtype(at::kLong));
  if (z.numel() == 0) return {z, idx};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::relu_maxpool_fwd", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    const SlabKernels<scalar_t> kern = slab_kernels<scalar_t>();
    at::parallel_for(0, planes, std::max<int64_t>(1, kValuesPerGrain / plane), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> v(k * W);
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* xs = xp + p * plane;
        const bool finite = std::isfinite(kern.sum(xs, plane, 0.0, false));
        pool_plane(kern, xs, H, W, k, acc_t(1), acc_t(0), finite, v.data(), zp + p * oplane, ip + p * oplane);
      }
    });
  });
  return {z, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) { m.impl("relu_maxpool_fwd", &relu_maxpool_fwd_cpu); }

}  // namespace fastmaml
