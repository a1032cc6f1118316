// C++ CPU kernels of a conv net's first block, fused: a convolution of the model's input (few input channels,
// per-task weights), BatchNorm on batch statistics (per task and channel), ReLU and non-overlapping k×k
// max-pooling, forward and backward. The convolution's output y, the block's largest tensor, is never
// written: the forward computes it one plane at a time, the backward does not compute it at all.
//
//   conv_bn_relu_maxpool_fwd(x [T,N,Ci,H,W], cw [T,C,Ci,kh,kw], cb [T,C], w [T,C], b [T,C], eps, k, stride,
//                            padding, dilation)
//     -> (z [T,N,C,Hc/k,Wc/k], idx int64, mean [T,C], invstd [T,C], pmean [T,D], pcov [T,D,D] (float64))
//     y = conv2d(x, cw) + cb ([T,N,C,Hc,Wc]); z, idx, mean, invstd as bn_relu_maxpool_fwd gives them for y.
//     The statistics come from the moments of the input patches p (D = Ci·kh·kw values per output position,
//     zero where they fall on the padding): pmean = mean p, pcov = mean p pᵀ − pmean pmeanᵀ over the m =
//     N·Hc·Wc positions of a task, so mean_c = cw_c · pmean + cb_c and var_c = cw_cᵀ pcov cw_c.
//   conv_bn_relu_maxpool_bwd(gz, z, idx, x, cw, cb, w, pmean, pcov, eps, k, stride, padding, dilation)
//     -> (gcw [T,C,Ci,kh,kw], gcb [T,C], gw [T,C], gb [T,C]); no gradient w.r.t. x (the model's input).
//     With ga the pooled gradient routed to idx where z > 0 (ReLU's mask at the pick) and S = Σ ga p:
//       gb = Σ ga,  gw = Σ ga ŷ = invstd cw·(S − gb pmean),
//       gcw = w invstd (S − gb pmean − gw invstd pcov cw),  gcb = Σ gy = 0
//     (BatchNorm's backward gy = w invstd (ga − gb/m − ŷ gw/m) summed against p and 1; a constant added
//     before a BatchNorm on batch statistics has no effect, so its gradient is exactly zero).
//   conv_bn_relu_maxpool_tangent_fwd / _tangent_bwd: the same with tangents along the parameters' directions
//     (the Hessian-vector products; x has no tangent), from the same picks and moments (formulas below).
//
// Layout: x any (made contiguous and zero-padded once per call); outputs contiguous. Work: the moments in
// double, per image (parallel) and added over images in order; the forward's items are (task, channel), each
// computing y plane by plane (the taps as shifted rows of the padded image, in (ci, i, j) order, in x's type;
// GCC vectors, a baseline and an AVX2 build with the same bits, chosen by cpu_isa.h) and pooling it with the
// block tail's plane kernel (bn_relu_maxpool_plane.h); the backward's items likewise, summing over the picks
// only, in double (AVX2: each tap row one vector, a 3×3 kernel on one channel's sums in registers; baseline:
// one tap at a time, the same products in the same order). Results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "bn_relu_maxpool_plane.h"
#include "cpu_isa.h"

namespace fastmaml {
namespace {

constexpr int64_t kValuesPerGrain = 4096;  // output values below which (task, channel) items share a thread
constexpr int64_t kMaxTaps = 32;           // D = Ci * kh * kw at most (the backward's sums stay on the stack)

// The geometry of the block's convolution on a padded input, and each tap's offset in a padded image.
struct ConvGeometry {
  int64_t T, N, Ci, H, W, C, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t Hp, Wp, Hc, Wc, D;
  std::vector<int64_t> tap;  // tap k = (ci, i, j) -> ci * Hp * Wp + i * dh * Wp + j * dw

  ConvGeometry(const at::Tensor& x, const at::Tensor& cw, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation)
      : T(x.size(0)), N(x.size(1)), Ci(x.size(2)), H(x.size(3)), W(x.size(4)), C(cw.size(1)), kh(cw.size(3)),
        kw(cw.size(4)), sh(stride[0]), sw(stride[1]), ph(padding[0]), pw(padding[1]), dh(dilation[0]),
        dw(dilation[1]) {
    Hp = H + 2 * ph;
    Wp = W + 2 * pw;
    Hc = (Hp - dh * (kh - 1) - 1) / sh + 1;
    Wc = (Wp - dw * (kw - 1) - 1) / sw + 1;
    D = Ci * kh * kw;
    per_column = 1.0 / double(Wc);
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) tap.push_back(ci * Hp * Wp + i * dh * Wp + j * dw);
  }
  int64_t image() const { return Ci * Hp * Wp; }  // values of one padded image
  int64_t origin(int64_t h, int64_t w) const { return h * sh * Wp + w * sw; }  // output (h, w)'s first tap
  // the first tap of the output a pick e = h * Wc + w names (its row (e + 0.5) / Wc, exact for these sizes)
  int64_t pick_origin(int64_t e) const {
    const int64_t h = int64_t((double(e) + 0.5) * per_column);
    return origin(h, e - h * Wc);
  }
  double per_column = 0.0;  // 1 / Wc
};

void check_geometry(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "stride: expected two values >= 1, got ",
              stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "padding: expected two values >= 0, got ",
              padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1,
              "dilation: expected two values >= 1, got ", dilation);
}

