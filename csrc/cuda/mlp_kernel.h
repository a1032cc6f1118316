// Torch-free launcher of the persistent whole-inner-loop MLP kernel (csrc/cuda/mlp_kernel.cu).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "../mlp_shape.h"

namespace fastmaml_cuda {

// One thread block per task runs all K inner steps, the query loss and the whole reverse HVP sweep;
// the block's weights (phi, u = alpha * v, and the gradient/HVP vector) live in shared memory when
// 3 P elements fit, else in `tape`. double_precision: float64 buffers, else float32.
// theta [P]; sx [T, ns, d0]; sy [T, ns, dL]; qx [T, nq, d0]; qy [T, nq, dL]; alpha [K, P];
// task_grads [T, P] (out: each task's meta-gradient / T); task_dalpha [T, K, P] (out, or null);
// losses [3, T] (out: query after, query before (only with need_before or K = 0), support before);
// tape [T, tape_elems];
// scratch [T, pass_scratch_elems(max(ns, nq))].
cudaError_t mlp_meta_step(bool double_precision, const fastmaml_mlp::MlpShape& shape, const void* theta,
                          const void* sx, const void* sy, int64_t ns, const void* qx, const void* qy, int64_t nq,
                          const void* alpha, int K, bool second_order, bool need_before, int64_t T, void* task_grads,
                          void* task_dalpha, void* losses, void* tape, void* scratch, cudaStream_t stream);

}  // namespace fastmaml_cuda
