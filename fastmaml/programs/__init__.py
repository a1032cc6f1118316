"""Programs: how a model computes per-task loss, gradient and HVPs for all tasks at once."""

from .base import HVP, LossGrad, Program
from .fused import FusedProgram
from .select import ModelGuard, select_program
from .torchfunc import BatchStatsNorm, TorchFuncProgram

__all__ = [
    "HVP",
    "LossGrad",
    "ModelGuard",
    "Program",
    "BatchStatsNorm",
    "FusedProgram",
    "TorchFuncProgram",
    "select_program",
]