void check_inputs(const at::Tensor& x, const at::Tensor& cw) {
  TORCH_CHECK(x.dim() == 5, "x: expected images [T, N, Ci, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x: expected float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(cw.dim() == 5 && cw.size(0) == x.size(0) && cw.size(2) == x.size(2),
              "cw: expected per-task weights [T, C, Ci, kh, kw] with T = ", x.size(0), " and Ci = ", x.size(2),
              " (as x), got shape ", cw.sizes());
  TORCH_CHECK(cw.size(2) * cw.size(3) * cw.size(4) <= kMaxTaps, "cw: expected at most ", kMaxTaps,
              " taps Ci * kh * kw (a first layer's few input channels), got ", cw.size(2) * cw.size(3) * cw.size(4));
  TORCH_CHECK(cw.scalar_type() == x.scalar_type() && cw.device() == x.device(), "cw: expected dtype ",
              x.scalar_type(), " on ", x.device(), " (as x)");
}

// t: one value per task and output channel, [T, C], x's dtype
void check_channels(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t C) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == C, name,
              ": expected per-task channel values [", x.size(0), ", ", C, "], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), name, ": expected dtype ",
              x.scalar_type(), " on ", x.device(), " (as x)");
}

// The geometry of both passes, after checking x, cw, cb, w and the convolution's arguments
ConvGeometry checked_geometry(const at::Tensor& x, const at::Tensor& cw, const at::Tensor& cb, const at::Tensor& w,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_inputs(x, cw);
  check_geometry(stride, padding, dilation);
  check_channels(cb, "cb", x, cw.size(1));
  check_channels(w, "w", x, cw.size(1));
  const ConvGeometry g(x, cw, stride, padding, dilation);
  TORCH_CHECK(g.Hc >= 1 && g.Wc >= 1, "x: the images [", g.H, ", ", g.W, "] are smaller than the kernel [", g.kh,
              ", ", g.kw, "] with this padding and dilation");
  return g;
}

// x zero-padded, contiguous [T, N, Ci, Hp, Wp]
at::Tensor padded(const at::Tensor& x, const ConvGeometry& g) {
  return at::constant_pad_nd(x.contiguous(), {g.pw, g.pw, g.ph, g.ph}, 0);
}

// Per task, the patches' mean [D] and covariance [D, D] (double), from one parallel pass over the images: each
// image's row sums (over output columns, elementwise into [D] / [D, D] rows of Wc lanes), added over images in
// order. Products p_k p_l for l >= k; the lower triangle is copied.
template <typename scalar_t>
void patch_moments(const scalar_t* xp, const ConvGeometry& g, double* pmean, double* pcov) {
  const int64_t D = g.D, Wc = g.Wc, pairs = D * (D + 1) / 2, per = D + pairs;
  std::vector<double> part(g.T * g.N * per);
  at::parallel_for(0, g.T * g.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> rows(D * Wc), s1(D * Wc), s2(pairs * Wc);
    for (int64_t item = begin; item < end; ++item) {
      const scalar_t* img = xp + item * g.image();
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t h = 0; h < g.Hc; ++h) {
        for (int64_t k = 0; k < D; ++k) {
          const scalar_t* src = img + g.tap[k] + g.origin(h, 0);
          double* r = rows.data() + k * Wc;
          for (int64_t w = 0; w < Wc; ++w) r[w] = double(src[w * g.sw]);
          double* a = s1.data() + k * Wc;
          for (int64_t w = 0; w < Wc; ++w) a[w] += r[w];
        }
        double* q = s2.data();
        for (int64_t k = 0; k < D; ++k) {
          const double* rk = rows.data() + k * Wc;
          for (int64_t l = k; l < D; ++l, q += Wc) {
            const double* rl = rows.data() + l * Wc;
            for (int64_t w = 0; w < Wc; ++w) q[w] += rk[w] * rl[w];
          }
        }
      }
      double* out = part.data() + item * per;
      for (int64_t k = 0; k < D; ++k) out[k] = std::accumulate(s1.begin() + k * Wc, s1.begin() + (k + 1) * Wc, 0.0);
      for (int64_t q = 0; q < pairs; ++q)
        out[D + q] = std::accumulate(s2.begin() + q * Wc, s2.begin() + (q + 1) * Wc, 0.0);
    }
  });
  const double m = double(g.N * g.Hc * g.Wc);
  for (int64_t t = 0; t < g.T; ++t) {
    std::vector<double> sum(per, 0.0);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t i = 0; i < per; ++i) sum[i] += part[(t * g.N + n) * per + i];
    double* mu = pmean + t * D;
    double* cov = pcov + t * D * D;
    for (int64_t k = 0; k < D; ++k) mu[k] = sum[k] / m;
    int64_t q = D;
    for (int64_t k = 0; k < D; ++k)
      for (int64_t l = k; l < D; ++l, ++q) cov[k * D + l] = cov[l * D + k] = sum[q] / m - mu[k] * mu[l];
  }
}

// mean and biased variance of channel c's y from the patch moments: cw_c · pmean + cb_c, cw_cᵀ pcov cw_c
// (at least 0); the forward and the backward call this one function, so both see the same bits.
template <typename scalar_t>
std::pair<double, double> channel_moments(const scalar_t* cwc, double cbc, const double* pmean, const double* pcov,
                                          int64_t D) {
  double mean = cbc, var = 0.0;
  for (int64_t k = 0; k < D; ++k) {
    mean += double(cwc[k]) * pmean[k];
    double row = 0.0;
    for (int64_t l = 0; l < D; ++l) row += pcov[k * D + l] * double(cwc[l]);
    var += double(cwc[k]) * row;
  }
  return {mean, std::max(var, 0.0)};
}

