"""Triton kernels of fastmaml, one module per fused op, each with its launch wrapper registered as a
`torch.library.custom_op` (namespace `fastmaml_triton`) with a fake implementation.

Importing this package imports triton. Kernels are decorated at import, so `TRITON_INTERPRET=1`
(the CPU interpreter used by the tests) must be set before the first import; `INTERPRET` records it.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
