// The per-slab kernels of BatchNorm + ReLU + max-pooling on contiguous activations (declared and described in
// bn_relu_maxpool_slabs.h). No include guard: bn_relu_maxpool.cpp includes this once in namespace fastmaml_brmp
// (baseline instruction set) and bn_relu_maxpool_avx2.cpp once in fastmaml_brmp_avx2 under an AVX2 target; it
// uses no inline function from outside its namespace, so no AVX2 copy of a shared function exists.
//
// Written with GCC vectors of kLanes = 4 values (lane-wise IEEE arithmetic, lowered to SSE2 or AVX2
// registers); values are widened to double for every arithmetic step, and compares and picks are vector
// selects, never branches. Only whole vectors are loaded and stored: a row's last values are covered by one
// more block ending at the row's end, overlapping the one before (it writes the same values again), and rows
// shorter than a block run the same arithmetic one value at a time. No FMA: both builds do the same
// operations in the same order and give the same bits.
#ifndef FASTMAML_BRMP_NS
#error "define FASTMAML_BRMP_NS before including bn_relu_maxpool_kernels.h"
#endif

// Helpers and block bodies are always inlined, so that the vectors stay in registers.
#define FASTMAML_BRMP_INLINE inline __attribute__((always_inline))

// 32-byte vectors passed to inline helpers: their ABI differs between the builds, but no such function
// crosses a library boundary. For the rest of the including file: GCC reports it at the file's end.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace FASTMAML_BRMP_NS {

constexpr int kLanes = 4;

typedef double vd __attribute__((vector_size(kLanes * sizeof(double))));
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int64_t vl __attribute__((vector_size(kLanes * sizeof(int64_t))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

template <typename S>
struct VecOf;
template <>
struct VecOf<float> {
  typedef vf type;
  typedef vi index;  // a compare's mask, a shuffle's selector
};
template <>
struct VecOf<double> {
  typedef vd type;
  typedef vl index;
};

template <typename T, typename V>
FASTMAML_BRMP_INLINE V load_as(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename S>
FASTMAML_BRMP_INLINE typename VecOf<S>::type load(const S* p) {
  return load_as<S, typename VecOf<S>::type>(p);
}

template <typename S>
FASTMAML_BRMP_INLINE vd load_acc(const S* p) {
  return __builtin_convertvector(load(p), vd);
}

template <typename T, typename V>
FASTMAML_BRMP_INLINE void store(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof v);
}

// f(i) for the blocks of kLanes values from i in [0, n), n >= kLanes: the last one ends at n
template <typename F>
FASTMAML_BRMP_INLINE void for_blocks(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) f(i);
  if (i < n) f(n - kLanes);
}

inline double add_lanes(const vd& v, double total) {
  for (int j = 0; j < kLanes; ++j) total += v[j];
  return total;
}

template <typename S>
double slab_sum(const S* x, int64_t n, double shift, bool square) {
  vd lo = {}, hi = {};  // lanes 0-3 and 4-7 of the eight partial sums
  int64_t i = 0;
  if (square) {
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      const vd d0 = load_acc(x + i) - shift, d1 = load_acc(x + i + kLanes) - shift;
      lo += d0 * d0;
      hi += d1 * d1;
    }
  } else {
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      lo += load_acc(x + i) - shift;
      hi += load_acc(x + i + kLanes) - shift;
    }
  }
  double total = add_lanes(hi, add_lanes(lo, 0.0));
  for (; i < n; ++i) {
    const double d = double(x[i]) - shift;
    total += square ? d * d : d;
  }
  return total;
}

// relu(x * scale + shift), the product and sum in double, rounded to S: of kLanes values at p, of one value
template <typename S>
FASTMAML_BRMP_INLINE typename VecOf<S>::type relu_affine(const S* p, double scale, double shift) {
  typedef typename VecOf<S>::type V;
  const V y = __builtin_convertvector(load_acc(p) * scale + shift, V);
  return y > V{} ? y : V{};
}

template <typename S>
FASTMAML_BRMP_INLINE S relu_affine_one(S x, double scale, double shift) {
  const S y = static_cast<S>(double(x) * scale + shift);
  return y > S(0) ? y : S(0);
}

