"""Inner learning rates in every form, expanded to one α_j per inner step.

Accepted forms of `inner_lr`:
- a positive float (plain MAML);
- a scalar tensor or `nn.Parameter` (learned when it requires grad);
- a dict {parameter name: tensor} covering every adapted parameter, each tensor shaped like the
  parameter (Meta-SGD) or a scalar (one rate per tensor);
- a list/tuple with one of the above per inner step (MAML++ per-step, per-layer rates).

Each α_j is a 0-dim tensor (one global rate) or a flat `[Pa]` vector aligned with the adapted
parameters; it is built from the user's tensors with ordinary autograd ops, so the exact ∂L/∂α_j of
the reverse sweep flows back to whatever the user learns.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Union

import torch

from .layout import FlatGroup

LRLike = Union[float, torch.Tensor, Mapping[str, torch.Tensor]]


def expand_inner_lr(inner_lr, steps: int, group: FlatGroup, like: torch.Tensor) -> list[torch.Tensor]:
    """Returns `steps` tensors α_j (0-dim or `[Pa]`, dtype/device of `like`); equal forms share one object."""
    if isinstance(inner_lr, (list, tuple)):
        if len(inner_lr) != steps:
            raise ValueError(
                f"inner_lr: a per-step list must have one entry per inner step; got {len(inner_lr)} "
                f"entries for steps={steps}"
            )
        return [_one(lr, group, like, f"inner_lr[{j}]") for j, lr in enumerate(inner_lr)]
    alpha = _one(inner_lr, group, like, "inner_lr")
    return [alpha] * steps


def learnable_leaves(inner_lr) -> list[torch.Tensor]:
    """The user's tensors in `inner_lr` that require grad (each once)."""
    items = inner_lr if isinstance(inner_lr, (list, tuple)) else [inner_lr]
    leaves, seen = [], set()
    for lr in items:
        vals = lr.values() if isinstance(lr, Mapping) else [lr]
        for v in vals:
            if isinstance(v, torch.Tensor) and v.requires_grad and id(v) not in seen:
                seen.add(id(v))
                leaves.append(v)
    return leaves


def _one(lr, group: FlatGroup, like: torch.Tensor, where: str) -> torch.Tensor:
    if isinstance(lr, bool):
        raise TypeError(f"{where}: expected a float, a tensor or a dict of tensors, got a bool")
    if isinstance(lr, numbers.Real):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"{where}: the learning rate must be positive and finite, got {lr}")
        return torch.tensor(float(lr), dtype=like.dtype, device=like.device)
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"{where}: a tensor learning rate must be a scalar, got shape {tuple(lr.shape)}; "
                "use a dict {name: tensor} for per-parameter rates (Meta-SGD)"
            )
        _check_tensor(lr, where)
        if not lr.requires_grad and not bool((lr > 0).all()):
            raise ValueError(f"{where}: the learning rate must be positive, got {lr.item()}")
        return lr.reshape(()).to(dtype=like.dtype, device=like.device)
    if isinstance(lr, Mapping):
        return _per_parameter(lr, group, like, where)
    raise TypeError(
        f"{where}: expected a positive float, a scalar tensor, a dict {{name: tensor}} or a per-step list, "
        f"got {type(lr).__name__}"
    )


def _per_parameter(lr: Mapping, group: FlatGroup, like: torch.Tensor, where: str) -> torch.Tensor:
    unknown = sorted(set(lr) - set(group.names))
    if unknown:
        raise ValueError(f"{where}: keys {unknown} are not adapted parameters; expected keys among {list(group.names)}")
    missing = [n for n in group.names if n not in lr]
    if missing:
        raise ValueError(f"{where}: no learning rate for adapted parameters {missing}")
    parts = []
    for slot in group.slots:
        t = lr[slot.name]
        key = f"{where}[{slot.name!r}]"
        if not isinstance(t, torch.Tensor):
            if isinstance(t, numbers.Real) and not isinstance(t, bool):
                t = torch.tensor(float(t))
            else:
                raise TypeError(f"{key}: expected a tensor or a float, got {type(t).__name__}")
        if t.numel() != 1 and tuple(t.shape) != tuple(slot.shape):
            raise ValueError(
                f"{key}: expected a scalar or a tensor shaped like the parameter {tuple(slot.shape)}, "
                f"got shape {tuple(t.shape)}"
            )
        _check_tensor(t, key)
        if not t.requires_grad and not bool((t > 0).all()):
            raise ValueError(
                f"{key}: the learning rate must be positive, got {t.min().item()} (a rate of 0 "
                "freezes a parameter: leave it out of inner_params instead)"
            )
        t = t.to(dtype=like.dtype, device=like.device)
        parts.append(t.reshape(-1).expand(slot.numel) if t.numel() == 1 else t.reshape(-1))
    return torch.cat(parts)


def _check_tensor(t: torch.Tensor, where: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point tensor, got {t.dtype}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{where}: the learning rate contains NaN or inf")