// Vectors of S of `Bytes` bytes (16: SSE2 registers, the baseline build; 32: AVX2) and their loads and stores.
// 32-byte vectors only inside conv_plane_avx2 (everything it calls is inlined into it).
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename S, int Bytes>
struct VecOf {
  typedef S type __attribute__((vector_size(Bytes)));
};

// One block of 2 L adjacent outputs of a row, from `w` (stride 1): cb plus the taps in (ci, i, j) order, in S
// (a multiply and an add each, no FMA: both builds give the same bits, for any block that covers an output).
template <typename S, int Bytes>
inline __attribute__((always_inline)) void conv_block2(const S* base, const int64_t* tap, const S* cwc, S cbc,
                                                      int64_t D, int64_t w, S* row) {
  typedef typename VecOf<S, Bytes>::type V;
  constexpr int64_t L = Bytes / sizeof(S);
  V a0 = V{} + cbc, a1 = V{} + cbc;
  for (int64_t k = 0; k < D; ++k) {
    const S* src = base + tap[k] + w;
    V x0, x1;
    __builtin_memcpy(&x0, src, sizeof x0);
    __builtin_memcpy(&x1, src + L, sizeof x1);
    a0 += cwc[k] * x0;
    a1 += cwc[k] * x1;
  }
  __builtin_memcpy(row + w, &a0, sizeof a0);
  __builtin_memcpy(row + w + L, &a1, sizeof a1);
}

// One plane of y = conv2d(x, cw_c) + cb_c from one padded image: y [Hc, Wc]. At stride 1 with rows of at least
// 2 L outputs, blocks of 2 L (the last one ending at the row's end, overlapping the one before: it writes the
// same values again); else one output at a time, with the same operations in the same order.
template <typename S, int Bytes>
inline __attribute__((always_inline)) void conv_plane_impl(const S* img, const S* cwc, S cbc, const ConvGeometry& g,
                                                          S* y) {
  constexpr int64_t B = 2 * Bytes / sizeof(S);
  const int64_t D = g.D, Wc = g.Wc, sw = g.sw;
  const int64_t* tap = g.tap.data();
  for (int64_t h = 0; h < g.Hc; ++h) {
    const S* base = img + g.origin(h, 0);
    S* row = y + h * Wc;
    if (sw == 1 && Wc >= B) {
      int64_t w = 0;
      for (; w + B <= Wc; w += B) conv_block2<S, Bytes>(base, tap, cwc, cbc, D, w, row);
      if (w < Wc) conv_block2<S, Bytes>(base, tap, cwc, cbc, D, Wc - B, row);
      continue;
    }
    for (int64_t w = 0; w < Wc; ++w) {
      S a = cbc;
      for (int64_t k = 0; k < D; ++k) a += cwc[k] * base[tap[k] + w * sw];
      row[w] = a;
    }
  }
}

