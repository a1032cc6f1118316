// BatchNorm (batch statistics) + leaky ReLU (bn_act.cpp): the shapes and arguments of the per-plane kernels
// (bn_act_kernels.h) and their entry points (per plane for contiguous x, per block of rows for channels-last
// x), compiled twice: for the baseline instruction set (namespace
// fastmaml_bn_act, in bn_act.cpp) and for AVX2 (fastmaml_bn_act_avx2, in bn_act_avx2.cpp). Plain C++, no
// ATen: every inline function a kernel uses is defined outside the AVX2 target region.
#pragma once

#include <cstdint>

namespace fastmaml_bn_act_shapes {

// x [T, N, C, S], contiguous: T*C planes (task, channel) of N rows of S contiguous values each
struct Geometry {
  int64_t T, N, C, S;
  int64_t planes() const { return T * C; }
  double count() const { return static_cast<double>(N * S); }
  // offset of row n of plane p = t * C + c
  int64_t row(int64_t p, int64_t n) const { return ((p / C * N + n) * C + p % C) * S; }
};

// The forwards: x, w, b -> z, mean, invstd (xd, wd, bd, zd, a, dmean: the tangent forward's; xd may be null)
template <typename S>
struct FwdArgs {
  const S *x, *xd, *w, *b, *wd, *bd;
  S *z, *zd, *mean, *invstd, *a, *dmean;
  double eps, slope;
};

// The backwards: gz (gzd), z (null for slope 1), x (xd: may be null), statistics, w (wd) -> gx (gxd: null when
// the input's gradient is not asked for), gw, gb (gwd, gbd)
template <typename S>
struct BwdArgs {
  const S *gz, *gzd, *z, *x, *xd, *mean, *invstd, *a, *dmean, *w, *wd;
  S *gx, *gxd, *gw, *gwd, *gb, *gbd;
  double slope;
};

// Channels-last x (strides (N*S*C, S*C, 1, C)): per task R = N*S rows of C contiguous values, in blocks of
// `rows` rows (`blocks` per task, the last one may be shorter); item i of a parallel pass is block i % blocks
// of task i / blocks
struct RowBlocks {
  int64_t R, rows, blocks;
};

constexpr int kNhwcSums = 5;    // partial sums per block and channel (at most: the tangent backward's)
constexpr int kNhwcCoefs = 10;  // per-channel coefficients (at most: the tangent backward's)

// The channels-last passes' scratch (the caller's, doubles): the per-block partial sums [T * blocks,
// kNhwcSums, C] and the per-channel coefficients [T, kNhwcCoefs, C]
struct NhwcScratch {
  double *sums, *coefs;
};

}  // namespace fastmaml_bn_act_shapes

// The entry points: planes [begin, end) of each pass (contiguous x); for channels-last x, in this order: the
// shifts (forward) or the statistics in double (backward) of every task and channel, the items [begin, end)
// of the sums pass, the coefs of every task and channel, the items [begin, end) of the write pass; the
// forwards with FwdArgs (the tangent's parts where xd, zd are set), the backwards with BwdArgs (the tangent
// backward where gzd is set).
#define FASTMAML_BN_ACT_ENTRY_POINTS                                                                    \
  using fastmaml_bn_act_shapes::BwdArgs;                                                                \
  using fastmaml_bn_act_shapes::FwdArgs;                                                                \
  using fastmaml_bn_act_shapes::Geometry;                                                               \
  using fastmaml_bn_act_shapes::kNhwcCoefs;                                                             \
  using fastmaml_bn_act_shapes::kNhwcSums;                                                              \
  using fastmaml_bn_act_shapes::NhwcScratch;                                                            \
  using fastmaml_bn_act_shapes::RowBlocks;                                                              \
  template <typename S>                                                                                 \
  void forward_planes(const Geometry& g, const FwdArgs<S>& q, int64_t begin, int64_t end);              \
  template <typename S>                                                                                 \
  void tangent_forward_planes(const Geometry& g, const FwdArgs<S>& q, int64_t begin, int64_t end);      \
  template <typename S>                                                                                 \
  void backward_planes(const Geometry& g, const BwdArgs<S>& q, int64_t begin, int64_t end);             \
  template <typename S>                                                                                 \
  void tangent_backward_planes(const Geometry& g, const BwdArgs<S>& q, int64_t begin, int64_t end);      \
  template <typename S>                                                                                 \
  void forward_shifts_nhwc(const Geometry& g, const FwdArgs<S>& q, const NhwcScratch& w);               \
  template <typename S>                                                                                 \
  void forward_sums_nhwc(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w, \
                         int64_t begin, int64_t end);                                                   \
  template <typename S>                                                                                 \
  void forward_coefs_nhwc(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w); \
  template <typename S>                                                                                 \
  void forward_write_nhwc(const Geometry& g, const RowBlocks& s, const FwdArgs<S>& q, const NhwcScratch& w, \
                          int64_t begin, int64_t end);                                                  \
  template <typename S>                                                                                 \
  void backward_stats_nhwc(const Geometry& g, const BwdArgs<S>& q, const NhwcScratch& w);               \
  template <typename S>                                                                                 \
  void backward_sums_nhwc(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w, \
                          int64_t begin, int64_t end);                                                  \
  template <typename S>                                                                                 \
  void backward_coefs_nhwc(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w); \
  template <typename S>                                                                                 \
  void backward_write_nhwc(const Geometry& g, const RowBlocks& s, const BwdArgs<S>& q, const NhwcScratch& w, \
                           int64_t begin, int64_t end);

namespace fastmaml_bn_act {
FASTMAML_BN_ACT_ENTRY_POINTS
}  // namespace fastmaml_bn_act

namespace fastmaml_bn_act_avx2 {
FASTMAML_BN_ACT_ENTRY_POINTS
bool usable();  // the CPU runs AVX2 and the build has the AVX2 variant
}  // namespace fastmaml_bn_act_avx2
