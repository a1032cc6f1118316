// The per-plane kernels of BatchNorm (batch statistics) + leaky ReLU (the math and the passes: bn_act.cpp).
// No include guard: bn_act.cpp includes this once in namespace fastmaml_bn_act (baseline instruction set)
// and bn_act_avx2.cpp once in fastmaml_bn_act_avx2 under an AVX2 target. It uses no template or inline
// function from outside its namespace but the trivial accessors of bn_act_planes.h (compiled for the
// baseline), so no AVX2 copy of a shared function exists; <cmath> and bn_act_planes.h are included before it.
//
// The reductions and the backwards' elementwise passes work on blocks of kLanes = 4 consecutive values of a
// row, as GCC vectors (vector_size: lane-wise IEEE arithmetic, lowered to SSE2 or AVX2 registers); the sums
// are 8 interleaved partial sums in a fixed order and the activation's mask is a vector select. Written as
// scalar loops, GCC vectorized some of these passes and not others (a select in the lanes of a sum became a
// branch). The remaining scalar loops (z, zd) vectorize as they are. No FMA: the two builds do the same
// operations in the same order and give the same bits.
#ifndef FASTMAML_BN_ACT_NS
#error "define FASTMAML_BN_ACT_NS before including bn_act_kernels.h"
#endif

// 32-byte vectors returned by inline helpers: their ABI differs between the builds, but no such function
// crosses a library boundary. For the rest of the including file: GCC reports it at the file's end.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace FASTMAML_BN_ACT_NS {

using acc_t = double;                 // float and float64 values accumulate in double
constexpr int kLanes = 4;             // values per block (vector)
constexpr int64_t kShiftValues = 32;  // values averaged for the statistics' shift

typedef double vd __attribute__((vector_size(kLanes * sizeof(double))));
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

template <typename S>
struct VecOf;
template <>
struct VecOf<float> {
  typedef vf type;
};
template <>
struct VecOf<double> {
  typedef vd type;
};

// n <= kLanes values from p as a vector of S (the other lanes 0)
template <typename S>
inline typename VecOf<S>::type load(const S* p, int64_t n) {
  typename VecOf<S>::type v = {};
  if (n == kLanes) {
    __builtin_memcpy(&v, p, sizeof v);
  } else {
    for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  }
  return v;
}

// the same, in double
template <typename S>
inline vd load_acc(const S* p, int64_t n) {
  return __builtin_convertvector(load(p, n), vd);
}

// the first n <= kLanes lanes of v, rounded to S, to p
template <typename S>
inline void store(S* p, const vd& v, int64_t n) {
  const typename VecOf<S>::type w = __builtin_convertvector(v, typename VecOf<S>::type);
  if (n == kLanes) {
    __builtin_memcpy(p, &w, sizeof w);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = w[i];
  }
}

// k g, k = 1 where z > 0 else slope (the activation's derivative at y, z keeping y's sign), in the values'
// type as PyTorch's leaky_relu_backward computes it (g * 1 is g); a select, never a branch
template <bool kAct, typename V>
inline V masked(const V& g, const V& z, const V& slope) {
  if constexpr (kAct) {
    const V one = V{} + 1;
    return g * (z > 0 ? one : slope);
  } else {
    return g;
  }
}

// f(offset, n, group) for every block of plane p: rows in turn, each in blocks of kLanes values (n = kLanes),
// its remainder last (n < kLanes); group: the block's index in its row mod kGroups
template <int kGroups = 1, typename F>
inline void for_blocks(const Geometry& g, int64_t p, F&& f) {
  for (int64_t r = 0; r < g.N; ++r) {
    const int64_t o = g.row(p, r);
    int64_t i = 0;
    for (; i + kGroups * kLanes <= g.S; i += kGroups * kLanes)
      for (int h = 0; h < kGroups; ++h) f(o + i + h * kLanes, int64_t(kLanes), h);
    for (int h = 0; i < g.S; i += kLanes, ++h) f(o + i, g.S - i < kLanes ? g.S - i : int64_t(kLanes), h);
  }
}

// K vectors of kLanes values (lambdas return vectors in this struct: a lambda returning a bare 32-byte vector
// draws GCC's ABI warning in the baseline build, which no pragma silences), and K sums
template <int K>
struct Vecs {
  vd v[K];
};
template <int K>
struct Sums {
  acc_t v[K];
};

// The sums over plane p of the K vectors f(offset, n) returns for its blocks (for_blocks; f leaves the lanes
// past n at 0), as kGroups * kLanes interleaved partial sums (the values at j mod kGroups * kLanes of each
// row), Kahan-compensated when kKahan, added up in a fixed order at the end. (kGroups 2: more independent
// additions in flight; 1 where the registers hold many sums.)
template <int K, bool kKahan, int kGroups, typename F>
inline Sums<K> sum_plane(const Geometry& g, int64_t p, F&& f) {
  vd s[kGroups][K] = {}, c[kGroups][K] = {};
  for_blocks<kGroups>(g, p, [&](int64_t o, int64_t n, int h) {
    const Vecs<K> x = f(o, n);
    for (int k = 0; k < K; ++k) {
      if constexpr (kKahan) {
        const vd y = x.v[k] - c[h][k];
        const vd t = s[h][k] + y;
        c[h][k] = (t - s[h][k]) - y;
        s[h][k] = t;
      } else {
        s[h][k] += x.v[k];
      }
    }
  });
  Sums<K> total{};
  for (int k = 0; k < K; ++k) {
    acc_t t = 0, e = 0;
    for (int h = 0; h < kGroups; ++h) {
      for (int j = 0; j < kLanes; ++j) {
        t += s[h][k][j];
        e += c[h][k][j];
      }
    }
    total.v[k] = t - e;
  }
  return total;
}

