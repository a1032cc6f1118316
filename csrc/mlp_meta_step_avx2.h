// The CPU MLP op's per-task inner loop compiled for AVX2 + FMA (mlp_meta_step_avx2.cpp); the op
// (mlp_meta_step.cpp) calls it instead of the baseline build when `usable()`.
#pragma once
#include <cstdint>

#include "mlp_shape.h"

namespace fastmaml_mlp_avx2 {

// Whether this build has the AVX2 variant and this CPU (and OS) can run it.
bool usable();

// mlp_task_meta_step (mlp_inner_loop.h) with the CPU Exec, one task.
template <typename S>
fastmaml_mlp::TaskLosses task_meta_step(const fastmaml_mlp::MlpShape& s, const S* theta, const S* sx, const S* sy,
                                        int64_t ns, const S* qx, const S* qy, int64_t nq, const S* alpha, int K,
                                        bool second_order, S inv_tasks, const fastmaml_mlp::TaskBuffers<S>& b);

}  // namespace fastmaml_mlp_avx2