template <typename S>
void conv_plane_baseline(const S* img, const S* cwc, S cbc, const ConvGeometry& g, S* y) {
  conv_plane_impl<S, 16>(img, cwc, cbc, g, y);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMAML_CONV_BLOCK_AVX2 1
template <typename S>
__attribute__((target("avx2"))) void conv_plane_avx2(const S* img, const S* cwc, S cbc, const ConvGeometry& g,
                                                     S* y) {
  conv_plane_impl<S, 32>(img, cwc, cbc, g, y);
}
#endif

// The plane kernel of the build that runs: AVX2 where the CPU has it (cpu_isa.h); both give the same bits
template <typename S>
using ConvPlane = void (*)(const S*, const S*, S, const ConvGeometry&, S*);

template <typename S>
ConvPlane<S> conv_plane_kernel() {
#if defined(FASTMAML_CONV_BLOCK_AVX2)
  if (use_avx2_build(__builtin_cpu_supports("avx2"))) return &conv_plane_avx2<S>;
#endif
  return &conv_plane_baseline<S>;
}

// One task and channel's sums over its picks, image by image (N of them, `stride` pooled values apart from
// gz, z, idx; images `g.image()` apart from img): sg = Σ ga and s[q] = Σ ga p_q with ga = gz where z > 0 (ReLU's
// mask at the pick, as a select: random picks defeat branch prediction); double sums.
template <typename scalar_t>
void routed_patch_sums(const scalar_t* gz, const scalar_t* z, const int64_t* idx, const scalar_t* img,
                       const ConvGeometry& g, int64_t oplane, int64_t stride, const int64_t* tap, double* s,
                       double& sg_out) {
  std::fill(s, s + g.D, 0.0);
  double sg = 0.0;
  for (int64_t n = 0; n < g.N; ++n, gz += stride, z += stride, idx += stride, img += g.image()) {
    for (int64_t o = 0; o < oplane; ++o) {
      const double ga = z[o] > scalar_t(0) ? double(gz[o]) : 0.0;
      const scalar_t* p = img + g.pick_origin(idx[o]);
      sg += ga;
      for (int64_t q = 0; q < g.D; ++q) s[q] += ga * double(p[tap[q]]);
    }
  }
  sg_out = sg;
}

// routed_patch_sums where every tap row (ci, i) is kw <= 4 adjacent values (dw = 1): a row's four values are one
// vector (the fourth, past the row when kw = 3, lands in a lane that is dropped; img has slack after its last
// image), widened to double (a float product is exact there) and summed in double, as routed_patch_sums does.
// KR: the rows Ci·kh known when compiled (the sums stay in registers), or 0. Built for AVX2 only (its double
// vectors); the baseline build runs routed_patch_sums, which adds the same products in the same order.
template <int64_t KR, typename scalar_t>
inline __attribute__((always_inline)) void routed_row_sums_impl(const scalar_t* gz, const scalar_t* z,
                                                               const int64_t* idx, const scalar_t* img,
                                                               const ConvGeometry& g, int64_t oplane,
                                                               int64_t stride, double* s_out, double& sg_out) {
  typedef typename VecOf<scalar_t, 4 * sizeof(scalar_t)>::type V;
  typedef typename VecOf<double, 32>::type V64;
  const int64_t R = KR > 0 ? KR : g.Ci * g.kh;
  int64_t rows[KR > 0 ? KR : kMaxTaps];
  for (int64_t r = 0; r < R; ++r) rows[r] = (r / g.kh) * g.Hp * g.Wp + (r % g.kh) * g.dh * g.Wp;
  V64 acc[KR > 0 ? KR : kMaxTaps];
  for (int64_t r = 0; r < R; ++r) acc[r] = V64{};
  double sg = 0.0;
  for (int64_t n = 0; n < g.N; ++n, gz += stride, z += stride, idx += stride, img += g.image()) {
    for (int64_t o = 0; o < oplane; ++o) {
      const double ga = z[o] > scalar_t(0) ? double(gz[o]) : 0.0;
      const scalar_t* p = img + g.pick_origin(idx[o]);
      sg += ga;
      for (int64_t r = 0; r < R; ++r) {
        V v;
        __builtin_memcpy(&v, p + rows[r], sizeof v);
        acc[r] += ga * __builtin_convertvector(v, V64);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < g.kw; ++j) s_out[r * g.kw + j] = acc[r][j];
  sg_out = sg;
}

#if defined(FASTMAML_CONV_BLOCK_AVX2)
template <int64_t KR, typename scalar_t>
__attribute__((target("avx2"))) void routed_row_sums(const scalar_t* gz, const scalar_t* z, const int64_t* idx,
                                                     const scalar_t* img, const ConvGeometry& g, int64_t oplane,
                                                     int64_t stride, double* s_out, double& sg_out) {
  routed_row_sums_impl<KR>(gz, z, idx, img, g, oplane, stride, s_out, sg_out);
}
#endif

// Whether the backward runs routed_row_sums: the AVX2 build (cpu_isa.h) and tap rows of at most four adjacent
// values
bool row_sums_apply(const ConvGeometry& g) {
#if defined(FASTMAML_CONV_BLOCK_AVX2)
  return g.dw == 1 && g.kw <= 4 && use_avx2_build(__builtin_cpu_supports("avx2"));
#else
  (void)g;
  return false;
#endif
}

// S[q] = Σ ga p_q and sg = Σ ga over one task and channel's picks: routed_row_sums where `rows4`
// (row_sums_apply), else routed_patch_sums; the same bits either way.
template <typename scalar_t>
void pick_sums(bool rows4, const scalar_t* gz, const scalar_t* z, const int64_t* idx, const scalar_t* img,
               const ConvGeometry& g, int64_t oplane, int64_t stride, double* s, double& sg) {
#if defined(FASTMAML_CONV_BLOCK_AVX2)
  if (rows4 && g.Ci * g.kh == 3) return routed_row_sums<3>(gz, z, idx, img, g, oplane, stride, s, sg);
  if (rows4) return routed_row_sums<0>(gz, z, idx, img, g, oplane, stride, s, sg);
#endif
  routed_patch_sums(gz, z, idx, img, g, oplane, stride, g.tap.data(), s, sg);
}

// x zero-padded with four values of slack after the last image (routed_row_sums's last vector reads past it)
at::Tensor padded_with_slack(const at::Tensor& x, const ConvGeometry& g) {
  const at::Tensor xpad = padded(x, g);
  at::Tensor buffer = at::zeros({xpad.numel() + 4}, x.options());
  buffer.narrow(0, 0, xpad.numel()).copy_(xpad.view(-1));
  return buffer;
}

// The backwards' checks of the pooled tensors (gz, z, idx) and the forward's patch moments
void check_backward(const at::Tensor& gz_in, const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& x,
                    const ConvGeometry& g, int64_t k, const at::Tensor& pmean_in, const at::Tensor& pcov_in) {
  const int64_t T = g.T, N = g.N, C = g.C, D = g.D;
  TORCH_CHECK(gz_in.dim() == 5 && gz_in.sizes() == z_in.sizes() && idx_in.sizes() == z_in.sizes(),
              "gz, z, idx: expected the pooled shape [T, N, C, Ho, Wo] for all three, got ", gz_in.sizes(), ", ",
              z_in.sizes(), ", ", idx_in.sizes());
  TORCH_CHECK(gz_in.size(0) == T && gz_in.size(1) == N && gz_in.size(2) == C, "gz: expected [T, N, C] = [", T, ", ",
              N, ", ", C, "] leading sizes, got ", gz_in.sizes());
  TORCH_CHECK(gz_in.scalar_type() == x.scalar_type() && z_in.scalar_type() == x.scalar_type(),
              "gz, z: expected dtype ", x.scalar_type(), " (as x)");
  TORCH_CHECK(idx_in.scalar_type() == at::kLong, "idx: expected int64 indices, got ", idx_in.scalar_type());
  TORCH_CHECK(k >= 1 && gz_in.size(3) == g.Hc / k && gz_in.size(4) == g.Wc / k, "gz: expected pooled planes [",
              g.Hc / std::max<int64_t>(k, 1), ", ", g.Wc / std::max<int64_t>(k, 1), "] (Hc / k, Wc / k), got ",
              gz_in.sizes());
  TORCH_CHECK(pmean_in.scalar_type() == at::kDouble && pmean_in.sizes() == at::IntArrayRef({T, D}),
              "pmean: expected float64 [", T, ", ", D, "] (the forward's), got ", pmean_in.scalar_type(), " ",
              pmean_in.sizes());
  TORCH_CHECK(pcov_in.scalar_type() == at::kDouble && pcov_in.sizes() == at::IntArrayRef({T, D, D}),
              "pcov: expected float64 [", T, ", ", D, ", ", D, "] (the forward's), got ", pcov_in.scalar_type(), " ",
              pcov_in.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_maxpool_fwd_cpu(
    const at::Tensor& x, const at::Tensor& cw_in, const at::Tensor& cb_in, const at::Tensor& w_in,
    const at::Tensor& b_in, double eps, int64_t k, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const ConvGeometry g = checked_geometry(x, cw_in, cb_in, w_in, stride, padding, dilation);
  const int64_t C = g.C;
  check_channels(b_in, "b", x, C);
  TORCH_CHECK(k >= 1 && g.Hc >= k && g.Wc >= k, "k: expected a pooling window 1 <= k <= min(Hc, Wc) = ",
              std::min(g.Hc, g.Wc), ", got ", k);
  const int64_t T = g.T, N = g.N, Ho = g.Hc / k, Wo = g.Wc / k, plane = g.Hc * g.Wc, oplane = Ho * Wo, D = g.D;
  const at::Tensor cw = cw_in.contiguous(), cb = cb_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  at::Tensor z = at::empty({T, N, C, Ho, Wo}, x.options());
  at::Tensor idx = at::empty({T, N, C, Ho, Wo}, x.options().dtype(at::kLong));
  at::Tensor mean = at::empty({T, C}, x.options()), invstd = at::empty({T, C}, x.options());
  at::Tensor pmean = at::empty({T, D}, x.options().dtype(at::kDouble));
  at::Tensor pcov = at::empty({T, D, D}, x.options().dtype(at::kDouble));
  if (T == 0 || N == 0 || C == 0) return {z, idx, mean, invstd, pmean.zero_(), pcov.zero_()};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::conv_bn_relu_maxpool_fwd", [&] {
    const at::Tensor xpad = padded(x, g);
    const scalar_t* xp = xpad.const_data_ptr<scalar_t>();
    double* pm = pmean.mutable_data_ptr<double>();
    double* pc = pcov.mutable_data_ptr<double>();
    patch_moments(xp, g, pm, pc);
    const scalar_t *cwp = cw.const_data_ptr<scalar_t>(), *cbp = cb.const_data_ptr<scalar_t>();
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    scalar_t *mp = mean.mutable_data_ptr<scalar_t>(), *rp = invstd.mutable_data_ptr<scalar_t>();
    const SlabKernels<scalar_t> kern = slab_kernels<scalar_t>();
    const ConvPlane<scalar_t> conv_plane = conv_plane_kernel<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kValuesPerGrain / (N * plane));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> y(plane), v(k * g.Wc);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C;
        const scalar_t* cwc = cwp + item * D;
        const auto [mu, var] = channel_moments(cwc, double(cbp[item]), pm + t * D, pc + t * D * D, D);
        const double r = 1.0 / std::sqrt(var + eps);
        mp[item] = static_cast<scalar_t>(mu);
        rp[item] = static_cast<scalar_t>(r);
        const double scale = r * double(wp[item]), shift = double(bp[item]) - mu * scale;
        // no y is NaN: x, cw and cb finite (their moments are), and the affine map's constants
        const bool finite = std::isfinite(mu) && std::isfinite(var) && std::isfinite(scale) && std::isfinite(shift);
        for (int64_t n = 0; n < N; ++n) {
          conv_plane(xp + (t * N + n) * g.image(), cwc, cbp[item], g, y.data());
          const int64_t o0 = ((t * N + n) * C + item % C) * oplane;
          pool_plane(kern, y.data(), g.Hc, g.Wc, k, scale, shift, finite, v.data(), zp + o0, ip + o0);
        }
      }
    });
  });
  return {z, idx, mean, invstd, pmean, pcov};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_maxpool_bwd_cpu(
    const at::Tensor& gz_in, const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& x,
    const at::Tensor& cw_in, const at::Tensor& cb_in, const at::Tensor& w_in, const at::Tensor& pmean_in,
    const at::Tensor& pcov_in, double eps, int64_t k, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const ConvGeometry g = checked_geometry(x, cw_in, cb_in, w_in, stride, padding, dilation);
  const int64_t T = g.T, N = g.N, C = g.C, D = g.D;
  check_backward(gz_in, z_in, idx_in, x, g, k, pmean_in, pcov_in);
  const at::Tensor gz = gz_in.contiguous(), z = z_in.contiguous(), idx = idx_in.contiguous();
  const at::Tensor cw = cw_in.contiguous(), cb = cb_in.contiguous(), w = w_in.contiguous();
  const at::Tensor pmean = pmean_in.contiguous(), pcov = pcov_in.contiguous();
  const int64_t oplane = gz.size(3) * gz.size(4);
  at::Tensor gcw = at::empty(cw.sizes(), x.options()), gcb = at::zeros({T, C}, x.options());
  at::Tensor gw = at::empty({T, C}, x.options()), gb = at::empty({T, C}, x.options());
  if (T * C == 0) return {gcw, gcb, gw, gb};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::conv_bn_relu_maxpool_bwd", [&] {
    const bool rows4 = row_sums_apply(g);
    const at::Tensor xpad = rows4 ? padded_with_slack(x, g) : padded(x, g);
    const scalar_t* xp = xpad.const_data_ptr<scalar_t>();
    const scalar_t *gzp = gz.const_data_ptr<scalar_t>(), *zp = z.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t *cwp = cw.const_data_ptr<scalar_t>(), *cbp = cb.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const double *pm = pmean.const_data_ptr<double>(), *pc = pcov.const_data_ptr<double>();
    scalar_t *gcwp = gcw.mutable_data_ptr<scalar_t>(), *gwp = gw.mutable_data_ptr<scalar_t>();
    scalar_t* gbp = gb.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kValuesPerGrain / std::max<int64_t>(1, N * oplane * D));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      double s[kMaxTaps], pcw[kMaxTaps];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C;
        const scalar_t* cwc = cwp + item * D;
        const double *pmt = pm + t * D, *pct = pc + t * D * D;
        double sg = 0.0;  // Σ ga
        const int64_t o0 = (t * N * C + item % C) * oplane;
        pick_sums(rows4, gzp + o0, zp + o0, ip + o0, xp + t * N * g.image(), g, oplane, C * oplane, s, sg);
        const double var = channel_moments(cwc, double(cbp[item]), pmt, pct, D).second;
        const double r = 1.0 / std::sqrt(var + eps), wr = double(wp[item]) * r;
        double sgx = 0.0;  // Σ ga ŷ = r cw · (S − Σ ga pmean)
        for (int64_t q = 0; q < D; ++q) {
          s[q] -= sg * pmt[q];
          sgx += double(cwc[q]) * s[q];
          double row = 0.0;
          for (int64_t l = 0; l < D; ++l) row += pct[q * D + l] * double(cwc[l]);
          pcw[q] = row;
        }
        sgx *= r;
        gbp[item] = static_cast<scalar_t>(sg);
        gwp[item] = static_cast<scalar_t>(sgx);
        for (int64_t q = 0; q < D; ++q) gcwp[item * D + q] = static_cast<scalar_t>(wr * (s[q] - sgx * r * pcw[q]));
      }
    });
  });
  return {gcw, gcb, gw, gb};
}


