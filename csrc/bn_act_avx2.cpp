// The per-plane kernels of BatchNorm + leaky ReLU (bn_act_kernels.h, called by bn_act.cpp) compiled a second
// time for AVX2, in their own namespace (fastmaml_bn_act_avx2) so that no AVX2 copy of a function can replace
// a baseline one at link time. No FMA: without contraction both builds round alike. Every header with inline
// code is included before the target pragma.
#include <cmath>
#include <cstdint>

#include "bn_act_planes.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMAML_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2")
#endif

#define FASTMAML_BN_ACT_NS fastmaml_bn_act_avx2
#include "bn_act_kernels.h"
#undef FASTMAML_BN_ACT_NS

#if defined(FASTMAML_HAVE_AVX2_VARIANT)
#pragma GCC pop_options
#endif

namespace fastmaml_bn_act_avx2 {

bool usable() {
#if defined(FASTMAML_HAVE_AVX2_VARIANT)
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

}  // namespace fastmaml_bn_act_avx2
