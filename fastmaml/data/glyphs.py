"""The embedded dataset: procedurally drawn glyphs, so the few-shot pipeline runs with no download.

Each class is a glyph of a few strokes (quadratic Bézier curves with random control points); each of
its examples redraws the glyph with its own handwriting: a random affine distortion of the whole
glyph (rotation, scale, shear, shift), per-control-point jitter and stroke width. Images are
`[1, size, size]`, uint8, strokes bright on a dark background (like preprocessed Omniglot).
Classes share the stroke vocabulary but differ in its arrangement, so a network that has learned
stroke features adapts from one example far better than one from a random initialization.

Everything is drawn from one `torch.Generator` seed with plain CPU tensor ops: the same seed gives the
same dataset (a few seconds on 2 CPU cores; kept in memory after the first call). Nothing is stored in
the package, so there is no package data to ship.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .episodes import ClassDataset, Splits, split_classes

STROKES = 4  # strokes per glyph at most (each class uses 2..STROKES)
CURVE_POINTS = 64  # points splatted along each Bézier curve


def _bezier(ctrl: torch.Tensor) -> torch.Tensor:
    """ctrl `[..., 3, 2]` -> points `[..., CURVE_POINTS, 2]` on the quadratic Bézier curve."""
    t = torch.linspace(0, 1, CURVE_POINTS)[:, None]
    p0, p1, p2 = ctrl[..., 0:1, :], ctrl[..., 1:2, :], ctrl[..., 2:3, :]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Binary dilation of `[B, H, W]` by a (2r+1)×(2r+1) square (separable shifts)."""
    H, W = mask.shape[1:]
    p = F.pad(mask, (r, r, 0, 0))
    rows = functools.reduce(torch.logical_or, [p[:, :, i : i + W] for i in range(2 * r + 1)])
    p = F.pad(rows, (0, 0, r, r))
    return functools.reduce(torch.logical_or, [p[:, i : i + H] for i in range(2 * r + 1)])


def _render(points: torch.Tensor, active: torch.Tensor, thick: torch.Tensor, size: int) -> torch.Tensor:
    """points `[B, S, P, 2]` in [0, 1]², active `[B, S]`, thick `[B]` bool -> images `[B, size, size]` in [0, 1].

    Splats the curve points on a 2× supersampled canvas, dilates them into strokes (3×3, or 5×5
    for thick strokes) and averages 2×2 blocks down to `size` (antialiased edges).
    """
    B = points.shape[0]
    hi = 2 * size
    pix = (points.clamp(0, 1 - 1e-6) * hi).long()  # [B, S, P, 2] (x, y)
    flat = (torch.arange(B)[:, None, None] * hi * hi + pix[..., 1] * hi + pix[..., 0])[active]
    canvas = torch.zeros(B * hi * hi, dtype=torch.bool)
    canvas[flat.reshape(-1)] = True
    canvas = canvas.view(B, hi, hi)
    thin = _dilate(canvas, 1)
    strokes = torch.where(thick[:, None, None], _dilate(thin, 1), thin).float()
    return F.avg_pool2d(strokes[:, None], 2)[:, 0]


def _make(num_classes: int, examples: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # class prototypes: STROKES curves of 3 control points in the central square, 2..STROKES active
    ctrl = 0.2 + 0.6 * torch.rand(num_classes, STROKES, 3, 2, generator=g)
    n_active = torch.randint(2, STROKES + 1, (num_classes,), generator=g)
    active = torch.arange(STROKES) < n_active[:, None]  # [classes, S]

    E = examples
    ctrl = ctrl[:, None].expand(-1, E, -1, -1, -1)  # [classes, E, S, 3, 2]
    jitter = 0.045 * torch.randn(num_classes, E, STROKES, 3, 2, generator=g)
    angle = (torch.rand(num_classes, E, generator=g) - 0.5) * (2 * math.radians(15))
    scale = 0.85 + 0.3 * torch.rand(num_classes, E, generator=g)
    shear = 0.3 * (torch.rand(num_classes, E, generator=g) - 0.5)
    shift = 0.12 * (torch.rand(num_classes, E, 2, generator=g) - 0.5)
    thick = torch.rand(num_classes, E, generator=g) < 0.5
    cos, sin = torch.cos(angle), torch.sin(angle)
    A = torch.stack([torch.stack([cos, -sin + shear], -1), torch.stack([sin, cos], -1)], -2)
    A = A * scale[..., None, None]  # [classes, E, 2, 2]
    centered = ctrl + jitter - 0.5
    moved = torch.einsum("ceij,cesqj->cesqi", A, centered) + 0.5 + shift[:, :, None, None]
    points = _bezier(moved).reshape(num_classes * E, STROKES, CURVE_POINTS, 2)
    act = active[:, None].expand(-1, E, -1).reshape(num_classes * E, STROKES)
    images = _render(points, act, thick.reshape(-1), size)
    return (images * 255).round().to(torch.uint8).reshape(num_classes, E, 1, size, size)


@functools.lru_cache(maxsize=4)
def _cached(num_classes: int, examples: int, size: int, seed: int) -> torch.Tensor:
    return _make(num_classes, examples, size, seed)


def glyphs(num_classes: int = 600, examples: int = 20, size: int = 28, seed: int = 0) -> torch.Tensor:
    """The glyph dataset as uint8 `[num_classes, examples, 1, size, size]` (same seed, same data)."""
    for name, value, low in (("num_classes", num_classes, 1), ("examples", examples, 1), ("size", size, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return _cached(num_classes, examples, size, seed)


def glyph_splits(
    num_classes: int = 600,
    examples: int = 20,
    size: int = 28,
    seed: int = 0,
    val_classes: int = 100,
    test_classes: int = 100,
) -> Splits:
    """Disjoint class splits of `glyphs(...)`: the rest / `val_classes` / `test_classes`."""
    data = glyphs(num_classes, examples, size, seed)
    train_classes = num_classes - val_classes - test_classes
    if train_classes < 1:
        raise ValueError(
            f"val_classes + test_classes: {val_classes} + {test_classes} leave no meta-training classes "
            f"out of {num_classes}"
        )
    full = ClassDataset.from_tensor(data, names=[f"glyph{c:04d}" for c in range(num_classes)])
    train, val, test = split_classes(num_classes, [train_classes, val_classes, test_classes], seed=seed)
    return Splits(full.subset(train), full.subset(val), full.subset(test))
