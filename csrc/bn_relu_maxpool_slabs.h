// BatchNorm + ReLU + max-pooling (bn_relu_maxpool.cpp), contiguous activations: the per-slab kernels (one
// image's plane of one task and channel, H*W contiguous values) of bn_relu_maxpool_kernels.h, compiled twice:
// for the baseline instruction set (namespace fastmaml_brmp, in bn_relu_maxpool.cpp) and for AVX2
// (fastmaml_brmp_avx2, in bn_relu_maxpool_avx2.cpp). Plain C++, no ATen.
//
//   slab_sum(x, n, shift, square)     sum_i (x[i] - shift), or its square, over n values: kLanes = 8
//                                     partial sums (value i in lane i mod 8 up to the last multiple of 8),
//                                     added in lane order, then the rest in order
//   relu_pool2_slab(x, H, W, scale, shift, z, idx)
//                                     z [H/2, W/2] = 2×2 max-pool of relu(x * scale + shift rounded to S)
//                                     and idx = h * W + w of each pick (PyTorch's rule: the first maximum);
//                                     only where no value is NaN (the caller's `finite`)
//   routed_sums(gz, z, idx, x, count, mu, r, sums)
//                                     sums[0] = sum_o g_o, sums[1] = sum_o g_o (x[idx_o] - mu) r over count
//                                     pooled values, g_o = gz_o where z_o > 0 else 0 (kLanes / 2 partial
//                                     sums, added in lane order)
//   input_gradient_slab(x, plane, gz, z, idx, count, mu, c0, c1, a, gx)
//                                     gx = c0 + c1 (x - mu) over the plane, plus a g_o at each pick idx_o
//   input_gradient_pool2_slab(x, H, W, gz, z, idx, mu, c0, c1, a, gx)
//                                     the same for 2×2 windows (idx_o inside window o), window by window
//                                     without a scatter; the same bits
#pragma once

#include <cstdint>

#define FASTMAML_BRMP_ENTRY_POINTS                                                                              \
  template <typename S>                                                                                         \
  double slab_sum(const S* x, int64_t n, double shift, bool square);                                          \
  template <typename S>                                                                                         \
  void relu_pool2_slab(const S* x, int64_t H, int64_t W, double scale, double shift, S* z, int64_t* idx);      \
  template <typename S>                                                                                         \
  void routed_sums(const S* gz, const S* z, const int64_t* idx, const S* x, int64_t count, double mu, double r, \
                   double* sums);                                                                               \
  template <typename S>                                                                                         \
  void input_gradient_slab(const S* x, int64_t plane, const S* gz, const S* z, const int64_t* idx, int64_t count, \
                           double mu, double c0, double c1, double a, S* gx);                           \
  template <typename S>                                                                                         \
  void input_gradient_pool2_slab(const S* x, int64_t H, int64_t W, const S* gz, const S* z, const int64_t* idx,  \
                                 double mu, double c0, double c1, double a, S* gx);

namespace fastmaml_brmp {
FASTMAML_BRMP_ENTRY_POINTS
}  // namespace fastmaml_brmp

namespace fastmaml_brmp_avx2 {
FASTMAML_BRMP_ENTRY_POINTS
bool usable();  // built for AVX2 (GCC on x86-64) and the CPU has it
}  // namespace fastmaml_brmp_avx2

#undef FASTMAML_BRMP_ENTRY_POINTS
