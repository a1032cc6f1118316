// CUDA kernels of the step ops over the flat task-batched buffers [T, P] (CUDA headers only: this
// file compiles with plain nvcc, the torch-facing registration is step_ops_cuda.cpp).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "step_kernels.h"

namespace fastmaml_cuda {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Acc { using type = T; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type load(const T* p) { return *p; }
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T> __device__ __forceinline__ void store(T* p, typename Acc<T>::type x) { *p = x; }
template <> __device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

template <typename T>
__global__ void inner_update_kernel(const T* __restrict__ phi, int64_t rs_phi, const T* __restrict__ g,
                                    int64_t rs_g, const T* __restrict__ alpha, bool per_param,
                                    T* __restrict__ out, int64_t T_, int64_t P) {
  using A = typename Acc<T>::type;
  const int64_t n = T_ * P;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / P, p = i - t * P;
    const A a = load(alpha + (per_param ? p : 0));
    store(out + i, load(phi + t * rs_phi + p) - a * load(g + t * rs_g + p));
  }
}

// Block-wide sum in a fixed tree order (deterministic). All threads must call it.
template <typename A>
__device__ A block_sum(A x, A* shared) {
  shared[threadIdx.x] = x;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  A r = shared[0];
  __syncthreads();
  return r;
}

// One thread per parameter p, looping over tasks in order.
template <typename T>
__global__ void adjoint_kernel(const T* __restrict__ v, int64_t rs_v, const T* __restrict__ hu, int64_t rs_hu,
                               const T* __restrict__ g, int64_t rs_g, bool per_param, T* __restrict__ out,
                               T* __restrict__ d_alpha, typename Acc<T>::type* __restrict__ partial,
                               int64_t T_, int64_t P) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads];
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  A acc = 0;
  if (p < P) {
    for (int64_t t = 0; t < T_; ++t) {
      const A vt = load(v + t * rs_v + p);
      if (out) store(out + t * P + p, vt - load(hu + t * rs_hu + p));
      if (d_alpha) acc += load(g + t * rs_g + p) * vt;
    }
    if (d_alpha && per_param) store(d_alpha + p, -acc);
  }
  if (d_alpha && !per_param) {
    const A s = block_sum(acc, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
  }
}

template <typename T>
__global__ void finish_scalar_kernel(const typename Acc<T>::type* __restrict__ partial, int64_t n,
                                     T* __restrict__ d_alpha) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads];
  A acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  const A s = block_sum(acc, shared);
  if (threadIdx.x == 0) store(d_alpha, -s);
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename T>
cudaError_t inner_update_t(const void* phi, int64_t rs_phi, const void* g, int64_t rs_g, const void* alpha,
                           bool per_param, void* out, int64_t T_, int64_t P, cudaStream_t stream) {
  if (T_ * P == 0) return cudaSuccess;
  inner_update_kernel<T><<<grid_for(T_ * P), kThreads, 0, stream>>>(
      static_cast<const T*>(phi), rs_phi, static_cast<const T*>(g), rs_g, static_cast<const T*>(alpha),
      per_param, static_cast<T*>(out), T_, P);
  return cudaGetLastError();
}

template <typename T>
cudaError_t adjoint_update_t(const void* v, int64_t rs_v, const void* hu, int64_t rs_hu, const void* g,
                             int64_t rs_g, bool per_param, void* out, void* d_alpha, void* workspace,
                             int64_t T_, int64_t P, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (P == 0) return cudaSuccess;
  const int64_t blocks = (P + kThreads - 1) / kThreads;
  adjoint_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(v), rs_v, static_cast<const T*>(hu), rs_hu, static_cast<const T*>(g), rs_g,
      per_param, static_cast<T*>(out), static_cast<T*>(d_alpha), static_cast<A*>(workspace), T_, P);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !d_alpha || per_param) return err;
  finish_scalar_kernel<T><<<1, kThreads, 0, stream>>>(static_cast<const A*>(workspace), blocks,
                                                      static_cast<T*>(d_alpha));
  return cudaGetLastError();
}

}  // namespace

cudaError_t inner_update(DType dtype, const void* phi, int64_t rs_phi, const void* g, int64_t rs_g,
                         const void* alpha, bool per_param, void* out, int64_t T, int64_t P,
                         cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return inner_update_t<float>(phi, rs_phi, g, rs_g, alpha, per_param, out, T, P, stream);
    case DType::kFloat64: return inner_update_t<double>(phi, rs_phi, g, rs_g, alpha, per_param, out, T, P, stream);
    case DType::kBFloat16:
      return inner_update_t<__nv_bfloat16>(phi, rs_phi, g, rs_g, alpha, per_param, out, T, P, stream);
  }
  return cudaErrorInvalidValue;
}

size_t adjoint_workspace_bytes(DType dtype, int64_t P) {
  const size_t blocks = static_cast<size_t>((P + kThreads - 1) / kThreads);
  return blocks * (dtype == DType::kFloat64 ? sizeof(double) : sizeof(float));
}

cudaError_t adjoint_update(DType dtype, const void* v, int64_t rs_v, const void* hu, int64_t rs_hu,
                           const void* g, int64_t rs_g, bool per_param, void* out, void* d_alpha,
                           void* workspace, int64_t T, int64_t P, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return adjoint_update_t<float>(v, rs_v, hu, rs_hu, g, rs_g, per_param, out, d_alpha, workspace, T, P, stream);
    case DType::kFloat64:
      return adjoint_update_t<double>(v, rs_v, hu, rs_hu, g, rs_g, per_param, out, d_alpha, workspace, T, P, stream);
    case DType::kBFloat16:
      return adjoint_update_t<__nv_bfloat16>(v, rs_v, hu, rs_hu, g, rs_g, per_param, out, d_alpha, workspace, T, P,
                                             stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastmaml_cuda
