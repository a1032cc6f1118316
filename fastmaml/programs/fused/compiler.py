"""Compiles a model into a list of layer rules, or says which module keeps it off the fused engine.

Supported: `nn.Sequential` (nested too) or a single supported layer, built of Linear, Conv2d
(groups=1, zero padding), BatchNorm1d/2d, ReLU, LeakyReLU, Tanh, Sigmoid, ELU, GELU (exact),
MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten (start_dim >= 1), Identity, Dropout in eval mode
(or p=0). Every module object must appear once (no tied weights).

A BatchNorm immediately followed by a ReLU in execution order (Identity and inactive Dropout between
them are dropped) compiles into one BatchNormReLURule (norm_act.py): one kernel per pass instead of two;
a BatchNorm2d + ReLU followed by a MaxPool2d with non-overlapping windows (the conv nets' block tail)
into one BatchNormReLUMaxPoolRule.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from .base import Rule
from .conv import ConvRule
from .dense import LinearRule
from .norm import BatchNormRule
from .norm_act import BatchNormReLUMaxPoolRule, BatchNormReLURule
from .pointwise import ELURule, GELURule, LeakyReLURule, ReLURule, SigmoidRule, TanhRule
from .pooling import AdaptiveAvgPool2dRule, AvgPool2dRule, MaxPool2dRule
from .shape import FlattenRule

_SIMPLE = {
    nn.Linear: LinearRule, nn.ReLU: ReLURule, nn.LeakyReLU: LeakyReLURule, nn.Tanh: TanhRule,
    nn.Sigmoid: SigmoidRule, nn.ELU: ELURule, nn.MaxPool2d: MaxPool2dRule, nn.AvgPool2d: AvgPool2dRule,
    nn.AdaptiveAvgPool2d: AdaptiveAvgPool2dRule, nn.Flatten: FlattenRule,
}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)


class Unsupported(Exception):
    """The model cannot run on the fused engine; `module` / `kind` name the culprit ("" for the loss)."""

    def __init__(self, module: str, kind: str, reason: str):
        super().__init__(f"{module} ({kind}): {reason}" if module else reason)
        self.module, self.kind, self.reason = module, kind, reason


def compile_model(model: nn.Module) -> List[Rule]:
    """The rules of `model` in execution order (Identity and inactive Dropout dropped, BatchNorm + ReLU
    pairs fused)."""
    rules: List[Rule] = []
    seen: set = set()
    _walk(model, "", rules, seen)
    rules = _fuse(rules)
    norms = [r for r in rules if isinstance(r, BatchNormRule)]
    for i, r in enumerate(norms):
        r.index = i
    return rules


def _fuse(rules: List[Rule]) -> List[Rule]:
    """`rules` with every BatchNorm directly followed by a ReLU merged into a BatchNormReLURule, and
    such a pair directly followed by a non-overlapping MaxPool2d into a BatchNormReLUMaxPoolRule."""
    fused: List[Rule] = []
    for rule in rules:
        last = fused[-1] if fused else None
        if type(rule) is ReLURule and type(last) is BatchNormRule:
            fused[-1] = BatchNormReLURule(last, rule)
        elif (type(rule) is MaxPool2dRule and type(last) is BatchNormReLURule
              and BatchNormReLUMaxPoolRule.fusable(last, rule)):
            fused[-1] = BatchNormReLUMaxPoolRule(last, rule)
        else:
            fused.append(rule)
    return fused


def _walk(module: nn.Module, name: str, rules: List[Rule], seen: set) -> None:
    label = name or "<model>"
    if id(module) in seen:
        raise Unsupported(label, type(module).__name__, "the same module object appears twice (tied weights)")
    seen.add(id(module))
    if type(module) is nn.Sequential:
        for child_name, child in module._modules.items():  # all entries, repeats included (as forward runs them)
            if child is None:
                continue
            _walk(child, f"{name}.{child_name}" if name else child_name, rules, seen)
        return
    rule = _leaf(module, name)
    if rule is not None:
        rules.append(rule)


def _leaf(m: nn.Module, name: str) -> Optional[Rule]:
    label, kind = name or "<model>", type(m).__name__
    if type(m) is nn.Identity:
        return None
    if type(m) in _DROPOUTS:
        if m.training and m.p > 0:
            raise Unsupported(label, kind, "dropout in training mode is random; exact meta-gradients need it "
                                           "off (call .eval() on it)")
        return None
    if type(m) is nn.Conv2d:
        if m.groups != 1:
            raise Unsupported(label, kind, f"groups={m.groups}; the fused engine supports groups=1")
        if m.padding_mode != "zeros":
            raise Unsupported(label, kind, f"padding_mode={m.padding_mode!r}; the fused engine supports 'zeros'")
        if m.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size)):
            raise Unsupported(label, kind, "padding='same' with an even effective kernel (asymmetric padding)")
        return ConvRule(name, m)
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return BatchNormRule(name, m, index=-1)  # index set by compile_model
    if type(m) is nn.GELU:
        if m.approximate != "none":
            raise Unsupported(label, kind, f"approximate={m.approximate!r}; the fused engine supports 'none'")
        return GELURule(name, m)
    if type(m) is nn.MaxPool2d and m.return_indices:
        raise Unsupported(label, kind, "return_indices=True (the output is a tuple)")
    if type(m) is nn.Flatten and m.start_dim == 0:
        raise Unsupported(label, kind, "start_dim=0 would merge the examples of a task")
    cls = _SIMPLE.get(type(m))
    if cls is None:
        raise Unsupported(label, kind, "not a layer the fused engine knows (only nn.Sequential of standard "
                                       "layers compile; see fastmaml.explain)")
    return cls(name, m)
