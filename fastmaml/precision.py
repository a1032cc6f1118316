"""Precision policies of a meta-step (`meta_step(..., precision=)`), for float32 models:

| policy | convolutions and matrix products                              | activations | the rest |
|--------|---------------------------------------------------------------|-------------|----------|
| None   | PyTorch's TF32 flags (cuDNN convolutions on TF32 by default)  | float32     | float32  |
| "fp32" | true FP32 (TF32 off for the call)                             | float32     | float32  |
| "tf32" | TF32 tensor cores on CUDA (FP32 elsewhere)                    | float32     | float32  |
| "bf16" | bfloat16 operands, float32 accumulation                       | bfloat16    | float32  |

"The rest": the fast weights, gradients, adjoints, the loss and the meta-gradient.

`math_mode(policy, device)` sets the float32 precision flags (cuDNN, cuBLAS; oneDNN on the CPU) for the
duration of a call and restores them after, with PyTorch's newer `fp32_precision` API where it exists (mixing
it with the legacy `allow_tf32` flags is an error in recent PyTorch). The bf16 policy's casts are the
program's (fastmaml/programs/mixed.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Precision:
    """A policy: `name` ("fp32", "tf32", "bf16"), `compute` the activations' dtype, `tf32` whether float32
    convolutions and matrix products may use TF32 tensor cores."""

    name: str
    compute: torch.dtype
    tf32: bool


_POLICIES = {
    "fp32": Precision("fp32", torch.float32, False),
    "tf32": Precision("tf32", torch.float32, True),
    "bf16": Precision("bf16", torch.bfloat16, False),
}


def resolve_precision(precision, param_dtype: torch.dtype) -> Optional[Precision]:
    """The policy named by `precision` (None: none, PyTorch's settings) for parameters of `param_dtype`.

    Raises:
        ValueError: an unknown name, or a policy asked of parameters that are not float32 (a float64 or bf16
            model already fixes its precision)."""
    if precision is None:
        return None
    if not isinstance(precision, str) or precision not in _POLICIES:
        raise ValueError(f"precision: expected None or one of {PRECISIONS}, got {precision!r}")
    if param_dtype != torch.float32:
        raise ValueError(
            f"precision={precision!r}: the policies apply to float32 models; the model's parameters are "
            f"{param_dtype} (pass precision=None, or convert the model with model.float())"
        )
    return _POLICIES[precision]


def _new_api() -> bool:
    """Whether this PyTorch has the per-backend `fp32_precision` flags (2.9 and later)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    return conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision")


def conv_allows_tf32() -> bool:
    """Whether float32 convolutions may use TF32 now (cuDNN's flag; the Triton convolutions follow it)."""
    if _new_api():
        return torch.backends.cudnn.conv.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def _flags(device: torch.device):
    """The (object, attribute) pairs of the float32 precision flags of convolutions and matrix products on
    `device`'s type: cuDNN and cuBLAS on CUDA, oneDNN on the CPU (newer API only)."""
    if device.type == "cuda":
        if _new_api():
            return [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
        return [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
    mkldnn = torch.backends.mkldnn
    if device.type == "cpu" and _new_api() and hasattr(getattr(mkldnn, "conv", None), "fp32_precision"):
        return [(mkldnn.conv, "fp32_precision"), (mkldnn.matmul, "fp32_precision")]
    return []


@contextlib.contextmanager
def math_mode(policy: Optional[Precision], device: torch.device) -> Iterator[None]:
    """Within the block, float32 convolutions and matrix products use TF32 exactly when `policy.tf32` and the
    device is CUDA, and true FP32 otherwise (None: nothing changes). The flags are restored on exit."""
    flags = [] if policy is None else _flags(device)
    before = [getattr(obj, name) for obj, name in flags]
    tf32 = policy is not None and policy.tf32 and device.type == "cuda"
    try:
        for obj, name in flags:
            setattr(obj, name, tf32 if name == "allow_tf32" else "tf32" if tf32 else "ieee")
        yield
    finally:
        for (obj, name), value in zip(flags, before):
            setattr(obj, name, value)