template <typename S>
void relu_pool2_slab(const S* x, int64_t H, int64_t W, double scale, double shift, S* z, int64_t* idx) {
  typedef typename VecOf<S>::type V;
  typedef typename VecOf<S>::index I;
  const I even = {0, 2, 4, 6}, odd = {1, 3, 5, 7};
  const vl step = {0, 2, 4, 6};
  const int64_t Ho = H / 2, Wo = W / 2;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const int64_t top = 2 * oh * W;
    S* zr = z + oh * Wo;
    int64_t* ir = idx + oh * Wo;
    if (Wo < kLanes) {  // the windows [a b; c d] one by one, picked as below
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const S* p = x + top + 2 * ow;
        const S a = relu_affine_one(p[0], scale, shift), b = relu_affine_one(p[1], scale, shift);
        const S c = relu_affine_one(p[W], scale, shift), d = relu_affine_one(p[W + 1], scale, shift);
        const bool ab = b > a, cd = d > c;
        const S upper = ab ? b : a, lower = cd ? d : c;
        const bool low = lower > upper;
        zr[ow] = low ? lower : upper;
        ir[ow] = top + 2 * ow + (low ? W + cd : int64_t(ab));
      }
      continue;
    }
    for_blocks(Wo, [&](int64_t ow) __attribute__((always_inline)) {  // kLanes windows from ow
      const S* p = x + top + 2 * ow;
      const V t0 = relu_affine(p, scale, shift), t1 = relu_affine(p + kLanes, scale, shift);
      const V b0 = relu_affine(p + W, scale, shift), b1 = relu_affine(p + W + kLanes, scale, shift);
      // the window [a b; c d] of each lane, picked as max_pool2d does: the first maximum in row order
      const V a = __builtin_shuffle(t0, t1, even), b = __builtin_shuffle(t0, t1, odd);
      const V c = __builtin_shuffle(b0, b1, even), d = __builtin_shuffle(b0, b1, odd);
      const I ab = b > a, cd = d > c;
      const V upper = ab ? b : a, lower = cd ? d : c;
      const I low = lower > upper;
      store(zr + ow, low ? lower : upper);
      const vl ab_l = __builtin_convertvector(ab, vl), cd_l = __builtin_convertvector(cd, vl);
      const vl low_l = __builtin_convertvector(low, vl);
      const vl offset = low_l ? W - cd_l : -ab_l;  // masks are -1 where true
      store(ir + ow, top + 2 * ow + step + offset);
    });
  }
}

template <typename S>
void routed_sums(const S* gz, const S* z, const int64_t* idx, const S* x, int64_t count, double mu, double r,
                 double* sums) {
  typedef typename VecOf<S>::type V;
  vd sg = {}, sgx = {};
  int64_t o = 0;
  for (; o + kLanes <= count; o += kLanes) {
    const vd g = __builtin_convertvector(load(z + o) > V{} ? load(gz + o) : V{}, vd);  // ReLU's mask
    const vd xv = {double(x[idx[o]]), double(x[idx[o + 1]]), double(x[idx[o + 2]]), double(x[idx[o + 3]])};
    sg += g;
    sgx += g * (xv - mu) * r;
  }
  double tail_g = 0, tail_gx = 0;
  for (; o < count; ++o) {
    const double g = z[o] > 0 ? double(gz[o]) : 0.0;
    tail_g += g;
    tail_gx += g * (double(x[idx[o]]) - mu) * r;
  }
  sums[0] = add_lanes(sg, 0.0) + tail_g;
  sums[1] = add_lanes(sgx, 0.0) + tail_gx;
}

// c0 + c1 (x - mu) in double: an element's input gradient before its pick's a g is added
FASTMAML_BRMP_INLINE vd input_gradient_base(const vd& xv, double mu, double c0, double c1) { return c0 + c1 * (xv - mu); }

template <typename S>
FASTMAML_BRMP_INLINE double input_gradient_base_one(S x, double mu, double c0, double c1) {
  return c0 + c1 * (double(x) - mu);
}

// the base gradient, rounded to S, of the n values from offset i (no pick among them)
template <typename S>
FASTMAML_BRMP_INLINE void plain_input_gradient(const S* x, int64_t i, int64_t n, double mu, double c0, double c1,
                                               S* gx) {
  typedef typename VecOf<S>::type V;
  if (n < kLanes) {
    for (int64_t j = i; j < i + n; ++j) gx[j] = static_cast<S>(input_gradient_base_one(x[j], mu, c0, c1));
    return;
  }
  for_blocks(n, [&](int64_t j) __attribute__((always_inline)) {
    store(gx + i + j, __builtin_convertvector(input_gradient_base(load_acc(x + i + j), mu, c0, c1), V));
  });
}

