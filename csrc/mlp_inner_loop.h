// The whole MAML inner loop and its exact reverse sweep for one task of a small MLP (Linear layers
// with ReLU or Tanh between them, MSE loss), as the CUDA kernel runs it: one thread block per task
// (`BlockExec` in cuda/mlp_kernel.cu). An Exec gives tid(), nthreads() and sync(). The CPU op runs the
// same math organised for one core (mlp_cpu.h). Torch-free: compiled by nvcc.
//
// Parameters are one flat vector in nn.Linear order (W0 [d1, d0], b0 [d1], W1 [d2, d1], ...).
//   forward:  phi_0 = theta; g_j = grad L_s(phi_j); phi_{j+1} = phi_j - alpha_j * g_j   (j < K)
//   reverse:  v = grad L_q(phi_K) / T; for j = K-1..0: dalpha_j = -g_j * v; v -= H_j (alpha_j * v)
// Hessian-vector products are forward-over-reverse (Pearlmutter): a forward pass carrying the
// tangent of the activations, then a backward pass carrying the tangent of the gradients.
#pragma once
#include <cmath>
#include <cstdint>

#include "mlp_shape.h"

namespace fastmaml_mlp {

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
  
    if (l == 0) break;
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
  
    ex.sync();
    S* t0 = gz; gz = ga; ga = t0;
    S* t1 = tgz; tgz = tga; tga = t1;
  }
  ex.sync();
  return loss;
}

// One task's meta-step; the query loss at theta only with need_before (with K = 0 it is the query loss
// after). All threads of `ex` call it.
template <typename S, typename Exec>
FM_HD TaskLosses mlp_task_meta_step(const Exec& ex, const MlpShape& s, const S* theta, const S* sx, const S* sy,
                                    int64_t ns, const S* qx, const S* qy, int64_t nq, const S* alpha, int K,
                                    bool second_order, bool need_before, S inv_tasks,
                                    const TaskBuffers<S>& b) {
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
  if (K == 0)
    out.query_before = out.query_after;
  else if (need_before)
    out.query_before = double(mlp_pass<S>(ex, s, theta, static_cast<const S*>(nullptr), qx, qy, nq,
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

}  // namespace fastmaml_mlp
