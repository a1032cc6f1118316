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

import operator
import weakref
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
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


def volatile_attributes(model: nn.Module) -> Dict[str, frozenset]:
    """{module name: the attributes its `forward` changes} found when `model` was traced (left out of keys)."""
    return dict(_VOLATILE.get(model) or {})


_MISSING = object()
_BY_VALUE, _BY_SNAPSHOT, _BY_REF, _BY_ID = range(4)


def _immutable(v) -> bool:
    return isinstance(v, _PLAIN) or (type(v) is tuple and all(_immutable(x) for x in v))


def _attr_check(v) -> tuple:
    """How `ModelGuard` compares an attribute: (kind, expected)."""
    if _immutable(v):
        return _BY_VALUE, v
    if isinstance(v, (tuple, list, dict)):
        return _BY_SNAPSHOT, _frozen(v)
    try:
        return _BY_REF, weakref.ref(v)
    except TypeError:
        return _BY_ID, id(v)


def _attr_same(v, kind: int, expected) -> bool:
    if kind == _BY_VALUE:
        return v is expected or (type(v) is type(expected) and v == expected)
    if kind == _BY_SNAPSHOT:
        return _frozen(v) == expected
    if kind == _BY_REF:
        return v is expected()
    return id(v) == expected


def _hooks(m: nn.Module) -> tuple:
    return (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))


class ModelGuard:
    """Checks, cheaply enough for every call, that a model still is what a plan was built for: the same modules
    (type, children, hook counts), the same Parameter objects with the same shape, dtype, device and
    `requires_grad`, the same buffer objects, and the same attributes (plain values by value, other objects by
    identity): what `structure_key` keys the program cache on, read module by module from each `__dict__`
    without walking `named_modules`. Attributes that `forward` changes are left out, as there.

    Holds the model's modules weakly (a guard never keeps a model alive) and its parameters and buffers
    strongly (so their identity cannot be taken over by new tensors). data_ptrs: also check that every
    parameter and buffer keeps its storage (what a captured CUDA graph reads)."""

    def __init__(self, model: nn.Module, data_ptrs: bool = False):
        volatile = _VOLATILE.get(model) or {}
        self._data_ptrs = data_ptrs
        self._model = weakref.ref(model)
        entries = []
        for name, m in model.named_modules():
            d = m.__dict__
            skip = volatile.get(name, ())
            checks = [(k, *_attr_check(v)) for k, v in d.items() if not k.startswith("_") and k not in skip]
            plain = [(k, v) for k, kind, v in checks if kind == _BY_VALUE]
            others = tuple((k, kind, v) for k, kind, v in checks if kind != _BY_VALUE)
            # the plain attributes read with one itemgetter (a missing key raises KeyError: changed); with one
            # key it returns the value itself, with more a tuple
            getter = operator.itemgetter(*(k for k, _ in plain)) if plain else None
            values = plain[0][1] if len(plain) == 1 else tuple(v for _, v in plain)
            params = tuple(
                (k, p, None, None, None, None, 0)
                if p is None
                else (k, p, p.shape, p.dtype, p.device, p.requires_grad, p.data_ptr() if data_ptrs else 0)
                for k, p in d["_parameters"].items()
            )
            buffers = tuple(
                (k, b, b.data_ptr() if data_ptrs and b is not None else 0) for k, b in d["_buffers"].items()
            )
            children = tuple((k, None if c is None else weakref.ref(c)) for k, c in d["_modules"].items())
            entries.append(
                (weakref.ref(m), type(m), len(d), getter, values, others, params, buffers, children, _hooks(m))
            )
        self._entries = tuple(entries)
        self._summary = _summary(model, volatile)

    def check(self, model: nn.Module) -> Optional[str]:
        """None if `model` is unchanged, else what changed (e.g. "parameter '0.weight' resized from (40, 1) to
        (50, 1)")."""
        return None if self._same(model) else self.describe(model)

    def _same(self, model: nn.Module) -> bool:
        """Whether `model` is unchanged (the fast check of every call)."""
        if self._model() is not model:
            return False
        ptrs = self._data_ptrs
        for ref, cls, size, getter, values, others, params, buffers, children, hooks in self._entries:
            m = ref()
            if m is None or type(m) is not cls:
                return False
            d = m.__dict__
            if len(d) != size:
                return False
            if getter is not None:
                try:
                    if getter(d) != values:
                        return False
                except KeyError:
                    return False
            for k, kind, expected in others:
                if not _attr_same(d.get(k, _MISSING), kind, expected):
                    return False
            if params:
                current = d["_parameters"]
                if len(current) != len(params):
                    return False
                for k, p, shape, dtype, device, requires_grad, ptr in params:
                    if current.get(k, _MISSING) is not p:
                        return False
                    if p is not None and (
                        p.shape != shape
                        or p.dtype != dtype
                        or p.requires_grad != requires_grad
                        or p.device != device
                        or (ptrs and p.data_ptr() != ptr)
                    ):
                        return False
            elif d["_parameters"]:
                return False
            if buffers:
                current = d["_buffers"]
                if len(current) != len(buffers):
                    return False
                for k, b, ptr in buffers:
                    if current.get(k, _MISSING) is not b or (ptrs and b is not None and b.data_ptr() != ptr):
                        return False
            elif d["_buffers"]:
                return False
            if children:
                current = d["_modules"]
                if len(current) != len(children):
                    return False
                for k, c in children:
                    if current.get(k, _MISSING) is not (None if c is None else c()):
                        return False
            elif d["_modules"]:
                return False
            if (len(d["_forward_hooks"]), len(d["_forward_pre_hooks"]), len(d["_backward_hooks"])) != hooks:
                return False
        return True

    def describe(self, model: nn.Module) -> str:
        """What differs between `model` and the model the guard was built on, in words."""
        if self._model() is not model:
            return "another model"
        old, new = self._summary, _summary(model, _VOLATILE.get(model) or {})
        changes = [_change(k, old.get(k), new.get(k)) for k in list(old) + [k for k in new if k not in old]]
        changes = [c for c in changes if c]
        if not changes:
            changes = [
                "a parameter or buffer was given other storage (`.data` assigned)"
                if self._data_ptrs
                else "the model changed"
            ]
        more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
        return "; ".join(changes[:3]) + more


