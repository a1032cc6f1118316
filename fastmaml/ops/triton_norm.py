"""The "triton" backend of the BatchNorm ops (`fastmaml/ops/layers.py`): kernels/batchnorm.py.

Same signatures and results as the torch references. The kernel module is imported at the first call
(the backend's availability check in `fastmaml.ops.triton` has imported triton by then), so
`import fastmaml` never imports triton.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from ..errors import BackendUnavailable
from .registry import register
from .triton import _import_kernels

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]

_state: dict = {}


def _bn():
    """`fastmaml.kernels.batchnorm` (its custom ops), imported once."""
    if "module" not in _state:
        try:
            _import_kernels()
            _state["module"] = importlib.import_module("fastmaml.kernels.batchnorm")
        except Exception as exc:
            raise BackendUnavailable(f"backend='triton': kernels/batchnorm.py failed to import: {exc!r}") from exc
    return _state["module"]


def _channels4(v: Tensor) -> Tensor:
    """`[T|1, C]` -> `[T|1, 1, C, 1]` (the reference's shape of r and a)."""
    return v.view(v.shape[0], 1, v.shape[1], 1)


@register("batchnorm_fwd", "triton")
def batchnorm_fwd(x: Tensor, w: Opt, b: Opt, eps: float, mean: Opt = None, var: Opt = None):
    """x `[T, N, C, S]` -> (y, x̂, r `[T|1, 1, C, 1]`); batch statistics unless `mean`/`var` `[C]` are given."""
    y, xhat, _, r = _bn().batchnorm_fwd(x, w, None if w is None else b, mean, var, eps, w is not None)
    return y, (y if w is None else xhat), _channels4(r)


@register("batchnorm_train_fwd", "triton")
def batchnorm_train_fwd(x: Tensor, w: Opt, b: Opt, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """x `[T, N, C, S]` -> (y, mean `[T, C]`, r `[T, C]`), batch statistics, one kernel."""
    y, _, mean, r = _bn().batchnorm_fwd(x, w, b, None, None, eps, False)
    return y, mean, r


@register("batchnorm_train_bwd", "triton")
def batchnorm_train_bwd(gy: Tensor, x: Tensor, mean: Tensor, r: Tensor, w: Opt, eps: float, need_x: bool,
                        gw_out: Opt, gb_out: Opt) -> Opt:
    """Writes gw, gb `[T, C]` into the given outputs; returns gx `[T, N, C, S]` if `need_x` (x̂ from x)."""
    gx = _bn().batchnorm_bwd(gy, x, mean, r, w, True, need_x, gw_out, gb_out)
    return gx if need_x else None


@register("batchnorm_bwd", "triton")
def batchnorm_bwd(gy: Tensor, xhat: Tensor, r: Tensor, w: Opt, batch_stats: bool, need_x: bool,
                  gw_out: Opt, gb_out: Opt) -> Opt:
    """Writes Σ gy x̂ → `gw_out`, Σ gy → `gb_out` `[T, C]`; returns gx `[T, N, C, S]` if `need_x`."""
    gx = _bn().batchnorm_bwd(gy, xhat, None, r, w, batch_stats, need_x, gw_out, gb_out)
    return gx if need_x else None


@register("batchnorm_tangent_fwd", "triton")
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


@register("batchnorm_tangent_bwd", "triton")
def batchnorm_tangent_bwd(gy: Tensor, gyd: Tensor, xhat: Tensor, xhd: Opt, a: Opt, r: Tensor, w: Opt, wd: Opt,
                          batch_stats: bool, need_x: bool, gw_out: Opt, gwd_out: Opt, gb_out: Opt,
                          gbd_out: Opt) -> Tuple[Opt, Opt]:
    """Writes gw, ġw, gb, ġb `[T, C]` into the given outputs; returns (gx, ġx) if `need_x`."""
    gx, gxd = _bn().batchnorm_tangent_bwd(gy, gyd, xhat, xhd, a, r, w, wd, batch_stats, need_x, gw_out, gwd_out,
                                          gb_out, gbd_out)
    return (gx, gxd) if need_x else (None, None)
