// The CPU form of the whole-inner-loop MLP meta-step (one task per call; the op spreads tasks over
// threads): the math of mlp_inner_loop.h, organised for one core's caches and vector registers.
//
//   forward:  phi_0 = theta; g_j = grad L_s(phi_j); phi_{j+1} = phi_j - alpha_j * g_j   (j < K)
//   reverse:  v = grad L_q(phi_K) / T; for j = K-1..0: dalpha_j = -g_j * v; v -= H_j (alpha_j * v)
//
// What differs from the block-parallel form that CUDA runs:
// - Every product is one register-blocked kernel (`gemm`): C [M, n] = init + sum_k A(m, k) B[k, :] (+ a
//   second pair with the same shapes, for the tangent forms), B row-major, A read through strides, so that
//   the transposed operands of the weight gradients need no copy. Rows in tiles of at most 6 (as equal as
//   possible), columns in blocks of 2 or 1 vectors of 32 bytes (GCC vector types: lane-wise IEEE
//   arithmetic, lowered to SSE2 or AVX2); the columns left over (a layer of width 1) as vectors over rows
//   or over the sum where the operands allow, else with 4 partial sums.
// - The forward reads each weight matrix transposed (W^T [d_in, d_out], one copy per inner step in blocks
//   of vector shuffles, kept for the reverse sweep), the input gradient reads it as it is.
// - phi_{j+1} is written straight into the tape, and each pass over the parameters in the reverse sweep
//   finishes one step and prepares the next.
// - Each support pass keeps its activations and gradients (a tape of N rows per step), so the reverse
//   sweep's Hessian-vector product at phi_j computes only the tangents (forward-over-reverse).
// - The query loss at theta is computed only when asked for (`need_before`).
//
// Included once per instruction-set build, inside namespace FASTMAML_MLP_NS (mlp_meta_step.cpp:
// fastmaml_mlp, mlp_meta_step_avx2.cpp: fastmaml_mlp_avx2 under an AVX2 + FMA target), so that no AVX2
// copy of an inline function can replace a baseline one at link time.
#pragma once
#include <cmath>
#include <cstdint>

#include "mlp_shape.h"

#ifndef FASTMAML_MLP_NS
#define FASTMAML_MLP_NS fastmaml_mlp
#endif

// 32-byte vectors returned by inline helpers: their ABI differs between the builds, but no such function
// crosses a library boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace FASTMAML_MLP_NS {

using namespace fastmaml_mlp;

template <typename S>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

