"""Flat parameter layout: which parameters adapt in the inner loop and where they live in `[P]`.

The adapted parameters are packed into one flat vector `theta_a [Pa]` (fast weights `[T, Pa]`),
the shared ones (not adapted; ANIL's body) into `theta_s [Ps]`. Each parameter is a view
`flat[..., offset:offset + numel].view(*batch, *shape)` of its buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn
from torch._utils import _unflatten_dense_tensors

InnerParams = Union[None, str, Sequence[str], Callable[[str, nn.Parameter], bool]]


@dataclass(frozen=True)
class Slot:
    name: str
    shape: torch.Size
    offset: int
    numel: int


class FlatGroup:
    """A group of named tensors packed into one flat vector."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]]):
        slots, offset = [], 0
        for name, p in named:
            slots.append(Slot(name, p.shape, offset, p.numel()))
            offset += p.numel()
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.size = offset
        self.names = tuple(s.name for s in self.slots)

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-slot tensors `[*shape]` -> `[size]` (autograd-friendly concatenation)."""
        if not tensors:
            return torch.zeros(0)
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """`[*batch, size]` -> {name: view `[*batch, *shape]`}.

        One `split` (not a slice per slot): autograd's backward of a split is a single concatenation,
        while each slice's backward would fill a zero `[*batch, size]` buffer.
        """
        batch = flat.shape[:-1]
        parts = torch.split(flat, [s.numel for s in self.slots], dim=-1)
        return {s.name: part.view((*batch, *s.shape)) for s, part in zip(self.slots, parts)}


class ParamLayout:
    """Splits a model's parameters into adapted (`a`) and shared (`s`) flat groups."""

    def __init__(self, model: nn.Module, inner_params: InnerParams = None):
        named = list(model.named_parameters())
        if not named:
            raise ValueError("model: has no parameters; meta-learning needs at least one")
        for name, p in named:
            if not p.is_floating_point():
                raise TypeError(f"model: parameter {name!r} has dtype {p.dtype}; expected a floating dtype")
        selected = _select(named, inner_params)
        self.adapted = FlatGroup((n, p) for n, p in named if n in selected)
        self.shared = FlatGroup((n, p) for n, p in named if n not in selected)
        self.params = dict(named)

    def theta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current parameters as flat `(theta_a [Pa], theta_s [Ps])`, differentiable to the model."""
        p = self.params
        first = next(iter(p.values()))
        a = [p[n] for n in self.adapted.names]
        s = [p[n] for n in self.shared.names]
        theta_a = self.adapted.flatten(a)
        theta_s = self.shared.flatten(s) if s else first.new_zeros(0)
        return theta_a, theta_s

    def signature(self) -> tuple:
        return (self.adapted.names, self.shared.names)


def _select(named, inner_params: InnerParams) -> set[str]:
    names = [n for n, _ in named]
    trainable = {n for n, p in named if p.requires_grad}
    if inner_params is None:  # every parameter that trains; frozen ones (requires_grad=False) stay as they are
        if not trainable:
            raise ValueError("model: every parameter is frozen (requires_grad=False); nothing to meta-learn")
        return trainable
    if isinstance(inner_params, str):
        inner_params = [inner_params]
    if callable(inner_params):
        chosen = {n for n, p in named if inner_params(n, p)}
        if not chosen:
            raise ValueError(f"inner_params: the predicate selected no parameter; the model's parameters are {names}")
        return chosen
    try:
        wanted = list(inner_params)
    except TypeError:
        raise TypeError(
            "inner_params: expected None, a parameter name, a list of names or prefixes, "
            f"or a predicate (name, param) -> bool; got {type(inner_params).__name__}"
        ) from None
    chosen = set()
    for w in wanted:
        if not isinstance(w, str):
            raise TypeError(f"inner_params: expected parameter names (str), got {w!r}")
        hits = {n for n in names if n == w or (n.startswith(w + ".") and n in trainable)}
        if not hits and any(n.startswith(w + ".") for n in names):
            raise ValueError(
                f"inner_params: {w!r} holds only frozen parameters (requires_grad=False); name them "
                "one by one to adapt them"
            )
        if not hits:
            raise ValueError(
                f"inner_params: {w!r} names no parameter or module of the model; the model's parameters are {names}"
            )
        chosen |= hits
    if not chosen:
        raise ValueError(
            f"inner_params: an empty list adapts nothing; pass None to adapt every parameter, or names among {names}"
        )
    return chosen


class BoundLayout:
    """A `ParamLayout` bound to its parameters' storage, for a plan that runs many calls: θ is one `cat` of
    flat views of the parameters made once, and a meta-gradient goes into `.grad` through the `[*shape]` views
    of its parts that one op makes (and one foreach add), instead of a reshape of every `nn.Parameter` and a
    `split` per call (each a Python-level dispatch). Same values and the same `.grad` tensors as
    `ParamLayout.theta` and `calls`' accumulation.

    Valid while every parameter keeps its storage, shape, dtype and `requires_grad` (a `MetaStep`'s guard
    checks them before every call); the views keep the storage they were made from alive, so no other tensor
    can take over its address."""

    def __init__(self, layout: ParamLayout):
        self.layout = layout
        p = layout.params
        a = [p[n] for n in layout.adapted.names]
        s = [p[n] for n in layout.shared.names]
        contiguous = all(t.is_contiguous() for t in a + s)
        self._flat_a = [t.detach().view(-1) for t in a] if contiguous else None
        self._flat_s = [t.detach().view(-1) for t in s] if contiguous else None
        self._sinks = tuple(_Sink(group, p) for group in (layout.adapted, layout.shared))
        self._no_shared = a[0].new_zeros(0).detach() if not s else None  # (read, never written)

    def theta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`ParamLayout.theta` without autograd history: `(theta_a [Pa], theta_s [Ps])`."""
        if self._flat_a is None:  # a parameter that is not contiguous: reshaped at every call
            with torch.no_grad():
                return self.layout.theta()
        theta_a = torch.cat(self._flat_a)
        if self._flat_s:
            return theta_a, torch.cat(self._flat_s)
        return theta_a, self._no_shared

    def accumulate(self, d_a: torch.Tensor, d_s) -> None:
        """Adds the flat meta-gradients into `p.grad` of the parameters that require grad; a parameter without a
        gradient yet gets a copy of its part (a tensor of its own, not a view of the flat buffer)."""
        into, add = [], []
        for sink, flat in zip(self._sinks, (d_a, d_s)):
            if flat is None or not sink.targets:
                continue
            parts = _unflatten_dense_tensors(flat, sink.likes)  # `[*shape]` views of the parts, in one op
            for i, p in sink.targets:
                if p.grad is None:
                    p.grad = parts[i].clone()
                else:
                    into.append(p.grad)
                    add.append(parts[i])
        if into:
            torch._foreach_add_(into, add)


class _Sink:
    """One flat group's parameters in slot order (`likes`: the shapes its flat vector unflattens to) and, for
    each of them that requires grad, (index, parameter)."""

    def __init__(self, group: FlatGroup, params: dict):
        self.likes = [params[s.name] for s in group.slots]
        self.targets = [(i, params[s.name]) for i, s in enumerate(group.slots) if params[s.name].requires_grad]
