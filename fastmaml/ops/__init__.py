"""Ops: named computations with a plain-PyTorch reference (`reference/`) and faster backends (`backends/`),
chosen per device by the registry (see README.md in this folder). Importing this registers them all."""

from . import reference  # noqa: F401  (the "torch" reference of every op)
from .registry import BACKENDS, ENV_VAR, OpTable, implementation, op_names, register, register_backend, resolve

try:  # optional fast backends register themselves; their build/load is lazy and never breaks import
    from .backends import cpp  # noqa: F401
except Exception as _exc:  # pragma: no cover - reported by `fastmaml info`
    register_backend("cpp", lambda device, _why=f"fastmaml.ops.backends.cpp failed to import: {_exc!r}": (False, _why))
try:
    from .backends import triton, triton_norm  # noqa: F401  (kernels imported at first use)
except Exception as _exc:  # pragma: no cover
    register_backend(
        "triton", lambda device, _why=f"fastmaml.ops.backends.triton failed to import: {_exc!r}": (False, _why)
    )

__all__ = ["BACKENDS", "ENV_VAR", "OpTable", "implementation", "op_names", "register", "register_backend", "resolve"]