// lanes [0, n) of a vector 1, the others 0 (the remainder blocks' values past n)
inline vd valid_lanes(int64_t n) {
  vd v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = 1;
  return v;
}

struct Stats {
  acc_t mean, invstd, a, dmean;  // a = mean(xhat xd), dmean = mean(xd): 0 without a tangent
};

// The statistics of plane p, and with kTangent those of the tangent xd: one read of x (and xd). Shifted
// sums: d = x - K, K the mean of the plane's first kShiftValues values; float64 sums Kahan-compensated.
// The sums of x run the same operations in the same order with and without kTangent.
template <bool kTangent, typename S>
Stats plane_stats(const S* x, const S* xd, const Geometry& g, int64_t p, double eps) {
  constexpr bool kKahan = sizeof(S) == sizeof(double);
  acc_t shift = 0;
  int64_t k = 0;
  for (int64_t r = 0; r < g.N && k < kShiftValues; ++r)
    for (int64_t i = 0; i < g.S && k < kShiftValues; ++i, ++k) shift += acc_t(x[g.row(p, r) + i]);
  shift /= acc_t(k);
  constexpr int K = kTangent ? 4 : 2;  // sum d, sum d^2 (and sum xd, sum d xd), d = x - shift
  const Sums<K> sums = sum_plane<K, kKahan, 2>(g, p, [&](int64_t o, int64_t n) {
    vd d = load_acc(x + o, n) - shift;
    if (n < kLanes) d *= valid_lanes(n);  // (d is finite unless the whole plane's statistics are NaN)
    if constexpr (kTangent) {
      const vd u = load_acc(xd + o, n);
      return Vecs<K>{{d, d * d, u, d * u}};
    } else {
      return Vecs<K>{{d, d * d}};
    }
  });
  const acc_t m = acc_t(g.count());
  const acc_t dm = sums.v[0] / m;  // mean - shift
  acc_t var = sums.v[1] / m - dm * dm;
  if (var < 0) var = 0;  // (rounding; NaN stays NaN)
  Stats st{shift + dm, acc_t(1) / std::sqrt(var + acc_t(eps)), 0, 0};
  if constexpr (kTangent) {
    st.dmean = sums.v[K - 2] / m;
    st.a = st.invstd * (sums.v[K - 1] / m - dm * st.dmean);  // mean((x - mean) xd) r
  }
  return st;
}

// 1, hidden from the optimizer: y * (y > 0 ? one : slope) then stays a select and a multiply. With a literal 1
// GCC turns it into a branch around y * slope, which it may not if-convert under -ftrapping-math (the
// default), and the loop does not vectorize.
template <typename S>
inline S opaque_one() {
  const volatile S one = 1;
  return one;
}

// z = act(y), y = (x - mean) scale + shift rounded to S, act(y) = y * (y > 0 ? 1 : slope) as leaky_relu, one
// row. Not inlined: the forward and the value-and-tangent forward run this one piece of machine code, so
// their z agree bit for bit.
template <bool kAct, typename S>
__attribute__((noinline)) void normalize_row(const S* x, int64_t n, acc_t mean, acc_t scale, acc_t shift, S slope,
                                             S* z) {
  const S one = opaque_one<S>();
  for (int64_t i = 0; i < n; ++i) {
    const S y = static_cast<S>((acc_t(x[i]) - mean) * scale + shift);
    z[i] = kAct ? y * (y > S(0) ? one : slope) : y;
  }
}

template <bool kAct, typename S>
void forward_impl(const Geometry& g, const FwdArgs<S>& q, int64_t begin, int64_t end) {
  const S sl = static_cast<S>(q.slope);
  for (int64_t p = begin; p < end; ++p) {
    const Stats st = plane_stats<false>(q.x, q.x, g, p, q.eps);
    q.mean[p] = static_cast<S>(st.mean);
    q.invstd[p] = static_cast<S>(st.invstd);
    const acc_t scale = st.invstd * acc_t(q.w[p]), shift = acc_t(q.b[p]);
    for (int64_t r = 0; r < g.N; ++r) {
      const int64_t o = g.row(p, r);
      normalize_row<kAct>(q.x + o, g.S, st.mean, scale, shift, sl, q.z + o);
    }
  }
}

// z as forward_impl, and zd = k yd, yd = r w (xd - dmean) + (wd - r w a) xhat + bd rounded to S
template <bool kAct, bool kXd, typename S>
void tangent_forward_impl(const Geometry& g, const FwdArgs<S>& q, int64_t begin, int64_t end) {
  const S sl = static_cast<S>(q.slope);
  for (int64_t p = begin; p < end; ++p) {
    const Stats st = plane_stats<kXd>(q.x, q.xd, g, p, q.eps);
    q.mean[p] = static_cast<S>(st.mean);
    q.invstd[p] = static_cast<S>(st.invstd);
    q.a[p] = static_cast<S>(st.a);
    q.dmean[p] = static_cast<S>(st.dmean);
    const acc_t r = st.invstd, scale = r * acc_t(q.w[p]), shift = acc_t(q.b[p]);
    const acc_t cx = acc_t(q.wd[p]) - scale * st.a, c0 = acc_t(q.bd[p]);
    const S one = opaque_one<S>();
    for (int64_t row = 0; row < g.N; ++row) {
      const int64_t o = g.row(p, row);
      normalize_row<kAct>(q.x + o, g.S, st.mean, scale, shift, sl, q.z + o);
      for (int64_t i = o; i < o + g.S; ++i) {
        acc_t yd = cx * ((acc_t(q.x[i]) - st.mean) * r) + c0;
        if constexpr (kXd) yd += scale * (acc_t(q.xd[i]) - st.dmean);
        const S yds = static_cast<S>(yd);
        q.zd[i] = kAct ? yds * (q.z[i] > S(0) ? one : sl) : yds;
      }
    }
  }
}

