// The per-slab kernels of BatchNorm + ReLU + max-pooling (bn_relu_maxpool_kernels.h, called by
// bn_relu_maxpool.cpp) compiled a second time for AVX2, in their own namespace (fastmaml_brmp_avx2) so that no
// AVX2 copy of a function can replace a baseline one at link time. No FMA: without contraction both builds
// round alike. Every header with inline code is included before the target pragma.
#include <cstdint>

#include "bn_relu_maxpool_slabs.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMAML_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2")
#endif

#define FASTMAML_BRMP_NS fastmaml_brmp_avx2
#include "bn_relu_maxpool_kernels.h"
#undef FASTMAML_BRMP_NS

#if defined(FASTMAML_HAVE_AVX2_VARIANT)
#pragma GCC pop_options
#endif

namespace fastmaml_brmp_avx2 {

bool usable() {
#if defined(FASTMAML_HAVE_AVX2_VARIANT)
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

}  // namespace fastmaml_brmp_avx2
