"""Ops registry and the reference implementations (importing this registers them)."""
from . import reference  # noqa: F401  (registers the "torch" reference of every op)
from .registry import BACKENDS, ENV_VAR, OpTable, op_names, register, register_backend, resolve

__all__ = ["BACKENDS", "ENV_VAR", "OpTable", "op_names", "register", "register_backend", "resolve"]
