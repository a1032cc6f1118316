"""Measuring one (implementation, workload): the meta-gradient, its time per meta-step, and
(in a subprocess of its own, see `fastmaml.bench.memory`) its peak memory.

Every implementation starts from a deep copy of the same model and the same task batch.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..tasks import TaskBatch
from .impls import Impl, Step
from .workloads import Workload


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (absolute when b is 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def to_device(tasks: TaskBatch, device, dtype=torch.float32) -> TaskBatch:
    """Moves the batch; floating-point tensors (inputs, MSE targets) get `dtype`, labels stay int64."""
    return TaskBatch(*(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tasks))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_page_faults() -> Optional[int]:
    """The process's minor page faults so far (each a fresh page mapped and zeroed), or None where the
    system does not count them. On the CPU they tell how often a step's tensors land on new memory, which
    moves its time by up to 1.6× (benchmarks/RESULTS.md)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Runner:
    """An implementation bound to its own copy of the model: `step()` runs one meta-step with
    `.grad` cleared first; `flat_grad()` is the meta-gradient `[P]` (parameters in module order)."""

    def __init__(
        self,
        impl: Impl,
        base: nn.Module,
        workload: Workload,
        tasks: TaskBatch,
        device: torch.device,
        dtype=torch.float32,
    ):
        self.device = device
        self.model = copy.deepcopy(base).to(device=device, dtype=dtype).train()
        self.tasks = to_device(tasks, device, dtype)
        self._step: Step = impl.build(self.model, workload, device)
        self.page_faults: List[int] = []  # per timed step, where the system counts them

    def step(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        self._step(self.tasks)

    def flat_grad(self) -> torch.Tensor:
        return torch.cat(
            [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in self.model.parameters()]
        ).detach()

    def timed_step(self) -> float:
        """Seconds for one meta-step (device synchronized before and after); the step's page faults go to
        `page_faults`."""
        for p in self.model.parameters():
            p.grad = None
        sync(self.device)
        faults = minor_page_faults()
        start = time.perf_counter()
        self._step(self.tasks)
        sync(self.device)
        elapsed = time.perf_counter() - start
        if faults is not None:
            self.page_faults.append(minor_page_faults() - faults)
        return elapsed


def time_round_robin(
    runners: Dict[str, Runner], *, warmup: int, repeats: int, budget_s: Optional[float] = None
) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Times every runner `repeats` times after `warmup` untimed steps, interleaved (one step of each
    per round) so that a change in background load hits every row alike. Each round runs the rows in
    a new order (a shuffle seeded by the round number: the same for every run): the step that follows
    a slow row (the autograd loop, which leaves the CPU's caches full of its graph) runs measurably
    slower, 0.2–0.5 ms on the sinusoid on this CPU and on the H200, and a fixed order charged that to
    the same row every round. Stops early after the round in which `budget_s` seconds were used (at
    least 2 rounds). Returns (seconds per runner, {runner: error} for runners that raised, which are
    dropped from later rounds)."""
    times: Dict[str, List[float]] = {name: [] for name in runners}
    errors: Dict[str, str] = {}
    names = list(runners)

    def attempt(name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # reported as the row's failure, the other rows go on
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]

    def round_order(i: int) -> List[str]:
        order = list(names)
        random.Random(i).shuffle(order)
        return [n for n in order if n not in errors]

    for i in range(warmup):
        for name in round_order(i):
            attempt(name, runners[name].step)
    start = time.perf_counter()
    for i in range(repeats):
        for name in round_order(i):
            attempt(name, lambda name=name: times[name].append(runners[name].timed_step()))
        if budget_s is not None and i >= 1 and time.perf_counter() - start > budget_s:
            break
    return times, errors


def summarize(times: List[float]) -> Dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}
