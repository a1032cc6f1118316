"""Argument checks and dtype helpers shared by the Triton launch wrappers."""
from __future__ import annotations

import torch
import triton.language as tl

from . import INTERPRET

SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype):
    """Accumulation type inside kernels: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cpu" and not INTERPRET:
        raise ValueError(f"{name}: a CPU tensor needs the Triton interpreter (TRITON_INTERPRET=1 set before "
                         "fastmaml.kernels is imported); got a CPU tensor in compiled mode")


def check_matrix(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a [T, P] tensor, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED:
        raise TypeError(f"{name}: expected one of {SUPPORTED}, got {t.dtype}")
    check_device(t, name)


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    check_matrix(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (as {ref_name}), got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def check_alpha(alpha: torch.Tensor, ref: torch.Tensor) -> None:
    P = ref.shape[1]
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"alpha: expected a tensor, got {type(alpha).__name__}")
    if not (alpha.dim() == 0 or (alpha.dim() == 1 and alpha.shape[0] == P)):
        raise ValueError(f"alpha: expected a 0-dim tensor or shape [{P}], got shape {tuple(alpha.shape)}")
    if alpha.dtype != ref.dtype:
        raise TypeError(f"alpha: expected dtype {ref.dtype}, got {alpha.dtype}")
    if alpha.device != ref.device:
        raise ValueError(f"alpha: expected device {ref.device}, got {alpha.device}")


def unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along P; any row stride (0 for a parameter vector broadcast over tasks)."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()