// gb = sum gy, gw = sum gy xhat, gx = a gy + c0 + c1 (x - mean) with a = w r, c0 = -a gb/m, c1 = -a r gw/m
template <bool kAct, typename S>
void backward_impl(const Geometry& g, const BwdArgs<S>& q, int64_t begin, int64_t end) {
  using V = typename VecOf<S>::type;
  const V slv = V{} + static_cast<S>(q.slope);
  const acc_t m = acc_t(g.count());
  auto gy_at = [&](int64_t o, int64_t n) {  // k gz, 0 past n (a struct: see Vecs)
    return Vecs<1>{{__builtin_convertvector(masked<kAct>(load(q.gz + o, n), kAct ? load(q.z + o, n) : V{}, slv), vd)}};
  };
  for (int64_t p = begin; p < end; ++p) {
    const acc_t mu = acc_t(q.mean[p]), r = acc_t(q.invstd[p]);
    const Sums<2> sums = sum_plane<2, false, 2>(g, p, [&](int64_t o, int64_t n) {  // sum gy, sum gy (x - mean)
      const vd gy = gy_at(o, n).v[0];
      return Vecs<2>{{gy, gy * (load_acc(q.x + o, n) - mu)}};
    });
    const acc_t gb = sums.v[0], gw = sums.v[1] * r;
    q.gb[p] = static_cast<S>(gb);
    q.gw[p] = static_cast<S>(gw);
    if (q.gx == nullptr) continue;
    const acc_t a = acc_t(q.w[p]) * r, c0 = -a * gb / m, c1 = -a * r * gw / m;
    for_blocks(g, p, [&](int64_t o, int64_t n, int) {
      store(q.gx + o, a * gy_at(o, n).v[0] + c0 + c1 * (load_acc(q.x + o, n) - mu), n);
    });
  }
}

// With gy = k gz, gy' = k gzd, xhat = (x - mean) r, xhat' = r (xd - dmean - xhat a) (0 without xd), gxhat = w gy,
// gxhat' = w gy' + wd gy: gb = sum gy, gw = sum gy xhat, gb' = sum gy', gw' = sum (gy' xhat + gy xhat'), and
// gx = r (gxhat - m1 - xhat m2), gx' = -r a gx + r (gxhat' - n1 - xhat' m2 - xhat n3) with m1 = mean(gxhat),
// m2 = mean(xhat gxhat), n1 = mean(gxhat'), n3 = mean(xhat' gxhat + xhat gxhat').
template <bool kAct, bool kXd, typename S>
void tangent_backward_impl(const Geometry& g, const BwdArgs<S>& q, int64_t begin, int64_t end) {
  using V = typename VecOf<S>::type;
  const V slv = V{} + static_cast<S>(q.slope);
  const acc_t m = acc_t(g.count());
  for (int64_t p = begin; p < end; ++p) {
    const acc_t mu = acc_t(q.mean[p]), r = acc_t(q.invstd[p]), ai = acc_t(q.a[p]), dm = acc_t(q.dmean[p]);
    const acc_t wi = acc_t(q.w[p]), wdi = acc_t(q.wd[p]);
    // (gy, gy', xhat, xhat') of a block, 0 past n (xhat' 0 without xd)
    auto block = [&](int64_t o, int64_t n) {
      const V z = kAct ? load(q.z + o, n) : V{};
      const vd gy = __builtin_convertvector(masked<kAct>(load(q.gz + o, n), z, slv), vd);
      const vd gyd = __builtin_convertvector(masked<kAct>(load(q.gzd + o, n), z, slv), vd);
      const vd xh = (load_acc(q.x + o, n) - mu) * r;
      vd xhd = {};
      if constexpr (kXd) xhd = r * (load_acc(q.xd + o, n) - dm - xh * ai);
      return Vecs<4>{{gy, gyd, xh, xhd}};
    };
    constexpr int K = kXd ? 5 : 4;  // sums of gy, gy xhat, gy', gy' xhat (and gy xhat')
    const Sums<K> sums = sum_plane<K, false, 1>(g, p, [&](int64_t o, int64_t n) {
      const Vecs<4> b = block(o, n);
      const vd gy = b.v[0], gyd = b.v[1], xh = b.v[2];
      if constexpr (kXd)
        return Vecs<K>{{gy, gy * xh, gyd, gyd * xh, gy * b.v[3]}};
      else
        return Vecs<K>{{gy, gy * xh, gyd, gyd * xh}};
    });
    const acc_t tg = sums.v[0], tgx = sums.v[1], td = sums.v[2], tdx = sums.v[3];
    const acc_t tgxd = kXd ? sums.v[K - 1] : acc_t(0);
    q.gb[p] = static_cast<S>(tg);
    q.gw[p] = static_cast<S>(tgx);
    q.gbd[p] = static_cast<S>(td);
    q.gwd[p] = static_cast<S>(tdx + tgxd);
    if (q.gx == nullptr) continue;
    const acc_t m1 = wi * tg / m, m2 = wi * tgx / m, n1 = (wi * td + wdi * tg) / m;
    const acc_t n3 = (wi * tgxd + wi * tdx + wdi * tgx) / m;
    for_blocks(g, p, [&](int64_t o, int64_t n, int) {
      const Vecs<4> b = block(o, n);
      const vd gy = b.v[0], gyd = b.v[1], xh = b.v[2];
      const vd gx = r * (wi * gy - m1 - xh * m2);
      vd gxd = r * (wi * gyd + wdi * gy - n1 - xh * n3);
      if constexpr (kXd) gxd -= r * (ai * gx + b.v[3] * m2);
      store(q.gx + o, gx, n);
      store(q.gxd + o, gxd, n);
    });
  }
}