def _summary(model: nn.Module, volatile) -> Dict[tuple, tuple]:
    """What `ModelGuard.describe` compares, by name."""
    out: Dict[tuple, tuple] = {}
    for name, m in model.named_modules():
        out[("module", name)] = (type(m).__name__, _hooks(m))
        for k, v in m.__dict__.items():
            if not k.startswith("_") and k not in volatile.get(name, ()):
                out[("attr", name, k)] = (_frozen(v),)
    for name, p in model.named_parameters(remove_duplicate=False):
        out[("parameter", name)] = (id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad)
    for name, b in model.named_buffers():
        out[("buffer", name)] = (id(b), tuple(b.shape), b.dtype, b.device)
    return out


def _name(kind: str, name: str) -> str:
    if kind == "module":
        return f"module {name!r}" if name else "the model"
    return f"{kind} {name!r}"


def _change(key: tuple, old, new) -> str:
    """One difference between two `_summary` entries, in words ("" if none)."""
    if old == new:
        return ""
    kind = key[0]
    if kind == "attr":
        _, module, attr = key
        where = f"{module}.{attr}" if module else attr
        if old is None or new is None:
            return f"attribute {where!r} {'added' if old is None else 'removed'}"
        return f"attribute {where!r} changed from {_show(old[0])} to {_show(new[0])}"
    what = _name(kind, key[1])
    if old is None or new is None:
        return f"{what} {'added' if old is None else 'removed'}"
    if kind == "module":
        return f"{what} changed type ({old[0]} -> {new[0]})" if old[0] != new[0] else f"{what} hooks changed"
    labels = ("shape", "dtype", "device", "requires_grad")
    diffs = ", ".join(f"{label} {_show(a)} -> {_show(b)}" for label, a, b in zip(labels, old[1:], new[1:]) if a != b)
    if old[0] != new[0]:
        return f"{what} replaced by another tensor" + (f" ({diffs})" if diffs else "")
    return f"{what}: {diffs}"


def _show(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int):
        return f"<{v[0]} object>"
    return repr(v)


__all__ = [
    "ModelGuard",
    "cached_programs",
    "module_state",
    "select_program",
    "structure_key",
    "volatile_attributes",
]
