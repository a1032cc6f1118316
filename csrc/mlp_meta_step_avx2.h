// The CPU MLP op's per-task meta-step compiled for AVX2 + FMA (mlp_meta_step_avx2.cpp); the op
// (mlp_meta_step.cpp) calls it instead of the baseline build when `usable()`.
#pragma once
#include <cstdint>

#include "mlp_shape.h"

namespace fastmaml_mlp_avx2 {

// Whether this build has the AVX2 variant and this CPU (and OS) can run it.
bool usable();

// cpu_task_meta_step (mlp_cpu.h), one task.
template <typename S>
fastmaml_mlp::TaskLosses task_meta_step(const fastmaml_mlp::MlpShape& s, const S* theta, const S* sx, const S* sy,
                                        int64_t ns, const S* qx, const S* qy, int64_t nq, const S* alpha, int K,
                                        bool second_order, bool need_before, S inv_tasks, S* work, S* v, S* dalpha);

}  // namespace fastmaml_mlp_avx2