template <typename S>
void forward_planes(const Geometry& g, const FwdArgs<S>& q, int64_t begin, int64_t end) {
  if (q.slope == 1.0)
    forward_impl<false>(g, q, begin, end);
  else
    forward_impl<true>(g, q, begin, end);
}

template <typename S>
void tangent_forward_planes(const Geometry& g, const FwdArgs<S>& q, int64_t begin, int64_t end) {
  const bool act = q.slope != 1.0, xd = q.xd != nullptr;
  if (act && xd)
    tangent_forward_impl<true, true>(g, q, begin, end);
  else if (act)
    tangent_forward_impl<true, false>(g, q, begin, end);
  else if (xd)
    tangent_forward_impl<false, true>(g, q, begin, end);
  else
    tangent_forward_impl<false, false>(g, q, begin, end);
}

template <typename S>
void backward_planes(const Geometry& g, const BwdArgs<S>& q, int64_t begin, int64_t end) {
  if (q.slope == 1.0)
    backward_impl<false>(g, q, begin, end);
  else
    backward_impl<true>(g, q, begin, end);
}

template <typename S>
void tangent_backward_planes(const Geometry& g, const BwdArgs<S>& q, int64_t begin, int64_t end) {
  const bool act = q.slope != 1.0, xd = q.xd != nullptr;
  if (act && xd)
    tangent_backward_impl<true, true>(g, q, begin, end);
  else if (act)
    tangent_backward_impl<true, false>(g, q, begin, end);
  else if (xd)
    tangent_backward_impl<false, true>(g, q, begin, end);
  else
    tangent_backward_impl<false, false>(g, q, begin, end);
}

// ---------------------------------------------------------------- channels-last x
// Per task R = N*S rows of C contiguous values (row n*S + s: a plane's values come in the contiguous layout's
// order); the per-channel values as vectors of kLanes consecutive channels, the formulas those of the plane
// kernels above. A pass runs over blocks of rows (RowBlocks). The sums pass sums a block a few vectors of
// channels at a time down its rows, one accumulator per channel and sum (in
// registers), Kahan-compensated where the plane kernels are; the coefs step adds the blocks' partial sums up
// in block order (the same way) and turns them into the statistics, the per-channel outputs and the
// coefficients of the write pass, which writes the full-size outputs.

// the forward's per-channel coefficients (rows of [kNhwcCoefs, C] per task): the statistics' shift, the mean
// (double), scale = r w, b, and the tangent's r, cx = wd - r w a, bd, dmean (double)
enum ForwardCoef { kShift, kMean, kScale, kBias, kR, kCx, kC0, kDmean };
// the backwards': the statistics (mean, r, a, dmean) in double, then the backward's gx = a gy + c0 + c1 (x -
// mean) or the tangent backward's w, wd, m1, m2, n1, n3
enum BackwardStat { kStatMean, kStatR, kStatA, kStatDmean };
enum BackwardCoef { kGxA = kStatDmean + 1, kGxC0, kGxC1 };
enum TangentBackwardCoef { kW = kStatDmean + 1, kWd, kM1, kM2, kN1, kN3 };

inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

// the first n <= kLanes lanes of v, a vector of S, to p
template <typename S>
inline void put(S* p, const typename VecOf<S>::type& v, int64_t n) {
  if (n == kLanes) {
    __builtin_memcpy(p, &v, sizeof v);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = v[i];
  }
}

// Block i: its task, first row, rows, and the offset of that row
struct Block {
  int64_t t, r0, rows, o;
};

inline Block block_of(const Geometry& g, const RowBlocks& s, int64_t i) {
  const int64_t t = i / s.blocks, r0 = i % s.blocks * s.rows;
  return {t, r0, lesser(s.rows, s.R - r0), (t * s.R + r0) * g.C};
}

// f(o, n, c) for every vector of block b: each row in vectors of the kLanes channels from c (n = kLanes), its
// remainder last (n < kLanes); o the vector's offset
template <typename F>
inline void for_block_vectors(const Geometry& g, const Block& b, F&& f) {
  for (int64_t r = 0, o = b.o; r < b.rows; ++r, o += g.C) {
    int64_t c = 0;
    for (; c + kLanes <= g.C; c += kLanes) f(o + c, int64_t(kLanes), c);
    if (c < g.C) f(o + c, g.C - c, c);
  }
}

// The K sums per channel over block b of the channels [c0, c0 + kVecs * kLanes) (kFull) or [c0, C): f(o, n, c)
// returns the K vectors of the kLanes channels from c at offset o (lanes past n 0); out[k * C + c] the sum k
// of channel c
template <int K, bool kKahan, int kVecs, bool kFull, typename F>
inline void sum_chunk(const Geometry& g, const Block& b, int64_t c0, F& f, acc_t* out) {
  const int64_t width = kFull ? kVecs * kLanes : g.C - c0;
  const int nv = kFull ? kVecs : int((width + kLanes - 1) / kLanes);
  vd sum[kVecs][K] = {}, err[kVecs][K] = {};
  for (int64_t r = 0, o = b.o + c0; r < b.rows; ++r, o += g.C) {
    for (int j = 0; j < nv; ++j) {
      const int64_t n = kFull ? int64_t(kLanes) : lesser(kLanes, width - j * kLanes);
      const Vecs<K> x = f(o + j * kLanes, n, c0 + j * kLanes);
      for (int k = 0; k < K; ++k) {
        if constexpr (kKahan) {
          const vd y = x.v[k] - err[j][k];
          const vd t = sum[j][k] + y;
          err[j][k] = (t - sum[j][k]) - y;
          sum[j][k] = t;
        } else {
          sum[j][k] += x.v[k];
        }
      }
    }
  }
  for (int j = 0; j < nv; ++j)
    for (int k = 0; k < K; ++k)
      for (int64_t i = 0; i < lesser(kLanes, width - j * kLanes); ++i)
        out[k * g.C + c0 + j * kLanes + i] = sum[j][k][i] - err[j][k][i];
}