template <typename S>
inline typename Vec<S>::type vload(const S* p) {
  typename Vec<S>::type v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename S>
inline void vstore(S* p, const typename Vec<S>::type& v) {
  __builtin_memcpy(p, &v, sizeof v);
}

template <typename S>
inline S cpu_tanh(S x) {
  return std::tanh(x);
}

// Rows [0, MR) and the NV vectors of columns from c: C = init + sum_k A1(m, k) B1[k, :] (+ A2(m, k) B2[k, :]),
// A(m, k) = a[m am + k ak], B row-major with ldb, C row-major with ldc; init: [NV lanes] or null (zero).
template <typename S, int MR, int NV, bool kTwo>
inline void gemm_tile(int64_t kd, const S* a1, const S* a2, int64_t am, int64_t ak, const S* b1, const S* b2,
                      int64_t ldb, const S* init, S* c, int64_t ldc) {
  using V = typename Vec<S>::type;
  constexpr int L = Vec<S>::kLanes;
  V acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const V start = init ? vload(init + v * L) : V{};
    for (int r = 0; r < MR; ++r) acc[r][v] = start;
  }
  for (int64_t k = 0; k < kd; ++k) {
    V x1[NV];
    for (int v = 0; v < NV; ++v) x1[v] = vload(b1 + k * ldb + v * L);
    for (int r = 0; r < MR; ++r) {
      const S s1 = a1[r * am + k * ak];
      for (int v = 0; v < NV; ++v) acc[r][v] += s1 * x1[v];
    }
    if constexpr (kTwo) {
      V x2[NV];
      for (int v = 0; v < NV; ++v) x2[v] = vload(b2 + k * ldb + v * L);
      for (int r = 0; r < MR; ++r) {
        const S s2 = a2[r * am + k * ak];
        for (int v = 0; v < NV; ++v) acc[r][v] += s2 * x2[v];
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * L, acc[r][v]);
}

// Rows [m, m + rows) of the NV-vector column block starting at column j, rows <= 6.
template <typename S, int NV, bool kTwo>
inline void gemm_rows(int64_t rows, int64_t m, int64_t kd, const S* a1, const S* a2, int64_t am, int64_t ak,
                      const S* b1, const S* b2, int64_t ldb, const S* init, S* c, int64_t ldc, int64_t j) {
  const S* in = init ? init + j : nullptr;
  const S* r1 = a1 + m * am;
  const S* r2 = kTwo ? a2 + m * am : nullptr;
  const S* c1 = b1 + j;
  const S* c2 = kTwo ? b2 + j : nullptr;
  S* out = c + m * ldc + j;
  switch (rows) {
    case 6: return gemm_tile<S, 6, NV, kTwo>(kd, r1, r2, am, ak, c1, c2, ldb, in, out, ldc);
    case 5: return gemm_tile<S, 5, NV, kTwo>(kd, r1, r2, am, ak, c1, c2, ldb, in, out, ldc);
    case 4: return gemm_tile<S, 4, NV, kTwo>(kd, r1, r2, am, ak, c1, c2, ldb, in, out, ldc);
    case 3: return gemm_tile<S, 3, NV, kTwo>(kd, r1, r2, am, ak, c1, c2, ldb, in, out, ldc);
    case 2: return gemm_tile<S, 2, NV, kTwo>(kd, r1, r2, am, ak, c1, c2, ldb, in, out, ldc);
    default: return gemm_tile<S, 1, NV, kTwo>(kd, r1, r2, am, ak, c1, c2, ldb, in, out, ldc);
  }
}

// Every row of the NV-vector column block starting at column j, in tiles of at most 6 rows (12 accumulators
// with NV = 2: what 16 vector registers hold besides the B loads), as equal as possible: 10 rows run as
// 5 + 5, not 6 + 4 or 4 + 4 + 2 (few rows mean few independent chains of additions to hide their latency).
template <typename S, int NV, bool kTwo>
inline void gemm_columns(int64_t M, int64_t kd, const S* a1, const S* a2, int64_t am, int64_t ak, const S* b1,
                         const S* b2, int64_t ldb, const S* init, S* c, int64_t ldc, int64_t j) {
  constexpr int64_t kMaxRows = 6;
  const int64_t tiles = (M + kMaxRows - 1) / kMaxRows, base = M / tiles, extra = M % tiles;
  int64_t m = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = base + (t < extra ? 1 : 0);
    gemm_rows<S, NV, kTwo>(rows, m, kd, a1, a2, am, ak, b1, b2, ldb, init, c, ldc, j);
    m += rows;
  }
}

// One output of the columns left over, with 4 interleaved partial sums over k (k mod 4), added in a fixed
// order: the chain of dependent additions a single sum would be is 4 times shorter.
template <typename S>
inline S gemm_scalar(int64_t kd, const S* a1, const S* a2, int64_t ak, const S* b1, const S* b2, int64_t ldb) {
  S acc[4] = {S(0), S(0), S(0), S(0)};
  int64_t k = 0;
  for (; k + 4 <= kd; k += 4)
    for (int q = 0; q < 4; ++q) {
      acc[q] += a1[(k + q) * ak] * b1[(k + q) * ldb];
      if (a2) acc[q] += a2[(k + q) * ak] * b2[(k + q) * ldb];
    }
  for (int q = 0; k < kd; ++k, ++q) {
    acc[q] += a1[k * ak] * b1[k * ldb];
    if (a2) acc[q] += a2[k * ak] * b2[k * ldb];
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// One column: c[m ldc] = init + sum_k A1[m + k ak] b1[k ldb] (+ A2 b2) for m < M, as vectors of L rows
// (the rows left over one by one).
template <typename S>
inline void gemm_column_by_rows(int64_t M, int64_t kd, const S* a1, const S* a2, int64_t ak, const S* b1,
                                const S* b2, int64_t ldb, S init, S* c, int64_t ldc) {
  using V = typename Vec<S>::type;
  constexpr int L = Vec<S>::kLanes;
  int64_t m = 0;
  for (; m + L <= M; m += L) {
    V acc = V{} + init;
    for (int64_t k = 0; k < kd; ++k) {
      acc += vload(a1 + m + k * ak) * b1[k * ldb];
      if (a2) acc += vload(a2 + m + k * ak) * b2[k * ldb];
    }
    for (int r = 0; r < L; ++r) c[(m + r) * ldc] = acc[r];
  }
  for (; m < M; ++m) {
    S acc = init;
    for (int64_t k = 0; k < kd; ++k) {
      acc += a1[m + k * ak] * b1[k * ldb];
      if (a2) acc += a2[m + k * ak] * b2[k * ldb];
    }
    c[m * ldc] = acc;
  }
}

// sum_k a1[k] b1[k] (+ a2[k] b2[k]), all contiguous: L partial sums (k mod L) added in a fixed order, then
// the terms left over.
template <typename S>
inline S gemm_dot(int64_t kd, const S* a1, const S* a2, const S* b1, const S* b2) {
  using V = typename Vec<S>::type;
  constexpr int L = Vec<S>::kLanes;
  V acc = V{};
  int64_t k = 0;
  for (; k + L <= kd; k += L) {
    acc += vload(a1 + k) * vload(b1 + k);
    if (a2) acc += vload(a2 + k) * vload(b2 + k);
  }
  S sum = 0;
  for (int r = 0; r < L; ++r) sum += acc[r];
  for (; k < kd; ++k) {
    sum += a1[k] * b1[k];
    if (a2) sum += a2[k] * b2[k];
  }
  return sum;
}

// C [M, n] (row-major, ldc = n) = init + sum_{k < kd} A1(m, k) B1[k, :] (+ A2(m, k) B2[k, :] when a2):
// A(m, k) = a[m am + k ak]; B1, B2 [kd, n] row-major; init [n] (added to every row) or null.
template <typename S>
void gemm(int64_t M, int64_t n, int64_t kd, const S* a1, const S* a2, int64_t am, int64_t ak, const S* b1,
          const S* b2, const S* init, S* c) {
  constexpr int L = Vec<S>::kLanes;
  int64_t j = 0;
  if (a2) {
    for (; j + 2 * L <= n; j += 2 * L) gemm_columns<S, 2, true>(M, kd, a1, a2, am, ak, b1, b2, n, init, c, n, j);
    for (; j + L <= n; j += L) gemm_columns<S, 1, true>(M, kd, a1, a2, am, ak, b1, b2, n, init, c, n, j);
  } else {
    for (; j + 2 * L <= n; j += 2 * L) gemm_columns<S, 2, false>(M, kd, a1, a2, am, ak, b1, b2, n, init, c, n, j);
    for (; j + L <= n; j += L) gemm_columns<S, 1, false>(M, kd, a1, a2, am, ak, b1, b2, n, init, c, n, j);
  }
  if (j < n && am == 1) {  // the last n mod L columns, A contiguous along m: vectors of L rows
    for (; j < n; ++j) gemm_column_by_rows(M, kd, a1, a2, ak, b1 + j, a2 ? b2 + j : nullptr, n, init ? init[j] : S(0),
                                           c + j, n);
  } else if (j < n && n == 1 && ak == 1) {  // one column, A and B contiguous along k: vectors of L terms
    for (int64_t m = 0; m < M; ++m)
      c[m] = (init ? init[0] : S(0)) + gemm_dot(kd, a1 + m * am, a2 ? a2 + m * am : nullptr, b1, b2);
    j = n;
  }
  for (; j < n; ++j)  // else one output at a time
    for (int64_t m = 0; m < M; ++m)
      c[m * n + j] = (init ? init[j] : S(0)) +
                     gemm_scalar(kd, a1 + m * am, a2 ? a2 + m * am : nullptr, ak, b1 + j, a2 ? b2 + j : nullptr, n);
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FASTMAML_MLP_SHUFFLE 1
// v[0..L) <- its transpose, v[q][r] = (old v[r])[q], by three (two for double) rounds of shuffles: u[r + c]
// holds columns c and c + 4 of rows r..r+3
inline void transpose_block(Vec<float>::type* v) {
  typedef Vec<float>::type V;
  V t[8], u[8];
  for (int r = 0; r < 8; r += 2) {
    t[r] = __builtin_shufflevector(v[r], v[r + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[r + 1] = __builtin_shufflevector(v[r], v[r + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int r = 0; r < 8; r += 4)
    for (int h = 0; h < 2; ++h) {
      u[r + 2 * h] = __builtin_shufflevector(t[r + h], t[r + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[r + 2 * h + 1] = __builtin_shufflevector(t[r + h], t[r + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int q = 0; q < 4; ++q) {
    v[q] = __builtin_shufflevector(u[q], u[q + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    v[q + 4] = __builtin_shufflevector(u[q], u[q + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

inline void transpose_block(Vec<double>::type* v) {
  typedef Vec<double>::type V;
  V t[4];
  for (int r = 0; r < 4; r += 2) {
    t[r] = __builtin_shufflevector(v[r], v[r + 1], 0, 4, 2, 6);
    t[r + 1] = __builtin_shufflevector(v[r], v[r + 1], 1, 5, 3, 7);
  }
  for (int h = 0; h < 2; ++h) {
    v[h] = __builtin_shufflevector(t[h], t[h + 2], 0, 1, 4, 5);
    v[h + 2] = __builtin_shufflevector(t[h], t[h + 2], 2, 3, 6, 7);
  }
}
#endif

// wt = every weight matrix of the flat parameters p, transposed (W_l^T [d_l, d_{l+1}], layer after layer):
// L x L blocks in vector registers where the compiler has vector shuffles, the edges one by one.
template <typename S>
inline void transpose_weights(const MlpShape& s, const S* p, S* wt) {
  for (int l = 0; l < s.layers; ++l) {
    const int64_t din = s.dims[l], dout = s.dims[l + 1];
    const S* W = p + s.w_off[l];
    int64_t o_end = 0, i_end = 0;  // the block-transposed part: rows [0, o_end) x columns [0, i_end)
#if defined(FASTMAML_MLP_SHUFFLE)
    constexpr int L = Vec<S>::kLanes;
    o_end = dout - dout % L;
    i_end = din - din % L;
    for (int64_t o = 0; o < o_end; o += L)
      for (int64_t i = 0; i < i_end; i += L) {
        typename Vec<S>::type v[L];
#pragma GCC unroll 8
        for (int r = 0; r < L; ++r) v[r] = vload(W + (o + r) * din + i);
        transpose_block(v);
#pragma GCC unroll 8
        for (int q = 0; q < L; ++q) vstore(wt + (i + q) * dout + o, v[q]);
      }
#endif
    for (int64_t i = 0; i < din; ++i)
      for (int64_t o = i < i_end ? o_end : 0; o < dout; ++o) wt[i * dout + o] = W[o * din + i];
    wt += din * dout;
  }
}

// Elements of the transposed weights (sum_l d_l d_{l+1}).
inline int64_t weight_elems(const MlpShape& s) {
  int64_t n = 0;
  for (int l = 0; l < s.layers; ++l) n += s.dims[l] * s.dims[l + 1];
  return n;
}

// What one pass at phi keeps for the Hessian-vector product at the same phi (N rows; layer l's block of
// acts, gz and gin starts at row-offset N (d_1 + .. + d_l)).
template <typename S>
struct PassTape {
  S* wt;    // [sum_l d_l d_{l+1}] phi's weights transposed
  S* acts;  // [N, d_1 + .. + d_L] each layer's output (after its activation; the last is the prediction)
  S* gz;    // same layout: the loss gradient w.r.t. each layer's pre-activation
  S* gin;   // same layout: w.r.t. each hidden layer's output (before the activation's derivative)
};

// One pass over N examples (x [N, d0], y [N, dL]) at phi (nn.Linear order) whose transposed weights are in
// t.wt: the forward into t.acts; returns the MSE loss. With grad: also the backward into t.gz and t.gin, and
// grad = grad_scale dL/dphi [P] (without: t.gz and t.gin are not touched).
template <typename S>
S cpu_pass(const MlpShape& s, const S* phi, const S* x, const S* y, int64_t N, const PassTape<S>& t, S* grad,
           S grad_scale) {
  const int L = s.layers;
  const S* a_in = x;
  const S* wt = t.wt;
  int64_t off = 0;  // d_1 + .. + d_l
  for (int l = 0; l < L; ++l) {
    const int64_t din = s.dims[l], dout = s.dims[l + 1];
    S* a_out = t.acts + N * off;
    gemm<S>(N, dout, din, a_in, nullptr, din, 1, wt, nullptr, phi + s.b_off[l], a_out);
    if (l < L - 1) {
      if (s.activation == kReLU) {
        for (int64_t i = 0; i < N * dout; ++i) a_out[i] = a_out[i] > S(0) ? a_out[i] : S(0);
      } else {
        for (int64_t i = 0; i < N * dout; ++i) a_out[i] = cpu_tanh(a_out[i]);
      }
    }
    wt += din * dout;
    a_in = a_out;
    off += dout;
  }
  const int64_t dL = s.dims[L], nout = N * dL;
  const S* out = a_in;
  S sum = 0;
  for (int64_t i = 0; i < nout; ++i) {
    const S d = out[i] - y[i];
    sum += d * d;
  }
  const S loss = sum / S(nout);
  if (!grad) return loss;
  S* gz = t.gz + N * (off - dL);
  const S scale = S(2) / S(nout) * grad_scale;
  for (int64_t i = 0; i < nout; ++i) gz[i] = scale * (out[i] - y[i]);
  for (int l = L - 1; l >= 0; --l) {
    const int64_t din = s.dims[l], dout = s.dims[l + 1];
    off -= dout;
    gz = t.gz + N * off;
    const S* a = l == 0 ? x : t.acts + N * (off - din);
    // dW [dout, din] = gz^T a; db = sum over rows of gz
    gemm<S>(dout, din, N, gz, nullptr, 1, dout, a, nullptr, nullptr, grad + s.w_off[l]);
    S* gb = grad + s.b_off[l];
    for (int64_t o = 0; o < dout; ++o) gb[o] = S(0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < dout; ++o) gb[o] += gz[n * dout + o];
    if (l == 0) break;
    // the gradient w.r.t. the layer's input, gin = gz W, then through the previous layer's activation
    S* gin = t.gin + N * (off - din);
    S* gprev = t.gz + N * (off - din);
    gemm<S>(N, din, dout, gz, nullptr, dout, 1, phi + s.w_off[l], nullptr, nullptr, gin);
    if (s.activation == kReLU) {
      for (int64_t i = 0; i < N * din; ++i) gprev[i] = a[i] > S(0) ? gin[i] : S(0);
    } else {
      for (int64_t i = 0; i < N * din; ++i) gprev[i] = gin[i] * (S(1) - a[i] * a[i]);
    }
  }
  return loss;
}

// Scratch of one Hessian-vector product pass: N rows.
template <typename S>
struct HvpScratch {
  S* tacts;  // [N, d_1 + .. + d_L] tangents of the activations
  S* tg0;    // [N, max width]
  S* tg1;    // [N, max width]
};

// hu = H u [P], the Hessian of the pass over (x, y) at phi (taped by `cpu_pass` with grad in t) along u
// (nn.Linear order) whose weights transposed are ut. Forward over reverse: tangents only, the primal
// values come from the tape.
template <typename S>
void cpu_hvp(const MlpShape& s, const S* phi, const S* u, const S* ut, const S* x, int64_t N, const PassTape<S>& t,
             const HvpScratch<S>& w, S* hu) {
  const int L = s.layers;
  const S* a_in = x;
  const S* ta_in = nullptr;  // the input's tangent is 0
  const S* wt = t.wt;
  const S* uwt = ut;
  int64_t off = 0;
  for (int l = 0; l < L; ++l) {
    const int64_t din = s.dims[l], dout = s.dims[l + 1];
    const S* a_out = t.acts + N * off;
    S* ta_out = w.tacts + N * off;
    // tz = ub + ta_in W^T + a_in U^T
    if (ta_in)
      gemm<S>(N, dout, din, ta_in, a_in, din, 1, wt, uwt, u + s.b_off[l], ta_out);
    else
      gemm<S>(N, dout, din, a_in, nullptr, din, 1, uwt, nullptr, u + s.b_off[l], ta_out);
    if (l < L - 1) {
      if (s.activation == kReLU) {
        for (int64_t i = 0; i < N * dout; ++i) ta_out[i] = a_out[i] > S(0) ? ta_out[i] : S(0);
      } else {
        for (int64_t i = 0; i < N * dout; ++i) ta_out[i] = (S(1) - a_out[i] * a_out[i]) * ta_out[i];
      }
    }
    wt += din * dout;
    uwt += din * dout;
    a_in = a_out;
    ta_in = ta_out;
    off += dout;
  }
  const int64_t dL = s.dims[L], nout = N * dL;
  const S scale = S(2) / S(nout);
  S* tgz = w.tg0;
  S* tgin = w.tg1;
  for (int64_t i = 0; i < nout; ++i) tgz[i] = scale * ta_in[i];
  for (int l = L - 1; l >= 0; --l) {
    const int64_t din = s.dims[l], dout = s.dims[l + 1];
    off -= dout;
    const S* gz = t.gz + N * off;
    const S* a = l == 0 ? x : t.acts + N * (off - din);
    const S* ta = l == 0 ? nullptr : w.tacts + N * (off - din);
    // hW = tgz^T a + gz^T ta; hb = sum over rows of tgz
    gemm<S>(dout, din, N, tgz, ta ? gz : nullptr, 1, dout, a, ta, nullptr, hu + s.w_off[l]);
    S* hb = hu + s.b_off[l];
    for (int64_t o = 0; o < dout; ++o) hb[o] = S(0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < dout; ++o) hb[o] += tgz[n * dout + o];
    if (l == 0) break;
    // tgin = tgz W + gz U, then the tangent of the activation's derivative
    gemm<S>(N, din, dout, tgz, gz, dout, 1, phi + s.w_off[l], u + s.w_off[l], nullptr, tgin);
    if (s.activation == kReLU) {
      for (int64_t i = 0; i < N * din; ++i) tgin[i] = a[i] > S(0) ? tgin[i] : S(0);
    } else {
      const S* gin = t.gin + N * (off - din);
      for (int64_t i = 0; i < N * din; ++i) tgin[i] = tgin[i] * (S(1) - a[i] * a[i]) - S(2) * gin[i] * a[i] * ta[i];
    }
    S* swap = tgz;
    tgz = tgin;
    tgin = swap;
  }
}

// Elements of one task's buffers for `cpu_task_meta_step` (K inner steps, at most n rows per pass).
inline int64_t cpu_task_elems(const MlpShape& s, int K, int64_t n) {
  const int64_t rows = n * s.act_elems_per_row;
  return (2 * int64_t(K) + 2) * s.params + (int64_t(K) + 2) * weight_elems(s) + (3 * int64_t(K) + 4) * rows +
         2 * n * s.max_width;
}

// One task's meta-step with its buffers carved from `work` [cpu_task_elems(s, K, max(ns, nq))]:
// writes v [P] (the task's meta-gradient / T) and, if dalpha, dalpha [K, P]. alpha [K, P].
template <typename S>
TaskLosses cpu_task_meta_step(const MlpShape& s, const S* theta, const S* sx, const S* sy, int64_t ns, const S* qx,
                              const S* qy, int64_t nq, const S* alpha, int K, bool second_order, bool need_before,
                              S inv_tasks, S* work, S* v, S* dalpha) {
  const int64_t P = s.params, Pw = weight_elems(s), n = ns > nq ? ns : nq, rows = n * s.act_elems_per_row;
  S* hu = work;  // [P] H u
  S* u = hu + P;
  S* phis = u + P;                   // [K, P]: phi_1 .. phi_K (phi_0 is theta)
  S* grads = phis + int64_t(K) * P;  // [K, P]
  S* wts = grads + int64_t(K) * P;   // [K + 1, Pw]: phi_0 .. phi_K transposed
  S* ut = wts + (int64_t(K) + 1) * Pw;
  S* tapes = ut + Pw;  // [K + 1, 3 rows]: each support pass's, then the query pass's
  HvpScratch<S> hs{tapes + (int64_t(K) + 1) * 3 * rows, nullptr, nullptr};
  hs.tg0 = hs.tacts + rows;
  hs.tg1 = hs.tg0 + n * s.max_width;
  auto tape = [&](int j) {
    S* base = tapes + int64_t(j) * 3 * rows;
    return PassTape<S>{wts + int64_t(j) * Pw, base, base + rows, base + 2 * rows};
  };
  auto phi = [&](int j) { return j == 0 ? theta : phis + int64_t(j - 1) * P; };
  TaskLosses out{0, 0, 0};
  for (int j = 0; j < K; ++j) {
    const PassTape<S> t = tape(j);
    transpose_weights(s, phi(j), t.wt);
    const S* g = grads + int64_t(j) * P;
    const S loss = cpu_pass(s, phi(j), sx, sy, ns, t, grads + int64_t(j) * P, S(1));
    if (j == 0) out.support_before = double(loss);
    const S* a = alpha + int64_t(j) * P;
    const S* now = phi(j);
    S* next = phis + int64_t(j) * P;
    for (int64_t p = 0; p < P; ++p) next[p] = now[p] - a[p] * g[p];
  }
  const PassTape<S> tq = tape(K);
  transpose_weights(s, phi(K), tq.wt);
  out.query_after = double(cpu_pass(s, phi(K), qx, qy, nq, tq, v, inv_tasks));
  // the losses at theta that no pass above computed (forward only, on the scratch of the reverse sweep)
  const PassTape<S> scratch{wts, hs.tacts, nullptr, nullptr};
  if (K == 0) {
    out.query_before = out.query_after;
    out.support_before = double(cpu_pass(s, theta, sx, sy, ns, scratch, static_cast<S*>(nullptr), S(1)));
  } else if (need_before) {
    out.query_before = double(cpu_pass(s, theta, qx, qy, nq, scratch, static_cast<S*>(nullptr), S(1)));
  }
  // the reverse sweep: before step j's HVP, dalpha_j = -g_j v and u = alpha_j v; after it, v -= H_j u. One pass
  // over the parameters does step j's update and step j-1's preparation.
  auto prepare = [&](int j, bool update) {
    const S* g = grads + int64_t(j) * P;
    const S* a = alpha + int64_t(j) * P;
    S* da = dalpha ? dalpha + int64_t(j) * P : nullptr;
    for (int64_t p = 0; p < P; ++p) {
      if (update) v[p] -= hu[p];
      if (da) da[p] = -g[p] * v[p];
      u[p] = a[p] * v[p];
    }
  };
  if (K > 0) prepare(K - 1, false);
  for (int j = K - 1; j >= 0 && second_order; --j) {
    transpose_weights(s, u, ut);
    cpu_hvp(s, phi(j), u, ut, sx, ns, tape(j), hs, hu);
    if (j > 0) {
      prepare(j - 1, true);
    } else {
      for (int64_t p = 0; p < P; ++p) v[p] -= hu[p];
    }
  }
  for (int j = K - 2; j >= 0 && !second_order; --j) prepare(j, false);  // first order: v stays
  return out;
}

}  // namespace FASTMAML_MLP_NS
