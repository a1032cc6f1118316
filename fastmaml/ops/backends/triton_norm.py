"""The "triton" backend of the BatchNorm ops (`fastmaml/ops/reference/batchnorm.py`, `block_tail.py`):
kernels/batchnorm.py, of the
BatchNorm + ReLU ops: kernels/batchnorm_relu.py, and of the BatchNorm + ReLU + MaxPool ops:
kernels/bn_relu_maxpool.py.

Same signatures and results as the torch references. The kernel modules are imported at the first call
(the backend's availability check in `fastmaml.ops.triton` has imported triton by then), so
`import fastmaml` never imports triton.
"""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from ...errors import BackendUnavailable
from ..reference.block_tail import per_task_channels, with_tangents, with_tangents_bwd
from ..registry import register
from .triton import EXPLICIT_ONLY, KERNEL_DTYPES, _import_kernels

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]
_EXPLICIT = dict(EXPLICIT_ONLY, dtypes=KERNEL_DTYPES)

_state: dict = {}


def _kernel_module(name: str):
    """`fastmaml.kernels.<name>` (its custom ops), imported once."""
    if name not in _state:
        try:
            _import_kernels()
            _state[name] = importlib.import_module(f"fastmaml.kernels.{name}")
        except Exception as exc:
            raise BackendUnavailable(f"backend='triton': kernels/{name}.py failed to import: {exc!r}") from exc
    return _state[name]


def _bn():
    """kernels/batchnorm.py."""
    return _kernel_module("batchnorm")


def _bn_relu():
    """kernels/batchnorm_relu.py."""
    return _kernel_module("batchnorm_relu")


def _bn_relu_pool():
    """kernels/bn_relu_maxpool.py."""
    return _kernel_module("bn_relu_maxpool")


def _channels4(v: Tensor) -> Tensor:
    """`[T|1, C]` -> `[T|1, 1, C, 1]` (the reference's shape of r and a)."""
    return v.view(v.shape[0], 1, v.shape[1], 1)


@register("batchnorm_fwd", "triton", **_EXPLICIT)
def batchnorm_fwd(x: Tensor, w: Opt, b: Opt, eps: float, mean: Opt = None, var: Opt = None):
    """x `[T, N, C, S]` -> (y, x̂, r `[T|1, 1, C, 1]`); batch statistics unless `mean`/`var` `[C]` are given."""
    y, xhat, _, r = _bn().batchnorm_fwd(x, w, None if w is None else b, mean, var, eps, w is not None)
    return y, (y if w is None else xhat), _channels4(r)