// sum_chunk over every channel, block i's partial sums to the scratch; chunks of as many vectors as keep the
// sums (and their compensations) in registers: up to 8 accumulators
template <int K, bool kKahan, typename F>
inline void sum_block(const Geometry& g, const RowBlocks& s, int64_t i, F&& f, const NhwcScratch& w) {
  constexpr int kAccumulators = K * (kKahan ? 2 : 1);
  constexpr int kVecs = kAccumulators >= 8 ? 1 : 8 / kAccumulators;
  constexpr int64_t kWidth = kVecs * kLanes;
  const Block b = block_of(g, s, i);
  acc_t* out = w.sums + i * kNhwcSums * g.C;
  int64_t c0 = 0;
  for (; c0 + kWidth <= g.C; c0 += kWidth) sum_chunk<K, kKahan, kVecs, true>(g, b, c0, f, out);
  if (c0 < g.C) sum_chunk<K, kKahan, kVecs, false>(g, b, c0, f, out);
}

// the per-channel coefficients k of task t: [C]
inline acc_t* coefs_of(const Geometry& g, const NhwcScratch& w, int64_t t, int k) {
  return w.coefs + (t * kNhwcCoefs + k) * g.C;
}

// The K sums of (task t, channel c): its blocks' partial sums added up in block order
template <int K, bool kKahan>
inline Sums<K> block_total(const Geometry& g, const RowBlocks& s, const NhwcScratch& w, int64_t t, int64_t c) {
  Sums<K> total{};
  for (int k = 0; k < K; ++k) {
    acc_t sum = 0, err = 0;
    for (int64_t b = 0; b < s.blocks; ++b) {
      const acc_t x = w.sums[((t * s.blocks + b) * kNhwcSums + k) * g.C + c];
      if constexpr (kKahan) {
        const acc_t y = x - err;
        const acc_t u = sum + y;
        err = (u - sum) - y;
        sum = u;
      } else {
        sum += x;
      }
    }
    total.v[k] = sum - err;
  }
  return total;
}

// The statistics' shift of every (task, channel): the mean of its first kShiftValues rows (the plane's first
// values, as plane_stats)
template <typename S>
void forward_shifts_nhwc(const Geometry& g, const FwdArgs<S>& q, const NhwcScratch& w) {
  const int64_t R = g.N * g.S, k = lesser(R, kShiftValues);
  for (int64_t t = 0; t < g.T; ++t) {
    acc_t* shift = coefs_of(g, w, t, kShift);
    for (int64_t c = 0; c < g.C; ++c) shift[c] = 0;
    for (int64_t r = 0; r < k; ++r)
      for (int64_t c = 0; c < g.C; ++c) shift[c] += acc_t(q.x[(t * R + r) * g.C + c]);
    for (int64_t c = 0; c < g.C; ++c) shift[c] /= acc_t(k);
  }
}

// sum d, sum d^2 (and sum xd, sum d xd), d = x - shift, per block: the operations of plane_stats
template <bool kTangent, typename S>
void forward_sums_impl(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w,
                       int64_t begin, int64_t end) {
  constexpr bool kKahan = sizeof(S) == sizeof(double);
  constexpr int K = kTangent ? 4 : 2;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* shift = coefs_of(g, w, block_of(g, s, i).t, kShift);
    sum_block<K, kKahan>(g, s, i, [&](int64_t o, int64_t n, int64_t c) {
      const vd d = load_acc(q.x + o, n) - load(shift + c, n);
      if constexpr (kTangent) {
        const vd u = load_acc(q.xd + o, n);
        return Vecs<K>{{d, d * d, u, d * u}};
      } else {
        return Vecs<K>{{d, d * d}};
      }
    }, w);
  }
}

// the statistics (plane_stats' formulas) and the coefficients of the write pass
template <bool kTangent, typename S>
void forward_coefs_impl(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w) {
  constexpr bool kKahan = sizeof(S) == sizeof(double);
  constexpr int K = kTangent ? 4 : 2;
  const acc_t m = acc_t(g.count());
  for (int64_t p = 0; p < g.planes(); ++p) {
    const int64_t t = p / g.C, c = p % g.C;
    auto coef = [&](int k) { return coefs_of(g, w, t, k); };
    const Sums<K> sums = block_total<K, kKahan>(g, s, w, t, c);
    const acc_t dm = sums.v[0] / m;  // mean - shift
    acc_t var = sums.v[1] / m - dm * dm;
    if (var < 0) var = 0;  // (rounding; NaN stays NaN)
    const acc_t mean = coef(kShift)[c] + dm, r = acc_t(1) / std::sqrt(var + acc_t(q.eps));
    const acc_t scale = r * acc_t(q.w[p]);
    q.mean[p] = static_cast<S>(mean);
    q.invstd[p] = static_cast<S>(r);
    coef(kMean)[c] = mean;
    coef(kScale)[c] = scale;
    coef(kBias)[c] = acc_t(q.b[p]);
    if (q.zd == nullptr) continue;
    acc_t a = 0, dmean = 0;
    if constexpr (kTangent) {
      dmean = sums.v[K - 2] / m;
      a = r * (sums.v[K - 1] / m - dm * dmean);  // mean((x - mean) xd) r
    }
    q.a[p] = static_cast<S>(a);
    q.dmean[p] = static_cast<S>(dmean);
    coef(kR)[c] = r;
    coef(kCx)[c] = acc_t(q.wd[p]) - scale * a;
    coef(kC0)[c] = acc_t(q.bd[p]);
    coef(kDmean)[c] = dmean;
  }
}

