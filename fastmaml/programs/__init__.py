"""Programs: how a model computes per-task loss, gradient and HVPs for all tasks at once."""
from .base import HVP, LossGrad, Program
from .torchfunc import BatchStatsNorm, TorchFuncProgram

__all__ = ["HVP", "LossGrad", "Program", "BatchStatsNorm", "TorchFuncProgram"]
from .select import select_program  # noqa: E402

__all__.append("select_program")
