"""fastmaml: fast, exact, task-batched meta-gradients for optimization-based meta-learning."""

from . import func
from .allocator import retain_freed_memory
from .api import AdaptedModel, adapt, meta_step
from .batchnorm import BN_MODES, add_per_step_stats
from .engine import ORDERS, InnerLoop
from .errors import BackendUnavailable, NonFiniteError
from .explain import explain
from .msl import msl_weights
from .plan import MetaStep
from .result import MetaResult
from .tasks import TaskBatch

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "BN_MODES",
    "BackendUnavailable",
    "add_per_step_stats",
    "InnerLoop",
    "MetaResult",
    "MetaStep",
    "NonFiniteError",
    "ORDERS",
    "TaskBatch",
    "adapt",
    "explain",
    "func",
    "meta_step",
    "msl_weights",
    "retain_freed_memory",
    "__version__",
]
