// BatchNorm + ReLU + max-pooling on one contiguous plane: what the NCHW kernels of bn_relu_maxpool.cpp and the
// first-layer block of conv_bn_relu_maxpool.cpp share. `slab_kernels<S>()` (defined in bn_relu_maxpool.cpp for
// float and double) gives the per-slab kernels of the build that runs; `pool_plane` pools one plane of y.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "bn_relu_maxpool_slabs.h"

namespace fastmaml {

// v[i] = relu(x[i] * scale + shift) for n values, rounded to x's type (the pooling compares what the
// reference compares: relu(y) in x's type); NaN is kept unless `finite` (no NaN possible), where the
// loop is a plain max that vectorizes.
template <typename scalar_t, typename acc_t>
void relu_row(const scalar_t* x, int64_t n, acc_t scale, acc_t shift, bool finite, scalar_t* v) {
  if (finite) {
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t y = static_cast<scalar_t>(acc_t(x[i]) * scale + shift);
      v[i] = y > scalar_t(0) ? y : scalar_t(0);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t y = static_cast<scalar_t>(acc_t(x[i]) * scale + shift);
    v[i] = (y > 0 || std::isnan(y)) ? y : scalar_t(0);
  }
}

// One row of pooled outputs from v = relu(y) of its k input rows `[k, W]`: z[ow] and idx[ow] = row0 + the
// offset in v of the element max-pooling picks, by PyTorch's rule (first maximum; a NaN wins). Windows
// other than 2×2, or NaN possible: the finite 2×2 windows take relu_pool2_slab (selects, not branches: the
// picks of random data defeat branch prediction).
template <typename scalar_t>
void pool_row(const scalar_t* v, int64_t W, int64_t Wo, int64_t k, int64_t row0, scalar_t* z, int64_t* idx) {
  for (int64_t ow = 0; ow < Wo; ++ow) {
    scalar_t best = -std::numeric_limits<scalar_t>::infinity();
    int64_t where = ow * k;
    for (int64_t dh = 0; dh < k; ++dh) {
      for (int64_t dw = 0; dw < k; ++dw) {
        const int64_t e = dh * W + ow * k + dw;
        if (v[e] > best || std::isnan(v[e])) {
          best = v[e];
          where = e;
        }
      }
    }
    z[ow] = best;
    idx[ow] = row0 + where;
  }
}

// The per-slab kernels (bn_relu_maxpool_slabs.h) of the build that runs: AVX2 where the CPU has it (cpu_isa.h);
// both give the same bits, which the tests check
template <typename S>
struct SlabKernels {
  double (*sum)(const S*, int64_t, double, bool);
  void (*relu_pool2)(const S*, int64_t, int64_t, double, double, S*, int64_t*);
  void (*routed_sums)(const S*, const S*, const int64_t*, const S*, int64_t, double, double, double*);
  void (*input_gradient)(const S*, int64_t, const S*, const S*, const int64_t*, int64_t, double, double, double,
                         double, S*);
  void (*input_gradient_pool2)(const S*, int64_t, int64_t, const S*, const S*, const int64_t*, double, double, double,
                               double, S*);
};

template <typename S>
SlabKernels<S> slab_kernels();

// z [H/k, W/k] and idx (h * W + w of each pick) of one plane y [H, W]: max-pool (k x k windows, stride k) of
// relu(y * scale + shift) rounded to y's type; `finite`: no value can be NaN (then 2x2 windows take the
// vectorized slab kernel). v: k * W values of scratch.
template <typename scalar_t, typename acc_t>
void pool_plane(const SlabKernels<scalar_t>& kern, const scalar_t* y, int64_t H, int64_t W, int64_t k, acc_t scale,
                acc_t shift, bool finite, scalar_t* v, scalar_t* z, int64_t* idx) {
  if (finite && k == 2) {
    kern.relu_pool2(y, H, W, scale, shift, z, idx);
    return;
  }
  const int64_t Wo = W / k;
  for (int64_t oh = 0; oh < H / k; ++oh) {  // k rows at a time
    relu_row(y + oh * k * W, k * W, scale, shift, finite, v);
    pool_row(v, W, Wo, k, oh * k * W, z + oh * Wo, idx + oh * Wo);
  }
}

}  // namespace fastmaml