// z = act(y), y = (x - mean) scale + shift rounded to S, act(y) = y * (y > 0 ? 1 : slope), for block b,
// per-channel mean, scale, shift: normalize_row's operations. Not inlined: the forward and the
// value-and-tangent forward run this one piece of machine code, so their z agree bit for bit.
template <bool kAct, typename S>
__attribute__((noinline)) void normalize_block(const Geometry& g, const Block& b, const S* x, const acc_t* mean,
                                               const acc_t* scale, const acc_t* shift, S slope, S* z) {
  using V = typename VecOf<S>::type;
  const V slv = V{} + slope;
  for_block_vectors(g, b, [&](int64_t o, int64_t n, int64_t c) {
    const vd y = (load_acc(x + o, n) - load(mean + c, n)) * load(scale + c, n) + load(shift + c, n);
    const V ys = __builtin_convertvector(y, V);
    put(z + o, masked<kAct>(ys, ys, slv), n);
  });
}

// z, and with kZd zd = k yd, yd = r w (xd - dmean) + (wd - r w a) xhat + bd rounded to S
// (tangent_forward_impl). The blocks in reverse order: the last ones the sums pass read are still in cache.
template <bool kAct, bool kZd, bool kXd, typename S>
void forward_write_impl(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w,
                        int64_t begin, int64_t end) {
  using V = typename VecOf<S>::type;
  const S sl = static_cast<S>(q.slope);
  const V slv = V{} + sl;
  for (int64_t i = end - 1; i >= begin; --i) {
    const Block b = block_of(g, s, i);
    auto coef = [&](int k) { return coefs_of(g, w, b.t, k); };
    const acc_t *mean = coef(kMean), *scale = coef(kScale), *r = coef(kR), *cx = coef(kCx), *c0 = coef(kC0);
    const acc_t* dmean = coef(kDmean);
    normalize_block<kAct>(g, b, q.x, mean, scale, coef(kBias), sl, q.z);
    if constexpr (kZd) {
      for_block_vectors(g, b, [&](int64_t o, int64_t n, int64_t c) {
        vd yd = load(cx + c, n) * ((load_acc(q.x + o, n) - load(mean + c, n)) * load(r + c, n)) + load(c0 + c, n);
        if constexpr (kXd) yd += load(scale + c, n) * (load_acc(q.xd + o, n) - load(dmean + c, n));
        const V yds = __builtin_convertvector(yd, V);
        put(q.zd + o, masked<kAct>(yds, kAct ? load(q.z + o, n) : V{}, slv), n);
      });
    }
  }
}

// gy = k gz of the kLanes values at o, 0 past n (a struct: see Vecs)
template <bool kAct, typename S>
inline Vecs<1> gy_at(const BwdArgs<S>& q, int64_t o, int64_t n, const typename VecOf<S>::type& slv) {
  using V = typename VecOf<S>::type;
  return Vecs<1>{{__builtin_convertvector(masked<kAct>(load(q.gz + o, n), kAct ? load(q.z + o, n) : V{}, slv), vd)}};
}

// sum gy, sum gy (x - mean) per block (backward_impl)
template <bool kAct, typename S>
void backward_sums_impl(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w,
                        int64_t begin, int64_t end) {
  using V = typename VecOf<S>::type;
  const V slv = V{} + static_cast<S>(q.slope);
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* mean = coefs_of(g, w, block_of(g, s, i).t, kStatMean);
    sum_block<2, false>(g, s, i, [&](int64_t o, int64_t n, int64_t c) {
      const vd gy = gy_at<kAct>(q, o, n, slv).v[0];
      return Vecs<2>{{gy, gy * (load_acc(q.x + o, n) - load(mean + c, n))}};
    }, w);
  }
}

// gb = sum gy, gw = sum gy xhat; gx = a gy + c0 + c1 (x - mean), a = w r, c0 = -a gb/m, c1 = -a r gw/m
template <typename S>
void backward_coefs_impl(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w) {
  const acc_t m = acc_t(g.count());
  for (int64_t p = 0; p < g.planes(); ++p) {
    const int64_t t = p / g.C, c = p % g.C;
    auto coef = [&](int k) { return coefs_of(g, w, t, k); };
    const Sums<2> sums = block_total<2, false>(g, s, w, t, c);
    const acc_t r = acc_t(q.invstd[p]), gb = sums.v[0], gw = sums.v[1] * r;
    q.gb[p] = static_cast<S>(gb);
    q.gw[p] = static_cast<S>(gw);
    const acc_t a = acc_t(q.w[p]) * r;
    coef(kGxA)[c] = a;
    coef(kGxC0)[c] = -a * gb / m;
    coef(kGxC1)[c] = -a * r * gw / m;
  }
}

// gx, the blocks in reverse order (as forward_write_impl)
template <bool kAct, typename S>
void backward_write_impl(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w,
                         int64_t begin, int64_t end) {
  using V = typename VecOf<S>::type;
  const V slv = V{} + static_cast<S>(q.slope);
  for (int64_t i = end - 1; i >= begin; --i) {
    const Block b = block_of(g, s, i);
    const acc_t *mean = coefs_of(g, w, b.t, kStatMean), *a = coefs_of(g, w, b.t, kGxA);
    const acc_t *c0 = coefs_of(g, w, b.t, kGxC0), *c1 = coefs_of(g, w, b.t, kGxC1);
    for_block_vectors(g, b, [&](int64_t o, int64_t n, int64_t c) {
      const vd gy = gy_at<kAct>(q, o, n, slv).v[0];
      const vd xc = load_acc(q.x + o, n) - load(mean + c, n);
      store(q.gx + o, load(a + c, n) * gy + load(c0 + c, n) + load(c1 + c, n) * xc, n);
    });
  }
}

