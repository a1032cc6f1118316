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
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__
#else
#define FM_HD
#endif

namespace fastmaml_mlp {

constexpr int kMaxLayers = 8;
enum Activation : int { kReLU = 0, kTanh = 1 };

struct MlpShape {
  int layers = 0;                     // L
  int64_t dims[kMaxLayers + 1] = {};  // d0 .. dL
  int64_t w_off[kMaxLayers] = {};     // offset of W_l in the flat parameters
  int64_t b_off[kMaxLayers] = {};     // offset of b_l
  int64_t params = 0;                 // P
  int64_t max_width = 0;              // max(d1 .. dL)
  int64_t act_elems_per_row = 0;      // d1 + ... + dL
  int activation = kReLU;
};

// Fills offsets from the sizes; returns false if the shape is not supported.
inline bool make_shape(const int64_t* sizes, int count, int activation, MlpShape* s) {
  if (count < 2 || count - 1 > kMaxLayers) return false;
  s->layers = count - 1;
  s->activation = activation;
  int64_t off = 0;
  s->max_width = 0;
  s->act_elems_per_row = 0;
  for (int l = 0; l <= s->layers; ++l) {
    if (sizes[l] < 1) return false;
    s->dims[l] = sizes[l];
  }
  for (int l = 0; l < s->layers; ++l) {
    s->w_off[l] = off;
    off += s->dims[l + 1] * s->dims[l];
    s->b_off[l] = off;
    off += s->dims[l + 1];
    s->max_width = s->dims[l + 1] > s->max_width ? s->dims[l + 1] : s->max_width;
    s->act_elems_per_row += s->dims[l + 1];
  }
  s->params = off;
  return true;
}

// Scratch of one task for one loss/gradient/HVP pass, N rows at most.
template <typename S>
struct PassScratch {
  S* acts;    // [N, d1 + .. + dL]: post-activation of every layer (the last is the output)
  S* tacts;   // same layout: their tangents
  S* gz;      // [N, max_width] gradient w.r.t. the current layer's pre-activation
  S* tgz;     // its tangent
  S* ga;      // [N, max_width] gradient w.r.t. the layer's input
  S* tga;     // its tangent
  S* scalar;  // [1] the loss, shared between threads
};

template <typename S>
FM_HD inline int64_t pass_scratch_elems(const MlpShape& s, int64_t n) {
  return 2 * n * s.act_elems_per_row + 4 * n * s.max_width + 1;
}

template <typename S>
FM_HD inline PassScratch<S> carve_pass_scratch(const MlpShape& s, int64_t n, S* base) {
  PassScratch<S> w;
  w.acts = base;
  w.tacts = w.acts + n * s.act_elems_per_row;
  w.gz = w.tacts + n * s.act_elems_per_row;
  w.tgz = w.gz + n * s.max_width;
  w.ga = w.tgz + n * s.max_width;
  w.tga = w.ga + n * s.max_width;
  w.scalar = w.tga + n * s.max_width;
  return w;
}

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

// Buffers of one task for `mlp_task_meta_step`. phi, u, vec: [P] working vectors (shared memory
// on CUDA when they fit); phis, grads: [K, P] the tape; v: [P] the task's meta-gradient (output);
// dalpha: [K, P] the task's alpha-gradient (output, may be null).
template <typename S>
struct TaskBuffers {
  S* phi;
  S* u;
  S* vec;
  S* phis;
  S* grads;
  S* v;
  S* dalpha;
  PassScratch<S> scratch;
};

struct TaskLosses {
  double support_before, query_before, query_after;
};

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

}  // namespace fastmaml_mlp

namespace fastmaml_mlp {

// Per-task elements of the tape and the [P] working vectors: phis, grads [K, P]; phi, u, vec [P].
FM_HD inline int64_t tape_elems(const MlpShape& s, int K) { return (2 * int64_t(K) + 3) * s.params; }

}  // namespace fastmaml_mlp
