"""Dropout's random masks in training mode, the same wherever a meta-step's inner loop computes step j again.

The exact meta-gradient of a model with dropout is the gradient for the masks its forwards drew (what the
autograd loop differentiates): step j's Hessian-vector product in the reverse sweep, a "checkpoint" replay
of step j, a backtracking candidate at step j and `adapt`'s unrolled backward must all see the masks step
j's forward saw. Inside a meta-step (`Draws.at`) a task's mask is therefore drawn by a generator of
its own (PyTorch's Philox on CUDA, Mersenne Twister on the CPU), seeded from the meta-step's seed, the
inner step, whether the pass is on the support or the query set, the dropout node and the task's index in
the meta-batch (mixed by splitmix64's output function: Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014), so any pass draws it again and nothing is kept. Outside a scope
(`fastmaml.func.forward`, an adapted model's forward, the running statistics' pass) a mask is a fresh draw
from PyTorch's default generator, as nn.Dropout draws it.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed

_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = (1 << 64) - 1

# (the step's stream key, the tasks' indices in the meta-batch `[Tc]` or None, the chunk's first task)
_SCOPE: contextvars.ContextVar[Optional[Tuple[int, Optional[torch.Tensor], int]]] = contextvars.ContextVar(
    "fastmaml_draw_scope", default=None
)


def _mix(z: int) -> int:
    """splitmix64's output function (mod 2^64)."""
    z &= _U64
    z = ((z ^ (z >> 30)) * _MIX1) & _U64
    z = ((z ^ (z >> 27)) * _MIX2) & _U64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class Draws:
    """The dropout masks of one meta-step (or `adapt` call): `seed`, and `offset`, the index of the first
    task of the chunk the sweeps run in the whole batch of tasks."""

    seed: int
    offset: int = 0

    @staticmethod
    def fresh() -> "Draws":
        """A seed from PyTorch's default generator (so `torch.manual_seed` makes the masks reproducible), mixed
        with the process's rank under `torch.distributed` (ranks seeded alike draw their shares' masks apart)."""
        seed = int(torch.randint(0, 2**62, ()))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            seed = _mix(seed ^ _mix(torch.distributed.get_rank() + 1)) >> 2
        return Draws(seed)

    def chunk(self, start: int) -> "Draws":
        """The draws of the chunk whose first task is `start` in the batch."""
        return Draws(self.seed, self.offset + start)

    @contextlib.contextmanager
    def at(self, step: int, tasks: Optional[torch.Tensor] = None, query: bool = False) -> Iterator[None]:
        """The masks of the support pass at inner step `step` (`query`: of the query pass at φ_step) for the
        calls inside, of the chunk's tasks, or of `tasks` `[Tc]` (indices within the chunk) where a call takes
        some of them."""
        key = _mix(_mix(self.seed) ^ (2 * step + 2 + int(query)))
        ids = None if tasks is None else tasks + self.offset
        token = _SCOPE.set((key, ids, self.offset))
        try:
            yield
        finally:
            _SCOPE.reset(token)


def at(draws: Optional[Draws], step: int, tasks: Optional[torch.Tensor] = None, query: bool = False):
    """`draws.at(step, tasks, query)`, or nothing when the program draws no masks (draws None)."""
    return contextlib.nullcontext() if draws is None else draws.at(step, tasks, query)


def keep_mask(node: int, p: float, shape, device) -> torch.Tensor:
    """Which entries dropout node `node` keeps, each with probability 1 − p: a bool tensor of `shape`
    `[Tc, ...]` (the tasks first), each task's from its own generator in the current scope, or from PyTorch's
    default generator outside one."""
    scope = _SCOPE.get()
    if scope is None:
        return torch.rand(shape, device=device) >= p
    key, ids, offset = scope
    tasks = range(offset, offset + shape[0]) if ids is None else ids.tolist()
    base = _mix(key ^ _mix(node + 1))
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    uniform = torch.empty(shape[1:], device=device)  # one task's draws, reused
    generator = torch.Generator(device=device)
    for i, t in enumerate(tasks):
        generator.manual_seed(_mix(base ^ _mix(t + 1)) >> 1)
        torch.ge(torch.rand(shape[1:], generator=generator, device=device, out=uniform), p, out=keep[i])
    return keep
