// C++ CPU kernels of the conv nets' block tail, fused: BatchNorm on batch statistics (per task and
// channel) + ReLU + non-overlapping k×k max-pooling (stride k, no padding, floor), forward and backward.
//
//   bn_relu_maxpool_fwd(x [T,N,C,H,W], w [T,C], b [T,C], eps, k)
//     -> (z [T,N,C,H/k,W/k], idx int64 [T,N,C,H/k,W/k], mean [T,C], invstd [T,C])
//     y = (x - mean) * invstd * w + b, statistics over (N, H, W) with the biased variance;
//     z = max-pool(relu(y)) and idx = h * W + w of the window element it came from, chosen exactly
//     as PyTorch's max_pool2d chooses on relu(y) (first maximum; NaN wins), so idx is interchangeable
//     with PyTorch's indices.
//   bn_relu_maxpool_bwd(gz, z, idx, x, mean, invstd, w, need_x)
//     -> (gx [T,N,C,H,W] or [0] when !need_x, gw [T,C], gb [T,C])
//     gy = gz routed to idx where z > 0 (ReLU's mask at the chosen element), then BatchNorm's backward:
//     gb = sum gy, gw = sum gy * xhat, gx = w * invstd * (gy - gb/m - xhat * gw/m), m = N*H*W.
//   bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, bd, eps, k)
//     -> (z, zd, idx, mean, invstd, a, dmean): the forward and its tangent (R-op) along (xd, wd, bd):
//     a = mean(xhat * xd), dmean = mean(xd), xhat' = invstd (xd - dmean - xhat a),
//     y' = xhat' w + xhat wd + bd, zd = y' at idx where z > 0, else 0.
//   bn_relu_maxpool_tangent_bwd(gz, gzd, z, idx, x, xd, mean, invstd, a, dmean, w, wd, need_x)
//     -> (gx, gxd, gw, gwd, gb, gbd): the backward and its tangent, with gy, gy' routed as above and
//     the formulas of batchnorm_tangent_bwd in fastmaml/ops/layers.py (gx, gxd [0] when !need_x).
//
// Layouts (activation_layout.h): x contiguous (NCHW) or channels-last (NHWC: strides of a contiguous
// [T, N, H, W, C]); any other x is made contiguous. Full-size outputs (z, zd, idx, gx, gxd) come in x's
// layout; the other full-size inputs (xd, gz, gzd, z, idx) are converted to it where they differ.
// Per-channel tensors are [T, C] contiguous in both. Neither the BatchNorm output nor relu(y) is written.
//
// NCHW kernels: work items are (task, channel); each thread streams its run of one task's channels image by
// image (for_task_runs), calling the per-slab kernels of bn_relu_maxpool_kernels.h (one image's H x W plane of
// one channel; GCC vectors, a baseline and an AVX2 build with the same bits). The forward reads x three
// times (mean, variance, the pooled output); for 2x2 windows with finite statistics the pooling is
// vectorized, other windows run the scalar rows below. The backward reads x and the pooled gradient for its
// sums and again to write gx, window by window where 2x2 is the only window that fits the shapes, else as a
// dense write and a scatter of the picks. Each item reduces in a fixed order (double sums in 8 or 4 partial
// sums per slab, added over images in order; the variance around the mean of the first pass).
//
// NHWC kernels: loops over the C adjacent channels innermost (they vectorize); work items are blocks of
// image rows (a multiple of k rows, about kValuesPerBlock values; sized from the shape alone) of every
// task. Each block keeps its own double sums per channel, combined in block order per task: the forward's
// are the block's sum and its sum of squares around the block's mean (a second read, from cache), joined by
// Chan's formula; the backward's are plain sums over the routed elements. Two parallel passes: the sums
// (all blocks), then, after the statistics, the outputs over the blocks in reverse (each thread starts on
// what the first pass read last, still in cache). Picks and routing are masks over each window's k x k elements, not gathers and
// scatters (the backwards derive k from the pooled shape; where several k fit, they gather and scatter over
// whole images). idx has PyTorch's values (h * W + w) in z's channels-last strides, so it stays
// interchangeable with max_pool2d's indices; planes are limited to 2^31 positions (the float32 kernels'
// picks are int32), larger ones take the NCHW path.
//
// Both: results do not depend on the number of threads; the value-and-tangent forward runs the forward's
// statistics and pooling code (the tangent's sums beside it), so its z, idx, mean and invstd are the
// forward's bit for bit. Only the NCHW per-slab kernels have an AVX2 build; the rest is compiled for the
// baseline instruction set.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "activation_layout.h"
#include "bn_relu_maxpool_plane.h"
#include "bn_relu_maxpool_slabs.h"
#include "cpu_isa.h"

#define FASTMAML_BRMP_NS fastmaml_brmp
#include "bn_relu_maxpool_kernels.h"
#undef FASTMAML_BRMP_NS

namespace fastmaml {

template <typename S>
SlabKernels<S> slab_kernels() {
  if (use_avx2_build(fastmaml_brmp_avx2::usable()))
    return {&fastmaml_brmp_avx2::slab_sum<S>, &fastmaml_brmp_avx2::relu_pool2_slab<S>,
            &fastmaml_brmp_avx2::routed_sums<S>, &fastmaml_brmp_avx2::input_gradient_slab<S>,
            &fastmaml_brmp_avx2::input_gradient_pool2_slab<S>};
  return {&fastmaml_brmp::slab_sum<S>, &fastmaml_brmp::relu_pool2_slab<S>, &fastmaml_brmp::routed_sums<S>,
          &fastmaml_brmp::input_gradient_slab<S>, &fastmaml_brmp::input_gradient_pool2_slab<S>};
}

template SlabKernels<float> slab_kernels<float>();
template SlabKernels<double> slab_kernels<double>();

namespace {

constexpr int64_t kSlabsPerGrain = 4096;  // x elements below which (task, channel) items share a thread
constexpr int kLanes = 8;                 // independent partial sums: the reductions vectorize

// fn(t, c_begin, c_end) for the runs of one task's consecutive channels that the work items [begin, end) of
// a parallel pass (item = t * C + c) hold. The contiguous kernels stream a run image by image: the slabs of
// one image's channels are adjacent in memory, where one channel's slabs lie an image apart (a gather the
// prefetchers do not follow); each (task, channel) still adds up its images in order, so the loop order
// changes no bit.
template <typename F>
void for_task_runs(int64_t begin, int64_t end, int64_t C, const F& fn) {
  while (begin < end) {
    const int64_t t = begin / C, stop = std::min(end, (t + 1) * C);
    fn(t, begin - t * C, stop - t * C);
    begin = stop;
  }
}

// Whether 2 is the only window size k that pools [H, W] to [Ho, Wo] (floor(H / k) = Ho, floor(W / k) = Wo):
// then every pick lies in its 2×2 window and the backward writes window by window
bool only_window_2(int64_t H, int64_t W, int64_t Ho, int64_t Wo) {
  if (Ho < 1 || Wo < 1 || H / 2 != Ho || W / 2 != Wo) return false;
  for (int64_t k = 1; k <= std::min(H, W); ++k)
    if (k != 2 && H / k == Ho && W / k == Wo) return false;
  return true;
}

void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 5, "x: expected activations [T, N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x: expected float32 or float64, got ", x.scalar_type());
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

// ---------------------------------------------------------------- channels-last (NHWC) kernels
// A task's x is N*H*W pixels of C adjacent values; every loop over channels is innermost and vectorizes.
// Work items are blocks of `rows` image rows (a multiple of k; an image's last block ends at H) of one
// image, per task; per-channel sums are per block (in order within it), combined in block order.

constexpr int64_t kValuesPerBlock = 16384;  // x elements per block of rows (about, at least k rows)

struct NhwcGeometry {
  int64_t T, N, C, H, W, k, Ho, Wo;
  int64_t rows;    // image rows per block, a multiple of k
  int64_t blocks;  // blocks per image
  int64_t pooled;  // pooled rows per block (its windows [oh k, oh k + k) lie in its rows)

