"""Which Program runs a model: the fused engine when the model and loss compile (fastmaml/programs/fused),
else the any-module torch.func program; built once per model and structure and cached.

The cache is correct by construction: its key covers everything a compiled program reads from the model
(parameter identity, shape, dtype and device, buffers, every module's type, training flag, hooks and its
plain attributes: negative slopes, eps, pooling geometry, dropout p, a custom module's constants), so a
changed attribute compiles a new program instead of running a stale one. An attribute that `forward`
itself changes (a call counter, as learn2learn's ResNet-12 blocks keep) is restored after tracing and left
out of the key: the compiled program does not replay such side effects. The cache holds models weakly: a
program keeps no reference to its model.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Tuple

from torch import nn

from ..layout import ParamLayout
from ..losses import Loss
from . import fused
from .base import MODEL_CALL_LOCK, Program
from .torchfunc import TorchFuncProgram

_CACHE: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
# per model: {module name: attributes its forward changes}, left out of the key
_VOLATILE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
MAX_PROGRAMS_PER_MODEL = 4
_PLAIN = (int, float, bool, str, complex, type(None))


def _frozen(v):
    """A hashable snapshot of an attribute value: plain values by value, tensors and other objects by identity."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_frozen(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _frozen(x)) for k, x in v.items()))
    return (type(v).__name__, id(v))


def module_state(m: nn.Module, skip=()) -> tuple:
    """Type, training flag, hook counts and plain attributes (but `skip`) of one module."""
    attrs = tuple((k, _frozen(v)) for k, v in m.__dict__.items() if not k.startswith("_") and k not in skip)
    hooks = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
    return (type(m), attrs, hooks)


def structure_key(model: nn.Module, layout: ParamLayout, loss: Loss, volatile=None) -> tuple:
    volatile = volatile or {}
    params = tuple(
        (n, id(p), tuple(p.shape), p.dtype, p.device) for n, p in model.named_parameters(remove_duplicate=False)
    )
    buffers = tuple((n, id(b)) for n, b in model.named_buffers())
    modules = tuple((n, module_state(m, volatile.get(n, ()))) for n, m in model.named_modules())
    return (params, buffers, modules, layout.signature(), loss)


def _build(model: nn.Module, layout: ParamLayout, loss: Loss) -> Tuple[Program, dict]:
    """The program, and {module name: attributes the trace of `forward` changed} (restored by the compiler)."""
    try:
        program = fused.build(model, layout, loss)
        return program, program.graph.volatile
    except fused.Unsupported as exc:
        return TorchFuncProgram(model, layout, loss), exc.volatile


def select_program(model: nn.Module, layout: ParamLayout, loss: Loss) -> Program:
    """The Program for `model` (built once per model and structure; the newest few kept per model)."""
    per_model = _CACHE.get(model)
    if per_model is None:
        per_model = _CACHE[model] = OrderedDict()
    volatile = _VOLATILE.get(model)
    key = structure_key(model, layout, loss, volatile)
    program = per_model.get(key)
    if program is None:
        with MODEL_CALL_LOCK:  # fx patches nn.Module.__call__ process-wide while it traces
            program, changed = _build(model, layout, loss)
        if changed:
            merged = dict(volatile or {})
            for n, keys in changed.items():
                merged[n] = frozenset(merged.get(n, frozenset()) | keys)
            _VOLATILE[model] = merged
            key = structure_key(model, layout, loss, merged)
        if len(per_model) >= MAX_PROGRAMS_PER_MODEL:  # e.g. train/eval switches: keep the newest few
            per_model.popitem(last=False)
        per_model[key] = program
    else:
        per_model.move_to_end(key)
    return program


def cached_programs(model: nn.Module) -> int:
    """How many programs the cache holds for `model` (for tests)."""
    return len(_CACHE.get(model, ()))


__all__ = ["select_program", "structure_key", "module_state", "cached_programs"]
