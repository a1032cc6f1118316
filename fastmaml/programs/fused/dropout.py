"""Dropout in training mode: y = x ⊙ m / (1 − p), m a mask of entries kept with probability 1 − p (nn.Dropout,
`F.dropout`), or of whole channels (nn.Dropout1d/2d/3d: m per example and channel, broadcast over the
positions). Given the mask the map is linear: ẏ = ẋ ⊙ m / (1 − p), ġx = ġy ⊙ m / (1 − p). The mask comes from
`programs/draws.py`: the same for every pass of one inner step, so the HVP differentiates what the step's
forward computed.
"""

from __future__ import annotations

from .. import draws
from .base import LinearMapRule


class DropoutRule(LinearMapRule):
    """`[T, N, *features]` -> the same; `node`: this dropout's number in the model (its masks' stream);
    `channels`: 0 (a mask entry per entry), or the number of position dims after the channels (Dropout1d/2d/3d:
    1/2/3; one mask entry per example and channel, dim 2 of `[T, N, C, *positions]`)."""

    def __init__(self, name: str, kind: str, p: float, node: int, channels: int = 0):
        super().__init__(name, kind)
        self.p, self.node, self.channels = float(p), node, channels

    def apply(self, x, save):
        if self.channels and x.dim() != 3 + self.channels:
            raise ValueError(
                f"model layer {self.describe()}: expected per-example inputs of {1 + self.channels} dims (channels "
                f"first), got {tuple(x.shape[1:])}"
            )
        shape = x.shape[:3] + (1,) * (x.dim() - 3) if self.channels else x.shape
        keep = draws.keep_mask(self.node, self.p, shape, x.device)
        return self._masked(x, keep), keep

    def _masked(self, x, keep):
        if self.p >= 1.0:
            return x * 0.0
        return (x * keep).mul_(1.0 / (1.0 - self.p))

    def tangent(self, xd, keep):
        return self._masked(xd, keep)

    def transpose(self, gy, keep):
        return self._masked(gy, keep)