  // k = 0: the window is not known (one block per image)
  NhwcGeometry(const at::Tensor& x, int64_t k_, int64_t Ho_, int64_t Wo_)
      : T(x.size(0)), N(x.size(1)), C(x.size(2)), H(x.size(3)), W(x.size(4)), k(k_), Ho(Ho_), Wo(Wo_) {
    rows = k == 0 ? H : k * std::max<int64_t>(1, kValuesPerBlock / (k * W * C));
    blocks = (H + rows - 1) / rows;
    pooled = k == 0 ? Ho : rows / k;
  }
  int64_t items() const { return N * blocks; }  // blocks of a task
  int64_t task_values() const { return N * H * W * C; }
  int64_t task_outputs() const { return N * Ho * Wo * C; }
  int64_t first_row(int64_t b) const { return b * rows; }
  int64_t end_row(int64_t b) const { return std::min(H, (b + 1) * rows); }
  int64_t first_pooled(int64_t b) const { return b * pooled; }
  int64_t end_pooled(int64_t b) const { return std::min(Ho, (b + 1) * pooled); }
  int64_t pixels(int64_t b) const { return (end_row(b) - first_row(b)) * W; }
  // blocks below the grain's size share a thread's chunk
  int64_t grain() const { return std::max<int64_t>(1, kSlabsPerGrain / std::max<int64_t>(1, rows * W * C)); }
};

// The window size k of a backward's pooled shape: the one k with H / k = Ho and W / k = Wo, or 0 when
// several have (the backwards are not given k; blocks of rows must hold whole windows).
int64_t pooling_window(int64_t H, int64_t W, int64_t Ho, int64_t Wo) {
  int64_t found = 0;
  for (int64_t k = 1; k <= std::min(H, W); ++k) {
    if (H / k != Ho || W / k != Wo) continue;
    if (found != 0) return 0;
    found = k;
  }
  return found;
}

// Runs fn(t, item) for the blocks of every task in one parallel region; `reverse`: each thread walks its
// chunk from the end down, so a pass that follows a pass over all blocks starts on what is still in cache.
template <typename F>
void for_each_block(const NhwcGeometry& g, bool reverse, const F& fn) {
  const int64_t items = g.items(), all = g.T * items;
  at::parallel_for(0, all, g.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j = reverse ? all - 1 - i : i;
      fn(j / items, j % items);
    }
  });
}

// The moments of one block's x (and xd) per channel, `pixels` rows of C values: part[q * C + c] for
// q = 0: sum x, 1: sum (x - mb)^2 around the block's mean mb (a second read, from cache), and with
// kTangent 2: sum (x - mb) xd, 3: sum xd. The forward and the tangent forward share this code, so their
// statistics round alike.
template <bool kTangent, typename scalar_t, typename acc_t>
void block_moments(const scalar_t* __restrict__ x, const scalar_t* __restrict__ xd, int64_t pixels, int64_t C,
                   acc_t* __restrict__ part, acc_t* __restrict__ mb) {
  acc_t* __restrict__ s = part;
  acc_t* __restrict__ q = part + C;
  std::fill(part, part + (kTangent ? 4 : 2) * C, acc_t(0));
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t c = 0; c < C; ++c) s[c] += acc_t(x[p * C + c]);
  for (int64_t c = 0; c < C; ++c) mb[c] = s[c] / acc_t(pixels);
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = acc_t(x[p * C + c]) - mb[c];
      q[c] += d * d;
      if constexpr (kTangent) {
        part[2 * C + c] += d * acc_t(xd[p * C + c]);
        part[3 * C + c] += acc_t(xd[p * C + c]);
      }
    }
  }
}

// Per-channel statistics of a task from its blocks' moments (block order): mean, m * variance (Chan's
// combination: sum over blocks of M2_b + n_b (mb - mean)^2) and, with kTangent, sum (x - mean) xd and sum xd.
template <bool kTangent, typename acc_t>
void combine_moments(const NhwcGeometry& g, const acc_t* part, acc_t* mu, acc_t* m2, acc_t* sxd, acc_t* sd) {
  const int64_t C = g.C, nq = kTangent ? 4 : 2;
  const acc_t m = acc_t(g.N * g.H * g.W);
  std::fill(mu, mu + C, acc_t(0));
  std::fill(m2, m2 + C, acc_t(0));
  for (int64_t i = 0; i < g.items(); ++i)
    for (int64_t c = 0; c < C; ++c) mu[c] += part[i * nq * C + c];
  for (int64_t c = 0; c < C; ++c) mu[c] /= m;
  if constexpr (kTangent) {
    std::fill(sxd, sxd + C, acc_t(0));
    std::fill(sd, sd + C, acc_t(0));
  }
  for (int64_t i = 0; i < g.items(); ++i) {
    const acc_t* pi = part + i * nq * C;
    const acc_t n = acc_t(g.pixels(i % g.blocks));
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = pi[c] / n - mu[c];  // the block's mean - the mean
      m2[c] += pi[C + c] + n * d * d;
      if constexpr (kTangent) {
        sxd[c] += pi[2 * C + c] + d * pi[3 * C + c];
        sd[c] += pi[3 * C + c];
      }
    }
  }
}

// Integers as wide as scalar_t: the picks' masks and positions (selects of one width vectorize).
template <typename scalar_t>
using lane_int_t = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;

// take ? a : b for a mask `take` of all ones or all zeros, as bit operations (the selects of floating
// values under masks GCC does not prove all-or-nothing do not vectorize)
template <typename scalar_t>
inline scalar_t blend(lane_int_t<scalar_t> take, scalar_t a, scalar_t b) {
  using I = lane_int_t<scalar_t>;
  return __builtin_bit_cast(scalar_t, (__builtin_bit_cast(I, a) & take) | (__builtin_bit_cast(I, b) & ~take));
}

// One element e = h * W + w of the k x k windows of a row of pooled outputs, its C values at xp (and xdp):
// v = relu(y), y = x * scale + shift rounded to x's type, replaces the running pick z (and where = e) if it is
// the window's first element (kFirst), greater, or NaN (PyTorch's rule, as pool_row); with kTangent zd = y'
// of the pick, y' = r (xd - dm - xhat a) w + xhat wd + bd. Masks, not branches (the picks of random data
// defeat branch prediction). ch: per-channel constants scale, shift and with kTangent mu, r, a, dm, w, wd, bd
// ([C] each).
template <bool kFirst, bool kTangent, typename scalar_t, typename acc_t>
void pool_element(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ xdp, int64_t C,
                  const acc_t* __restrict__ ch, int64_t e, scalar_t* __restrict__ z, scalar_t* __restrict__ zd,
                  lane_int_t<scalar_t>* __restrict__ where) {
  using I = lane_int_t<scalar_t>;
  const acc_t *scale = ch, *shift = ch + C;
  const acc_t *mu = ch + 2 * C, *r = ch + 3 * C, *ai = ch + 4 * C, *dm = ch + 5 * C;
  const acc_t *wi = ch + 6 * C, *wdi = ch + 7 * C, *bdi = ch + 8 * C;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t y = static_cast<scalar_t>(acc_t(xp[c]) * scale[c] + shift[c]);
    const scalar_t v = y <= scalar_t(0) ? scalar_t(0) : y;  // relu, NaN kept
    const I take = kFirst ? I(-1) : -I(v > z[c]) | -I(std::isunordered(v, v));
    z[c] = blend(take, v, z[c]);
    where[c] = (I(e) & take) | (where[c] & ~take);
    if constexpr (kTangent) {
      const acc_t xh = (acc_t(xp[c]) - mu[c]) * r[c];
      const acc_t yd = r[c] * (acc_t(xdp[c]) - dm[c] - xh * ai[c]) * wi[c] + xh * wdi[c] + bdi[c];
      zd[c] = blend(take, static_cast<scalar_t>(yd), zd[c]);
    }
  }
}

