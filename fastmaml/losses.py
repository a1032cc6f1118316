"""Per-task losses: `loss(output [N, ...], target [N, ...]) -> scalar`, applied to every task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

LossLike = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements of one task; output and target shapes must match."""
    if output.shape != target.shape:
        raise ValueError(
            f"loss='mse': the model's output per task has shape {tuple(output.shape)} but the target has "
            f"{tuple(target.shape)}; expected equal shapes (e.g. y as [T, N, 1] for a 1-output model)"
        )
    # written out: F.mse_loss's backward has no forward-mode rule for a constant target (ZeroTensor error)
    diff = output - target
    return (diff * diff).mean()


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over examples. output `[N, C]` logits, target `[N]` class indices."""
    if output.dim() != 2 or target.dim() != 1 or output.shape[0] != target.shape[0]:
        raise ValueError(
            f"loss='cross_entropy': expected logits [N, C] and class indices [N] per task, got "
            f"{tuple(output.shape)} and {tuple(target.shape)}"
        )
    return F.cross_entropy(output, target)


@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    classification: bool

    @property
    def builtin(self) -> bool:
        """Whether this is one of the named losses (which the fused engine differentiates by hand)."""
        named = _NAMED.get(self.name)
        return named is not None and named.fn is self.fn

    @property
    def checks_values(self) -> bool:
        """Whether `check_targets` reads the targets' values (class indices >= 0), not only their dtype."""
        return self.name == "cross_entropy" and self.builtin

    def check_targets(self, y: torch.Tensor, field: str, like: Optional[torch.Tensor] = None) -> None:
        """Targets the named losses take: int64 class indices >= 0 (cross-entropy; the upper bound is checked
        once the model's outputs are known), floating point of the inputs' dtype (MSE). `like`: the inputs."""
        if self.name == "cross_entropy" and self.builtin:
            if y.dtype != torch.long:
                raise TypeError(f"{field}: loss='cross_entropy' needs int64 class indices, got {y.dtype}")
            if y.numel() and y.device.type != "meta" and int(y.min()) < 0:
                raise ValueError(
                    f"{field}: class indices must be >= 0, got {int(y.min())} (fastmaml has no "
                    "ignore_index: drop those examples instead)"
                )
        if self.name == "mse" and self.builtin:
            if not y.is_floating_point():
                raise TypeError(f"{field}: loss='mse' needs floating-point targets, got {y.dtype}")
            if like is not None and y.dtype != like.dtype:
                raise TypeError(
                    f"{field}: dtype {y.dtype} differs from the inputs' {like.dtype}; convert the "
                    "targets (e.g. y.to(x.dtype))"
                )


_NAMED = {"mse": Loss("mse", mse, False), "cross_entropy": Loss("cross_entropy", cross_entropy, True)}


def _builtin_name(loss) -> Optional[str]:
    """The named loss a PyTorch loss is with its default settings (what people pass), else None."""
    if loss is F.cross_entropy:
        return "cross_entropy"
    if loss is F.mse_loss:
        return "mse"
    if (
        type(loss) is torch.nn.CrossEntropyLoss
        and loss.weight is None
        and loss.reduction == "mean"
        and loss.label_smoothing == 0.0
    ):
        return "cross_entropy"
    if type(loss) is torch.nn.MSELoss and loss.reduction == "mean":
        return "mse"
    return None


def resolve_loss(loss: LossLike) -> Loss:
    """The `Loss` of a name ("mse", "cross_entropy"), of `F.mse_loss` / `F.cross_entropy` / `nn.MSELoss()` /
    `nn.CrossEntropyLoss()` with their default settings (the named losses, differentiated by hand and with
    accuracy for classification), or of any other callable `(output, target) -> scalar` (the torch.func
    program)."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in _NAMED:
            raise ValueError(f"loss: unknown loss {loss!r}; expected one of {sorted(_NAMED)} or a callable")
        return _NAMED[loss]
    name = _builtin_name(loss)
    if name is not None:
        return _NAMED[name]
    if callable(loss):
        return Loss(getattr(loss, "__name__", type(loss).__name__), loss, False)
    raise TypeError(f"loss: expected a name {sorted(_NAMED)} or a callable (output, target) -> scalar, got {loss!r}")


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits `[T, N, C]`, target `[T, N]` -> accuracy per task `[T]`."""
    return (logits.argmax(-1) == target).to(logits.dtype).mean(-1)
