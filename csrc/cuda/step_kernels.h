// Torch-free launchers of the CUDA step kernels (csrc/cuda/step_kernels.cu). Pointers are device
// pointers of `dtype` elements; [T, P] buffers have unit stride along P and row stride `rs_*`
// (0 broadcasts one row over tasks). alpha is one element (per_param false) or P elements.
#pragma once
#include <cuda_runtime_api.h>
#include <cstddef>
#include <cstdint>

namespace fastmaml_cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

// out[t, p] = phi[t, p] - alpha[p or 0] * g[t, p]
cudaError_t inner_update(DType dtype, const void* phi, int64_t rs_phi, const void* g, int64_t rs_g,
                         const void* alpha, bool per_param, void* out, int64_t T, int64_t P,
                         cudaStream_t stream);

// Bytes of scratch `adjoint_update` needs for a scalar alpha's deterministic two-pass reduction.
size_t adjoint_workspace_bytes(DType dtype, int64_t P);

// out[t, p] = v[t, p] - hu[t, p] (skipped if out == nullptr); if d_alpha != nullptr:
// d_alpha[p] = -sum_t g[t, p] v[t, p] (per_param) or d_alpha[0] = -sum_{t,p} g v, accumulated in
// fp32 for bf16 and in a fixed order (deterministic).
cudaError_t adjoint_update(DType dtype, const void* v, int64_t rs_v, const void* hu, int64_t rs_hu,
                           const void* g, int64_t rs_g, bool per_param, void* out, void* d_alpha,
                           void* workspace, int64_t T, int64_t P, cudaStream_t stream);

}  // namespace fastmaml_cuda
