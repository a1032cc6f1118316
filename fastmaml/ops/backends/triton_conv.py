"""Task-batched convolutions on Triton (kernels/conv.py): the passes of the fused Conv2d rule's "triton"
strategy (`fastmaml/programs/fused/conv.py`), each one launch of an implicit-GEMM kernel with per-task
weights, the tangent forms sharing the value's tile loads.

    conv_forward(x, w, b, ...)                        y `[T, N, O, H', W']`
    conv_forward(x, w, b, ..., bn_stats=True)         (y, stats `[2, T, O]`: mean, biased variance of y)
    conv_value_tangent(x, xd, w, b, wd, bd, ...)      (y, ẏ = conv(ẋ, w) + conv(x, ẇ) + ḃ)
    conv_value_tangent(..., bn_stats=True)            (y, ẏ, stats `[4, T, O]`: also mean(ẏ), mean((y − ȳ) ẏ))
    conv_backward(gy, x, w, ..., need_x, gw_out, gb_out, accumulate)          gx; gw, gb written
    conv_tangent_backward(gy, gyd, x, xd, w, wd, ..., need_x, outs, touts)    (gx, ġx); gw, gb, ġw, ġb

x `[T, N, C, H, W]`, w `[T, O, C, kh, kw]` (per task, any strides: views of the fast weights) or
`[O, C, kh, kw]` (common), b `[T, O]` | `[O]` | None; stride, padding, dilation are pairs of ints.
Gradient outputs are written in place (views of the flat `[T, P]` gradient buffers).

`bn_stats`: the per-task, per-channel BatchNorm batch statistics of the output (over N, H', W'), from the
forward kernel's epilogue (per output tile, then a deterministic reduction over the tiles): what a
following BatchNorm on batch statistics needs, without reading y again. float32 (float64 for float64
inputs), of y and ẏ as stored. The fused engine gives them to a BatchNorm that is the only reader of the
convolution's output (`ConvRule.forward_stats`, fastmaml/programs/fused/program.py).

Runs where the "triton" backend runs: CUDA devices, and the CPU only under the Triton interpreter
(`TRITON_INTERPRET=1` set before the first use; tests). Elsewhere the first call raises
`BackendUnavailable` saying why. float32 is computed in TF32 when cuDNN's float32 convolutions are
(`fastmaml.precision.conv_allows_tf32`: PyTorch's flag, which the precision policies set), or as the call's
`tf32` says, else in true FP32; bfloat16/float16 on tensor cores with float32 accumulation; float64 exactly. The
kernels have no autograd formula: they refuse inputs that require grad while grad mode is on (the
fused engine builds no graph; the rule falls back to PyTorch's convolution for `AdaptedModel`).
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence, Tuple

import torch

from ...errors import BackendUnavailable
from ...precision import conv_allows_tf32
from .triton import _import_kernels, availability

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


_state: dict = {}


def _lib(device: torch.device):
    """`torch.ops.fastmaml_triton` with kernels/conv.py loaded, or BackendUnavailable for `device`."""
    ok, why = availability(device)
    if not ok:
        raise BackendUnavailable(f"conv strategy 'triton' cannot run on {device}: {why}")
    if "conv" not in _state:
        try:
            _import_kernels()
            _state["conv"] = importlib.import_module("fastmaml.kernels.conv")
        except Exception as exc:
            raise BackendUnavailable(f"conv strategy 'triton': kernels/conv.py failed to import: {exc!r}") from exc
    return torch.ops.fastmaml_triton


def _no_graph(*tensors: Opt) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "conv strategy 'triton': the Triton convolution kernels have no autograd formula; call them under "
            "torch.no_grad() or with tensors that do not require grad"
        )


def _geometry(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    return [int(v) for v in stride], [int(v) for v in padding], [int(v) for v in dilation]


def _tf32(tf32: Optional[bool]) -> bool:
    return conv_allows_tf32() if tf32 is None else bool(tf32)


def output_shape(x: Tensor, w: Tensor, stride, padding, dilation) -> Tuple[int, ...]:
    """`[T, N, O, H', W']` of conv(x, w)."""
    kh, kw = w.shape[-2:]
    ho = (x.shape[3] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[4] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (x.shape[0], x.shape[1], w.shape[-4], ho, wo)


def _stats_buffer(x: Tensor, T: int, channels: int, tangent: bool) -> Tensor:
    """Statistics `[2|4, T, channels]` in the accumulation type (float64 for float64, else float32)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty((4 if tangent else 2, T, channels), dtype=dtype, device=x.device)


def conv_forward(
    x: Tensor, w: Tensor, b: Opt, stride, padding, dilation, tf32: Optional[bool] = None, bn_stats: bool = False
):
    """y = conv(x, w) + b `[T, N, O, H', W']`, one launch. With `bn_stats`: (y, stats) with stats `[2, T, O]`
    = (mean, biased variance) of y per task and channel over (N, H', W'), from the same launch's epilogue."""
    lib = _lib(x.device)
    _no_graph(x, w, b)
    geo = _geometry(stride, padding, dilation)
    y = x.new_empty(output_shape(x, w, *geo))
    if not bn_stats:
        lib.conv2d_fwd(x, None, w, None, b, None, y, None, *geo, _tf32(tf32))
        return y
    stats = _stats_buffer(x, y.shape[0], y.shape[2], False)
    lib.conv2d_fwd_bn_stats(x, None, w, None, b, None, y, None, stats, *geo, False, _tf32(tf32))
    return y, stats


