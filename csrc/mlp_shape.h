// Shapes of the whole-inner-loop MLP kernel, shared by the CPU op (mlp_cpu.h, every instruction-set
// variant) and the CUDA kernel (mlp_inner_loop.h), and the CUDA kernel's per-task buffers. Torch-free.
#pragma once
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
// Per-task elements of the tape and the [P] working vectors: phis, grads [K, P]; phi, u, vec [P].
FM_HD inline int64_t tape_elems(const MlpShape& s, int K) { return (2 * int64_t(K) + 3) * s.params; }

}  // namespace fastmaml_mlp
