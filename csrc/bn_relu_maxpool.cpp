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
#include <vector>

namespace fastmaml {
namespace {

constexpr int64_t kSlabsPerGrain = 4096;  // x elements below which (task, channel) items share a thread
constexpr int kLanes = 8;                 // independent partial sums: the reductions vectorize

// sum_i (x[i] - shift) (kSquare false: the mean's pass) or sum_i (x[i] - shift)^2 (the variance's) over n
// values, in kLanes partial sums combined in a fixed order
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
      std::vector<acc_t> v(k * W);
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
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* xs = slab(n);
          const int64_t o0 = ((t * N + n) * C + c) * oplane;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const scalar_t* rows = xs + oh * k * W;
            for (int64_t i = 0; i < k * W; ++i) {
              const acc_t y = acc_t(rows[i]) * scale + shift;
              v[i] = (y > 0 || y != y) ? y : acc_t(0);  // relu, NaN kept
            }
            for (int64_t ow = 0; ow < Wo; ++ow) {
              acc_t best = -std::numeric_limits<acc_t>::infinity();
              int64_t where = ow * k;
              for (int64_t dh = 0; dh < k; ++dh) {
                for (int64_t dw = 0; dw < k; ++dw) {
                  const int64_t e = dh * W + ow * k + dw;
                  if (v[e] > best || v[e] != v[e]) {  // PyTorch's max-pool rule: first maximum, NaN wins
                    best = v[e];
                    where = e;
                  }
                }
              }
              where += oh * k * W;
              zp[o0 + oh * Wo + ow] = static_cast<scalar_t>(best);
              ip[o0 + oh * Wo + ow] = where;
            }
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
            if (!(zp[o] > 0 || std::isnan(zp[o]))) continue;
            const acc_t g = acc_t(gzp[o]);
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
            if (!(zp[o] > 0 || std::isnan(zp[o]))) continue;
            const int64_t e = ip[o];
            gs[e] = static_cast<scalar_t>(c0 + c1 * (acc_t(xs[e]) - mu) + a * acc_t(gzp[o]));
          }
        }
      }
    });
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("bn_relu_maxpool_fwd", &bn_relu_maxpool_fwd_cpu);
  m.impl("bn_relu_maxpool_bwd", &bn_relu_maxpool_bwd_cpu);
}

}  // namespace fastmaml
