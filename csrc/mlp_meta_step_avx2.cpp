// The CPU MLP op's per-task meta-step (mlp_cpu.h) compiled a second time for AVX2 + FMA, in
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
#include "mlp_cpu.h"

namespace fastmaml_mlp_avx2 {

template <typename S>
TaskLosses task_meta_step(const MlpShape& s, const S* theta, const S* sx, const S* sy, int64_t ns, const S* qx,
                          const S* qy, int64_t nq, const S* alpha, int K, bool second_order, bool need_before,
                          S inv_tasks, S* work, S* v, S* dalpha) {
  return cpu_task_meta_step<S>(s, theta, sx, sy, ns, qx, qy, nq, alpha, K, second_order, need_before, inv_tasks, work,
                               v, dalpha);
}

template TaskLosses task_meta_step<float>(const MlpShape&, const float*, const float*, const float*, int64_t,
                                          const float*, const float*, int64_t, const float*, int, bool, bool, float,
                                          float*, float*, float*);
template TaskLosses task_meta_step<double>(const MlpShape&, const double*, const double*, const double*, int64_t,
                                           const double*, const double*, int64_t, const double*, int, bool, bool,
                                           double, double*, double*, double*);

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
