"""The "triton" backend: Triton kernels of the step ops from `fastmaml.kernels`.

Available on CUDA devices when triton imports; on CPU only under the Triton interpreter
(`TRITON_INTERPRET=1`, for tests). The kernels are imported at the first availability check, so
`import fastmaml` never imports triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..reference import loss as _loss_refs  # noqa: F401  (the torch references register first)
from ..registry import register, register_backend

_state: dict = {}
# Kernels that "auto" leaves to the reference; only backend="triton" uses them. The decisions come from
# the op bench of benchmarks/gpu_check.sh on the arguments of real meta-steps, where every launch is small
# and Triton's launch cost decides; the measurements are in benchmarks/RESULTS.md.
KERNEL_DTYPES = (torch.float32, torch.float64)  # what the kernel tests cover
STEP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
EXPLICIT_ONLY = dict(auto=False, why_not_auto="tested, not yet measured faster than the reference on a GPU")
_SLOWER_STEP = dict(
    auto=False,
    dtypes=STEP_DTYPES,
    why_not_auto="slower than the reference's elementwise ops on a GPU (benchmarks/RESULTS.md, op bench)",
)
_SLOWER_LINEAR = dict(
    auto=False,
    dtypes=KERNEL_DTYPES,
    why_not_auto="mostly slower than cuBLAS at meta-learning sizes (benchmarks/RESULTS.md, op bench)",
)


def _import_kernels():
    """`fastmaml.kernels` (installed from `kernels/`), or `kernels/` of the source tree when run from it."""
    try:
        return importlib.import_module("fastmaml.kernels")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[3] / "kernels"
        if not (root / "__init__.py").exists():
            raise
        spec = importlib.util.spec_from_file_location(
            "fastmaml.kernels", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastmaml.kernels"] = module
        spec.loader.exec_module(module)
        return module


def _kernels():
    """Imports `fastmaml.kernels` once; returns (ok, reason)."""
    if "ok" not in _state:
        try:
            import triton

            kernels = _import_kernels()
            for name in ("inner_update", "adjoint_update", "cross_entropy", "mse", "linear"):
                importlib.import_module(f"fastmaml.kernels.{name}")
            _state.update(ok=True, why=f"triton {triton.__version__}", interpret=kernels.INTERPRET)
        except Exception as exc:
            _state.update(ok=False, why=f"triton kernels failed to import: {exc!r}", interpret=False)
    return _state["ok"], _state["why"]


def availability(device: torch.device) -> Tuple[bool, str]:
    ok, why = _kernels()
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, why
    if device.type == "cpu":
        if _state["interpret"]:
            return True, why + " (CPU interpreter, TRITON_INTERPRET=1: for testing, slow)"
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return False, "TRITON_INTERPRET=1 was set after the kernels were compiled for the GPU"
        return False, "Triton runs on CPU only in the interpreter (set TRITON_INTERPRET=1 before use)"
    return False, f"no Triton kernels for device type {device.type!r}"


register_backend("triton", availability)


@register("inner_update", "triton", **_SLOWER_STEP)
def inner_update(phi: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """φ − α ⊙ g `[T, P]`."""
    return torch.ops.fastmaml_triton.inner_update(phi, g, alpha)


@register("adjoint_update", "triton", **_SLOWER_STEP)
def adjoint_update(
    v: torch.Tensor, hu: Optional[torch.Tensor], g: torch.Tensor, alpha: torch.Tensor, lr_grad: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(v − hu `[T, P]`, −Σ_t g ⊙ v reduced to α's shape or None); hu None: first order, v passes."""
    if hu is None:
        return v, (torch.ops.fastmaml_triton.alpha_grad(g, v, alpha) if lr_grad else None)
    out, d_alpha = torch.ops.fastmaml_triton.adjoint_update(v, hu, g, alpha, lr_grad)
    return out, (d_alpha if lr_grad else None)