// The pooled outputs of one block of image rows: z, idx = h * W + w of the pick and with kTangent zd = y'
// at the pick where z > 0 (pool_element, the window's elements in row order). where: C integers of scratch.
template <bool kTangent, typename scalar_t, typename acc_t>
void pool_block(const NhwcGeometry& g, int64_t n, int64_t b, const scalar_t* xt, const scalar_t* xdt,
                const acc_t* ch, scalar_t* zt, scalar_t* zdt, int64_t* __restrict__ it,
                lane_int_t<scalar_t>* __restrict__ where) {
  const int64_t C = g.C, W = g.W, k = g.k;
  for (int64_t oh = g.first_pooled(b); oh < g.end_pooled(b); ++oh) {
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const int64_t o = ((n * g.Ho + oh) * g.Wo + ow) * C;
      scalar_t* __restrict__ z = zt + o;
      scalar_t* __restrict__ zd = kTangent ? zdt + o : nullptr;
      for (int64_t j = 0; j < k * k; ++j) {
        const int64_t e = (oh * k + j / k) * W + ow * k + j % k;
        const scalar_t* xp = xt + (n * g.H * W + e) * C;
        const scalar_t* xdp = kTangent ? xdt + (n * g.H * W + e) * C : nullptr;
        if (j == 0)
          pool_element<true, kTangent>(xp, xdp, C, ch, e, z, zd, where);
        else
          pool_element<false, kTangent>(xp, xdp, C, ch, e, z, zd, where);
      }
      for (int64_t c = 0; c < C; ++c) it[o + c] = where[c];
      if constexpr (kTangent)
        for (int64_t c = 0; c < C; ++c) zd[c] = z[c] > 0 ? zd[c] : scalar_t(0);
    }
  }
}

// The forward (kTangent false) or the value-and-tangent forward of a channels-last x, per task: the
// blocks' moments, the statistics, the pooled outputs (blocks in reverse).
template <bool kTangent>
std::vector<at::Tensor> fwd_nhwc(const at::Tensor& x, const at::Tensor& xd_in, const at::Tensor& w,
                                 const at::Tensor& b, const at::Tensor& wd, const at::Tensor& bd, double eps,
                                 int64_t k) {
  const NhwcGeometry g(x, k, x.size(3) / k, x.size(4) / k);
  const int64_t T = g.T, C = g.C;
  const at::Tensor xd = kTangent ? channels_last(xd_in) : xd_in;
  const std::vector<int64_t> pooled{T, g.N, C, g.Ho, g.Wo};
  at::Tensor z = empty_channels_last(pooled, x.options());
  at::Tensor zd = kTangent ? empty_channels_last(pooled, x.options()) : at::Tensor();
  at::Tensor idx = empty_channels_last(pooled, x.options().dtype(at::kLong));
  std::vector<at::Tensor> stats;  // mean, invstd and with kTangent a, dmean
  for (int s = 0; s < (kTangent ? 4 : 2); ++s) stats.push_back(at::empty({T, C}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_relu_maxpool_fwd_nhwc", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    constexpr int64_t nq = kTangent ? 4 : 2;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* xdp = kTangent ? xd.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    const scalar_t* wdp = kTangent ? wd.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bdp = kTangent ? bd.const_data_ptr<scalar_t>() : nullptr;
    // per task: the blocks' moments, then per channel scale, shift, mu, r, a, dm, w, wd, bd (pool_element's)
    const int64_t task_part = g.items() * nq * C;
    std::vector<acc_t> part(T * task_part), chs(T * 9 * C), m2(C), sxd(C), sd(C);
    for_each_block(g, false, [&](int64_t t, int64_t i) {
      std::vector<acc_t> mb(C);
      const int64_t at0 = t * g.task_values() + ((i / g.blocks) * g.H + g.first_row(i % g.blocks)) * g.W * C;
      block_moments<kTangent>(xp + at0, kTangent ? xdp + at0 : nullptr, g.pixels(i % g.blocks), C,
                              part.data() + t * task_part + i * nq * C, mb.data());
    });
    for (int64_t t = 0; t < T; ++t) {
      acc_t* ch = chs.data() + t * 9 * C;
      acc_t* mu = ch + 2 * C;
      acc_t* r = ch + 3 * C;
      combine_moments<kTangent>(g, part.data() + t * task_part, mu, m2.data(), sxd.data(), sd.data());
      const acc_t m = acc_t(g.N * g.H * g.W);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t tc = t * C + c;
        r[c] = acc_t(1) / std::sqrt(m2[c] / m + acc_t(eps));
        ch[c] = r[c] * acc_t(wp[tc]);               // scale
        ch[C + c] = acc_t(bp[tc]) - mu[c] * ch[c];  // shift
        stats[0].mutable_data_ptr<scalar_t>()[tc] = static_cast<scalar_t>(mu[c]);
        stats[1].mutable_data_ptr<scalar_t>()[tc] = static_cast<scalar_t>(r[c]);
        if constexpr (kTangent) {
          ch[4 * C + c] = r[c] * sxd[c] / m;  // a
          ch[5 * C + c] = sd[c] / m;          // dmean
          ch[6 * C + c] = acc_t(wp[tc]);
          ch[7 * C + c] = acc_t(wdp[tc]);
          ch[8 * C + c] = acc_t(bdp[tc]);
          stats[2].mutable_data_ptr<scalar_t>()[tc] = static_cast<scalar_t>(ch[4 * C + c]);
          stats[3].mutable_data_ptr<scalar_t>()[tc] = static_cast<scalar_t>(ch[5 * C + c]);
        }
      }
    }
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    scalar_t* zdp = kTangent ? zd.mutable_data_ptr<scalar_t>() : nullptr;
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    for_each_block(g, true, [&](int64_t t, int64_t i) {
      std::vector<lane_int_t<scalar_t>> where(C);
      const int64_t xt = t * g.task_values(), ot = t * g.task_outputs();
      pool_block<kTangent>(g, i / g.blocks, i % g.blocks, xp + xt, kTangent ? xdp + xt : nullptr,
                           chs.data() + t * 9 * C, zp + ot, kTangent ? zdp + ot : nullptr, ip + ot, where.data());
    });
  });
  if constexpr (kTangent) return {z, zd, idx, stats[0], stats[1], stats[2], stats[3]};
  return {z, idx, stats[0], stats[1]};
}

// x (and xd) at the picks of one pooled output (oh, ow), C channels, idx its C picks: with the window
// known (g.k > 0) a blend over its k x k elements by pick (vectorizes), else gathered; pick: C of scratch.
template <bool kTangent, typename scalar_t>
void picked(const NhwcGeometry& g, int64_t oh, int64_t ow, const int64_t* __restrict__ idx,
            const scalar_t* __restrict__ xs, const scalar_t* __restrict__ xds, lane_int_t<scalar_t>* __restrict__ pick,
            scalar_t* __restrict__ xsel, scalar_t* __restrict__ xdsel) {
  using I = lane_int_t<scalar_t>;
  const int64_t C = g.C, k = g.k;
  if (k == 0) {
    for (int64_t c = 0; c < C; ++c) {
      xsel[c] = xs[idx[c] * C + c];
      if constexpr (kTangent) xdsel[c] = xds[idx[c] * C + c];
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) pick[c] = static_cast<I>(idx[c]);
  const int64_t e0 = oh * k * g.W + ow * k;  // the first element stands in for a pick outside the window
  std::copy(xs + e0 * C, xs + (e0 + 1) * C, xsel);
  if constexpr (kTangent) std::copy(xds + e0 * C, xds + (e0 + 1) * C, xdsel);
  for (int64_t j = 1; j < k * k; ++j) {
    const int64_t e = (oh * k + j / k) * g.W + ow * k + j % k;
    const scalar_t* __restrict__ xe = xs + e * C;
    const scalar_t* __restrict__ xde = kTangent ? xds + e * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const I m = -I(pick[c] == I(e));
      xsel[c] = blend(m, xe[c], xsel[c]);
      if constexpr (kTangent) xdsel[c] = blend(m, xde[c], xdsel[c]);
    }
  }
}

