// Which build of a CPU kernel family runs: each family with an AVX2 build (bn_act, bn_relu_maxpool, the MLP
// meta-step) runs it where the CPU has it, unless $FASTMAML_CPU_ISA is "baseline". Read per call, so that the
// tests run both builds in one process.
#pragma once

#include <cstdlib>
#include <cstring>

namespace fastmaml {

// `usable`: the family's AVX2 build exists and the CPU has the instructions
inline bool use_avx2_build(bool usable) {
  const char* isa = std::getenv("FASTMAML_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
  return usable;
}

}  // namespace fastmaml
