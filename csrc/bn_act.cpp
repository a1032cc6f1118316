// C++ CPU kernels of BatchNorm on batch statistics followed by an optional leaky ReLU, fused: ResNet-12's
// BatchNorm + LeakyReLU(0.1) and plain BatchNorm (slope 1), forward, backward, and both with tangents.
//
// x [T, N, C, S] (S spatial positions, 1 for BatchNorm1d); statistics per task and channel ("plane": the
// m = N*S values of one (t, c)), biased variance: xhat = (x - mean) r, r = 1/sqrt(var + eps),
// y = xhat w + b, z = y > 0 ? y : slope * y (in x's type, as leaky_relu computes it). slope 1: z = y (no
// activation; z is never read), slope 0: ReLU. The activation's derivative is k = 1 where z > 0, else slope
// (z keeps y's sign for slope >= 0), so gy = k gz, zd = k yd and, its second derivative being 0, gyd = k gzd.
// w, b, wd, bd are per task [T, C] (the Python side expands common and absent ones).
//
//   bn_act_fwd(x, w, b, eps, slope) -> (z [T,N,C,S], mean [T,C], invstd [T,C])
//   bn_act_bwd(gz, z?, x, mean, invstd, w, slope, need_x) -> (gx or [0] when !need_x, gw [T,C], gb [T,C])
//     gb = sum gy, gw = sum gy xhat, gx = w r (gy - gb/m - xhat gw/m)
//   bn_act_tangent_fwd(x, xd?, w, b, wd, bd, eps, slope) -> (z, zd, mean, invstd, a, dmean)
//     a = mean(xhat xd), dmean = mean(xd) (both 0 without xd), xhat' = r (xd - dmean - xhat a),
//     yd = xhat' w + xhat wd + bd, zd = k yd
//   bn_act_tangent_bwd(gz, gzd, z?, x, xd?, mean, invstd, a, dmean, w, wd, slope, need_x)
//     -> (gx, gxd ([0] when !need_x), gw, gwd, gb, gbd [T,C]): batchnorm_tangent_bwd of gy = k gz, gyd = k gzd
//     (fastmaml/ops/reference/batchnorm.py), xhat and xhat' recomputed from x, xd and the statistics.
//
// Two layouts of x (activation_layout.h), and the full-size outputs (z, zd, gx, gxd) come in x's: contiguous
// (NCHW), or channels-last (strides (N*S*C, S*C, 1, C), the [T, N, C, H*W] view of a channels-last
// [T, N, C, H, W]), read as it is. The other full-size inputs (gz, gzd, z, xd) are copied into x's layout
// where they are not in it; any other x is made contiguous. With C == 1 or S == 1 the layouts are one.
//
// The passes (every reduction in a fixed order, so results do not depend on the number of threads): the
// forwards read x (and xd) once for all their sums and once more to write z (and zd); the backwards read
// their inputs once for the sums and, when gx is asked for, once more to write gx (and gxd). Nothing
// full-size is written but the outputs. Contiguous x: one at::parallel_for item per plane (its N rows of S
// contiguous values). Channels-last x: per task R = N*S rows of C contiguous values, vectorized over the
// channels; the items are blocks of rows (their count from the shape only), each writing its partial sums
// per channel, which a serial step adds up in block order per (task, channel) before the write pass.
//
// Precision: sums accumulate in double, in 8 interleaved partial sums (contiguous: they vectorize without
// -ffast-math) or one per channel (channels-last: per block of rows, then the blocks' sums in order), the
// float64 statistics Kahan-compensated as well; the elementwise arithmetic runs in double too, but for
// the activation's mask, applied in the values' type as PyTorch's leaky_relu_backward applies it. The
// statistics are one pass of shifted sums, sum (x - K) and sum (x - K)^2 with K the mean of the plane's
// first 32 values, so var = E(x-K)^2 - (E(x-K))^2 loses only a few bits to cancellation (K lies among the
// values). The value-and-tangent forward recomputes a step's forward in the Hessian-vector product pass and
// must round exactly as the forward did (a ReLU decision at a near-tie would differ otherwise): both run the
// same statistics code (the tangent sums only added beside it) and the same noinline normalize_row (or
// normalize_block) for z.
//
// The kernels are in bn_act_kernels.h, compiled here for the baseline instruction set and in
// bn_act_avx2.cpp for AVX2, the AVX2 build chosen where the CPU has it unless $FASTMAML_CPU_ISA is
// "baseline". Both do the same IEEE operations in the same order (GCC vectors, no FMA), so they give the same
// bits. This file checks the arguments and runs the planes or blocks in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "activation_layout.h"
#include "bn_act_planes.h"
#include "cpu_isa.h"

