"""Ops registry and the reference implementations (importing this registers them)."""
from . import layers, mlp_reference, reference  # noqa: F401  (register the "torch" reference of every op)
from .registry import BACKENDS, ENV_VAR, OpTable, op_names, register, register_backend, resolve

try:  # optional fast backends register themselves; their build/load is lazy and never breaks import
    from . import cpp  # noqa: F401
except Exception as _exc:  # pragma: no cover - reported by `fastmaml info`
    register_backend("cpp", lambda device, _why=f"fastmaml.ops.cpp failed to import: {_exc!r}": (False, _why))
try:
    from . import triton  # noqa: F401
    from . import triton_norm  # noqa: F401  (BatchNorm ops; kernels imported at first use)
except Exception as _exc:  # pragma: no cover
    register_backend("triton", lambda device, _why=f"fastmaml.ops.triton failed to import: {_exc!r}": (False, _why))

__all__ = ["BACKENDS", "ENV_VAR", "OpTable", "op_names", "register", "register_backend", "resolve"]
