"""Scheduling of a meta-step, shared by every engine: which tasks run together (task chunks), which fast
weights `checkpoint` keeps and how it replays the others, and the memory a call needs up front.

A leaf module: it imports nothing from fastmaml, so engines and ops may both use it.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator, List, Optional, Tuple

import torch

# per-task state budget of one chunk of tasks (see `task_chunks`), per device type: on the CPU a
# working set that stays in cache; on a GPU large enough to batch whole meta-batches per launch
TASK_STATE_BYTES = {"cpu": 32 << 20, "cuda": 2 << 30}
# the fewest fast-weight snapshots `checkpoint` keeps besides θ
MIN_CHECKPOINT_SLOTS = 2
# state below this size is not checked against the free memory (the check reads /proc/meminfo)
ALWAYS_FITS_BYTES = 64 << 20
# activations `meta_step` may keep for its Hessian-vector products (per chunk of tasks), per device type:
# the "second" order's from the forward sweep for the reverse sweep, the "implicit" order's from its first
# conjugate-gradient HVP for the others; never more than a quarter of the memory free when the chunk starts
# (0 turns the activation tape off)
ACTIVATION_TAPE_BYTES = {"cpu": 2 << 30, "cuda": 8 << 30}


def task_state_budget(device: torch.device) -> int:
    return TASK_STATE_BYTES.get(device.type, TASK_STATE_BYTES["cpu"])


def tape_memory_cap(device: torch.device) -> int:
    """A quarter of `available_memory(device)` (no cap, -1, where it cannot be told): the activation tape's
    bound from the free memory, read once when a meta-step is planned."""
    free = available_memory(device)
    return -1 if free is None else free // 4


def activation_tape_budget(device: torch.device, memory_cap: int) -> int:
    """Bytes of activations a chunk may keep on `device`: `ACTIVATION_TAPE_BYTES` as it is now, at most
    `memory_cap` (`tape_memory_cap`; -1: none)."""
    cap = ACTIVATION_TAPE_BYTES.get(device.type, ACTIVATION_TAPE_BYTES["cpu"])
    return cap if memory_cap < 0 else min(cap, memory_cap)


def checkpoint_slots(steps: int) -> int:
    """Fast-weight snapshots `[T, Pa]` that "checkpoint" keeps besides θ for `steps` inner steps:
    max(2, ⌈log2 K⌉). With that many, the bisection of `replay_phis` never runs out of slots on a
    segment longer than two steps, so the replay costs about (K/2)·log2 K inner steps (near-linear in
    K) while memory grows only as log K."""
    return max(MIN_CHECKPOINT_SLOTS, math.ceil(math.log2(steps)) if steps > 1 else 0)


def _mid(a: int, b: int) -> int:
    return (a + b + 1) // 2


def checkpoint_steps(steps: int, slots: Optional[int] = None) -> List[int]:
    """The steps j whose φ_j the forward sweep keeps in "checkpoint" order: 0 (θ) and the first
    snapshots `replay_phis` asks for (bisection of [0, K), at most `slots` of them)."""
    slots = checkpoint_slots(steps) if slots is None else slots
    keep, a, left = [0], 0, slots
    while steps - a > 1 and left > 0:
        a = _mid(a, steps)
        keep.append(a)
        left -= 1
    return keep


def replay_phis(
    phis: List[Optional[torch.Tensor]], advance: Callable, slots: Optional[int] = None
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yields (j, φ_j) for j = K−1, …, 0 from the kept snapshots (`phis[j]` or None; taken out of the
    list as they are used, so that each is freed once done with), recomputing the others with
    `advance(φ_a, a, b) -> φ_b` (b − a inner steps). Bisection with at most `slots` snapshots besides θ
    alive at once (default `checkpoint_slots(K)`), plus the φ_j in hand."""
    slots = checkpoint_slots(len(phis)) if slots is None else slots

    def take(j):
        phi, phis[j] = phis[j], None
        return phi

    def segment(a, phi_a, b, left):
        if b - a == 1:
            yield a, phi_a
            return
        if left == 0:
            for j in range(b - 1, a, -1):
                yield j, advance(phi_a, a, j)
            yield a, phi_a
            return
        m = _mid(a, b)
        phi_m = take(m)
        if phi_m is None:
            phi_m = advance(phi_a, a, m)
        yield from segment(m, phi_m, b, left - 1)
        del phi_m
        yield from segment(a, phi_a, m, left)

    if phis:
        yield from segment(0, take(0), len(phis), slots)


def state_buffers(order: str, steps: int, keep_grads: bool, keep_phis: bool = False) -> int:
    """How many `[Pa]` buffers per task one meta-step holds at its peak: the tape (what the forward
    sweep keeps) plus about six working ones (φ_K, the query gradient, v, H u, α ⊙ v, the next v)."""
    tape = {
        "second": 2 * steps,
        "checkpoint": checkpoint_slots(steps),
        "first": (steps if keep_grads else 0) + (steps if keep_phis else 0),
        "implicit": 4,
    }[order]  # implicit: CG's u, r, p, Ap
    return tape + 6


def task_chunks(T: int, per_task_bytes: int, budget_bytes: int, size: Optional[int] = None) -> List[slice]:
    """Slices of the T tasks, each a chunk whose per-task state fits `budget_bytes` (at least one task),
    or of `size` tasks when given. Tasks are independent, so a meta-step over chunks sums to the
    same meta-gradient with the state of one chunk alive at a time."""
    if size is None:
        size = max(1, budget_bytes // max(per_task_bytes, 1))
    return [slice(start, min(T, start + size)) for start in range(0, T, size)]


def task_budget_chunks(T: int, per_task_bytes: int, device: torch.device, size: Optional[int] = None) -> List[slice]:
    """`task_chunks` with the budget of `device`'s type (`TASK_STATE_BYTES`)."""
    return task_chunks(T, per_task_bytes, task_state_budget(device), size)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes the process can still allocate on `device` (None where it cannot be told): free memory
    on CUDA, `MemAvailable` on Linux for the CPU."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # pragma: no cover - no driver
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GB"


def check_memory(
    per_task_bytes: int, chunk_tasks: int, device: torch.device, *, steps: int, order: str, chunk_given: bool
) -> None:
    """Raises MemoryError, before anything is allocated, when one chunk's per-task state cannot fit the
    memory left on `device`, naming `steps` or `task_chunk` and the numbers."""
    need = per_task_bytes * chunk_tasks
    if need <= ALWAYS_FITS_BYTES:  # not worth reading the free memory on every call
        return
    free = available_memory(device)
    if free is None or need <= free:
        return
    if chunk_given and chunk_tasks > 1 and per_task_bytes <= free:
        raise MemoryError(
            f"task_chunk: {chunk_tasks} tasks per chunk need about {_gb(need)} of fast weights, gradients and "
            f"adjoints on {device}, but about {_gb(free)} is free; pass a smaller task_chunk (at most "
            f"{max(1, free // per_task_bytes)}) or leave it None"
        )
    hint = " or order='checkpoint' (memory grows as log K)" if order in ("second", "first") else ""
    raise MemoryError(
        f"steps: {steps} inner steps with order={order!r} need about {_gb(per_task_bytes)} per task of fast "
        f"weights, gradients and adjoints on {device}, but about {_gb(free)} is free; use fewer steps{hint}"
    )
