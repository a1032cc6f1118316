"""Context parameters: CAVIA (Zintgraf et al. 2019, "Fast Context Adaptation via Meta-Learning").

CAVIA splits a network into a small context vector φ, the only parameters the inner loop adapts, and
the network θ, which is meta-learned. Every task starts from φ = 0 and φ gets no meta-gradient of its own;
θ gets the exact meta-gradient through the inner loop on φ. Two layers carry a context vector here:

- `ContextConcat`: φ concatenated to every example's features (CAVIA's regression network: the input x
  becomes [x, φ]);
- `FiLM`: a per-channel scale and shift of a hidden layer computed from φ by a linear map,
  y = γ ⊙ x + β with [γ; β] = W φ + b (CAVIA's conv net, Perez et al. 2018).

Each layer holds its context as a *frozen* `nn.Parameter` of zeros (`requires_grad=False`). Naming the
context parameters in `inner_params` (`context_names(model)`) makes them the adapted parameters: they
start at their value, 0, in every task, adapt in the inner loop, and, being frozen, get no `.grad` (so an
optimizer never moves them off 0), while the rest of the model gets its exact meta-gradient::

    model = fastmaml.context.context_mlp()                 # [x, φ] -> 40 -> 40 -> 1
    fastmaml.meta_step(model, tasks, inner_lr=1.0, steps=1, inner_params=fastmaml.context.context_names(model))

Both layers have hand-derived rules in the fused engine (fastmaml/programs/fused/context.py), so these
models run there, all orders, `meta_step` and `adapt`. Two layers may share one context vector: assign
the same parameter to both (`film2.context = film1.context`); it is then one adapted slot.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ContextConcat",
    "FiLM",
    "context_names",
    "context_layers",
    "reset_context",
    "context_mlp",
    "context_conv4",
    "CONTEXT_LAYERS",
]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _zero_context(num_context: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(num_context), requires_grad=False)


class ContextConcat(nn.Module):
    """Concatenates the context vector φ `[C]` to the features of every example: `[N, ..., I]` ->
    `[N, ..., I + C]` (along the last dim).

    Args:
        num_context: C, the size of φ (CAVIA's sinusoid network: 5).

    Attributes:
        context: φ, a frozen `nn.Parameter` of zeros `[C]` (adapted when named in `inner_params`).
    """

    def __init__(self, num_context: int):
        super().__init__()
        self.num_context = _positive_int(num_context, "num_context")
        self.context = _zero_context(self.num_context)

    def forward(self, x):
        return torch.cat([x, self.context.expand(*x.shape[:-1], self.num_context)], -1)

    def extra_repr(self) -> str:
        return f"num_context={self.num_context}"


class FiLM(nn.Module):
    """Feature-wise linear modulation by the context: y = γ ⊙ x + β per channel, [γ; β] = W φ + b.

    x is `[N, C, *spatial]` (a conv map) or `[N, C]`; γ and β `[C]` scale and shift channel c of every
    example and position. W `[2C, D]` is initialized like an `nn.Linear`, b to γ = 1, β = 0: at φ = 0, the
    value every task starts from, the layer is the identity.

    Args:
        num_channels: C, the channels of the modulated layer.
        num_context: D, the size of φ (CAVIA's mini-ImageNet network: 100).

    Attributes:
        context: φ, a frozen `nn.Parameter` of zeros `[D]`.
        weight: W `[2C, D]`.
        bias: b `[2C]`.
    """

    def __init__(self, num_channels: int, num_context: int):
        super().__init__()
        self.num_channels = _positive_int(num_channels, "num_channels")
        self.num_context = _positive_int(num_context, "num_context")
        self.context = _zero_context(self.num_context)
        self.weight = nn.Parameter(torch.empty(2 * self.num_channels, self.num_context))
        self.bias = nn.Parameter(torch.empty(2 * self.num_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W as `nn.Linear` initializes its weight; b: γ = 1, β = 0 (the identity at φ = 0)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.bias[: self.num_channels] = 1.0
            self.bias[self.num_channels :] = 0.0

    def forward(self, x):
        z = F.linear(self.context, self.weight, self.bias)
        shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        return x * z[: self.num_channels].view(shape) + z[self.num_channels :].view(shape)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, num_context={self.num_context}"


CONTEXT_LAYERS = (ContextConcat, FiLM)


def context_layers(model: nn.Module) -> List[nn.Module]:
    """The context layers (`ContextConcat`, `FiLM`) of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, CONTEXT_LAYERS)]