# the layer and loss ops of the fused engine


@register("cross_entropy_grad", "triton", dtypes=KERNEL_DTYPES)
def cross_entropy_grad(z: torch.Tensor, y: torch.Tensor):
    """Logits `[T, N, C]`, classes `[T, N]` -> (loss `[T]`, (p − onehot)/N, p); one pass per row."""
    return torch.ops.fastmaml_triton.cross_entropy_grad(z, y)


@register("cross_entropy_grad_tangent", "triton", dtypes=KERNEL_DTYPES)
def cross_entropy_grad_tangent(p: torch.Tensor, zd: torch.Tensor) -> torch.Tensor:
    """ġz = p ⊙ (ż − ⟨p, ż⟩) / N `[T, N, C]`."""
    return torch.ops.fastmaml_triton.cross_entropy_grad_tangent(p, zd)


@register("mse_grad", "triton", dtypes=KERNEL_DTYPES)
def mse_grad(out: torch.Tensor, y: torch.Tensor):
    """out, y `[T, N, *]` -> (loss `[T]`, 2 (out − y) / M)."""
    return torch.ops.fastmaml_triton.mse_grad(out, y)


# Linear layers: every op is `linear_gemm` (kernels/linear.py) on (transposed) views, c = a bᵀ and
# its tangent cd = ad bᵀ + a bdᵀ in one kernel; outputs are written in place through their strides.


def _gemm(a, ad, b, bd, bias, bias_d, c, cd, ra, rad) -> None:
    torch.ops.fastmaml_triton.linear_gemm(a, ad, b, bd, bias, bias_d, c, cd, ra, rad)


def _mT(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.transpose(-1, -2)


@register("linear_fwd", "triton", **_SLOWER_LINEAR)
def linear_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x wᵀ + b `[T, N, O]`."""
    y = x.new_empty(x.shape[0], x.shape[1], w.shape[-2])
    _gemm(x, None, w, None, b, None, y, None, None, None)
    return y


@register("linear_value_tangent_fwd", "triton", **_SLOWER_LINEAR)
def linear_value_tangent_fwd(x, xd, w, b, wd, bd):
    """(y, ẏ) `[T, N, O]` in one kernel sharing the loads of x and w: [ẋ | x] @ [w ; ẇ]ᵀ."""
    y = x.new_empty(x.shape[0], x.shape[1], w.shape[-2])
    yd = None if xd is None and wd is None and bd is None else torch.empty_like(y)
    _gemm(x, xd, w, wd, b, bd, y, yd, None, None)
    return y, yd


@register("linear_bwd", "triton", **_SLOWER_LINEAR)
def linear_bwd(gy, x, w, need_x: bool, gw_out, gb_out):
    """gw = gyᵀ x into `gw_out`, gb = Σ_n gy into `gb_out`; returns gx = gy w `[T, N, I]` or None."""
    _gemm(_mT(gy), None, _mT(x), None, None, None, gw_out, None, gb_out, None)
    if not need_x:
        return None
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    _gemm(gy, None, _mT(w), None, None, None, gx, None, None, None)
    return gx


@register("linear_tangent_bwd", "triton", **_SLOWER_LINEAR)
def linear_tangent_bwd(gy, gyd, x, xd, w, wd, need_x: bool, gw_out, gwd_out, gb_out, gbd_out):
    """gw, ġw = ġyᵀ x + gyᵀ ẋ, gb, ġb in one kernel; returns (gx, ġx = ġy w + gy ẇ) in a second one
    (or (None, None) without `need_x`)."""
    _gemm(_mT(gy), _mT(gyd), _mT(x), _mT(xd), None, None, gw_out, gwd_out, gb_out, gbd_out)
    if not need_x:
        return None, None
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    gxd = torch.empty_like(gx)
    _gemm(gy, gyd, _mT(w), _mT(wd), None, None, gx, gxd, None, None)
    return gx, gxd