// The backward's sums over one pooled output's C routed elements (ReLU's mask as threshold_backward) into
// s[q * C + c]: gy, gy xhat and with kTangent gy', gy' xhat, gy xhat'. xsel, xdsel: x, xd at the picks.
// ch: per-channel mu, r, a, dm ([C] each, the first of bwd_nhwc's constants).
template <bool kTangent, typename scalar_t, typename acc_t>
void routed_sums(int64_t C, const scalar_t* __restrict__ z, const scalar_t* __restrict__ gz,
                 const scalar_t* __restrict__ gzd, const scalar_t* __restrict__ xsel,
                 const scalar_t* __restrict__ xdsel, const acc_t* __restrict__ ch, acc_t* __restrict__ s) {
  const acc_t *mu = ch, *r = ch + C, *ai = ch + 2 * C, *dm = ch + 3 * C;
  for (int64_t c = 0; c < C; ++c) {  // (masks in scalar_t: selects of one width vectorize)
    const bool on = z[c] > 0;
    const acc_t gv = acc_t(on ? gz[c] : scalar_t(0));
    if constexpr (kTangent) {
      const acc_t gd = acc_t(on ? gzd[c] : scalar_t(0));
      const acc_t xh = (acc_t(xsel[c]) - mu[c]) * r[c];
      const acc_t xhd = r[c] * (acc_t(xdsel[c]) - dm[c] - xh * ai[c]);
      s[c] += gv;
      s[C + c] += gv * xh;
      s[2 * C + c] += gd;
      s[3 * C + c] += gd * xh;
      s[4 * C + c] += gv * xhd;
    } else {
      s[c] += gv;
      s[C + c] += gv * (acc_t(xsel[c]) - mu[c]) * r[c];
    }
  }
}

// gon = gz (gdon = gzd) where z > 0, else 0 (ReLU's mask as threshold_backward), over C channels
template <typename scalar_t>
void masked_gradients(int64_t C, const scalar_t* __restrict__ z, const scalar_t* __restrict__ gz,
                      const scalar_t* __restrict__ gzd, scalar_t* __restrict__ gon, scalar_t* __restrict__ gdon) {
  for (int64_t c = 0; c < C; ++c) gon[c] = z[c] > 0 ? gz[c] : scalar_t(0);
  if (gzd != nullptr)
    for (int64_t c = 0; c < C; ++c) gdon[c] = z[c] > 0 ? gzd[c] : scalar_t(0);
}

// gx (and gxd) of one window element e (C values at x, xd, gx, gxd): the pooled gradient gon (gdon, ReLU's
// mask applied) where e is the pick, else 0. ch: bwd_nhwc's per-channel constants mu, r, a, dm, w, wd,
// then (c0, c1, w r): gx = c0 + c1 (x - mu) + w r gy; with kTangent (m1, m2, n1, n3):
// gx = r (gxhat - m1 - xhat m2), gxd = -r a gx + r (gxhat' - n1 - xhat' m2 - xhat n3).
template <bool kTangent, typename scalar_t, typename acc_t>
void window_gradients(int64_t C, lane_int_t<scalar_t> e, const lane_int_t<scalar_t>* __restrict__ pick,
                      const scalar_t* __restrict__ gon, const scalar_t* __restrict__ gdon,
                      const scalar_t* __restrict__ x, const scalar_t* __restrict__ xd, const acc_t* __restrict__ ch,
                      scalar_t* __restrict__ gx, scalar_t* __restrict__ gxd) {
  using I = lane_int_t<scalar_t>;
  const acc_t *mu = ch, *r = ch + C, *ai = ch + 2 * C, *dm = ch + 3 * C, *wi = ch + 4 * C, *wdi = ch + 5 * C;
  const acc_t *k0 = ch + 6 * C, *k1 = ch + 7 * C, *k2 = ch + 8 * C, *k3 = ch + 9 * C;
  for (int64_t c = 0; c < C; ++c) {
    const I m = -I(pick[c] == e);
    const acc_t gv = acc_t(blend(m, gon[c], scalar_t(0)));
    if constexpr (kTangent) {
      const acc_t gd = acc_t(blend(m, gdon[c], scalar_t(0)));
      const acc_t gxh = wi[c] * gv, gxhd = wi[c] * gd + wdi[c] * gv;
      const acc_t xh = (acc_t(x[c]) - mu[c]) * r[c];
      const acc_t xhd = r[c] * (acc_t(xd[c]) - dm[c] - xh * ai[c]);
      const acc_t g = r[c] * (gxh - k0[c] - xh * k1[c]);
      gx[c] = static_cast<scalar_t>(g);
      gxd[c] = static_cast<scalar_t>(-r[c] * ai[c] * g + r[c] * (gxhd - k2[c] - xhd * k1[c] - xh * k3[c]));
    } else {
      gx[c] = static_cast<scalar_t>(k0[c] + k1[c] * (acc_t(x[c]) - mu[c]) + k2[c] * gv);
    }
  }
}

