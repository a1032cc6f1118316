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
// Neither the BatchNorm output nor relu(y) is written: the forward reads x three times (mean,
// variance, the pooled output) per (task, channel) slab, which stays in cache; the backward reads x
// and the pooled gradient and writes gx once. Work items are (task, channel) pairs; each reduces in
// a fixed order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace fastmaml {
namespace {

constexpr int64_t kSlabsPerGrain = 4096;  // x elements below which (task, channel) items share a thread
constexpr int kLanes = 8;                 // independent partial sums: the reductions vectorize

// sum_i (x[i] - shift) (kSquare false: the mean's pass) or sum_i (x[i] - shift)^2 (the variance's) over n
// values, in kLanes partial sums combined in a fixed order
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
// offset in v of the element max-pooling picks, by PyTorch's rule (first maximum; a NaN wins). `finite`:
// v holds no NaN (the slab's statistics were finite), so the picks are plain compares that compile to
// selects, not branches (the picks of random data defeat branch prediction).
template <typename scalar_t>
void pool_row(const scalar_t* v, int64_t W, int64_t Wo, int64_t k, bool finite, int64_t row0, scalar_t* z,
              int64_t* idx) {
  if (finite && k == 2) {
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const scalar_t* p = v + 2 * ow;
      const scalar_t a = p[0], b = p[1], c = p[W], d = p[W + 1];
      const bool ab = b > a, cd = d > c;
      const scalar_t top = ab ? b : a, bottom = cd ? d : c;
      const int64_t e_top = 2 * ow + (ab ? 1 : 0), e_bottom = W + 2 * ow + (cd ? 1 : 0);
      const bool low = bottom > top;
      z[ow] = low ? bottom : top;
      idx[ow] = row0 + (low ? e_bottom : e_top);
    }
    return;
  }
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

template <bool kSquare, typename scalar_t, typename acc_t>
acc_t lane_sum(const scalar_t* x, int64_t n, acc_t shift) {
  acc_t lane[kLanes] = {};
  constexpr bool square = kSquare;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = acc_t(x[i + j]) - shift;
      lane[j] += square ? d * d : d;
    }
  }
  acc_t total = 0;
  for (int j = 0; j < kLanes; ++j) total += lane[j];
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - shift;
    total += square ? d * d : d;
  }
  return total;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in, double eps, int64_t k) {
  check_activations(x_in);
  check_channels(w_in, "w", x_in);
  check_channels(b_in, "b", x_in);
  TORCH_CHECK(k >= 1 && x_in.size(3) >= k && x_in.size(4) >= k, "k: expected a pooling window 1 <= k <= min(H, W) = ",
              std::min(x_in.size(3), x_in.size(4)), ", got ", k);
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
    const int64_t grain = std::max<int64_t>(1, kSlabsPerGrain / (N * plane));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> v(k * W);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C, c = item % C;
        auto slab = [&](int64_t n) { return xp + ((t * N + n) * C + c) * plane; };
        acc_t sum = 0;
        for (int64_t n = 0; n < N; ++n) sum += lane_sum<false>(slab(n), plane, acc_t(0));
        const acc_t mu = sum / acc_t(N * plane);
        acc_t ss = 0;
        for (int64_t n = 0; n < N; ++n) ss += lane_sum<true>(slab(n), plane, mu);
        const acc_t r = acc_t(1) / std::sqrt(ss / acc_t(N * plane) + acc_t(eps));
        mp[item] = static_cast<scalar_t>(mu);
        rp[item] = static_cast<scalar_t>(r);
        // v = relu(y), y = x * scale + shift (one expression for every element), k rows at a time
        const acc_t scale = r * acc_t(wp[item]), shift = acc_t(bp[item]) - mu * scale;
        const bool finite = std::isfinite(sum) && std::isfinite(scale) && std::isfinite(shift);  // then no y is NaN
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* xs = slab(n);
          const int64_t o0 = ((t * N + n) * C + c) * oplane;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            relu_row(xs + oh * k * W, k * W, scale, shift, finite, v.data());
            pool_row(v.data(), W, Wo, k, finite, oh * k * W, zp + o0 + oh * Wo, ip + o0 + oh * Wo);
          }
        }
      }
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
  const at::Tensor gz = gz_in.contiguous(), z = z_in.contiguous(), idx = idx_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), w = w_in.contiguous();
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), plane = x.size(3) * x.size(4);
  const int64_t oplane = gz.size(3) * gz.size(4);
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
    const int64_t grain = std::max<int64_t>(1, kSlabsPerGrain / std::max<int64_t>(1, N * plane));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C, c = item % C;
        const acc_t mu = acc_t(mp[item]), r = acc_t(rp[item]);
        acc_t sg = 0, sgx = 0;  // sum gy, sum gy * xhat (gy is nonzero only at the routed elements)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t s = (t * N + n) * C + c;
          const scalar_t* xs = xp + s * plane;
          for (int64_t o = s * oplane; o < (s + 1) * oplane; ++o) {
            const acc_t g = zp[o] > 0 ? acc_t(gzp[o]) : acc_t(0);  // ReLU's mask (as threshold_backward)
            sg += g;
            sgx += g * (acc_t(xs[ip[o]]) - mu) * r;
          }
        }
        gbp[item] = static_cast<scalar_t>(sg);
        gwp[item] = static_cast<scalar_t>(sgx);
        if (!need_x) continue;
        const acc_t a = acc_t(wp[item]) * r, m = acc_t(N * plane);
        const acc_t c0 = -a * sg / m, c1 = -a * sgx / m * r;  // gx = c0 + c1 (x - mu) + a gy
        for (int64_t n = 0; n < N; ++n) {
          const int64_t s = (t * N + n) * C + c;
          const scalar_t* xs = xp + s * plane;
          scalar_t* gs = gxp + s * plane;
          for (int64_t i = 0; i < plane; ++i) gs[i] = static_cast<scalar_t>(c0 + c1 * (acc_t(xs[i]) - mu));
          for (int64_t o = s * oplane; o < (s + 1) * oplane; ++o) {
            const int64_t e = ip[o];  // every picked element, its gradient masked: no branch
            const acc_t g = zp[o] > 0 ? acc_t(gzp[o]) : acc_t(0);
            gs[e] = static_cast<scalar_t>(c0 + c1 * (acc_t(xs[e]) - mu) + a * g);
          }
        }
      }
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
    const int64_t grain = std::max<int64_t>(1, kSlabsPerGrain / (N * plane));
    at::parallel_for(0, T * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> v(k * W);
      std::vector<acc_t> vd(k * W);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / C, c = item % C;
        auto at_n = [&](const scalar_t* base, int64_t n) { return base + ((t * N + n) * C + c) * plane; };
        const acc_t m = acc_t(N * plane);
        acc_t sum = 0, ss = 0, sxd = 0, sd = 0;
        for (int64_t n = 0; n < N; ++n) sum += lane_sum<false>(at_n(xp, n), plane, acc_t(0));
        const acc_t mu = sum / m;
        for (int64_t n = 0; n < N; ++n) {
          ss += lane_sum<true>(at_n(xp, n), plane, mu);
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
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const int64_t r0 = oh * k * W;
            relu_row(xs + r0, k * W, scale, shift, finite, v.data());
            for (int64_t i = 0; i < k * W; ++i) {  // y' = xhat' w + xhat wd + bd
              const acc_t xh = (acc_t(xs[r0 + i]) - mu) * r;
              vd[i] = r * (acc_t(xds[r0 + i]) - dm - xh * ai) * wi + xh * wdi + bdi;
            }
            pool_row(v.data(), W, Wo, k, finite, r0, zp + o0 + oh * Wo, ip + o0 + oh * Wo);
            for (int64_t o = o0 + oh * Wo; o < o0 + (oh + 1) * Wo; ++o)  // the tangent of the pick, masked by ReLU
              zdp[o] = static_cast<scalar_t>(zp[o] > 0 ? vd[ip[o] - r0] : acc_t(0));
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
  const at::Tensor gz = gz_in.contiguous(), gzd = gzd_in.contiguous(), z = z_in.contiguous();
  const at::Tensor idx = idx_in.contiguous(), x = x_in.contiguous(), xd = xd_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), a = a_in.contiguous();
  const at::Tensor dmean = dmean_in.contiguous(), w = w_in.contiguous(), wd = wd_in.contiguous();
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), plane = x.size(3) * x.size(4);
  const int64_t oplane = gz.size(3) * gz.size(4);
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