// (gy, gy', xhat, xhat') of the kLanes values at o, channels from c, 0 past n (xhat' 0 without xd), st the
// task's statistics (BackwardStat): as in tangent_backward_impl
template <bool kAct, bool kXd, typename S>
inline Vecs<4> tangent_backward_block(const BwdArgs<S>& q, const acc_t* const* st, int64_t o, int64_t n, int64_t c,
                                      const typename VecOf<S>::type& slv) {
  using V = typename VecOf<S>::type;
  const V z = kAct ? load(q.z + o, n) : V{};
  const vd gy = __builtin_convertvector(masked<kAct>(load(q.gz + o, n), z, slv), vd);
  const vd gyd = __builtin_convertvector(masked<kAct>(load(q.gzd + o, n), z, slv), vd);
  const vd r = load(st[kStatR] + c, n);
  const vd xh = (load_acc(q.x + o, n) - load(st[kStatMean] + c, n)) * r;
  vd xhd = {};
  if constexpr (kXd) xhd = r * (load_acc(q.xd + o, n) - load(st[kStatDmean] + c, n) - xh * load(st[kStatA] + c, n));
  return Vecs<4>{{gy, gyd, xh, xhd}};
}

// the statistics of task t (BackwardStat)
struct TaskStats {
  const acc_t* v[4];
};

inline TaskStats task_stats(const Geometry& g, const NhwcScratch& w, int64_t t) {
  return {{coefs_of(g, w, t, kStatMean), coefs_of(g, w, t, kStatR), coefs_of(g, w, t, kStatA),
           coefs_of(g, w, t, kStatDmean)}};
}

// sums of gy, gy xhat, gy', gy' xhat (and gy xhat') per block
template <bool kAct, bool kXd, typename S>
void tangent_backward_sums_impl(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w,
                                int64_t begin, int64_t end) {
  using V = typename VecOf<S>::type;
  const V slv = V{} + static_cast<S>(q.slope);
  constexpr int K = kXd ? 5 : 4;
  for (int64_t i = begin; i < end; ++i) {
    const TaskStats st = task_stats(g, w, block_of(g, s, i).t);
    sum_block<K, false>(g, s, i, [&](int64_t o, int64_t n, int64_t c) {
      const Vecs<4> b = tangent_backward_block<kAct, kXd>(q, st.v, o, n, c, slv);
      const vd gy = b.v[0], gyd = b.v[1], xh = b.v[2];
      if constexpr (kXd)
        return Vecs<K>{{gy, gy * xh, gyd, gyd * xh, gy * b.v[3]}};
      else
        return Vecs<K>{{gy, gy * xh, gyd, gyd * xh}};
    }, w);
  }
}

// gb, gw, gb', gw' and m1, m2, n1, n3 (tangent_backward_impl)
template <bool kXd, typename S>
void tangent_backward_coefs_impl(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w) {
  constexpr int K = kXd ? 5 : 4;
  const acc_t m = acc_t(g.count());
  for (int64_t p = 0; p < g.planes(); ++p) {
    const int64_t t = p / g.C, c = p % g.C;
    auto coef = [&](int k) { return coefs_of(g, w, t, k); };
    const Sums<K> sums = block_total<K, false>(g, s, w, t, c);
    const acc_t tg = sums.v[0], tgx = sums.v[1], td = sums.v[2], tdx = sums.v[3];
    const acc_t tgxd = kXd ? sums.v[K - 1] : acc_t(0);
    q.gb[p] = static_cast<S>(tg);
    q.gw[p] = static_cast<S>(tgx);
    q.gbd[p] = static_cast<S>(td);
    q.gwd[p] = static_cast<S>(tdx + tgxd);
    const acc_t wi = acc_t(q.w[p]), wdi = acc_t(q.wd[p]);
    coef(kW)[c] = wi;
    coef(kWd)[c] = wdi;
    coef(kM1)[c] = wi * tg / m;
    coef(kM2)[c] = wi * tgx / m;
    coef(kN1)[c] = (wi * td + wdi * tg) / m;
    coef(kN3)[c] = (wi * tgxd + wi * tdx + wdi * tgx) / m;
  }
}

// gx, gx', the blocks in reverse order (as forward_write_impl)
template <bool kAct, bool kXd, typename S>
void tangent_backward_write_impl(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w,
                                 int64_t begin, int64_t end) {
  using V = typename VecOf<S>::type;
  const V slv = V{} + static_cast<S>(q.slope);
  for (int64_t i = end - 1; i >= begin; --i) {
    const Block bl = block_of(g, s, i);
    const TaskStats st = task_stats(g, w, bl.t);
    auto coef = [&](int k) { return coefs_of(g, w, bl.t, k); };
    const acc_t *wi = coef(kW), *wdi = coef(kWd), *m1 = coef(kM1), *m2 = coef(kM2), *n1 = coef(kN1), *n3 = coef(kN3);
    for_block_vectors(g, bl, [&](int64_t o, int64_t n, int64_t c) {
      const Vecs<4> b = tangent_backward_block<kAct, kXd>(q, st.v, o, n, c, slv);
      const vd gy = b.v[0], gyd = b.v[1], xh = b.v[2];
      const vd r = load(st.v[kStatR] + c, n), wv = load(wi + c, n), m2v = load(m2 + c, n);
      const vd gx = r * (wv * gy - load(m1 + c, n) - xh * m2v);
      vd gxd = r * (wv * gyd + load(wdi + c, n) * gy - load(n1 + c, n) - xh * load(n3 + c, n));
      if constexpr (kXd) gxd -= r * (load(st.v[kStatA] + c, n) * gx + b.v[3] * m2v);
      store(q.gx + o, gx, n);
      store(q.gxd + o, gxd, n);
    });
  }
}

