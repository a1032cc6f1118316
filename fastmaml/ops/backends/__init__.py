"""The faster backends of the ops: "cpp" (C++/CUDA extension, csrc/) and "triton" (kernels/). Each registers
its implementations with the registry, declaring where they run; importing them never builds or imports a
compiler or triton (that happens at the first availability check)."""