// One task and channel's constants of ż at a pick: cb − mean, r, a, w, dw, db
struct PickTangent {
  double shift, r, a, w, dw, db;
};

// zd at one task and channel's picks where z > 0, image by image (N of them, `stride` pooled values apart; images
// `g.image()` apart from img): ŷ = r (cw·p + cb − mean), ŷ' = r (dcw·(p − pmean) − ŷ a), zd = ŷ' w + ŷ dw + db.
// KD: D known when compiled (the taps unrolled), or 0.
template <int64_t KD, typename scalar_t>
void tangent_at_picks(const scalar_t* z, const int64_t* idx, const scalar_t* img, const ConvGeometry& g,
                      int64_t oplane, int64_t stride, const scalar_t* cw, const scalar_t* dcw, const double* pmean,
                      const PickTangent& c, scalar_t* zd) {
  const int64_t D = KD > 0 ? KD : g.D;
  const int64_t* tap = g.tap.data();
  for (int64_t n = 0; n < g.N; ++n, z += stride, idx += stride, zd += stride, img += g.image()) {
    for (int64_t o = 0; o < oplane; ++o) {
      if (!(z[o] > scalar_t(0))) continue;  // ReLU's mask at the pick (zd stays 0)
      const scalar_t* p = img + g.pick_origin(idx[o]);
      double y = c.shift, yd = 0.0;
      for (int64_t q = 0; q < D; ++q) {
        const double v = double(p[tap[q]]);
        y += double(cw[q]) * v;
        yd += double(dcw[q]) * (v - pmean[q]);
      }
      const double yh = y * c.r, yhd = c.r * (yd - yh * c.a);
      zd[o] = static_cast<scalar_t>(yhd * c.w + yh * c.dw + c.db);
    }
  }
}