@register("batchnorm_train_fwd", "triton", **_EXPLICIT)
def batchnorm_train_fwd(x: Tensor, w: Opt, b: Opt, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """x `[T, N, C, S]` -> (y, mean `[T, C]`, r `[T, C]`), batch statistics, one kernel."""
    y, _, mean, r = _bn().batchnorm_fwd(x, w, b, None, None, eps, False)
    return y, mean, r


@register("batchnorm_train_bwd", "triton", **_EXPLICIT)
def batchnorm_train_bwd(
    gy: Tensor, x: Tensor, mean: Tensor, r: Tensor, w: Opt, eps: float, need_x: bool, gw_out: Opt, gb_out: Opt
) -> Opt:
    """Writes gw, gb `[T, C]` into the given outputs; returns gx `[T, N, C, S]` if `need_x` (x̂ from x)."""
    gx = _bn().batchnorm_bwd(gy, x, mean, r, w, True, need_x, gw_out, gb_out)
    return gx if need_x else None


@register("batchnorm_bwd", "triton", **_EXPLICIT)
def batchnorm_bwd(
    gy: Tensor, xhat: Tensor, r: Tensor, w: Opt, batch_stats: bool, need_x: bool, gw_out: Opt, gb_out: Opt
) -> Opt:
    """Writes Σ gy x̂ → `gw_out`, Σ gy → `gb_out` `[T, C]`; returns gx `[T, N, C, S]` if `need_x`."""
    gx = _bn().batchnorm_bwd(gy, xhat, None, r, w, batch_stats, need_x, gw_out, gb_out)
    return gx if need_x else None


@register("batchnorm_tangent_fwd", "triton", **_EXPLICIT)
def batchnorm_tangent_fwd(xd: Opt, xhat: Tensor, r: Tensor, w: Opt, wd: Opt, bd: Opt, batch_stats: bool):
    """(ẏ, x̂̇, a `[T, 1, C, 1]`) as the reference; None where it gives None."""
    if xd is None and wd is None and bd is None:
        return None, None, None
    yd, xhd, a = _bn().batchnorm_tangent_fwd(xd, xhat, r, w, wd, bd, batch_stats)
    if xd is None:
        return yd, None, None
    if w is None and wd is None and bd is None:  # ẏ = x̂̇: the kernel wrote x̂̇ only
        yd = xhd
    return yd, xhd, (_channels4(a) if batch_stats else None)


@register("batchnorm_tangent_bwd", "triton", **_EXPLICIT)
def batchnorm_tangent_bwd(
    gy: Tensor,
    gyd: Tensor,
    xhat: Tensor,
    xhd: Opt,
    a: Opt,
    r: Tensor,
    w: Opt,
    wd: Opt,
    batch_stats: bool,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """Writes gw, ġw, gb, ġb `[T, C]` into the given outputs; returns (gx, ġx) if `need_x`."""
    gx, gxd = _bn().batchnorm_tangent_bwd(
        gy, gyd, xhat, xhd, a, r, w, wd, batch_stats, need_x, gw_out, gwd_out, gb_out, gbd_out
    )
    return (gx, gxd) if need_x else (None, None)


# ---------------------------------------------------------------- BatchNorm followed by ReLU


@register("batchnorm_relu_train_fwd", "triton", **_EXPLICIT)
def batchnorm_relu_train_fwd(x: Tensor, w: Opt, b: Opt, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """x `[T, N, C, S]` -> (z, mean `[T, C]`, r `[T, C]`), batch statistics, one kernel."""
    z, _, mean, r = _bn_relu().batchnorm_relu_fwd(x, w, b, None, None, eps, False)
    return z, mean, r


@register("batchnorm_relu_fwd", "triton", **_EXPLICIT)
def batchnorm_relu_fwd(x: Tensor, w: Opt, b: Opt, eps: float, mean: Opt = None, var: Opt = None):
    """x `[T, N, C, S]` -> (z, x̂, r `[T|1, 1, C, 1]`); batch statistics unless `mean`/`var` `[C]` are given."""
    z, xhat, _, r = _bn_relu().batchnorm_relu_fwd(x, w, None if w is None else b, mean, var, eps, True)
    return z, xhat, _channels4(r)


@register("batchnorm_relu_train_bwd", "triton", **_EXPLICIT)
def batchnorm_relu_train_bwd(
    gz: Tensor,
    z: Tensor,
    x: Tensor,
    mean: Tensor,
    r: Tensor,
    w: Opt,
    eps: float,
    need_x: bool,
    gw_out: Opt,
    gb_out: Opt,
) -> Opt:
    """Writes gw, gb `[T, C]` into the given outputs; returns gx `[T, N, C, S]` if `need_x` (x̂ from x)."""
    gx = _bn_relu().batchnorm_relu_bwd(gz, z, x, mean, r, w, True, need_x, gw_out, gb_out)
    return gx if need_x else None


@register("batchnorm_relu_bwd", "triton", **_EXPLICIT)
def batchnorm_relu_bwd(
    gz: Tensor, z: Tensor, xhat: Tensor, r: Tensor, w: Opt, batch_stats: bool, need_x: bool, gw_out: Opt, gb_out: Opt
) -> Opt:
    """With gy = [z > 0] gz: writes Σ gy x̂, Σ gy `[T, C]` into the given outputs; returns gx if `need_x`."""
    gx = _bn_relu().batchnorm_relu_bwd(gz, z, xhat, None, r, w, batch_stats, need_x, gw_out, gb_out)
    return gx if need_x else None


@register("batchnorm_relu_value_tangent_fwd", "triton", **_EXPLICIT)
def batchnorm_relu_value_tangent_fwd(
    x: Tensor, xd: Opt, w: Opt, b: Opt, wd: Opt, bd: Opt, eps: float, mean: Opt = None, var: Opt = None
):
    """(z, ż, x̂, x̂̇, a `[T, 1, C, 1]`, r `[T|1, 1, C, 1]`) in one kernel; None where the reference gives None."""
    z, zd, xhat, xhd, a, r = _bn_relu().batchnorm_relu_value_tangent_fwd(
        x, xd, w, None if w is None else b, wd, bd, mean, var, eps
    )
    has_xd = xd is not None
    return (
        z,
        (zd if has_xd or wd is not None or bd is not None else None),
        xhat,
        (xhd if has_xd else None),
        (_channels4(a) if has_xd and mean is None else None),
        _channels4(r),
    )


@register("batchnorm_relu_tangent_bwd", "triton", **_EXPLICIT)
def batchnorm_relu_tangent_bwd(
    gz: Tensor,
    gzd: Tensor,
    z: Tensor,
    xhat: Tensor,
    xhd: Opt,
    a: Opt,
    r: Tensor,
    w: Opt,
    wd: Opt,
    batch_stats: bool,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """Writes gw, ġw, gb, ġb `[T, C]` into the given outputs; returns (gx, ġx) if `need_x`."""
    gx, gxd = _bn_relu().batchnorm_relu_tangent_bwd(
        gz, gzd, z, xhat, xhd, a, r, w, wd, batch_stats, need_x, gw_out, gwd_out, gb_out, gbd_out
    )
    return (gx, gxd) if need_x else (None, None)


def _copy_outs(pairs) -> None:
    for out, value in pairs:
        if out is not None:
            out.copy_(value)


# the block tail is chosen by "auto" on CUDA: faster than the reference in the op bench (benchmarks/RESULTS.md)
@register("bn_relu_maxpool_train_fwd", "triton", dtypes=KERNEL_DTYPES)
def bn_relu_maxpool_train_fwd(x: Tensor, w: Opt, b: Opt, eps: float, k: int):
    """x `[T, N, C, H, W]` -> (z, idx `[T, N, C, H/k, W/k]`, mean `[T, C]`, r `[T, C]`), one kernel."""
    w, b = per_task_channels(w, "w", x, 1.0), per_task_channels(b, "b", x, 0.0)
    z, _, idx, mean, r, _, _ = _bn_relu_pool().bn_relu_maxpool_fwd(x, None, w, b, None, None, eps, k)
    return z, idx, mean, r


@register("bn_relu_maxpool_train_bwd", "triton", dtypes=KERNEL_DTYPES)
def bn_relu_maxpool_train_bwd(
    gz: Tensor,
    z: Tensor,
    idx: Tensor,
    x: Tensor,
    mean: Tensor,
    r: Tensor,
    w: Opt,
    eps: float,
    k: int,
    need_x: bool,
    gw_out: Opt,
    gb_out: Opt,
) -> Opt:
    """Writes gw, gb `[T, C]` into the given outputs; returns gx `[T, N, C, H, W]` if `need_x`."""
    w = per_task_channels(w, "w", x, 1.0)
    gx, _, gw, _, gb, _ = _bn_relu_pool().bn_relu_maxpool_bwd(
        gz, None, z, idx, x, None, mean, r, None, None, w, None, k, need_x
    )
    _copy_outs(((gw_out, gw), (gb_out, gb)))
    return gx if need_x else None


_TANGENT = dict(dtypes=KERNEL_DTYPES, limits="float32/float64 with both tangents")


@register("bn_relu_maxpool_tangent_fwd", "triton", supports=with_tangents, **_TANGENT)
def bn_relu_maxpool_tangent_fwd(x: Tensor, xd: Opt, w: Opt, b: Opt, wd: Opt, bd: Opt, eps: float, k: int):
    """The forward and its tangent in one kernel."""
    w, b, bd = (
        per_task_channels(v, name, x, fill) for v, name, fill in ((w, "w", 1.0), (b, "b", 0.0), (bd, "bd", 0.0))
    )
    return _bn_relu_pool().bn_relu_maxpool_fwd(x, xd, w, b, wd.contiguous(), bd, eps, k)


@register("bn_relu_maxpool_tangent_bwd", "triton", supports=with_tangents_bwd, **_TANGENT)
def bn_relu_maxpool_tangent_bwd(
    gz: Tensor,
    gzd: Tensor,
    z: Tensor,
    idx: Tensor,
    x: Tensor,
    xd: Opt,
    mean: Tensor,
    r: Tensor,
    a: Tensor,
    dmean: Tensor,
    w: Opt,
    wd: Opt,
    k: int,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """The backward and its tangent in one kernel."""
    w = per_task_channels(w, "w", x, 1.0)
    gx, gxd, gw, gwd, gb, gbd = _bn_relu_pool().bn_relu_maxpool_bwd(
        gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd.contiguous(), k, need_x
    )
    _copy_outs(((gw_out, gw), (gwd_out, gwd), (gb_out, gb), (gbd_out, gbd)))
    return (gx, gxd) if need_x else (None, None)
