"""Flatten: a reshape per example, `[T, N, *feat]` -> `[T, N, flattened]`."""
from __future__ import annotations

from torch import nn

from .base import LinearMapRule


class FlattenRule(LinearMapRule):
    """nn.Flatten(start_dim >= 1): per-example dims start_dim..end_dim merged (task dim shifts them by 1)."""

    def __init__(self, name: str, module: nn.Flatten):
        super().__init__(name, module)
        self.start_dim = module.start_dim
        self.end_dim = module.end_dim

    def apply(self, x, save):
        start = self.start_dim + 1 if self.start_dim >= 0 else self.start_dim + x.dim()
        end = self.end_dim + 1 if self.end_dim >= 0 else self.end_dim + x.dim()
        if start < 2:
            raise ValueError(f"model layer {self.describe()}: start_dim={self.start_dim} would merge the examples "
                             f"of a task (per-task input shape {tuple(x.shape)})")
        return x.flatten(start, end), x.shape

    def transpose(self, gy, shape):
        return gy.reshape(shape)
