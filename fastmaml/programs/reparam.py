"""Weights PyTorch computes from other parameters as a layer runs: `torch.nn.utils.parametrize`
(`parametrizations.weight_norm`, a user's own parametrization) and the older weight-norm hook
(`torch.nn.utils.weight_norm`: `weight_g`, `weight_v`).

The fused compiler takes such a weight as a derived tensor (fused/derived.py): `reparametrization(module,
name)` is the function of the parameters it is computed from. Parametrizations run as the model's own
modules (copies on the meta device, called with the parameters by `torch.func.functional_call`), chained as
`ParametrizationList.forward` chains them; one that keeps buffers is refused (its state is not a
parameter: spectral_norm's power iteration updates its vectors in place as it runs; orthogonal keeps a base).

Weight normalization is written out as its definition, w = v · g / ‖v‖ with the norm over every dim but
`dim` (over all of them for dim = −1, PyTorch's "whole tensor"), here and in the torch.func program's copy
of the model (`use_exact_weight_norm`): PyTorch's fused `torch._weight_norm` has no forward-mode derivative
and no vmap rule, which both need, and its double backward is wrong (torch 2.13: gradgradcheck fails on it).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.weight_norm import WeightNorm

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class Reparametrization:
    """`fn(values of params) -> weight`; `text` says how PyTorch computes it (for `explain`)."""

    fn: Callable[[List[Tensor]], Tensor]
    params: Tuple[nn.Parameter, ...]
    text: str


def weight_norm(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """`torch._weight_norm(v, g, dim)` in ops torch.func transforms: v · g / ‖v‖ over every dim but `dim`."""
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    keep = dim % v.dim()
    others = [d for d in range(v.dim()) if d != keep]
    return v * (g / torch.linalg.vector_norm(v, 2, others, keepdim=True))


class _ExactWeightNorm(nn.Module):
    """`parametrizations.weight_norm`'s parametrization, computed as `weight_norm` (its definition)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return weight_norm(weight_v, weight_g, self.dim)


class _ExactWeightNormHook(WeightNorm):
    """The weight-norm hook of `torch.nn.utils.weight_norm`, computing the weight as `weight_norm`."""

    def compute_weight(self, module: nn.Module) -> Tensor:
        return weight_norm(getattr(module, f"{self.name}_v"), getattr(module, f"{self.name}_g"), self.dim)


@contextlib.contextmanager
def copyable(model: nn.Module):
    """Inside the block, the weights the weight-norm hook last computed are detached, so that `model` can
    be deep-copied (PyTorch refuses to copy a tensor with history)."""
    saved = []
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm) and isinstance(m.__dict__.get(hook.name), Tensor):
                saved.append((m, hook.name, m.__dict__[hook.name]))
                m.__dict__[hook.name] = m.__dict__[hook.name].detach()
    try:
        yield model
    finally:
        for m, name, value in saved:
            m.__dict__[name] = value


def use_exact_weight_norm(model: nn.Module) -> None:
    """Replaces, in place, every weight normalization of `model` (a parametrization or a hook) by one that
    computes it as `weight_norm`: for a copy the torch.func program runs."""
    for m in model.modules():
        if isinstance(m, parametrize.ParametrizationList):
            for i, f in enumerate(m):
                if type(f) is parametrizations._WeightNorm:
                    m[i] = _ExactWeightNorm(f.dim)
        for key, hook in list(m._forward_pre_hooks.items()):
            if type(hook) is WeightNorm:
                m._forward_pre_hooks[key] = _ExactWeightNormHook(hook.name, hook.dim)


def has_other_hooks(m: nn.Module) -> bool:
    """Whether m has hooks other than the weight-norm pre-hooks of `torch.nn.utils.weight_norm`."""
    pre = m._forward_pre_hooks.values()
    return bool(m._forward_hooks or m._backward_hooks) or any(not isinstance(h, WeightNorm) for h in pre)


def reparametrization(m: nn.Module, name: str, path: str) -> Optional[Reparametrization]:
    """Module m's tensor `name` (m at `path` in the model) as a function of parameters, or None when PyTorch
    does not compute it. Raises ValueError for a parametrization with buffers."""
    if parametrize.is_parametrized(m, name):
        return parametrization_list(m.parametrizations[name], f"{path}.parametrizations.{name}")
    hook = next((h for h in m._forward_pre_hooks.values() if isinstance(h, WeightNorm) and h.name == name), None)
    if hook is None:
        return None
    dim = hook.dim
    g, v = getattr(m, f"{name}_g"), getattr(m, f"{name}_v")
    text = f"weight_norm({path}.{name}_v, {path}.{name}_g, dim={dim})"
    return Reparametrization(lambda L: weight_norm(L[0], L[1], dim), (v, g), text)


def parametrization_list(plist: nn.Module, path: str) -> Reparametrization:
    """What a call of a `ParametrizationList` (module `path`) computes: a parametrized tensor (fx traces the
    property read in `forward`, `F.linear(x, self.fc.weight)`, as such a call). Raises ValueError for one
    with buffers."""
    if any(True for _ in plist.buffers()):
        raise ValueError(
            f"{path}: a parametrization with buffers ({', '.join(type(p).__name__ for p in plist)}), state the "
            "fused engine does not follow (spectral_norm's power iteration updates its vectors as it runs)"
        )
    names = [n for n, _ in plist.named_parameters()]
    params = tuple(p for _, p in plist.named_parameters())
    originals = ["original"] if plist.is_tensor else [f"original{i}" for i in range(plist.ntensors)]
    steps = [_step(f, f"{i}.", names) for i, f in enumerate(plist)]

    def fn(L: List[Tensor]) -> Tensor:
        values = dict(zip(names, L))
        x = steps[0](values, [values[o] for o in originals])
        for step in steps[1:]:
            x = step(values, [x])
        return x

    chain = " ∘ ".join(type(f).__name__ for f in reversed(list(plist)))
    return Reparametrization(fn, params, f"{chain}({', '.join(f'{path}.{o}' for o in originals)})")


def _step(f: nn.Module, prefix: str, names: List[str]) -> Callable:
    """One parametrization of a chain: (values by name, its inputs) -> its output."""
    if type(f) is parametrizations._WeightNorm:
        dim = f.dim
        return lambda values, args: weight_norm(args[1], args[0], dim)
    shell = copy.deepcopy(f).to("meta")
    own = [(n, n[len(prefix) :]) for n in names if n.startswith(prefix)]

    def step(values, args):
        return functional_call(shell, {short: values[n] for n, short in own}, tuple(args))

    return step