// The backward (kTangent false) or the backward and its tangent of a channels-last x, per task: the
// blocks' sums over the routed elements, then (need_x) gx (and gxd) written over each block's pixels and
// overwritten at the picks (blocks in reverse). Per-channel constants come from the NCHW kernels' formulas.
template <bool kTangent>
std::vector<at::Tensor> bwd_nhwc(const at::Tensor& gz_in, const at::Tensor& gzd_in, const at::Tensor& z_in,
                                 const at::Tensor& idx_in, const at::Tensor& x, const at::Tensor& xd_in,
                                 const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& a,
                                 const at::Tensor& dmean, const at::Tensor& w, const at::Tensor& wd, bool need_x) {
  const int64_t Ho = gz_in.size(3), Wo = gz_in.size(4);
  const NhwcGeometry g(x, pooling_window(x.size(3), x.size(4), Ho, Wo), Ho, Wo);
  const int64_t T = g.T, C = g.C;
  const at::Tensor gz = channels_last(gz_in), z = channels_last(z_in), idx = channels_last(idx_in);
  const at::Tensor gzd = kTangent ? channels_last(gzd_in) : gzd_in, xd = kTangent ? channels_last(xd_in) : xd_in;
  auto input_sized = [&] { return need_x ? empty_channels_last(x.sizes(), x.options()) : at::empty({0}, x.options()); };
  at::Tensor gx = input_sized(), gxd = kTangent ? input_sized() : at::Tensor();
  std::vector<at::Tensor> sums;  // gw, gb and with kTangent gwd, gbd
  for (int s = 0; s < (kTangent ? 4 : 2); ++s) sums.push_back(at::empty({T, C}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_relu_maxpool_bwd_nhwc", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    constexpr int64_t nq = kTangent ? 5 : 2;  // sums: gy, gy xhat and with kTangent gy', gy' xhat, gy xhat'
    const scalar_t *gzp = gz.const_data_ptr<scalar_t>(), *zp = z.const_data_ptr<scalar_t>();
    const scalar_t* gzdp = kTangent ? gzd.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* xdp = kTangent ? xd.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *rp = invstd.const_data_ptr<scalar_t>();
    const scalar_t *ap = kTangent ? a.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t *dp = kTangent ? dmean.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *wdp = kTangent ? wd.const_data_ptr<scalar_t>() : nullptr;
    // per channel: mu, r, a, dm, w, wd, then the gx constants (c0, c1, w r) or (m1, m2, n1, n3)
    const int64_t task_part = g.items() * nq * C;
    std::vector<acc_t> part(T * task_part), chs(T * 10 * C);
    for (int64_t t = 0; t < T; ++t) {
      acc_t *mu = chs.data() + t * 10 * C, *r = mu + C, *ai = mu + 2 * C, *dm = mu + 3 * C, *wi = mu + 4 * C;
      acc_t* wdi = mu + 5 * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t tc = t * C + c;
        mu[c] = acc_t(mp[tc]);
        r[c] = acc_t(rp[tc]);
        wi[c] = acc_t(wp[tc]);
        if constexpr (kTangent) {
          ai[c] = acc_t(ap[tc]);
          dm[c] = acc_t(dp[tc]);
          wdi[c] = acc_t(wdp[tc]);
        }
      }
    }
    for_each_block(g, false, [&](int64_t t, int64_t i) {
      const scalar_t* xt = xp + t * g.task_values();
      const scalar_t* xdt = kTangent ? xdp + t * g.task_values() : nullptr;
      const int64_t ot = t * g.task_outputs();
      const int64_t n = i / g.blocks, b = i % g.blocks;
      acc_t* __restrict__ s = part.data() + t * task_part + i * nq * C;
      std::fill(s, s + nq * C, acc_t(0));
      const scalar_t* xs = xt + n * g.H * g.W * C;
      const scalar_t* xds = kTangent ? xdt + n * g.H * g.W * C : nullptr;
      std::vector<lane_int_t<scalar_t>> pick(C);
      std::vector<scalar_t> xsel(C), xdsel(kTangent ? C : 0);
      for (int64_t oh = g.first_pooled(b); oh < g.end_pooled(b); ++oh) {
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const int64_t o = ot + ((n * g.Ho + oh) * g.Wo + ow) * C;
          picked<kTangent>(g, oh, ow, ip + o, xs, xds, pick.data(), xsel.data(), xdsel.data());
          routed_sums<kTangent>(C, zp + o, gzp + o, kTangent ? gzdp + o : nullptr, xsel.data(), xdsel.data(),
                                chs.data() + t * 10 * C, s);
        }
      }
    });
    for (int64_t t = 0; t < T; ++t) {
      const acc_t *mu = chs.data() + t * 10 * C, *r = mu + C, *wi = mu + 4 * C, *wdi = mu + 5 * C;
      acc_t *k0 = chs.data() + t * 10 * C + 6 * C, *k1 = k0 + C, *k2 = k0 + 2 * C, *k3 = k0 + 3 * C;
      std::vector<acc_t> tot(nq * C, acc_t(0));
      for (int64_t i = 0; i < g.items(); ++i)
        for (int64_t q = 0; q < nq * C; ++q) tot[q] += part[t * task_part + i * nq * C + q];
      const acc_t m = acc_t(g.N * g.H * g.W);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t tc = t * C + c;
        const acc_t sg = tot[c], sgx = tot[C + c];
        sums[0].mutable_data_ptr<scalar_t>()[tc] = static_cast<scalar_t>(sgx);
        sums[1].mutable_data_ptr<scalar_t>()[tc] = static_cast<scalar_t>(sg);
        if constexpr (kTangent) {
          const acc_t sd = tot[2 * C + c], sdx = tot[3 * C + c], sgxd = tot[4 * C + c];
          sums[2].mutable_data_ptr<scalar_t>()[tc] = static_cast<scalar_t>(sdx + sgxd);
          sums[3].mutable_data_ptr<scalar_t>()[tc] = static_cast<scalar_t>(sd);
          k0[c] = wi[c] * sg / m;                                     // m1 = mean(gxhat)
          k1[c] = wi[c] * sgx / m;                                    // m2 = mean(xhat gxhat)
          k2[c] = (wi[c] * sd + wdi[c] * sg) / m;                     // n1 = mean(gxhat')
          k3[c] = (wi[c] * sgxd + wi[c] * sdx + wdi[c] * sgx) / m;    // n3 = mean(xhat' gxhat + xhat gxhat')
        } else {
          const acc_t av = wi[c] * r[c];
          k0[c] = -av * sg / m;           // gx = k0 + k1 (x - mu) + k2 gy
          k1[c] = -av * sgx / m * r[c];
          k2[c] = av;
        }
      }
    }
    if (!need_x) return;
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gxdp = kTangent ? gxd.mutable_data_ptr<scalar_t>() : nullptr;
    for_each_block(g, true, [&](int64_t t, int64_t i) {
      const acc_t* ch = chs.data() + t * 10 * C;
      const acc_t *mu = ch, *r = ch + C, *ai = ch + 2 * C, *dm = ch + 3 * C, *wi = ch + 4 * C, *wdi = ch + 5 * C;
      const acc_t *k0 = ch + 6 * C, *k1 = ch + 7 * C, *k2 = ch + 8 * C, *k3 = ch + 9 * C;
      const scalar_t* xt = xp + t * g.task_values();
      const scalar_t* xdt = kTangent ? xdp + t * g.task_values() : nullptr;
      scalar_t* gxt = gxp + t * g.task_values();
      scalar_t* gxdt = kTangent ? gxdp + t * g.task_values() : nullptr;
      const int64_t ot = t * g.task_outputs();
      const int64_t n = i / g.blocks, b = i % g.blocks;
      const int64_t s0 = n * g.H * g.W * C;  // the image's first value
      const scalar_t* __restrict__ xs = xt + s0;
      const scalar_t* __restrict__ xds = kTangent ? xdt + s0 : nullptr;
      scalar_t* __restrict__ gs = gxt + s0;
      scalar_t* __restrict__ gds = kTangent ? gxdt + s0 : nullptr;
      // gx = r (gxhat - m1 - xhat m2); gxd = -r a gx + r (gxhat' - n1 - xhat' m2 - xhat n3)
      auto write = [&](int64_t e, int64_t c, acc_t gxh, acc_t gxhd) {
        const acc_t xh = (acc_t(xs[e]) - mu[c]) * r[c];
        const acc_t xhd = r[c] * (acc_t(xds[e]) - dm[c] - xh * ai[c]);
        const acc_t gv = r[c] * (gxh - k0[c] - xh * k1[c]);
        gs[e] = static_cast<scalar_t>(gv);
        gds[e] = static_cast<scalar_t>(-r[c] * ai[c] * gv + r[c] * (gxhd - k2[c] - xhd * k1[c] - xh * k3[c]));
      };
      // the value of every element that no window's pick reaches (gy = 0) over pixels [p0, p1)
      auto unrouted = [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          if constexpr (kTangent) {
            for (int64_t c = 0; c < C; ++c) write(p * C + c, c, 0, 0);
          } else {
            for (int64_t c = 0; c < C; ++c)
              gs[p * C + c] = static_cast<scalar_t>(k0[c] + k1[c] * (acc_t(xs[p * C + c]) - mu[c]));
          }
        }
      };
      if (g.k == 0) {  // the windows unknown: every element, then every pick again with its gradient
        unrouted(g.first_row(b) * g.W, g.end_row(b) * g.W);
        for (int64_t o = ot + (n * g.Ho + g.first_pooled(b)) * g.Wo * C;
             o < ot + (n * g.Ho + g.end_pooled(b)) * g.Wo * C; o += C) {
          for (int64_t c = 0; c < C; ++c) {  // every pick, its gradient masked: no branch
            const int64_t e = ip[o + c] * C + c;
            const bool on = zp[o + c] > 0;
            const acc_t gv = on ? acc_t(gzp[o + c]) : acc_t(0);
            if constexpr (kTangent) {
              const acc_t gd = on ? acc_t(gzdp[o + c]) : acc_t(0);
              write(e, c, wi[c] * gv, wi[c] * gd + wdi[c] * gv);
            } else {
              gs[e] = static_cast<scalar_t>(k0[c] + k1[c] * (acc_t(xs[e]) - mu[c]) + k2[c] * gv);
            }
          }
        }
        return;
      }
      // each window element once, its gradient the pooled one where it is the pick (masks, no scatter),
      // then the rows and columns outside the windows
      using I = lane_int_t<scalar_t>;
      std::vector<I> pick(C);
      std::vector<scalar_t> gon(C), gdon(kTangent ? C : 0);
      const int64_t k = g.k;
      for (int64_t oh = g.first_pooled(b); oh < g.end_pooled(b); ++oh) {
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const int64_t o = ot + ((n * g.Ho + oh) * g.Wo + ow) * C;
          for (int64_t c = 0; c < C; ++c) pick[c] = static_cast<I>(ip[o + c]);
          masked_gradients(C, zp + o, gzp + o, kTangent ? gzdp + o : nullptr, gon.data(), gdon.data());
          for (int64_t j = 0; j < k * k; ++j) {
            const int64_t e = (oh * k + j / k) * g.W + ow * k + j % k;
            window_gradients<kTangent>(C, static_cast<I>(e), pick.data(), gon.data(), gdon.data(), xs + e * C,
                                       kTangent ? xds + e * C : nullptr, ch, gs + e * C,
                                       kTangent ? gds + e * C : nullptr);
          }
        }
        if (g.Wo * k < g.W)
          for (int64_t h = oh * k; h < oh * k + k; ++h) unrouted(h * g.W + g.Wo * k, (h + 1) * g.W);
      }
      unrouted(g.end_pooled(b) * k * g.W, g.end_row(b) * g.W);
    });
  });
  if constexpr (kTangent) return {gx, gxd, sums[0], sums[2], sums[1], sums[3]};
  return {gx, sums[0], sums[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in, double eps, int64_t k) {
  check_activations(x_in);
  check_channels(w_in, "w", x_in);
  check_channels(b_in, "b", x_in);
  TORCH_CHECK(k >= 1 && x_in.size(3) >= k && x_in.size(4) >= k, "k: expected a pooling window 1 <= k <= min(H, W) = ",
              std::min(x_in.size(3), x_in.size(4)), ", got ", k);
  if (runs_channels_last(x_in)) {
    const auto out = fwd_nhwc<false>(x_in, {}, w_in.contiguous(), b_in.contiguous(), {}, {}, eps, k);
    return {out[0], out[1], out[2], out[3]};
  }
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Ho = H / k, Wo = W / k, plane = H * W, oplane = Ho * Wo;
  at::Tensor z = at::empty({T, N, C, Ho, Wo}, x.options());
  at::Tensor idx = at::empty({T, N, C, Ho, Wo}, x.options().dtype(at::kLong));
  at::Tensor mean = at::empty({T, C}, x.options()), invstd = at::empty({T, C}, x.options());
  if (z.numel() == 0 || N == 0) return {z, idx, mean, invstd};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_relu_maxpool_fwd", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rp = invstd.mutable_data_ptr<scalar_t>();
    const SlabKernels<scalar_t> kern = slab_kernels<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kSlabsPerGrain / (N * plane));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> v(k * W);
      std::vector<acc_t> sum(C), mu(C), ss(C), scale(C), shift(C);
      std::vector<char> finite(C);
      for_task_runs(begin, end, C, [&](int64_t t, int64_t c0, int64_t c1) {
        auto slab = [&](int64_t n, int64_t c) { return xp + ((t * N + n) * C + c) * plane; };
        const acc_t m = acc_t(N * plane);
        std::fill(sum.begin() + c0, sum.begin() + c1, acc_t(0));
        std::fill(ss.begin() + c0, ss.begin() + c1, acc_t(0));
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = c0; c < c1; ++c) sum[c] += kern.sum(slab(n, c), plane, 0.0, false);
        for (int64_t c = c0; c < c1; ++c) mu[c] = sum[c] / m;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = c0; c < c1; ++c) ss[c] += kern.sum(slab(n, c), plane, mu[c], true);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t item = t * C + c;
          const acc_t r = acc_t(1) / std::sqrt(ss[c] / m + acc_t(eps));
          mp[item] = static_cast<scalar_t>(mu[c]);
          rp[item] = static_cast<scalar_t>(r);
          // v = relu(y), y = x * scale + shift (one expression for every element)
          scale[c] = r * acc_t(wp[item]);
          shift[c] = acc_t(bp[item]) - mu[c] * scale[c];
          finite[c] = std::isfinite(sum[c]) && std::isfinite(scale[c]) && std::isfinite(shift[c]);  // no y is NaN
        }
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t c = c0; c < c1; ++c) {
            const scalar_t* xs = slab(n, c);
            const int64_t o0 = ((t * N + n) * C + c) * oplane;
            pool_plane(kern, xs, H, W, k, scale[c], shift[c], bool(finite[c]), v.data(), zp + o0, ip + o0);
          }
        }
      });
    });
  });
  return {z, idx, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_bwd_cpu(
    const at::Tensor& gz_in, const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& x_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, const at::Tensor& w_in, bool need_x) {
  check_activations(x_in);
  check_channels(mean_in, "mean", x_in);
  check_channels(invstd_in, "invstd", x_in);
  check_channels(w_in, "w", x_in);
  TORCH_CHECK(gz_in.dim() == 5 && gz_in.sizes() == z_in.sizes() && idx_in.sizes() == z_in.sizes(),
              "gz, z, idx: expected the pooled shape [T, N, C, Ho, Wo] for all three, got ", gz_in.sizes(), ", ",
              z_in.sizes(), ", ", idx_in.sizes());
  TORCH_CHECK(gz_in.scalar_type() == x_in.scalar_type() && z_in.scalar_type() == x_in.scalar_type(),
              "gz, z: expected dtype ", x_in.scalar_type(), " (as x)");
  TORCH_CHECK(idx_in.scalar_type() == at::kLong, "idx: expected int64 indices, got ", idx_in.scalar_type());
  for (int64_t d = 0; d < 3; ++d)
    TORCH_CHECK(gz_in.size(d) == x_in.size(d), "gz: expected [T, N, C] = ", x_in.sizes().slice(0, 3),
                " leading sizes (as x), got ", gz_in.sizes());
  if (runs_channels_last(x_in)) {
    const auto out = bwd_nhwc<false>(gz_in, {}, z_in, idx_in, x_in, {}, mean_in.contiguous(), invstd_in.contiguous(),
                                     {}, {}, w_in.contiguous(), {}, need_x);
    return {out[0], out[1], out[2]};
  }
  const at::Tensor gz = gz_in.contiguous(), z = z_in.contiguous(), idx = idx_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), w = w_in.contiguous();
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4), plane = H * W;
  const int64_t oplane = gz.size(3) * gz.size(4);
  const bool pool2 = only_window_2(H, W, gz.size(3), gz.size(4));
  at::Tensor gx = need_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw = at::empty({T, C}, x.options()), gb = at::empty({T, C}, x.options());
  if (T * C == 0) return {gx, gw, gb};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_relu_maxpool_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* gzp = gz.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* rp = invstd.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    scalar_t* gbp = gb.mutable_data_ptr<scalar_t>();
    const SlabKernels<scalar_t> kern = slab_kernels<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kSlabsPerGrain / std::max<int64_t>(1, N * plane));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      // per channel: sum gy, sum gy * xhat (gy is nonzero only at the routed elements); gx = c0 + c1 (x - mu) + a gy
      std::vector<acc_t> sg(C), sgx(C), c0(C), c1(C), a(C);
      for_task_runs(begin, end, C, [&](int64_t t, int64_t cb, int64_t ce) {
        auto at = [&](int64_t n, int64_t c) { return (t * N + n) * C + c; };
        std::fill(sg.begin() + cb, sg.begin() + ce, acc_t(0));
        std::fill(sgx.begin() + cb, sgx.begin() + ce, acc_t(0));
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t c = cb; c < ce; ++c) {
            const int64_t s = at(n, c);
            double sums[2];
            kern.routed_sums(gzp + s * oplane, zp + s * oplane, ip + s * oplane, xp + s * plane, oplane,
                             acc_t(mp[t * C + c]), acc_t(rp[t * C + c]), sums);
            sg[c] += sums[0];
            sgx[c] += sums[1];
          }
        }
        for (int64_t c = cb; c < ce; ++c) {
          const int64_t item = t * C + c;
          const acc_t r = acc_t(rp[item]), m = acc_t(N * plane);
          gbp[item] = static_cast<scalar_t>(sg[c]);
          gwp[item] = static_cast<scalar_t>(sgx[c]);
          a[c] = acc_t(wp[item]) * r;
          c0[c] = -a[c] * sg[c] / m;
          c1[c] = -a[c] * sgx[c] / m * r;
        }
        if (!need_x) return;
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t c = cb; c < ce; ++c) {
            const int64_t s = at(n, c);
            const acc_t mu = acc_t(mp[t * C + c]);
            if (pool2)
              kern.input_gradient_pool2(xp + s * plane, H, W, gzp + s * oplane, zp + s * oplane, ip + s * oplane, mu,
                                        c0[c], c1[c], a[c], gxp + s * plane);
            else
              kern.input_gradient(xp + s * plane, plane, gzp + s * oplane, zp + s * oplane, ip + s * oplane, oplane,
                                  mu, c0[c], c1[c], a[c], gxp + s * plane);
          }
        }
      });
    });
  });
  return {gx, gw, gb};
}

