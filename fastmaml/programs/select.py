"""Which Program runs a model, cached per model and structure: the fused engine when the model and
loss compile (fastmaml/programs/fused), else the any-module torch.func program."""
from __future__ import annotations

import weakref

from torch import nn

from ..layout import ParamLayout
from ..losses import Loss
from . import fused
from .base import Program
from .torchfunc import TorchFuncProgram

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
MAX_PROGRAMS_PER_MODEL = 4


def structure_key(model: nn.Module, layout: ParamLayout, loss: Loss) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())
    # train/eval mode is part of the structure: Dropout and custom modules compute differently
    modules = tuple((n, type(m), m.training) for n, m in model.named_modules())
    return (params, modules, layout.signature(), loss)


def select_program(model: nn.Module, layout: ParamLayout, loss: Loss) -> Program:
    """The Program for `model` (built once per model and structure)."""
    per_model = _CACHE.setdefault(model, {})
    key = structure_key(model, layout, loss)
    program = per_model.get(key)
    if program is None:
        try:
            program = fused.build(model, layout, loss)
        except fused.Unsupported:
            program = TorchFuncProgram(model, layout, loss)
        if len(per_model) >= MAX_PROGRAMS_PER_MODEL:  # e.g. train/eval switches: keep the newest few
            del per_model[next(iter(per_model))]
        per_model[key] = program
    return program
