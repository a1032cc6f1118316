"""Derived parameters: tensors a model computes from its parameters alone, before any layer reads them
(`torch.sigmoid(self.gate) * h`, `self.log_scale.exp() * h`, a LoRA weight `W + A @ B` given to
F.linear, a weight normalized by hand `g * v / v.norm(dim=1, keepdim=True)`).

Such an expression has no examples' dim and costs little next to the activations, so the program does not
derive rules for it: it runs the model's own PyTorch code on the parameter slots, once per task (torch.func
vmap over the task dim), and takes its derivatives from PyTorch's. A rule reads the result D as it reads a
parameter (`Ref("d", k)`); the program pulls what the rules send to D back to the slots:
- gradient: θ̄ = Jᵀ ḡ, with ḡ the gradient the rules wrote for D;
- Hessian-vector product: with h(θ, v) = (f(θ), J v) (the tangent D' = J v of D is the rules' direction),
  the pullback of h at the cotangents (ḡ', ḡ) gives the tangent of θ̄, Jᵀ ḡ' + (∂θ(J v))ᵀ ḡ (the
  expression's own second-order term), and Jᵀ ḡ, in one vjp of a jvp.

Leaf tensors are per task `[T, *shape]` or common `[*shape]` (step 0's θ, shared weights); D is common where
every leaf is, else `[T, *shape]`. The torch.func calls hold MODEL_CALL_LOCK (torch.func.jvp keeps its
forward-AD levels per process: two threads inside it at once fail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.func

from ..base import MODEL_CALL_LOCK
from .graph import Ref

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class Derived:
    """`fn(leaves) -> D`: the model's code on the parameter slots `leaves` (Refs "a"/"s", shapes
    `leaf_shapes`); D has `shape`; `text` is how the model writes it (for `explain`)."""

    fn: Callable[[List[Tensor]], Tensor]
    leaves: Tuple[Ref, ...]
    leaf_shapes: Tuple[Tuple[int, ...], ...]
    shape: Tuple[int, ...]
    text: str

    def groups(self) -> frozenset:
        return frozenset(r.group for r in self.leaves)

    def _dims(self, leaves: Sequence[Tensor]) -> Tuple[Optional[int], ...]:
        """vmap's in_dims of each leaf: 0 for a per-task `[T, *shape]`, None for a common one."""
        return tuple(0 if t.dim() == len(s) + 1 else None for t, s in zip(leaves, self.leaf_shapes))

    def _call(self, *leaves: Tensor) -> Tensor:
        return self.fn(list(leaves))

    def value(self, leaves: Sequence[Tensor]) -> Tensor:
        """D: common `[*shape]` where every leaf is common, else `[T, *shape]`."""
        dims = self._dims(leaves)
        if all(d is None for d in dims):
            return self._call(*leaves)
        with MODEL_CALL_LOCK:
            return torch.func.vmap(self._call, in_dims=dims)(*leaves)

    def tangent(self, leaves: Sequence[Tensor], dirs: Sequence[Optional[Tensor]]) -> Tensor:
        """D' `[T, *shape]`, the tangent of D along the leaves' directions (per task `[T, *shape]`, None: zero;
        at least one given)."""
        n = len(self.leaves)
        dirs = tuple(torch.zeros_like(t) if d is None else d for t, d in zip(leaves, dirs))

        def one(*args):
            return torch.func.jvp(self._call, args[:n], args[n:])[1]

        with MODEL_CALL_LOCK:
            return torch.func.vmap(one, in_dims=self._dims(leaves) + self._dims(dirs))(*leaves, *dirs)

    def pullback(self, leaves: Sequence[Tensor], g: Tensor) -> Tuple[Tensor, ...]:
        """Jᵀ ḡ per leaf `[T, *leaf shape]`, for ḡ `[T, *shape]`."""

        def one(*args):
            _, vjp = torch.func.vjp(self._call, *args[:-1])
            return vjp(args[-1])

        with MODEL_CALL_LOCK:
            return torch.func.vmap(one, in_dims=self._dims(leaves) + (0,))(*leaves, g)

    def pullback_tangent(
        self, leaves: Sequence[Tensor], dirs: Sequence[Optional[Tensor]], g: Tensor, gd: Tensor
    ) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        """(Jᵀ ḡ, Jᵀ ḡ' + (∂θ(J v))ᵀ ḡ) per leaf `[T, *leaf shape]`, for ḡ and its tangent ḡ' `[T, *shape]`
        and the leaves' directions v (per task, None: zero)."""
        n = len(self.leaves)
        dirs = tuple(torch.zeros_like(t) if d is None else d for t, d in zip(leaves, dirs))

        def one(*args):
            def h(*lv):
                return torch.func.jvp(self._call, lv[:n], lv[n:])

            _, vjp = torch.func.vjp(h, *args[: 2 * n])
            grads = vjp((args[-1], args[-2]))
            return grads[n:], grads[:n]

        dims = self._dims(leaves) + self._dims(dirs) + (0, 0)
        with MODEL_CALL_LOCK:
            return torch.func.vmap(one, in_dims=dims)(*leaves, *dirs, g, gd)