// sum_i (x[i] - shift) * u[i] and sum_i u[i] over n values (kLanes partial sums, fixed order)
template <typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> lane_dot(const scalar_t* x, const scalar_t* u, int64_t n, acc_t shift) {
  acc_t dot[kLanes] = {}, sum[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      dot[j] += (acc_t(x[i + j]) - shift) * acc_t(u[i + j]);
      sum[j] += acc_t(u[i + j]);
    }
  }
  acc_t d = 0, s = 0;
  for (int j = 0; j < kLanes; ++j) {
    d += dot[j];
    s += sum[j];
  }
  for (; i < n; ++i) {
    d += (acc_t(x[i]) - shift) * acc_t(u[i]);
    s += acc_t(u[i]);
  }
  return {d, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_relu_maxpool_tangent_fwd_cpu(const at::Tensor& x_in, const at::Tensor& xd_in, const at::Tensor& w_in,
                                const at::Tensor& b_in, const at::Tensor& wd_in, const at::Tensor& bd_in, double eps,
                                int64_t k) {
  check_activations(x_in);
  TORCH_CHECK(xd_in.sizes() == x_in.sizes() && xd_in.scalar_type() == x_in.scalar_type(),
              "xd: expected the shape ", x_in.sizes(), " and dtype of x, got ", xd_in.sizes(), " ",
              xd_in.scalar_type());
  check_channels(w_in, "w", x_in);
  check_channels(b_in, "b", x_in);
  check_channels(wd_in, "wd", x_in);
  check_channels(bd_in, "bd", x_in);
  TORCH_CHECK(k >= 1 && x_in.size(3) >= k && x_in.size(4) >= k, "k: expected a pooling window 1 <= k <= min(H, W) = ",
              std::min(x_in.size(3), x_in.size(4)), ", got ", k);
  if (runs_channels_last(x_in)) {
    const auto out = fwd_nhwc<true>(x_in, xd_in, w_in.contiguous(), b_in.contiguous(), wd_in.contiguous(),
                                    bd_in.contiguous(), eps, k);
    return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
  }
  const at::Tensor x = x_in.contiguous(), xd = xd_in.contiguous();
  const at::Tensor w = w_in.contiguous(), b = b_in.contiguous(), wd = wd_in.contiguous(), bd = bd_in.contiguous();
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Ho = H / k, Wo = W / k, plane = H * W, oplane = Ho * Wo;
  at::Tensor z = at::empty({T, N, C, Ho, Wo}, x.options()), zd = at::empty({T, N, C, Ho, Wo}, x.options());
  at::Tensor idx = at::empty({T, N, C, Ho, Wo}, x.options().dtype(at::kLong));
  at::Tensor mean = at::empty({T, C}, x.options()), invstd = at::empty({T, C}, x.options());
  at::Tensor a = at::empty({T, C}, x.options()), dmean = at::empty({T, C}, x.options());
  if (z.numel() == 0 || N == 0) return {z, zd, idx, mean, invstd, a, dmean};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_relu_maxpool_tangent_fwd", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *xdp = xd.const_data_ptr<scalar_t>();
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    const scalar_t *wdp = wd.const_data_ptr<scalar_t>(), *bdp = bd.const_data_ptr<scalar_t>();
    scalar_t *zp = z.mutable_data_ptr<scalar_t>(), *zdp = zd.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    scalar_t *mp = mean.mutable_data_ptr<scalar_t>(), *rp = invstd.mutable_data_ptr<scalar_t>();
    scalar_t *ap = a.mutable_data_ptr<scalar_t>(), *dp = dmean.mutable_data_ptr<scalar_t>();
    const SlabKernels<scalar_t> kern = slab_kernels<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kSlabsPerGrain / (N * plane));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> v(k * W);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C, c = item % C;
        auto at_n = [&](const scalar_t* base, int64_t n) { return base + ((t * N + n) * C + c) * plane; };
        const acc_t m = acc_t(N * plane);
        acc_t sum = 0, ss = 0, sxd = 0, sd = 0;
        for (int64_t n = 0; n < N; ++n) sum += kern.sum(at_n(xp, n), plane, 0.0, false);
        const acc_t mu = sum / m;
        for (int64_t n = 0; n < N; ++n) {
          ss += kern.sum(at_n(xp, n), plane, mu, true);
          const auto [d, s] = lane_dot(at_n(xp, n), at_n(xdp, n), plane, mu);
          sxd += d;
          sd += s;
        }
        const acc_t r = acc_t(1) / std::sqrt(ss / m + acc_t(eps));
        const acc_t ai = r * sxd / m, dm = sd / m;
        mp[item] = static_cast<scalar_t>(mu);
        rp[item] = static_cast<scalar_t>(r);
        ap[item] = static_cast<scalar_t>(ai);
        dp[item] = static_cast<scalar_t>(dm);
        const acc_t wi = acc_t(wp[item]), bi = acc_t(bp[item]), wdi = acc_t(wdp[item]), bdi = acc_t(bdp[item]);
        const acc_t scale = r * wi, shift = bi - mu * scale;
        const bool finite = std::isfinite(sum) && std::isfinite(scale) && std::isfinite(shift);
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t *xs = at_n(xp, n), *xds = at_n(xdp, n);
          const int64_t o0 = ((t * N + n) * C + c) * oplane;
          pool_plane(kern, xs, H, W, k, scale, shift, finite, v.data(), zp + o0, ip + o0);
          for (int64_t o = o0; o < o0 + oplane; ++o) {  // y' = xhat' w + xhat wd + bd at the pick, masked by ReLU
            const int64_t e = ip[o];
            const acc_t xh = (acc_t(xs[e]) - mu) * r;
            const acc_t yd = r * (acc_t(xds[e]) - dm - xh * ai) * wi + xh * wdi + bdi;
            zdp[o] = static_cast<scalar_t>(zp[o] > 0 ? yd : acc_t(0));
          }
        }
      }
    });
  });
  return {z, zd, idx, mean, invstd, a, dmean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_tangent_bwd_cpu(
    const at::Tensor& gz_in, const at::Tensor& gzd_in, const at::Tensor& z_in, const at::Tensor& idx_in,
    const at::Tensor& x_in, const at::Tensor& xd_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const at::Tensor& a_in, const at::Tensor& dmean_in, const at::Tensor& w_in, const at::Tensor& wd_in,
    bool need_x) {
  check_activations(x_in);
  TORCH_CHECK(xd_in.sizes() == x_in.sizes() && xd_in.scalar_type() == x_in.scalar_type(),
              "xd: expected the shape ", x_in.sizes(), " and dtype of x, got ", xd_in.sizes(), " ",
              xd_in.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean_in, "mean"}, {invstd_in, "invstd"},
                                {a_in, "a"}, {dmean_in, "dmean"}, {w_in, "w"}, {wd_in, "wd"}})
    check_channels(t, name, x_in);
  TORCH_CHECK(gz_in.dim() == 5 && gz_in.sizes() == z_in.sizes() && gzd_in.sizes() == z_in.sizes() &&
                  idx_in.sizes() == z_in.sizes(),
              "gz, gzd, z, idx: expected the pooled shape [T, N, C, Ho, Wo] for all four, got ", gz_in.sizes(), ", ",
              gzd_in.sizes(), ", ", z_in.sizes(), ", ", idx_in.sizes());
  TORCH_CHECK(gz_in.scalar_type() == x_in.scalar_type() && gzd_in.scalar_type() == x_in.scalar_type() &&
                  z_in.scalar_type() == x_in.scalar_type(),
              "gz, gzd, z: expected dtype ", x_in.scalar_type(), " (as x)");
  TORCH_CHECK(idx_in.scalar_type() == at::kLong, "idx: expected int64 indices, got ", idx_in.scalar_type());
  for (int64_t d = 0; d < 3; ++d)
    TORCH_CHECK(gz_in.size(d) == x_in.size(d), "gz: expected [T, N, C] = ", x_in.sizes().slice(0, 3),
                " leading sizes (as x), got ", gz_in.sizes());
  if (runs_channels_last(x_in)) {
    const auto out = bwd_nhwc<true>(gz_in, gzd_in, z_in, idx_in, x_in, xd_in, mean_in.contiguous(),
                                    invstd_in.contiguous(), a_in.contiguous(), dmean_in.contiguous(),
                                    w_in.contiguous(), wd_in.contiguous(), need_x);
    return {out[0], out[1], out[2], out[3], out[4], out[5]};
  }
  const at::Tensor gz = gz_in.contiguous(), gzd = gzd_in.contiguous(), z = z_in.contiguous();
  const at::Tensor idx = idx_in.contiguous(), x = x_in.contiguous(), xd = xd_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), a = a_in.contiguous();
  const at::Tensor dmean = dmean_in.contiguous(), w = w_in.contiguous(), wd = wd_in.contiguous();
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4), plane = H * W;
  const int64_t oplane = gz.size(3) * gz.size(4);
  const bool pool2 = only_window_2(H, W, gz.size(3), gz.size(4));
  at::Tensor gx = need_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gxd = need_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw = at::empty({T, C}, x.options()), gwd = at::empty({T, C}, x.options());
  at::Tensor gb = at::empty({T, C}, x.options()), gbd = at::empty({T, C}, x.options());
  if (T * C == 0) return {gx, gxd, gw, gwd, gb, gbd};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::bn_relu_maxpool_tangent_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t *gzp = gz.const_data_ptr<scalar_t>(), *gzdp = gzd.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *xdp = xd.const_data_ptr<scalar_t>();
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *rp = invstd.const_data_ptr<scalar_t>();
    const scalar_t *ap = a.const_data_ptr<scalar_t>(), *dp = dmean.const_data_ptr<scalar_t>();
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *wdp = wd.const_data_ptr<scalar_t>();
    scalar_t *gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t *gxdp = need_x ? gxd.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t *gwp = gw.mutable_data_ptr<scalar_t>(), *gwdp = gwd.mutable_data_ptr<scalar_t>();
    scalar_t *gbp = gb.mutable_data_ptr<scalar_t>(), *gbdp = gbd.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kSlabsPerGrain / std::max<int64_t>(1, N * plane));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C, c = item % C;
        const acc_t mu = acc_t(mp[item]), r = acc_t(rp[item]), ai = acc_t(ap[item]), dm = acc_t(dp[item]);
        const acc_t wi = acc_t(wp[item]), wdi = acc_t(wdp[item]), m = acc_t(N * plane);
        // sums over the routed elements: gy, gy xhat, gy', gy' xhat, gy xhat'
        acc_t sg = 0, sgx = 0, sd = 0, sdx = 0, sgxd = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t s = (t * N + n) * C + c;
          const scalar_t *xs = xp + s * plane, *xds = xdp + s * plane;
          for (int64_t o = s * oplane; o < (s + 1) * oplane; ++o) {
            const int64_t e = ip[o];
            const bool on = zp[o] > 0;  // ReLU's mask (as threshold_backward)
            const acc_t g = on ? acc_t(gzp[o]) : acc_t(0), gd = on ? acc_t(gzdp[o]) : acc_t(0);
            const acc_t xh = (acc_t(xs[e]) - mu) * r;
            const acc_t xhd = r * (acc_t(xds[e]) - dm - xh * ai);
            sg += g;
            sgx += g * xh;
            sd += gd;
            sdx += gd * xh;
            sgxd += g * xhd;
          }
        }
        gbp[item] = static_cast<scalar_t>(sg);
        gwp[item] = static_cast<scalar_t>(sgx);
        gbdp[item] = static_cast<scalar_t>(sd);
        gwdp[item] = static_cast<scalar_t>(sdx + sgxd);
        if (!need_x) continue;
        const acc_t m1 = wi * sg / m, m2 = wi * sgx / m;               // mean(gxhat), mean(xhat gxhat)
        const acc_t n1 = (wi * sd + wdi * sg) / m;                     // mean(gxhat')
        const acc_t n3 = (wi * sgxd + wi * sdx + wdi * sgx) / m;       // mean(xhat' gxhat + xhat gxhat')
        for (int64_t n = 0; n < N; ++n) {
          const int64_t s = (t * N + n) * C + c;
          const scalar_t *xs = xp + s * plane, *xds = xdp + s * plane;
          scalar_t *gs = gxp + s * plane, *gds = gxdp + s * plane;
          // gx = r (gxhat - m1 - xhat m2); gxd = -r a gx + r (gxhat' - n1 - xhat' m2 - xhat n3)
          auto write = [&](int64_t e, acc_t gxh, acc_t gxhd) {
            const acc_t xh = (acc_t(xs[e]) - mu) * r;
            const acc_t xhd = r * (acc_t(xds[e]) - dm - xh * ai);
            const acc_t g = r * (gxh - m1 - xh * m2);
            gs[e] = static_cast<scalar_t>(g);
            gds[e] = static_cast<scalar_t>(-r * ai * g + r * (gxhd - n1 - xhd * m2 - xh * n3));
          };
          for (int64_t e = 0; e < plane; ++e) write(e, 0, 0);
          for (int64_t o = s * oplane; o < (s + 1) * oplane; ++o) {
            const bool on = zp[o] > 0;
            const acc_t g = on ? acc_t(gzp[o]) : acc_t(0), gd = on ? acc_t(gzdp[o]) : acc_t(0);
            write(ip[o], wi * g, wi * gd + wdi * g);
          }
        }
      }
    });
  });
  return {gx, gxd, gw, gwd, gb, gbd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("bn_relu_maxpool_fwd", &bn_relu_maxpool_fwd_cpu);
  m.impl("bn_relu_maxpool_bwd", &bn_relu_maxpool_bwd_cpu);
  m.impl("bn_relu_maxpool_tangent_fwd", &bn_relu_maxpool_tangent_fwd_cpu);
  m.impl("bn_relu_maxpool_tangent_bwd", &bn_relu_maxpool_tangent_bwd_cpu);
}

}  // namespace fastmaml
