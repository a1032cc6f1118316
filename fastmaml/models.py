"""Ready-made few-shot classification networks: the conv4 and fully connected nets of the MAML paper
(Finn et al. 2017), as `nn.Sequential`s of standard layers, ResNet-12 (Lee et al. 2019, the
MetaOptNet / learn2learn layout) and a small vision transformer (Dosovitskiy et al. 2021, as timm writes
it), written as classes with a `forward` as users write models.

All take images `[N, C, H, W]` and return logits `[N, num_classes]`.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
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


class ViTAttention(nn.Module):
    """timm's multi-head self-attention: one qkv projection, `permute(2, 0, 3, 1, 4)` and `unbind(0)` into
    q, k, v `[N, heads, L, d]`, softmax(q kᵀ / √d) v, dropout of the weights and of the projection's output
    (in training mode). `[N, L, dim]` -> `[N, L, dim]`."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(x))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) (GELU, 4× wide)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A vision transformer as timm writes it: `patch`×`patch` patches embedded by a strided convolution, a
    class token (`self.cls_token.expand(B, -1, -1)`) and learned positions, `depth` pre-norm blocks, a final
    LayerNorm and a Linear head on the class token (`self.head`, the part ANIL adapts).

    Input `[N, in_channels, image_size, image_size]`, output `[N, num_classes]`.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        patch: int = 8,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        in_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        num_classes, image_size, patch = (
            _positive_int(v, n) for v, n in ((num_classes, "num_classes"), (image_size, "image_size"), (patch, "patch"))
        )
        dim, depth, heads = (_positive_int(v, n) for v, n in ((dim, "dim"), (depth, "depth"), (heads, "heads")))
        in_channels = _positive_int(in_channels, "in_channels")
        if image_size % patch:
            raise ValueError(f"patch: {patch} does not divide image_size {image_size}")
        if dim % heads:
            raise ValueError(f"heads: {heads} does not divide dim {dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(num_classes: int, **kwargs) -> ViT:
    """A small vision transformer (see `ViT`; keyword arguments: image_size, patch, dim, depth, heads,
    in_channels, dropout). Returns `[N, in_channels, H, W]` -> `[N, num_classes]`."""
    return ViT(num_classes, **kwargs)
