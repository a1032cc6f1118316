"""Memory format of the fused engine's image activations `[T, N, C, H, W]`.

- "contiguous": each example's `[C, H, W]` contiguous (NCHW);
- "channels_last": the strides of a contiguous `[T, N, H, W, C]`, so that each task's `[N, C, H, W]` is a
  channels-last tensor: oneDNN's CPU convolutions read and write it without reordering to their blocked
  format and back, which on NCHW costs as much as the product itself for maps with few channels (the first
  layers at 84×84);
- "auto": channels-last for float32 inputs of at least `CHANNELS_LAST_MIN_POSITIONS` positions per map
  where the BatchNorm ops (if the model has BatchNorm) are the C++ kernels, which have channels-last
  variants, and the model has no per-example norm (LayerNorm, GroupNorm, InstanceNorm: their rule runs NCHW);
  contiguous otherwise (PyTorch's own BatchNorm and pooling, the reference backend, run slower on
  channels-last than on NCHW). `benchmarks/conv_layout.py` times both formats on the layers of the
  standard nets and on whole meta-steps, in float32; results in benchmarks/RESULTS.md.

The program converts its input once per sweep (`to_format`); the rules keep their input's format in their
outputs (convolutions, BatchNorm, pooling, joins) and bring every other full-size operand to it (`dense_as`),
so any mix is correct and one format runs end to end. Features flattened for a Linear head are in NCHW
order whatever the format (a copy, as `reshape` makes). `FORMAT` holds the choice per device type; CUDA keeps
"contiguous" (unmeasured there).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FORMATS = ("contiguous", "channels_last", "auto")
FORMAT = {"cpu": "auto", "cuda": "contiguous"}
CHANNELS_LAST_MIN_POSITIONS = 32 * 32  # "auto": channels-last for input maps of at least this many positions


def choose(fmt: str, x, norm_kernels: bool = True) -> str:
    """The format for the program's input x: `fmt` itself unless it is "auto"; "contiguous" for anything
    but image batches `[T, N, C, H, W]`. norm_kernels: the model's norm layers (if any) run kernels
    with channels-last variants."""
    if fmt not in FORMATS:
        raise ValueError(f"memory format: expected one of {FORMATS}, got {fmt!r}")
    if x.dim() != 5:
        return "contiguous"
    if fmt != "auto":
        return fmt
    large = x.shape[3] * x.shape[4] >= CHANNELS_LAST_MIN_POSITIONS
    return "channels_last" if large and norm_kernels and x.dtype == torch.float32 else "contiguous"


def follows_channels_last(x) -> bool:
    """Whether x `[T, N, C, H, W]` is channels-last, so that values computed from it go channels-last: the
    strides of a contiguous `[T, N, H, W, C]` with unit channel stride (which tells the formats apart where
    they coincide as layouts, C = 1: a contiguous tensor's channel stride is H·W)."""
    return x.dim() == 5 and x.stride(2) == 1 and x.permute(0, 1, 3, 4, 2).is_contiguous()


def _channels_last(x):
    if follows_channels_last(x):
        return x
    return empty_as(x.shape, x, channels_last=True).copy_(x)


def to_format(x, fmt: str):
    """x `[T, N, C, H, W]` in format `fmt` ("contiguous" or "channels_last"); other ranks as they are."""
    if x.dim() != 5:
        return x
    return _channels_last(x) if fmt == "channels_last" else x.contiguous()


def dense_as(t, x):
    """t in x's format: channels-last where x is (`follows_channels_last`), else contiguous."""
    if t is None:
        return None
    return _channels_last(t) if t.dim() == 5 and follows_channels_last(x) else t.contiguous()


def empty_as(shape: Sequence[int], x, channels_last: Optional[bool] = None):
    """An uninitialized `[T, N, C, H, W]` tensor of `shape` in x's format (or channels-last as told), x's dtype
    and device."""
    if channels_last is None:
        channels_last = follows_channels_last(x)
    if len(shape) == 5 and channels_last:
        T, N, C, H, W = shape
        return x.new_empty(T, N, H, W, C).permute(0, 1, 4, 2, 3)
    return x.new_empty(shape)


def cat(tensors: Sequence[torch.Tensor], dim: int, like):
    """torch.cat along `dim`, the result in `like`'s format (torch.cat makes 5-D results contiguous)."""
    if not follows_channels_last(like) or tensors[0].dim() != 5:
        return torch.cat(list(tensors), dim)
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    out = empty_as(shape, like)
    start = 0
    for t in tensors:
        out.narrow(dim, start, t.shape[dim]).copy_(t)
        start += t.shape[dim]
    return out
