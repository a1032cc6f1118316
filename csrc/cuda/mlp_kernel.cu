// The persistent whole-inner-loop MLP kernel: one thread block per task (CUDA headers only; the
// torch-facing registration is mlp_meta_step_cuda.cpp). The math is mlp_inner_loop.h, shared with
// the CPU op; here its loops are spread over the block's threads with __syncthreads between phases.
#include <cuda_runtime.h>

#include "../mlp_inner_loop.h"
#include "mlp_kernel.h"

namespace fastmaml_cuda {
namespace {

constexpr int kThreads = 256;

struct BlockExec {
  __device__ int64_t tid() const { return threadIdx.x; }
  __device__ int64_t nthreads() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

template <typename S>
__global__ void __launch_bounds__(kThreads) mlp_meta_step_kernel(
    fastmaml_mlp::MlpShape shape, const S* __restrict__ theta, const S* __restrict__ sx, const S* __restrict__ sy,
    int64_t ns, const S* __restrict__ qx, const S* __restrict__ qy, int64_t nq, const S* __restrict__ alpha, int K,
    bool second_order, bool need_before, int64_t T, S* __restrict__ task_grads, S* __restrict__ task_dalpha,
    S* __restrict__ losses, S* __restrict__ tape, S* __restrict__ scratch, bool weights_in_shared) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t t = blockIdx.x, P = shape.params;
  const int64_t n_max = ns > nq ? ns : nq;
  const int64_t d0 = shape.dims[0], dL = shape.dims[shape.layers];
  S* my_tape = tape + t * fastmaml_mlp::tape_elems(shape, K);
  fastmaml_mlp::TaskBuffers<S> b;
  b.phis = my_tape;
  b.grads = b.phis + int64_t(K) * P;
  S* vectors = weights_in_shared ? reinterpret_cast<S*>(smem_raw) : b.grads + int64_t(K) * P;
  b.phi = vectors;
  b.u = b.phi + P;
  b.vec = b.u + P;
  b.v = task_grads + t * P;
  b.dalpha = task_dalpha ? task_dalpha + t * int64_t(K) * P : nullptr;
  b.scratch = fastmaml_mlp::carve_pass_scratch<S>(shape, n_max,
                                                  scratch + t * fastmaml_mlp::pass_scratch_elems<S>(shape, n_max));
  const fastmaml_mlp::TaskLosses l = fastmaml_mlp::mlp_task_meta_step<S>(
      BlockExec{}, shape, theta, sx + t * ns * d0, sy + t * ns * dL, ns, qx + t * nq * d0, qy + t * nq * dL, nq,
      alpha, K, second_order, need_before, S(1) / S(T), b);
  if (threadIdx.x == 0) {
    losses[t] = S(l.query_after);
    losses[T + t] = S(l.query_before);
    losses[2 * T + t] = S(l.support_before);
  }
}

template <typename S>
cudaError_t launch(const fastmaml_mlp::MlpShape& shape, const void* theta, const void* sx, const void* sy,
                   int64_t ns, const void* qx, const void* qy, int64_t nq, const void* alpha, int K,
                   bool second_order, bool need_before, int64_t T, void* task_grads, void* task_dalpha, void* losses,
                   void* tape,
                   void* scratch, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  int device = 0, max_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const size_t shared_bytes = 3 * static_cast<size_t>(shape.params) * sizeof(S);
  const bool in_shared = shared_bytes <= static_cast<size_t>(max_optin);
  if (in_shared && shared_bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(mlp_meta_step_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  mlp_meta_step_kernel<S><<<static_cast<unsigned>(T), kThreads, in_shared ? shared_bytes : 0, stream>>>(
      shape, static_cast<const S*>(theta), static_cast<const S*>(sx), static_cast<const S*>(sy), ns,
      static_cast<const S*>(qx), static_cast<const S*>(qy), nq, static_cast<const S*>(alpha), K, second_order,
      need_before, T,
      static_cast<S*>(task_grads), static_cast<S*>(task_dalpha), static_cast<S*>(losses), static_cast<S*>(tape),
      static_cast<S*>(scratch), in_shared);
  return cudaGetLastError();
}

}  // namespace

cudaError_t mlp_meta_step(bool double_precision, const fastmaml_mlp::MlpShape& shape, const void* theta,
                          const void* sx, const void* sy, int64_t ns, const void* qx, const void* qy, int64_t nq,
                          const void* alpha, int K, bool second_order, bool need_before, int64_t T, void* task_grads,
                          void* task_dalpha, void* losses, void* tape, void* scratch, cudaStream_t stream) {
  if (double_precision)
    return launch<double>(shape, theta, sx, sy, ns, qx, qy, nq, alpha, K, second_order, need_before, T, task_grads,
                          task_dalpha, losses, tape, scratch, stream);
  return launch<float>(shape, theta, sx, sy, ns, qx, qy, nq, alpha, K, second_order, need_before, T, task_grads,
                       task_dalpha, losses, tape, scratch, stream);
}

}  // namespace fastmaml_cuda