template <typename S>
void input_gradient_slab(const S* x, int64_t plane, const S* gz, const S* z, const int64_t* idx, int64_t count,
                         double mu, double c0, double c1, double a, S* gx) {
  plain_input_gradient(x, 0, plane, mu, c0, c1, gx);
  for (int64_t o = 0; o < count; ++o) {  // every pick, its gradient masked: no branch
    const int64_t e = idx[o];
    const double g = z[o] > 0 ? double(gz[o]) : 0.0;
    gx[e] = static_cast<S>(input_gradient_base_one(x[e], mu, c0, c1) + a * g);
  }
}

template <typename S>
void input_gradient_pool2_slab(const S* x, int64_t H, int64_t W, const S* gz, const S* z, const int64_t* idx,
                               double mu, double c0, double c1, double a, S* gx) {
  typedef typename VecOf<S>::type V;
  const vl step = {0, 2, 4, 6}, first = {0, 0, 1, 1}, second = {2, 2, 3, 3};
  const vl top_pick = {0, 1, 0, 1}, bottom_pick = top_pick + W;
  const int64_t Ho = H / 2, Wo = W / 2;
  // the 2 kLanes elements of one row of the windows from offset i; e: each window's pick relative to its first
  // element, `pick`: the row's elements relative to their window's first; ag: each window's a g
  auto row = [&](int64_t i, const vd& ag, const vl& e, const vl& pick) __attribute__((always_inline)) {
    const vd v0 = input_gradient_base(load_acc(x + i), mu, c0, c1);
    const vd v1 = input_gradient_base(load_acc(x + i + kLanes), mu, c0, c1);
    const vl e0 = __builtin_shuffle(e, first), e1 = __builtin_shuffle(e, second);
    store(gx + i, __builtin_convertvector(e0 == pick ? v0 + __builtin_shuffle(ag, first) : v0, V));
    store(gx + i + kLanes, __builtin_convertvector(e1 == pick ? v1 + __builtin_shuffle(ag, second) : v1, V));
  };
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const int64_t top = 2 * oh * W, o = oh * Wo;
    if (Wo < kLanes) {  // the windows one by one
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const double ag = a * (z[o + ow] > 0 ? double(gz[o + ow]) : 0.0);
        const int64_t first_element = top + 2 * ow, e = idx[o + ow] - first_element;
        const int64_t window[4] = {0, 1, W, W + 1};
        for (const int64_t j : window) {
          const double v = input_gradient_base_one(x[first_element + j], mu, c0, c1);
          gx[first_element + j] = static_cast<S>(e == j ? v + ag : v);
        }
      }
    } else {
      for_blocks(Wo, [&](int64_t ow) __attribute__((always_inline)) {  // kLanes windows from ow
        const vd ag = a * __builtin_convertvector(load(z + o + ow) > V{} ? load(gz + o + ow) : V{}, vd);
        const vl e = load_as<int64_t, vl>(idx + o + ow) - (top + 2 * ow + step);
        row(top + 2 * ow, ag, e, top_pick);
        row(top + W + 2 * ow, ag, e, bottom_pick);
      });
    }
    if (W % 2) {  // the column no window covers
      plain_input_gradient(x, top + W - 1, 1, mu, c0, c1, gx);
      plain_input_gradient(x, top + 2 * W - 1, 1, mu, c0, c1, gx);
    }
  }
  plain_input_gradient(x, 2 * Ho * W, H * W - 2 * Ho * W, mu, c0, c1, gx);  // the row no window covers
}

#define FASTMAML_BRMP_INSTANTIATE(S)                                                                             \
  template double slab_sum<S>(const S*, int64_t, double, bool);                                                 \
  template void relu_pool2_slab<S>(const S*, int64_t, int64_t, double, double, S*, int64_t*);                   \
  template void routed_sums<S>(const S*, const S*, const int64_t*, const S*, int64_t, double, double, double*); \
  template void input_gradient_slab<S>(const S*, int64_t, const S*, const S*, const int64_t*, int64_t, double,  \
                                       double, double, double, S*);                                             \
  template void input_gradient_pool2_slab<S>(const S*, int64_t, int64_t, const S*, const S*, const int64_t*,    \
                                             double, double, double, double, S*);

FASTMAML_BRMP_INSTANTIATE(float)
FASTMAML_BRMP_INSTANTIATE(double)
#undef FASTMAML_BRMP_INSTANTIATE

}  // namespace FASTMAML_BRMP_NS

#undef FASTMAML_BRMP_INLINE