#define FASTMAML_BN_ACT_NS fastmaml_bn_act
#include "bn_act_kernels.h"
#undef FASTMAML_BN_ACT_NS

namespace fastmaml {
namespace {

using fastmaml_bn_act_shapes::BwdArgs;
using fastmaml_bn_act_shapes::FwdArgs;
using fastmaml_bn_act_shapes::Geometry;
using fastmaml_bn_act_shapes::kNhwcCoefs;
using fastmaml_bn_act_shapes::kNhwcSums;
using fastmaml_bn_act_shapes::NhwcScratch;
using fastmaml_bn_act_shapes::RowBlocks;

constexpr int64_t kValuesPerGrain = 4096;   // plane values below which planes share a thread
constexpr int64_t kValuesPerBlock = 16384;  // values of a channels-last block of rows

int64_t grain(const Geometry& g) { return std::max<int64_t>(1, kValuesPerGrain / std::max<int64_t>(1, g.N * g.S)); }

// the two builds give the same bits, which the tests check
bool use_avx2() { return use_avx2_build(fastmaml_bn_act_avx2::usable()); }

// ---------------------------------------------------------------- the channels-last passes
// (bn_act_planes.h): the shifts or statistics, the blocks' partial sums in parallel, the per-channel step,
// the outputs in parallel (each thread's blocks in reverse order: the last ones the sums pass read are still
// in cache). Two parallel regions per op, whatever T.

RowBlocks row_blocks(const Geometry& g) {
  const int64_t R = g.N * g.S, rows = std::max<int64_t>(1, kValuesPerBlock / g.C);
  return {R, rows, (R + rows - 1) / rows};
}

// the scratch of the passes, in doubles
struct Scratch {
  at::Tensor sums, coefs;
  Scratch(const Geometry& g, const RowBlocks& rb)
      : sums(at::empty({g.T * rb.blocks * kNhwcSums * g.C}, at::kDouble)),
        coefs(at::empty({g.T * kNhwcCoefs * g.C}, at::kDouble)) {}
  NhwcScratch ptrs() { return {sums.mutable_data_ptr<double>(), coefs.mutable_data_ptr<double>()}; }
};

template <typename S>
void forward_nhwc(const Geometry& g, const FwdArgs<S>& q, bool avx2) {
  namespace base = fastmaml_bn_act;
  namespace fast = fastmaml_bn_act_avx2;
  const RowBlocks rb = row_blocks(g);
  Scratch scratch(g, rb);
  const NhwcScratch w = scratch.ptrs();
  avx2 ? fast::forward_shifts_nhwc(g, q, w) : base::forward_shifts_nhwc(g, q, w);
  at::parallel_for(0, g.T * rb.blocks, 1, [&](int64_t begin, int64_t end) {
    avx2 ? fast::forward_sums_nhwc(g, rb, q, w, begin, end) : base::forward_sums_nhwc(g, rb, q, w, begin, end);
  });
  avx2 ? fast::forward_coefs_nhwc(g, rb, q, w) : base::forward_coefs_nhwc(g, rb, q, w);
  at::parallel_for(0, g.T * rb.blocks, 1, [&](int64_t begin, int64_t end) {
    avx2 ? fast::forward_write_nhwc(g, rb, q, w, begin, end) : base::forward_write_nhwc(g, rb, q, w, begin, end);
  });
}

template <typename S>
void backward_nhwc(const Geometry& g, const BwdArgs<S>& q, bool avx2) {
  namespace base = fastmaml_bn_act;
  namespace fast = fastmaml_bn_act_avx2;
  const RowBlocks rb = row_blocks(g);
  Scratch scratch(g, rb);
  const NhwcScratch w = scratch.ptrs();
  avx2 ? fast::backward_stats_nhwc(g, q, w) : base::backward_stats_nhwc(g, q, w);
  at::parallel_for(0, g.T * rb.blocks, 1, [&](int64_t begin, int64_t end) {
    avx2 ? fast::backward_sums_nhwc(g, rb, q, w, begin, end) : base::backward_sums_nhwc(g, rb, q, w, begin, end);
  });
  avx2 ? fast::backward_coefs_nhwc(g, rb, q, w) : base::backward_coefs_nhwc(g, rb, q, w);
  if (q.gx == nullptr) return;
  at::parallel_for(0, g.T * rb.blocks, 1, [&](int64_t begin, int64_t end) {
    avx2 ? fast::backward_write_nhwc(g, rb, q, w, begin, end) : base::backward_write_nhwc(g, rb, q, w, begin, end);
  });
}

// ---------------------------------------------------------------- argument checks (each names its argument)

Geometry check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x: expected activations [T, N, C, S], got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x: expected float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) * x.size(3) > 0 || x.size(0) * x.size(2) == 0,
              "x: expected at least one value per task and channel (N * S > 0), got shape ", x.sizes());
  return {x.size(0), x.size(1), x.size(2), x.size(3)};
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, ": expected the shape ", x.sizes(), " of x, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), " (as x), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), " (as x), got ", t.device());
}

