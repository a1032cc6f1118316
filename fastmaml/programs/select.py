"""Which Program runs a model, cached per model and structure."""
from __future__ import annotations

import weakref

from torch import nn

from ..layout import ParamLayout
from ..losses import Loss
from .base import Program
from .torchfunc import TorchFuncProgram

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def structure_key(model: nn.Module, layout: ParamLayout, loss: Loss) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())
    modules = tuple((n, type(m), m.training) for n, m in model.named_modules())
    return (params, modules, layout.signature(), loss)


def select_program(model: nn.Module, layout: ParamLayout, loss: Loss) -> Program:
    """The Program for `model` (built once per model and structure)."""
    per_model = _CACHE.setdefault(model, {})
    key = structure_key(model, layout, loss)
    program = per_model.get(key)
    if program is None:
        program = TorchFuncProgram(model, layout, loss)
        per_model.clear()  # the model changed structure: drop programs for the old one
        per_model[key] = program
    return program
