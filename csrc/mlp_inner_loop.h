// The whole MAML inner loop and its exact reverse sweep for one task of a small MLP (Linear layers
// with ReLU or Tanh between them, MSE loss), written once for the C++ CPU op (one task per
// at::parallel_for item, `SerialExec`) and the CUDA kernel (one thread block per task, `BlockExec`).
// An Exec gives tid(), nthreads(), sync() and kSerial (true: one thread, row-wise loop forms).
// Torch-free: compiled by the host compiler and by nvcc.
//
// Parameters are one flat vector in nn.Linear order (W0 [d1, d0], b0 [d1], W1 [d2, d1], ...).
//   forward:  phi_0 = theta; g_j = grad L_s(phi_j); phi_{j+1} = phi_j - alpha_j * g_j   (j < K)
//   reverse:  v = grad L_q(phi_K) / T; for j = K-1..0: dalpha_j = -g_j * v; v -= H_j (alpha_j * v)
// Hessian-vector products are forward-over-reverse (Pearlmutter): a forward pass carrying the
// tangent of the activations, then a backward pass carrying the tangent of the gradients.
//
// The compute templates live in namespace FASTMAML_MLP_NS (default fastmaml_mlp): the CPU op compiles
// them a second time for AVX2 + FMA in its own namespace (mlp_meta_step_avx2.cpp), so that the linker
// can never pick an AVX2 copy of an inline function for the baseline path.
#pragma once
#include <cmath>
#include <cstdint>

#include "mlp_shape.h"

#ifndef FASTMAML_MLP_NS
#define FASTMAML_MLP_NS fastmaml_mlp
#endif