// t: one value per task and channel of x, [T, C], x's dtype
void check_channels(const at::Tensor& t, const char* name, const at::Tensor& x) {
  const int64_t T = x.size(0), C = x.size(2);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == T && t.size(1) == C, name, ": expected per-task channel values [", T,
              ", ", C, "], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), " (as x), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), " (as x), got ", t.device());
}

void check_slope(double slope) {
  TORCH_CHECK(std::isfinite(slope) && slope >= 0, "slope: expected a finite slope >= 0 (z keeps y's sign), got ",
              slope);
}

// z: required unless slope == 1 (no activation: never read); in x's layout
std::optional<at::Tensor> checked_z(const std::optional<at::Tensor>& z, double slope, const at::Tensor& x, bool cl) {
  if (slope == 1.0) return std::nullopt;
  TORCH_CHECK(z.has_value(), "z: the forward's output is needed for the activation's mask (slope ", slope, " != 1)");
  check_like(*z, "z", x);
  return in_layout(*z, cl);
}

std::optional<at::Tensor> optional_in_layout(const std::optional<at::Tensor>& t, bool cl) {
  return t.has_value() ? std::optional<at::Tensor>(in_layout(*t, cl)) : std::nullopt;
}

template <typename S>
const S* ptr(const at::Tensor& t) {
  return t.const_data_ptr<S>();
}

template <typename S>
const S* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<S>() : nullptr;
}

template <typename S>
S* out(at::Tensor& t) {
  return t.numel() ? t.mutable_data_ptr<S>() : nullptr;
}