// The forward and its tangent along (dcw, dcb, dw, db) (x has none: the model's input). z, idx and the statistics
// come from conv_bn_relu_maxpool_fwd itself, so they are the forward's bits; zd at each pick where z > 0:
//   ŷ = r (cw·p + cb − mean),  a = r cwᵀ pcov dcw,  ŷ' = r (dcw·(p − pmean) − ŷ a),  zd = ŷ' w + ŷ dw + db
// (y' − mean(y') = dcw·(p − pmean); r' = −r² a).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_maxpool_tangent_fwd_cpu(const at::Tensor& x, const at::Tensor& cw, const at::Tensor& cb,
                                     const at::Tensor& w, const at::Tensor& b, const at::Tensor& dcw_in,
                                     const at::Tensor& dcb_in, const at::Tensor& dw_in, const at::Tensor& db_in,
                                     double eps, int64_t k, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  auto [z, idx, mean, invstd, pmean, pcov] =
      conv_bn_relu_maxpool_fwd_cpu(x, cw, cb, w, b, eps, k, stride, padding, dilation);
  const ConvGeometry g(x, cw, stride, padding, dilation);
  TORCH_CHECK(dcw_in.sizes() == cw.sizes() && dcw_in.scalar_type() == x.scalar_type(), "dcw: expected ",
              cw.sizes(), " (as cw) of dtype ", x.scalar_type(), ", got ", dcw_in.sizes(), " ", dcw_in.scalar_type());
  check_channels(dcb_in, "dcb", x, g.C);
  check_channels(dw_in, "dw", x, g.C);
  check_channels(db_in, "db", x, g.C);
  const int64_t T = g.T, N = g.N, C = g.C, D = g.D, oplane = z.size(3) * z.size(4);
  at::Tensor zd = at::zeros(z.sizes(), z.options());
  if (T * C == 0 || N == 0) return {z, zd, idx, mean, invstd, pmean, pcov};
  const at::Tensor cwc_t = cw.contiguous(), cbc_t = cb.contiguous(), wc_t = w.contiguous();
  const at::Tensor dcw = dcw_in.contiguous(), dw = dw_in.contiguous(), db = db_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::conv_bn_relu_maxpool_tangent_fwd", [&] {
    const at::Tensor xpad = padded(x, g);
    const scalar_t* xp = xpad.const_data_ptr<scalar_t>();
    const scalar_t *zp = z.const_data_ptr<scalar_t>(), *cwp = cwc_t.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t *cbp = cbc_t.const_data_ptr<scalar_t>(), *wp = wc_t.const_data_ptr<scalar_t>();
    const scalar_t *dcwp = dcw.const_data_ptr<scalar_t>(), *dwp = dw.const_data_ptr<scalar_t>();
    const scalar_t* dbp = db.const_data_ptr<scalar_t>();
    const double *pm = pmean.const_data_ptr<double>(), *pc = pcov.const_data_ptr<double>();
    scalar_t* zdp = zd.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C;
        const scalar_t *cwc = cwp + item * D, *dcwc = dcwp + item * D;
        const double *pmt = pm + t * D, *pct = pc + t * D * D;
        const auto [mu, var] = channel_moments(cwc, double(cbp[item]), pmt, pct, D);
        const double r = 1.0 / std::sqrt(var + eps);
        double a = 0.0;  // r cwᵀ pcov dcw
        for (int64_t q = 0; q < D; ++q)
          for (int64_t l = 0; l < D; ++l) a += double(cwc[q]) * pct[q * D + l] * double(dcwc[l]);
        a *= r;
        const double wi = double(wp[item]), dwi = double(dwp[item]), dbi = double(dbp[item]);
        const PickTangent pick{double(cbp[item]) - mu, r, a, wi, dwi, dbi};
        const int64_t o0 = (t * N * C + item % C) * oplane;
        const scalar_t* img = xp + t * N * g.image();
        if (D == 9)
          tangent_at_picks<9>(zp + o0, ip + o0, img, g, oplane, C * oplane, cwc, dcwc, pmt, pick, zdp + o0);
        else
          tangent_at_picks<0>(zp + o0, ip + o0, img, g, oplane, C * oplane, cwc, dcwc, pmt, pick, zdp + o0);
      }
    });
  });
  return {z, zd, idx, mean, invstd, pmean, pcov};
}

