// Argument checks shared by the CPU and CUDA implementations of the step ops: every failure names
// the argument, what was seen and what was expected.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace fastmaml {

inline void check_matrix(const at::Tensor& t, const char* name, at::DeviceType device) {
  TORCH_CHECK(t.dim() == 2, name, ": expected a [T, P] tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), name, ": expected a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device().type() == device, name, ": expected a ", at::DeviceTypeName(device),
              " tensor, got one on ", t.device());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_matrix(t, name, ref.device().type());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (as ", ref_name, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (as ",
              ref_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (as ", ref_name,
              "), got ", t.device());
}

// alpha: 0-dim or [P], same dtype and device as ref [T, P].
inline void check_alpha(const at::Tensor& alpha, const at::Tensor& ref) {
  const int64_t P = ref.size(1);
  TORCH_CHECK(alpha.dim() == 0 || (alpha.dim() == 1 && alpha.size(0) == P),
              "alpha: expected a 0-dim tensor or shape [", P, "], got shape ", alpha.sizes());
  TORCH_CHECK(alpha.scalar_type() == ref.scalar_type(), "alpha: expected dtype ", ref.scalar_type(), ", got ",
              alpha.scalar_type());
  TORCH_CHECK(alpha.device() == ref.device(), "alpha: expected device ", ref.device(), ", got ", alpha.device());
}

// Unit stride along P; any row stride (0 for a parameter vector broadcast over tasks).
inline at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

inline at::Tensor alpha_grad_like(const at::Tensor& alpha) {
  return alpha.dim() == 0 ? at::zeros({}, alpha.options()) : at::zeros({alpha.size(0)}, alpha.options());
}

}  // namespace fastmaml
