"""Ready-made few-shot classification networks: the conv4 and fully connected nets of the MAML paper
(Finn et al. 2017), as `nn.Sequential`s of standard layers, and ResNet-12 (Lee et al. 2019, the
MetaOptNet / learn2learn layout), written as classes with a `forward` as users write models.

All take images `[N, C, H, W]` and return logits `[N, num_classes]`.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch.nn.functional as F
from torch import nn


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def conv4(
    in_channels: int, num_classes: int, hidden: int = 64, image_size: int = 28, norm: str = "batch", groups: int = 4
) -> nn.Sequential:
    """The 4-block conv net of the MAML paper: 4 × [Conv 3×3 (padding 1) → BatchNorm2d → ReLU → MaxPool
    2×2], then Flatten → Linear.

    Args:
        in_channels: input channels (1 for Omniglot, 3 for mini-ImageNet).
        num_classes: output classes (ways).
        hidden: filters per conv (64 for Omniglot, 32 for mini-ImageNet).
        image_size: the side of the square input; each pooling floors (84 → 42 → 21 → 10 → 5), so the
            classifier sees `hidden · s²` features, s the side after four poolings (1 for 28, 5 for 84).
        norm: each block's norm: "batch" (BatchNorm2d, the paper's), "group" (GroupNorm with `groups`
            groups: each example's own statistics, no batch statistics), or "none".
        groups: GroupNorm's groups (a divisor of `hidden`), for norm="group".

    Returns:
        An `nn.Sequential`: `[N, in_channels, image_size, image_size]` -> `[N, num_classes]`.
    """
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    hidden = _positive_int(hidden, "hidden")
    image_size = _positive_int(image_size, "image_size")
    norms = {"batch": lambda: nn.BatchNorm2d(hidden), "group": lambda: nn.GroupNorm(groups, hidden), "none": None}
    if norm not in norms:
        raise ValueError(f"norm: expected one of {sorted(norms)}, got {norm!r}")
    if norm == "group" and (_positive_int(groups, "groups") > hidden or hidden % groups):
        raise ValueError(f"groups: expected a divisor of hidden={hidden}, got {groups}")
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
        layers.append(nn.Conv2d(channels, hidden, kernel_size=3, padding=1))
        if norms[norm] is not None:
            layers.append(norms[norm]())
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = hidden
    layers += [nn.Flatten(), nn.Linear(hidden * side * side, num_classes)]
    return nn.Sequential(*layers)


def omniglot_mlp(num_classes: int, in_features: int = 784) -> nn.Sequential:
    """The fully connected Omniglot net of the MAML paper: Flatten, then 784-256-128-64-64 with
    BatchNorm1d and ReLU after each hidden Linear, then Linear → num_classes.

    Args:
        num_classes: output classes (ways).
        in_features: input features (784 for 28×28 images).

    Returns:
        An `nn.Sequential`: `[N, 1, 28, 28]` -> `[N, num_classes]`.
    """
    num_classes = _positive_int(num_classes, "num_classes")
    in_features = _positive_int(in_features, "in_features")
    layers = [nn.Flatten()]
    width = in_features
    for out in (256, 128, 64, 64):
        layers += [nn.Linear(width, out), nn.BatchNorm1d(out), nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ResNet12Block(nn.Module):
    """Three conv3×3 (no bias) + BatchNorm2d, LeakyReLU(0.1) after the first two; a conv1×1 + BatchNorm2d
    shortcut; `out += shortcut`, LeakyReLU(0.1), MaxPool2d(2). `[N, cin, H, W]` -> `[N, cout, H/2, W/2]`."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.LeakyReLU(0.1)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.maxpool(self.relu(out))


class ResNet12(nn.Module):
    """ResNet-12: four `ResNet12Block`s of `widths` channels, a global average pool and a Linear head
    (`self.classifier`, the part ANIL adapts: `inner_params=["classifier"]`). DropBlock is left out: it is
    random, and exact meta-gradients need a deterministic model.

    Input `[N, in_channels, H, W]` (84×84 for mini-ImageNet: 84 → 42 → 21 → 10 → 5), output `[N, num_classes]`.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (64, 160, 320, 640), in_channels: int = 3):
        super().__init__()
        num_classes = _positive_int(num_classes, "num_classes")
        in_channels = _positive_int(in_channels, "in_channels")
        widths = tuple(widths)
        if len(widths) != 4:
            raise ValueError(f"widths: expected 4 block widths, got {widths!r}")
        widths = tuple(_positive_int(w, "widths") for w in widths)
        blocks, cin = [], in_channels
        for w in widths:
            blocks.append(ResNet12Block(cin, w))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def resnet12(num_classes: int, widths: Sequence[int] = (64, 160, 320, 640), in_channels: int = 3) -> ResNet12:
    """ResNet-12 (see `ResNet12`).

    Args:
        num_classes: output classes (ways).
        widths: the four blocks' channels (MetaOptNet / learn2learn: 64-160-320-640; 16-32-64-128 is a
            size for CPUs).
        in_channels: input channels.

    Returns:
        A `ResNet12`: `[N, in_channels, H, W]` -> `[N, num_classes]`.
    """
    return ResNet12(num_classes, widths, in_channels)
