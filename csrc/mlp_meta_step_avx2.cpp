// The CPU MLP op's per-task inner loop (mlp_inner_loop.h) compiled a second time for AVX2 + FMA, in
// its own namespace (FASTMAML_MLP_NS) so no AVX2 copy of an inline function can replace a baseline
// one at link time. Every header with inline code is included before the target pragma.
#include <cmath>
#include <cstdint>

#include "mlp_meta_step_avx2.h"
#include "mlp_shape.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMAML_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define FASTMAML_MLP_NS fastmaml_mlp_avx2
#include "mlp_inner_loop.h"

namespace fastmaml_mlp_avx2 {

template <typename S>
TaskLosses task_meta_step(const MlpShape& s, const S* theta, const S* sx, const S* sy, int64_t ns, const S* qx,
                          const S* qy, int64_t nq, const S* alpha, int K, bool second_order, S inv_tasks,
                          const TaskBuffers<S>& b) {
  return mlp_task_meta_step<S>(SerialExec{}, s, theta, sx, sy, ns, qx, qy, nq, alpha, K, second_order, inv_tasks, b);
}

template TaskLosses task_meta_step<float>(const MlpShape&, const float*, const float*, const float*, int64_t,
                                          const float*, const float*, int64_t, const float*, int, bool, float,
                                          const TaskBuffers<float>&);
template TaskLosses task_meta_step<double>(const MlpShape&, const double*, const double*, const double*, int64_t,
                                           const double*, const double*, int64_t, const double*, int, bool, double,
                                           const TaskBuffers<double>&);

}  // namespace fastmaml_mlp_avx2

#if defined(FASTMAML_HAVE_AVX2_VARIANT)
#pragma GCC pop_options
#endif

namespace fastmaml_mlp_avx2 {

bool usable() {
#if defined(FASTMAML_HAVE_AVX2_VARIANT)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace fastmaml_mlp_avx2