template <typename S>
void forward_sums_nhwc(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w,
                       int64_t begin, int64_t end) {
  if (q.xd != nullptr)
    forward_sums_impl<true>(g, s, q, w, begin, end);
  else
    forward_sums_impl<false>(g, s, q, w, begin, end);
}

template <typename S>
void forward_coefs_nhwc(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w) {
  if (q.xd != nullptr)
    forward_coefs_impl<true>(g, s, q, w);
  else
    forward_coefs_impl<false>(g, s, q, w);
}

template <typename S>
void forward_write_nhwc(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w,
                        int64_t begin, int64_t end) {
  const bool act = q.slope != 1.0, zd = q.zd != nullptr, xd = q.xd != nullptr;
  if (!zd)
    act ? forward_write_impl<true, false, false>(g, s, q, w, begin, end)
        : forward_write_impl<false, false, false>(g, s, q, w, begin, end);
  else if (xd)
    act ? forward_write_impl<true, true, true>(g, s, q, w, begin, end)
        : forward_write_impl<false, true, true>(g, s, q, w, begin, end);
  else
    act ? forward_write_impl<true, true, false>(g, s, q, w, begin, end)
        : forward_write_impl<false, true, false>(g, s, q, w, begin, end);
}

// The statistics of every (task, channel) in double (BackwardStat; a, dmean for the tangent backward)
template <typename S>
void backward_stats_nhwc(const Geometry& g, const BwdArgs<S>& q, const NhwcScratch& w) {
  for (int64_t p = 0; p < g.planes(); ++p) {
    const int64_t t = p / g.C, c = p % g.C;
    coefs_of(g, w, t, kStatMean)[c] = acc_t(q.mean[p]);
    coefs_of(g, w, t, kStatR)[c] = acc_t(q.invstd[p]);
    if (q.gzd == nullptr) continue;
    coefs_of(g, w, t, kStatA)[c] = acc_t(q.a[p]);
    coefs_of(g, w, t, kStatDmean)[c] = acc_t(q.dmean[p]);
  }
}

template <typename S>
void backward_sums_nhwc(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w,
                        int64_t begin, int64_t end) {
  const bool act = q.slope != 1.0, xd = q.xd != nullptr;
  if (q.gzd == nullptr)
    act ? backward_sums_impl<true>(g, s, q, w, begin, end) : backward_sums_impl<false>(g, s, q, w, begin, end);
  else if (xd)
    act ? tangent_backward_sums_impl<true, true>(g, s, q, w, begin, end)
        : tangent_backward_sums_impl<false, true>(g, s, q, w, begin, end);
  else
    act ? tangent_backward_sums_impl<true, false>(g, s, q, w, begin, end)
        : tangent_backward_sums_impl<false, false>(g, s, q, w, begin, end);
}

template <typename S>
void backward_coefs_nhwc(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w) {
  if (q.gzd == nullptr)
    backward_coefs_impl(g, s, q, w);
  else if (q.xd != nullptr)
    tangent_backward_coefs_impl<true>(g, s, q, w);
  else
    tangent_backward_coefs_impl<false>(g, s, q, w);
}

template <typename S>
void backward_write_nhwc(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w,
                         int64_t begin, int64_t end) {
  const bool act = q.slope != 1.0, xd = q.xd != nullptr;
  if (q.gzd == nullptr)
    act ? backward_write_impl<true>(g, s, q, w, begin, end) : backward_write_impl<false>(g, s, q, w, begin, end);
  else if (xd)
    act ? tangent_backward_write_impl<true, true>(g, s, q, w, begin, end)
        : tangent_backward_write_impl<false, true>(g, s, q, w, begin, end);
  else
    act ? tangent_backward_write_impl<true, false>(g, s, q, w, begin, end)
        : tangent_backward_write_impl<false, false>(g, s, q, w, begin, end);
}

#define FASTMAML_BN_ACT_INSTANTIATE(S)                                                           \
  template void forward_planes<S>(const Geometry&, const FwdArgs<S>&, int64_t, int64_t);         \
  template void tangent_forward_planes<S>(const Geometry&, const FwdArgs<S>&, int64_t, int64_t); \
  template void backward_planes<S>(const Geometry&, const BwdArgs<S>&, int64_t, int64_t);        \
  template void tangent_backward_planes<S>(const Geometry&, const BwdArgs<S>&, int64_t, int64_t);                \
  template void forward_shifts_nhwc<S>(const Geometry&, const FwdArgs<S>&, const NhwcScratch&);                   \
  template void forward_sums_nhwc<S>(const Geometry&, const RowBlocks&, const FwdArgs<S>&, const NhwcScratch&,    \
                                     int64_t, int64_t);                                                           \
  template void forward_coefs_nhwc<S>(const Geometry&, const RowBlocks&, const FwdArgs<S>&, const NhwcScratch&);  \
  template void forward_write_nhwc<S>(const Geometry&, const RowBlocks&, const FwdArgs<S>&, const NhwcScratch&,   \
                                      int64_t, int64_t);                                                          \
  template void backward_stats_nhwc<S>(const Geometry&, const BwdArgs<S>&, const NhwcScratch&);                   \
  template void backward_sums_nhwc<S>(const Geometry&, const RowBlocks&, const BwdArgs<S>&, const NhwcScratch&,   \
                                      int64_t, int64_t);                                                          \
  template void backward_coefs_nhwc<S>(const Geometry&, const RowBlocks&, const BwdArgs<S>&, const NhwcScratch&); \
  template void backward_write_nhwc<S>(const Geometry&, const RowBlocks&, const BwdArgs<S>&, const NhwcScratch&,  \
                                       int64_t, int64_t);

FASTMAML_BN_ACT_INSTANTIATE(float)
FASTMAML_BN_ACT_INSTANTIATE(double)
#undef FASTMAML_BN_ACT_INSTANTIATE

}  // namespace FASTMAML_BN_ACT_NS