// The backward and its tangent, from the picks' sums S = Σ ga p, sg = Σ ga and Sd = Σ ga' p, sgd = Σ ga'
// (ga' the routed gzd, ReLU's mask of z); with Sc = S − sg pmean, Sdc = Sd − sgd pmean, a = r cwᵀ pcov dcw:
//   gw = r cw·Sc,  gw' = r cw·Sdc + r dcw·Sc − r a gw,  gb = sg,  gb' = sgd,
//   gcw = w r u with u = Sc − gw r pcov cw,
//   gcw' = dw r u − w r² a u + w r (Sdc − gw' r pcov cw + gw r² a pcov cw − gw r pcov dcw),  gcb = gcb' = 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_maxpool_tangent_bwd_cpu(const at::Tensor& gz_in, const at::Tensor& gzd_in, const at::Tensor& z_in,
                                     const at::Tensor& idx_in, const at::Tensor& x, const at::Tensor& cw_in,
                                     const at::Tensor& cb_in, const at::Tensor& w_in, const at::Tensor& dcw_in,
                                     const at::Tensor& dw_in, const at::Tensor& pmean_in, const at::Tensor& pcov_in,
                                     double eps, int64_t k, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  const ConvGeometry g = checked_geometry(x, cw_in, cb_in, w_in, stride, padding, dilation);
  const int64_t T = g.T, N = g.N, C = g.C, D = g.D;
  check_backward(gz_in, z_in, idx_in, x, g, k, pmean_in, pcov_in);
  TORCH_CHECK(gzd_in.sizes() == gz_in.sizes() && gzd_in.scalar_type() == x.scalar_type(),
              "gzd: expected gz's shape and dtype, got ", gzd_in.sizes(), " ", gzd_in.scalar_type());
  TORCH_CHECK(dcw_in.sizes() == cw_in.sizes() && dcw_in.scalar_type() == x.scalar_type(), "dcw: expected ",
              cw_in.sizes(), " (as cw) of dtype ", x.scalar_type(), ", got ", dcw_in.sizes(), " ",
              dcw_in.scalar_type());
  check_channels(dw_in, "dw", x, C);
  const at::Tensor gz = gz_in.contiguous(), gzd = gzd_in.contiguous(), z = z_in.contiguous();
  const at::Tensor idx = idx_in.contiguous(), cw = cw_in.contiguous(), cb = cb_in.contiguous();
  const at::Tensor w = w_in.contiguous(), dcw = dcw_in.contiguous(), dw = dw_in.contiguous();
  const at::Tensor pmean = pmean_in.contiguous(), pcov = pcov_in.contiguous();
  const int64_t oplane = gz.size(3) * gz.size(4);
  at::Tensor gcw = at::empty(cw.sizes(), x.options()), dgcw = at::empty(cw.sizes(), x.options());
  at::Tensor gcb = at::zeros({T, C}, x.options()), dgcb = at::zeros({T, C}, x.options());
  at::Tensor gw = at::empty({T, C}, x.options()), dgw = at::empty({T, C}, x.options());
  at::Tensor gb = at::empty({T, C}, x.options()), dgb = at::empty({T, C}, x.options());
  if (T * C == 0) return {gcw, gcb, gw, gb, dgcw, dgcb, dgw, dgb};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmaml::conv_bn_relu_maxpool_tangent_bwd", [&] {
    const bool rows4 = row_sums_apply(g);
    const at::Tensor xpad = rows4 ? padded_with_slack(x, g) : padded(x, g);
    const scalar_t* xp = xpad.const_data_ptr<scalar_t>();
    const scalar_t *gzp = gz.const_data_ptr<scalar_t>(), *gzdp = gzd.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t *cwp = cw.const_data_ptr<scalar_t>(), *cbp = cb.const_data_ptr<scalar_t>();
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *dcwp = dcw.const_data_ptr<scalar_t>();
    const scalar_t* dwp = dw.const_data_ptr<scalar_t>();
    const double *pm = pmean.const_data_ptr<double>(), *pc = pcov.const_data_ptr<double>();
    scalar_t *gcwp = gcw.mutable_data_ptr<scalar_t>(), *dgcwp = dgcw.mutable_data_ptr<scalar_t>();
    scalar_t *gwp = gw.mutable_data_ptr<scalar_t>(), *dgwp = dgw.mutable_data_ptr<scalar_t>();
    scalar_t *gbp = gb.mutable_data_ptr<scalar_t>(), *dgbp = dgb.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T * C, 1, [&](int64_t begin, int64_t end) {
      double s[kMaxTaps], sd[kMaxTaps], pcw[kMaxTaps], pcdw[kMaxTaps];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C;
        const scalar_t *cwc = cwp + item * D, *dcwc = dcwp + item * D;
        const double *pmt = pm + t * D, *pct = pc + t * D * D;
        const int64_t o0 = (t * N * C + item % C) * oplane;
        const scalar_t* img = xp + t * N * g.image();
        double sg = 0.0, sgd = 0.0;
        pick_sums(rows4, gzp + o0, zp + o0, ip + o0, img, g, oplane, C * oplane, s, sg);
        pick_sums(rows4, gzdp + o0, zp + o0, ip + o0, img, g, oplane, C * oplane, sd, sgd);
        const double var = channel_moments(cwc, double(cbp[item]), pmt, pct, D).second;
        const double r = 1.0 / std::sqrt(var + eps), wi = double(wp[item]), dwi = double(dwp[item]);
        double a = 0.0, gwv = 0.0, dgwv = 0.0;
        for (int64_t q = 0; q < D; ++q) {
          s[q] -= sg * pmt[q];
          sd[q] -= sgd * pmt[q];
          double row = 0.0, rowd = 0.0;
          for (int64_t l = 0; l < D; ++l) {
            row += pct[q * D + l] * double(cwc[l]);
            rowd += pct[q * D + l] * double(dcwc[l]);
          }
          pcw[q] = row;
          pcdw[q] = rowd;
          a += double(cwc[q]) * rowd;
          gwv += double(cwc[q]) * s[q];
          dgwv += double(cwc[q]) * sd[q] + double(dcwc[q]) * s[q];
        }
        a *= r;
        gwv *= r;
        dgwv = r * dgwv - r * a * gwv;
        gbp[item] = static_cast<scalar_t>(sg);
        dgbp[item] = static_cast<scalar_t>(sgd);
        gwp[item] = static_cast<scalar_t>(gwv);
        dgwp[item] = static_cast<scalar_t>(dgwv);
        for (int64_t q = 0; q < D; ++q) {
          const double u = s[q] - gwv * r * pcw[q];
          gcwp[item * D + q] = static_cast<scalar_t>(wi * r * u);
          const double du = sd[q] - dgwv * r * pcw[q] + gwv * r * r * a * pcw[q] - gwv * r * pcdw[q];
          dgcwp[item * D + q] = static_cast<scalar_t>(dwi * r * u - wi * r * r * a * u + wi * r * du);
        }
      }
    });
  });
  return {gcw, gcb, gw, gb, dgcw, dgcb, dgw, dgb};
}
}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("conv_bn_relu_maxpool_fwd", &conv_bn_relu_maxpool_fwd_cpu);
  m.impl("conv_bn_relu_maxpool_bwd", &conv_bn_relu_maxpool_bwd_cpu);
  m.impl("conv_bn_relu_maxpool_tangent_fwd", &conv_bn_relu_maxpool_tangent_fwd_cpu);
  m.impl("conv_bn_relu_maxpool_tangent_bwd", &conv_bn_relu_maxpool_tangent_bwd_cpu);
}

}  // namespace fastmaml