namespace FASTMAML_MLP_NS {

using namespace fastmaml_mlp;

// The CPU Exec: one thread runs a task (tasks are spread over threads by at::parallel_for).
struct SerialExec {
  static constexpr bool kSerial = true;
  int64_t tid() const { return 0; }
  int64_t nthreads() const { return 1; }
  void sync() const {}
};

template <typename S> FM_HD inline S fm_tanh(S x);
template <> FM_HD inline float fm_tanh<float>(float x) { return ::tanhf(x); }
template <> FM_HD inline double fm_tanh<double>(double x) { return ::tanh(x); }

// Activation derivative applied to the input gradient of layer l (in place, one element):
// ReLU passes where a > 0; Tanh multiplies by 1 - a^2, whose tangent adds -2 a ta g.
template <typename S>
FM_HD inline void through_activation(int activation, bool tangent, S av, S tav, S g, S tg, S* ga, S* tga) {
  if (activation == kReLU) {
    const bool on = av > S(0);
    *ga = on ? g : S(0);
    *tga = on ? tg : S(0);
  } else {
    const S d = S(1) - av * av;
    *ga = g * d;
    *tga = tangent ? tg * d - S(2) * g * av * tav : S(0);
  }
}

// CPU (one thread per task) forms of the two backward loops of `mlp_pass`: the same sums in the
// same order (over n, resp. o, ascending), as row updates the compiler vectorizes.
template <typename S>
inline void serial_weight_grads(const MlpShape& s, int l, int64_t N, const S* gz, const S* tgz, const S* a,
                                const S* ta, bool tangent, S* grad, S* hu) {
  const int64_t din = s.dims[l], dout = s.dims[l + 1];
  S* gW = grad ? grad + s.w_off[l] : nullptr;
  S* gb = grad ? grad + s.b_off[l] : nullptr;
  S* hW = hu ? hu + s.w_off[l] : nullptr;
  S* hb = hu ? hu + s.b_off[l] : nullptr;
  for (int64_t k = 0; k < dout * din; ++k) {
    if (gW) gW[k] = S(0);
    if (hW) hW[k] = S(0);
  }
  for (int64_t o = 0; o < dout; ++o) {
    if (gb) gb[o] = S(0);
    if (hb) hb[o] = S(0);
  }
  for (int64_t n = 0; n < N; ++n) {
    const S* arow = a + n * din;
    const S* tarow = ta ? ta + n * din : nullptr;
    for (int64_t o = 0; o < dout; ++o) {
      const S g = gz[n * dout + o];
      if (gW) {
        S* row = gW + o * din;
        for (int64_t i = 0; i < din; ++i) row[i] += g * arow[i];
        gb[o] += g;
      }
      if (hW && tangent) {
        const S tg = tgz[n * dout + o];
        S* row = hW + o * din;
        if (tarow) {
          for (int64_t i = 0; i < din; ++i) row[i] = (row[i] + tg * arow[i]) + g * tarow[i];
        } else {
          for (int64_t i = 0; i < din; ++i) row[i] += tg * arow[i];
        }
        hb[o] += tg;
      }
    }
  }
}

// Dot product with 8 independent partial sums (a fixed order the compiler vectorizes without
// reassociating one running sum, i.e. without -ffast-math).
template <typename S>
inline S serial_dot(const S* a, const S* b, int64_t n) {
  constexpr int kLanes = 8;
  S acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  S tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail;
}

// CPU form of one layer's forward with tangent: z = b + W a, tz = ub + U a + W ta per row, then the
// activation (none on the last layer).
template <typename S>
inline void serial_forward(const MlpShape& s, int l, int64_t N, const S* a_in, const S* ta_in, const S* W,
                           const S* b, const S* U, const S* ub, bool last, S* a_out, S* ta_out) {
  const int64_t din = s.dims[l], dout = s.dims[l + 1];
  for (int64_t n = 0; n < N; ++n) {
    const S* arow = a_in + n * din;
    const S* tarow = ta_in ? ta_in + n * din : nullptr;
    S* zrow = a_out + n * dout;
    S* tzrow = ta_out + n * dout;
    for (int64_t o = 0; o < dout; ++o) {
      const S* wrow = W + o * din;
      zrow[o] = b[o] + serial_dot(arow, wrow, din);
      if (U) tzrow[o] = ub[o] + serial_dot(arow, U + o * din, din) + (tarow ? serial_dot(tarow, wrow, din) : S(0));
    }
    if (last) {
      if (!U)
        for (int64_t o = 0; o < dout; ++o) tzrow[o] = S(0);
      continue;
    }
    for (int64_t o = 0; o < dout; ++o) {
      const S z = zrow[o], tz = U ? tzrow[o] : S(0);
      if (s.activation == kReLU) {
        zrow[o] = z > S(0) ? z : S(0);
        tzrow[o] = z > S(0) ? tz : S(0);
      } else {
        const S act = fm_tanh(z);
        zrow[o] = act;
        tzrow[o] = (S(1) - act * act) * tz;
      }
    }
  }
}

template <typename S>
inline void serial_input_grads(const MlpShape& s, int l, int64_t N, const S* gz, const S* tgz, const S* a,
                               const S* ta, const S* W, const S* U, bool tangent, S* ga, S* tga) {
  const int64_t din = s.dims[l], dout = s.dims[l + 1];
  for (int64_t n = 0; n < N; ++n) {
    S* grow = ga + n * din;
    S* tgrow = tga + n * din;
    for (int64_t i = 0; i < din; ++i) grow[i] = tgrow[i] = S(0);
    for (int64_t o = 0; o < dout; ++o) {
      const S g = gz[n * dout + o];
      const S* wrow = W + o * din;
      for (int64_t i = 0; i < din; ++i) grow[i] += g * wrow[i];
      if (tangent) {
        const S tg = tgz[n * dout + o];
        const S* urow = U + o * din;
        for (int64_t i = 0; i < din; ++i) tgrow[i] += tg * wrow[i] + g * urow[i];
      }
    }
    for (int64_t i = 0; i < din; ++i) {
      const int64_t idx = n * din + i;
      through_activation(s.activation, tangent, a[idx], tangent ? ta[idx] : S(0), grow[i], tgrow[i], &ga[idx],
                         &tga[idx]);
    }
  }
}

// One pass over a task's N examples at weights phi [P]:
//   returns the MSE loss; if grad: grad = dL/dphi [P]; if u: hu = H u [P] (u: tangent of phi).
// x [N, d0], y [N, dL]. All threads of `ex` call it; results are visible to all on return.
template <typename S, typename Exec>
FM_HD S mlp_pass(const Exec& ex, const MlpShape& s, const S* phi, const S* u, const S* x, const S* y,
                 int64_t N, S* grad, S* hu, const PassScratch<S>& w) {
  const int L = s.layers;
  const bool tangent = u != nullptr;
  const bool need_backward = grad != nullptr || hu != nullptr;
  const int64_t tid = ex.tid(), nth = ex.nthreads();
  // ---- forward (with tangent) ----
  const S* a_in = x;
  const S* ta_in = nullptr;  // tangent of the input is 0
  int64_t act_off = 0;
  for (int l = 0; l < L; ++l) {
    const int64_t din = s.dims[l], dout = s.dims[l + 1];
    const S* W = phi + s.w_off[l];
    const S* b = phi + s.b_off[l];
    const S* U = tangent ? u + s.w_off[l] : nullptr;
    const S* ub = tangent ? u + s.b_off[l] : nullptr;
    S* a_out = w.acts + N * act_off;
    S* ta_out = w.tacts + N * act_off;
    const bool last = l == L - 1;
    if constexpr (Exec::kSerial) {
      serial_forward(s, l, N, a_in, ta_in, W, b, U, ub, last, a_out, ta_out);
    } else {
      for (int64_t idx = tid; idx < N * dout; idx += nth) {
        const int64_t n = idx / dout, o = idx - n * dout;
        const S* arow = a_in + n * din;
        const S* wrow = W + o * din;
        S z = b[o];
        for (int64_t i = 0; i < din; ++i) z += arow[i] * wrow[i];
        S tz = 0;
        if (tangent) {
          const S* urow = U + o * din;
          tz = ub[o];
          for (int64_t i = 0; i < din; ++i) tz += arow[i] * urow[i];
          if (ta_in) {
            const S* tarow = ta_in + n * din;
            for (int64_t i = 0; i < din; ++i) tz += tarow[i] * wrow[i];
          }
        }
        if (last) {
          a_out[idx] = z;
          ta_out[idx] = tz;
        } else if (s.activation == kReLU) {
          const bool on = z > S(0);
          a_out[idx] = on ? z : S(0);
          ta_out[idx] = on ? tz : S(0);
        } else {
          const S a = fm_tanh(z);
          a_out[idx] = a;
          ta_out[idx] = (S(1) - a * a) * tz;
        }
      }
    }
    ex.sync();
    a_in = a_out;
    ta_in = tangent ? ta_out : nullptr;
    act_off += dout;
  }
  // ---- loss and output gradient ----
  const int64_t dL = s.dims[L];
  const S* out = a_in;
  const S* tout = ta_in;
  const S scale = S(2) / S(N * dL);
  if (tid == 0) {
    S sum = 0;
    for (int64_t i = 0; i < N * dL; ++i) {
      const S d = out[i] - y[i];
      sum += d * d;
    }
    w.scalar[0] = sum / S(N * dL);
  }
  if (need_backward) {
    for (int64_t i = tid; i < N * dL; i += nth) {
      w.gz[i] = scale * (out[i] - y[i]);
      w.tgz[i] = tangent ? scale * tout[i] : S(0);
    }
  }
  ex.sync();
  const S loss = w.scalar[0];
  if (!need_backward) return loss;
  // ---- backward (with tangent) ----
  S* gz = w.gz;
  S* tgz = w.tgz;
  S* ga = w.ga;
  S* tga = w.tga;
  for (int l = L - 1; l >= 0; --l) {
    const int64_t din = s.dims[l], dout = s.dims[l + 1];
    act_off -= dout;
    const S* a = l == 0 ? x : w.acts + N * (act_off - din);
    const S* ta = l == 0 ? nullptr : w.tacts + N * (act_off - din);
    const S* W = phi + s.w_off[l];
    const S* U = tangent ? u + s.w_off[l] : nullptr;
    if constexpr (Exec::kSerial) {
      serial_weight_grads(s, l, N, gz, tgz, a, ta, tangent, grad, hu);
    } else {
      // dW[o, i] = sum_n gz[n, o] a[n, i];  tangent: sum_n tgz[n, o] a[n, i] + gz[n, o] ta[n, i]
      for (int64_t idx = tid; idx < dout * din + dout; idx += nth) {
        if (idx < dout * din) {
          const int64_t o = idx / din, i = idx - o * din;
          S gsum = 0, hsum = 0;
          for (int64_t n = 0; n < N; ++n) {
            const S g_no = gz[n * dout + o];
            gsum += g_no * a[n * din + i];
            if (tangent) {
              hsum += tgz[n * dout + o] * a[n * din + i];
              if (ta) hsum += g_no * ta[n * din + i];
            }
          }
          if (grad) grad[s.w_off[l] + idx] = gsum;
          if (hu) hu[s.w_off[l] + idx] = hsum;
        } else {
          const int64_t o = idx - dout * din;
          S gsum = 0, hsum = 0;
          for (int64_t n = 0; n < N; ++n) {
            gsum += gz[n * dout + o];
            if (tangent) hsum += tgz[n * dout + o];
          }
          if (grad) grad[s.b_off[l] + o] = gsum;
          if (hu) hu[s.b_off[l] + o] = hsum;
        }
      }
    }
    if (l == 0) break;
    if constexpr (Exec::kSerial) {
      serial_input_grads(s, l, N, gz, tgz, a, ta, W, U, tangent, ga, tga);
    } else {
      // ga[n, i] = sum_o gz[n, o] W[o, i];  tangent: sum_o tgz W + gz U; then through the activation
      for (int64_t idx = tid; idx < N * din; idx += nth) {
        const int64_t n = idx / din, i = idx - n * din;
        S g = 0, tg = 0;
        for (int64_t o = 0; o < dout; ++o) {
          const S g_no = gz[n * dout + o];
          g += g_no * W[o * din + i];
          if (tangent) tg += tgz[n * dout + o] * W[o * din + i] + g_no * U[o * din + i];
        }
        through_activation(s.activation, tangent, a[idx], tangent ? ta[idx] : S(0), g, tg, &ga[idx], &tga[idx]);
      }
    }
    ex.sync();
    S* t0 = gz; gz = ga; ga = t0;
    S* t1 = tgz; tgz = tga; tga = t1;
  }
  ex.sync();
  return loss;
}
template <typename S, typename Exec>
FM_HD TaskLosses mlp_task_meta_step(const Exec& ex, const MlpShape& s, const S* theta, const S* sx, const S* sy,
                                    int64_t ns, const S* qx, const S* qy, int64_t nq, const S* alpha, int K,
                                    bool second_order, S inv_tasks, const TaskBuffers<S>& b) {
  const int64_t P = s.params, tid = ex.tid(), nth = ex.nthreads();
  TaskLosses out{0, 0, 0};
  for (int64_t p = tid; p < P; p += nth) b.phi[p] = theta[p];
  ex.sync();
  for (int j = 0; j < K; ++j) {
    const S loss = mlp_pass<S>(ex, s, b.phi, static_cast<const S*>(nullptr), sx, sy, ns, b.vec,
                               static_cast<S*>(nullptr), b.scratch);
    if (j == 0) out.support_before = double(loss);
    const S* a = alpha + int64_t(j) * P;
    S* phis_j = b.phis + int64_t(j) * P;
    S* grads_j = b.grads + int64_t(j) * P;
    for (int64_t p = tid; p < P; p += nth) {
      phis_j[p] = b.phi[p];
      grads_j[p] = b.vec[p];
      b.phi[p] -= a[p] * b.vec[p];
    }
    ex.sync();
  }
  out.query_after = double(mlp_pass<S>(ex, s, b.phi, static_cast<const S*>(nullptr), qx, qy, nq, b.vec,
                                       static_cast<S*>(nullptr), b.scratch));
  for (int64_t p = tid; p < P; p += nth) b.v[p] = b.vec[p] * inv_tasks;
  ex.sync();
  out.query_before = K == 0 ? out.query_after
                            : double(mlp_pass<S>(ex, s, theta, static_cast<const S*>(nullptr), qx, qy, nq,
                                                 static_cast<S*>(nullptr), static_cast<S*>(nullptr), b.scratch));
  if (K == 0) out.support_before = double(mlp_pass<S>(ex, s, theta, static_cast<const S*>(nullptr), sx, sy, ns,
                                                      static_cast<S*>(nullptr), static_cast<S*>(nullptr),
                                                      b.scratch));
  for (int j = K - 1; j >= 0; --j) {
    const S* a = alpha + int64_t(j) * P;
    const S* phis_j = b.phis + int64_t(j) * P;
    const S* grads_j = b.grads + int64_t(j) * P;
    for (int64_t p = tid; p < P; p += nth) {
      if (b.dalpha) b.dalpha[int64_t(j) * P + p] = -grads_j[p] * b.v[p];
      if (second_order) {
        b.phi[p] = phis_j[p];
        b.u[p] = a[p] * b.v[p];
      }
    }
    ex.sync();
    if (!second_order) continue;
    mlp_pass<S>(ex, s, b.phi, b.u, sx, sy, ns, static_cast<S*>(nullptr), b.vec, b.scratch);
    for (int64_t p = tid; p < P; p += nth) b.v[p] -= b.vec[p];
    ex.sync();
  }
  return out;
}

}  // namespace FASTMAML_MLP_NS