def conv_value_tangent(
    x: Tensor,
    xd: Opt,
    w: Tensor,
    b: Opt,
    wd: Opt,
    bd: Opt,
    stride,
    padding,
    dilation,
    value: bool = True,
    tf32: Optional[bool] = None,
    bn_stats: bool = False,
    y: Opt = None,
):
    """(y, ẏ = conv(ẋ, w) + conv(x, ẇ) + ḃ) in one launch (ẏ None when xd, wd and bd all are; y None
    without `value`).

    With `bn_stats`: (y, ẏ, stats), stats `[4, T, O]` = (mean, biased variance, mean(ẏ), mean((y − mean) ẏ))
    per task and channel over (N, H', W') from the same launch's epilogue (the last two 0 without ẏ).
    Without `value` the statistics need `y`, the output already computed (the activation tape): read in the
    epilogue, not recomputed; it is returned as the first element."""
    lib = _lib(x.device)
    _no_graph(x, xd, w, b, wd, bd)
    if y is not None and (value or not bn_stats):
        raise ValueError(
            "conv_value_tangent: y (the output already computed) is read only with bn_stats and value=False"
        )
    geo = _geometry(stride, padding, dilation)
    shape = output_shape(x, w, *geo)
    yd = None if xd is None and wd is None and bd is None else x.new_empty(shape)
    if not bn_stats:
        y = x.new_empty(shape) if value else None
        if y is not None or yd is not None:
            lib.conv2d_fwd(x, xd, w, wd, b, bd, y, yd, *geo, _tf32(tf32))
        return y, yd
    if value:
        y = x.new_empty(shape)
    elif y is None:
        raise ValueError("conv_value_tangent: bn_stats without value needs y (the output already computed)")
    stats = _stats_buffer(x, shape[0], shape[2], yd is not None)
    lib.conv2d_fwd_bn_stats(x, xd, w, wd, b, bd, y, yd, stats, *geo, not value, _tf32(tf32))
    if yd is None:
        stats = torch.cat([stats, torch.zeros_like(stats)])
    return y, yd, stats


def conv_backward(
    gy: Tensor,
    x: Tensor,
    w: Tensor,
    stride,
    padding,
    dilation,
    need_x: bool,
    gw_out: Opt,
    gb_out: Opt = None,
    accumulate: bool = False,
    tf32: Optional[bool] = None,
) -> Opt:
    """∂x(gy, w) `[T, N, C, H, W]` if `need_x` (else None); ∂w(x, gy) and Σ gy written into `gw_out`
    `[T, O, C, kh, kw]` / `gb_out` `[T, O]` when given (`accumulate`: the weight gradient added)."""
    lib = _lib(gy.device)
    _no_graph(gy, x, w)
    geo = _geometry(stride, padding, dilation)
    if gw_out is not None or gb_out is not None:
        lib.conv2d_bwd_weight(gy, None, x, None, gw_out, None, gb_out, None, *geo, accumulate, _tf32(tf32))
    if not need_x:
        return None
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.conv2d_bwd_input(gy, None, w, None, gx, None, *geo, _tf32(tf32))
    return gx


def conv_tangent_backward(
    gy: Tensor,
    gyd: Tensor,
    x: Tensor,
    xd: Opt,
    w: Tensor,
    wd: Opt,
    stride,
    padding,
    dilation,
    need_x: bool,
    outs: Sequence[Opt],
    touts: Sequence[Opt],
    gx: Opt = None,
    tf32: Optional[bool] = None,
) -> Tuple[Opt, Opt]:
    """The backward and its tangent: gw = ∂w(x, gy), gb = Σ gy into `outs`, ġw = ∂w(x, ġy) + ∂w(ẋ, gy),
    ġb = Σ ġy into `touts` (those given), in one launch; returns (gx = ∂x(gy, w), ġx = ∂x(ġy, w) +
    ∂x(gy, ẇ)) from a second one (only ġx computed when `gx` is given), or (None, None) without `need_x`."""
    lib = _lib(gy.device)
    _no_graph(gy, gyd, x, xd, w, wd)
    geo = _geometry(stride, padding, dilation)
    gw, gb = outs
    gwd, gbd = touts
    if any(t is not None for t in (gw, gb, gwd, gbd)):
        lib.conv2d_bwd_weight(gy, gyd, x, xd, gw, gwd, gb, gbd, *geo, False, _tf32(tf32))
    if not need_x:
        return None, None
    gxd = torch.empty_like(x, memory_format=torch.contiguous_format)
    if gx is None:
        gx = torch.empty_like(gxd)
        lib.conv2d_bwd_input(gy, gyd, w, wd, gx, gxd, *geo, _tf32(tf32))
    else:
        lib.conv2d_bwd_input(gy, gyd, w, wd, None, gxd, *geo, _tf32(tf32))
    return gx, gxd
