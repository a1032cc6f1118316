"""Ready-made few-shot classification networks from the MAML paper (Finn et al. 2017), as plain
`nn.Sequential`s of standard layers (so any Program, fused or torch.func, can run them).

Both take images `[N, C, H, W]` and return logits `[N, num_classes]`.
"""
from __future__ import annotations

import numbers

from torch import nn


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def conv4(in_channels: int, num_classes: int, hidden: int = 64, image_size: int = 28) -> nn.Sequential:
    """The 4-block conv net: 4 × [Conv 3×3 (padding 1) → BatchNorm2d → ReLU → MaxPool 2×2], then
    Flatten → Linear. 64 filters for Omniglot (28×28), 32 for mini-ImageNet (84×84).

    image_size: the side of the square input; each pooling floors (84 → 42 → 21 → 10 → 5), so the
    classifier sees `hidden · s²` features with s the side after four poolings (1 for 28, 5 for 84).
    """
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    hidden = _positive_int(hidden, "hidden")
    image_size = _positive_int(image_size, "image_size")
    side = image_size
    for _ in range(4):
        side //= 2
    if side < 1:
        raise ValueError(
            f"image_size: four 2×2 max-poolings need an input side of at least 16 pixels, got {image_size}"
        )
    layers = []
    channels = in_channels
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = hidden
    layers += [nn.Flatten(), nn.Linear(hidden * side * side, num_classes)]
    return nn.Sequential(*layers)


def omniglot_mlp(num_classes: int, in_features: int = 784) -> nn.Sequential:
    """The fully connected Omniglot net of the MAML paper: Flatten, then 784-256-128-64-64 with
    BatchNorm1d and ReLU after each hidden Linear, then Linear → num_classes. Input `[N, 1, 28, 28]`."""
    num_classes = _positive_int(num_classes, "num_classes")
    in_features = _positive_int(in_features, "in_features")
    layers = [nn.Flatten()]
    width = in_features
    for out in (256, 128, 64, 64):
        layers += [nn.Linear(width, out), nn.BatchNorm1d(out), nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
