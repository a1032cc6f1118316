// Argument checks of fastmaml::mlp_meta_step shared by its CPU and CUDA registrations.
#pragma once
#include <ATen/ATen.h>

#include "mlp_shape.h"

namespace fastmaml {

// Checks every argument (messages name it) and returns the MLP's shape.
fastmaml_mlp::MlpShape check_mlp_meta_step_args(const at::Tensor& theta, at::IntArrayRef sizes, const at::Tensor& sx,
                                                const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy,
                                                const at::Tensor& alpha, int64_t activation);

}  // namespace fastmaml