// ---------------------------------------------------------------- the ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                                                              const at::Tensor& b_in, double eps, double slope) {
  const Geometry g = check_x(x_in);
  check_channels(w_in, "w", x_in);
  check_channels(b_in, "b", x_in);
  check_slope(slope);
  const bool cl = channels_last_planes(x_in);
  const at::Tensor x = in_layout(x_in, cl), w = w_in.contiguous(), b = b_in.contiguous();
  at::Tensor z = empty_in_layout(x, cl);
  at::Tensor mean = at::empty({g.T, g.C}, x.options()), invstd = at::empty({g.T, g.C}, x.options());
  if (x.numel() == 0) return {z, mean, invstd};
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_act_fwd", [&] {
    using S = scalar_t;
    const FwdArgs<S> q{ptr<S>(x), nullptr, ptr<S>(w), ptr<S>(b), nullptr, nullptr, out<S>(z), nullptr,
                       out<S>(mean), out<S>(invstd), nullptr, nullptr, eps, slope};
    if (cl) return forward_nhwc(g, q, avx2);
    at::parallel_for(0, g.planes(), grain(g), [&](int64_t begin, int64_t end) {
      avx2 ? fastmaml_bn_act_avx2::forward_planes(g, q, begin, end) : fastmaml_bn_act::forward_planes(g, q, begin, end);
    });
  });
  return {z, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cpu(const at::Tensor& gz_in,
                                                              const std::optional<at::Tensor>& z_in,
                                                              const at::Tensor& x_in, const at::Tensor& mean_in,
                                                              const at::Tensor& invstd_in, const at::Tensor& w_in,
                                                              double slope, bool need_x) {
  const Geometry g = check_x(x_in);
  check_like(gz_in, "gz", x_in);
  check_channels(mean_in, "mean", x_in);
  check_channels(invstd_in, "invstd", x_in);
  check_channels(w_in, "w", x_in);
  check_slope(slope);
  const bool cl = channels_last_planes(x_in);
  const std::optional<at::Tensor> z = checked_z(z_in, slope, x_in, cl);
  const at::Tensor gz = in_layout(gz_in, cl), x = in_layout(x_in, cl), mean = mean_in.contiguous();
  const at::Tensor invstd = invstd_in.contiguous(), w = w_in.contiguous();
  at::Tensor gx = need_x ? empty_in_layout(x, cl) : at::empty({0}, x.options());
  at::Tensor gw = at::empty({g.T, g.C}, x.options()), gb = at::empty({g.T, g.C}, x.options());
  if (g.planes() == 0) return {gx, gw, gb};
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_act_bwd", [&] {
    using S = scalar_t;
    const BwdArgs<S> q{ptr<S>(gz),   nullptr, ptr<S>(z), ptr<S>(x), nullptr,   ptr<S>(mean), ptr<S>(invstd),
                       nullptr,      nullptr, ptr<S>(w), nullptr,   out<S>(gx), nullptr,     out<S>(gw),
                       nullptr,      out<S>(gb), nullptr, slope};
    if (cl) return backward_nhwc(g, q, avx2);
    at::parallel_for(0, g.planes(), grain(g), [&](int64_t begin, int64_t end) {
      avx2 ? fastmaml_bn_act_avx2::backward_planes(g, q, begin, end)
           : fastmaml_bn_act::backward_planes(g, q, begin, end);
    });
  });
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_tangent_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& xd_in, const at::Tensor& w_in, const at::Tensor& b_in,
    const at::Tensor& wd_in, const at::Tensor& bd_in, double eps, double slope) {
  const Geometry g = check_x(x_in);
  if (xd_in.has_value()) check_like(*xd_in, "xd", x_in);
  check_channels(w_in, "w", x_in);
  check_channels(b_in, "b", x_in);
  check_channels(wd_in, "wd", x_in);
  check_channels(bd_in, "bd", x_in);
  check_slope(slope);
  const bool cl = channels_last_planes(x_in);
  const at::Tensor x = in_layout(x_in, cl), w = w_in.contiguous(), b = b_in.contiguous();
  const at::Tensor wd = wd_in.contiguous(), bd = bd_in.contiguous();
  const std::optional<at::Tensor> xd = optional_in_layout(xd_in, cl);
  at::Tensor z = empty_in_layout(x, cl), zd = empty_in_layout(x, cl);
  at::Tensor mean = at::empty({g.T, g.C}, x.options()), invstd = at::empty({g.T, g.C}, x.options());
  at::Tensor a = at::zeros({g.T, g.C}, x.options()), dmean = at::zeros({g.T, g.C}, x.options());
  if (x.numel() == 0) return {z, zd, mean, invstd, a, dmean};
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_act_tangent_fwd", [&] {
    using S = scalar_t;
    const FwdArgs<S> q{ptr<S>(x),  ptr<S>(xd), ptr<S>(w),    ptr<S>(b),      ptr<S>(wd), ptr<S>(bd), out<S>(z),
                       out<S>(zd), out<S>(mean), out<S>(invstd), out<S>(a), out<S>(dmean), eps,      slope};
    if (cl) return forward_nhwc(g, q, avx2);
    at::parallel_for(0, g.planes(), grain(g), [&](int64_t begin, int64_t end) {
      avx2 ? fastmaml_bn_act_avx2::tangent_forward_planes(g, q, begin, end)
           : fastmaml_bn_act::tangent_forward_planes(g, q, begin, end);
    });
  });
  return {z, zd, mean, invstd, a, dmean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_tangent_bwd_cpu(
    const at::Tensor& gz_in, const at::Tensor& gzd_in, const std::optional<at::Tensor>& z_in, const at::Tensor& x_in,
    const std::optional<at::Tensor>& xd_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const at::Tensor& a_in, const at::Tensor& dmean_in, const at::Tensor& w_in, const at::Tensor& wd_in,
    double slope, bool need_x) {
  const Geometry g = check_x(x_in);
  check_like(gz_in, "gz", x_in);
  check_like(gzd_in, "gzd", x_in);
  if (xd_in.has_value()) check_like(*xd_in, "xd", x_in);
  check_channels(mean_in, "mean", x_in);
  check_channels(invstd_in, "invstd", x_in);
  check_channels(a_in, "a", x_in);
  check_channels(dmean_in, "dmean", x_in);
  check_channels(w_in, "w", x_in);
  check_channels(wd_in, "wd", x_in);
  check_slope(slope);
  const bool cl = channels_last_planes(x_in);
  const std::optional<at::Tensor> z = checked_z(z_in, slope, x_in, cl);
  const at::Tensor gz = in_layout(gz_in, cl), gzd = in_layout(gzd_in, cl), x = in_layout(x_in, cl);
  const std::optional<at::Tensor> xd = optional_in_layout(xd_in, cl);
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), a = a_in.contiguous();
  const at::Tensor dmean = dmean_in.contiguous(), w = w_in.contiguous(), wd = wd_in.contiguous();
  at::Tensor gx = need_x ? empty_in_layout(x, cl) : at::empty({0}, x.options());
  at::Tensor gxd = need_x ? empty_in_layout(x, cl) : at::empty({0}, x.options());
  at::Tensor gw = at::empty({g.T, g.C}, x.options()), gwd = at::empty({g.T, g.C}, x.options());
  at::Tensor gb = at::empty({g.T, g.C}, x.options()), gbd = at::empty({g.T, g.C}, x.options());
  if (g.planes() == 0) return {gx, gxd, gw, gwd, gb, gbd};
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_act_tangent_bwd", [&] {
    using S = scalar_t;
    const BwdArgs<S> q{ptr<S>(gz),  ptr<S>(gzd), ptr<S>(z),   ptr<S>(x),   ptr<S>(xd),  ptr<S>(mean),
                       ptr<S>(invstd), ptr<S>(a), ptr<S>(dmean), ptr<S>(w), ptr<S>(wd), out<S>(gx),
                       out<S>(gxd), out<S>(gw), out<S>(gwd), out<S>(gb), out<S>(gbd), slope};
    if (cl) return backward_nhwc(g, q, avx2);
    at::parallel_for(0, g.planes(), grain(g), [&](int64_t begin, int64_t end) {
      avx2 ? fastmaml_bn_act_avx2::tangent_backward_planes(g, q, begin, end)
           : fastmaml_bn_act::tangent_backward_planes(g, q, begin, end);
    });
  });
  return {gx, gxd, gw, gwd, gb, gbd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("bn_act_fwd", &bn_act_fwd_cpu);
  m.impl("bn_act_bwd", &bn_act_bwd_cpu);
  m.impl("bn_act_tangent_fwd", &bn_act_tangent_fwd_cpu);
  m.impl("bn_act_tangent_bwd", &bn_act_tangent_bwd_cpu);
}

}  // namespace fastmaml