def context_names(model: nn.Module) -> List[str]:
    """The names of `model`'s context parameters, as `inner_params` takes them (each shared vector once).

    Args:
        model: a model with `ContextConcat` or `FiLM` layers.

    Returns:
        Parameter names such as `["0.context"]`.

    Raises:
        ValueError: the model has no context layer.
    """
    ids = {id(m.context) for m in context_layers(model)}
    if not ids:
        raise ValueError("model: has no context layer (fastmaml.context.ContextConcat or FiLM)")
    return [name for name, p in model.named_parameters() if id(p) in ids]


def reset_context(model: nn.Module) -> None:
    """Puts every context vector back to CAVIA's rule: zero, frozen (`requires_grad=False`).

    Args:
        model: a model with context layers.
    """
    for m in context_layers(model):
        with torch.no_grad():
            m.context.zero_()
        m.context.requires_grad_(False)


def context_mlp(sizes: Sequence[int] = (1, 40, 40, 1), num_context: int = 5) -> nn.Sequential:
    """CAVIA's regression network: `ContextConcat`, then Linear layers with ReLU between them.

    Args:
        sizes: input features, hidden widths, outputs (the MAML sinusoid net: 1, 40, 40, 1).
        num_context: the size of the context vector concatenated to the input (CAVIA: 5).

    Returns:
        An `nn.Sequential`: `[N, sizes[0]]` -> `[N, sizes[-1]]`; its context is `"0.context"`.
    """
    sizes = [_positive_int(s, "sizes") for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"sizes: expected at least input and output sizes, got {sizes!r}")
    num_context = _positive_int(num_context, "num_context")
    layers: List[nn.Module] = [ContextConcat(num_context)]
    width = sizes[0] + num_context
    for i, out in enumerate(sizes[1:]):
        layers.append(nn.Linear(width, out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
        width = out
    return nn.Sequential(*layers)


def context_conv4(
    in_channels: int,
    num_classes: int,
    hidden: int = 32,
    image_size: int = 28,
    num_context: int = 100,
    film_block: int = 2,
) -> nn.Sequential:
    """CAVIA's conv net: the MAML paper's conv4 with a `FiLM` layer after the BatchNorm of one block.

    Blocks: Conv 3×3 (padding 1) → BatchNorm2d → [FiLM] → ReLU → MaxPool 2×2, four times, then Flatten →
    Linear. CAVIA modulates the third block (`film_block=2`) with 100 context parameters.

    Args:
        in_channels: input channels.
        num_classes: output classes (ways).
        hidden: filters per conv.
        image_size: the side of the square input (at least 16).
        num_context: the size of the context vector.
        film_block: which block (0–3) the FiLM layer modulates.

    Returns:
        An `nn.Sequential` `[N, in_channels, image_size, image_size]` -> `[N, num_classes]`.
    """
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    hidden = _positive_int(hidden, "hidden")
    num_context = _positive_int(num_context, "num_context")
    side = _positive_int(image_size, "image_size") // 16
    if side < 1:
        raise ValueError(
            f"image_size: four 2×2 max-poolings need an input side of at least 16 pixels, got {image_size}"
        )
    if isinstance(film_block, bool) or film_block not in range(4):
        raise ValueError(f"film_block: expected a block index 0-3, got {film_block!r}")
    layers: List[nn.Module] = []
    channels = in_channels
    for i in range(4):
        layers += [nn.Conv2d(channels, hidden, kernel_size=3, padding=1), nn.BatchNorm2d(hidden)]
        if i == film_block:
            layers.append(FiLM(hidden, num_context))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = hidden
    layers += [nn.Flatten(), nn.Linear(hidden * side * side, num_classes)]
    return nn.Sequential(*layers)
