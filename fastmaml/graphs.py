"""CUDA-graph capture of a planned meta-step: `MetaStep(..., cuda_graph=True)`.

The first call runs uncaptured (on a side stream: lazy initializations, kernel builds, the program's output
sizes), the second captures the whole meta-step (θ flattened from the parameters, the forward sweep, the
query pass, the reverse sweep; every chunk of tasks) into one CUDA graph and replays it; every later call
copies the tasks (and the current inner learning rates) into the graph's static inputs and replays it.
What needs the host stays outside the graph: the class-index checks (before the replay, on the new
tasks), the map from learnable rates to α_j and back (a tiny autograd graph), the `.grad` accumulation,
the BatchNorm statistics updates, and the finiteness check, after the replay, of everything the step
returns (with `check_finite`, a non-finite result reruns the step uncaptured, which raises the
`NonFiniteError` naming the inner step, or returns its result). The captured sweeps run with their
in-loop checks off; an inner step whose loss alone overflowed while every returned value stayed finite is
the one case the uncaptured step would refuse and the captured one does not notice.

The graph reads the parameters' and buffers' storage: the plan's guard also checks that every parameter
and buffer keeps its storage (an optimizer's in-place update does; `p.data = ...` does not), and a plan
that is built again (the model changed) captures again.

`MetaStep(..., cuda_graph="auto")` decides by measurement (`GraphChoice`): its first calls run
uncaptured, the next ones captured, and after `TIMED_CALLS` timed calls of each (each kind's first calls,
which initialize or capture, untimed) it keeps the faster for every later call. Off CUDA, and with
`inner_solver="backtracking"`, "auto" runs uncaptured from the start and says why.

Not measured yet (no GPU in the session that wrote it): `tests/test_meta_step_graphs.py` compares capture
and replay with the uncaptured step on CUDA for every order and learned rates (skipped without CUDA).
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch

from .calls import _inner_lr_grads, apply_meta_step, as_result, execute_meta_step
from .engine import MetaStepRequest
from .engine.general import check_labels
from .inner_lr import expand_inner_lr
from .result import MetaResult
from .tasks import TaskBatch

WARMUP_CALLS = 1
TIMED_CALLS = 2  # cuda_graph="auto": calls timed of each kind before choosing


def check_cuda_graph_option(cuda_graph) -> None:
    """Raises ValueError unless `cuda_graph` is False, True or "auto"."""
    if not (isinstance(cuda_graph, bool) or (isinstance(cuda_graph, str) and cuda_graph == "auto")):
        raise ValueError(f"cuda_graph: expected True, False or 'auto', got {cuda_graph!r}")


def why_not_capturable(device: torch.device, inner_solver: str) -> Optional[str]:
    """Why a meta-step on `device` with `inner_solver` cannot be captured in a CUDA graph (None: it can)."""
    if inner_solver != "sgd":
        return (
            f"inner_solver={inner_solver!r} decides each task's steps on the host (it reads the losses back), "
            "which a CUDA graph cannot replay; use cuda_graph=False"
        )
    if device.type != "cuda":
        return (
            f"CUDA graphs capture CUDA work, but the tasks are on {device}; put the model and the tasks on a CUDA "
            "device, or leave cuda_graph=False"
        )
    if not torch.cuda.is_available():
        return "CUDA is not available in this process"
    return None


def check_capturable(device: torch.device, inner_solver: str = "sgd") -> None:
    """Raises ValueError unless a meta-step on `device` with `inner_solver` can be captured in a CUDA graph."""
    why = why_not_capturable(device, inner_solver)
    if why is not None:
        raise ValueError(f"cuda_graph=True: {why}")


class GraphChoice:
    """`cuda_graph="auto"`: which kind of call a plan runs, decided by timing both kinds.

    The plan's calls run uncaptured until `TIMED_CALLS` of them were timed (the first call, which
    initializes, untimed), then captured until as many replays were timed (the warm-up and capturing calls
    untimed); the kind with the faster best call then runs every later call. A call is timed from a device
    synchronization before it to one after it, so the host's work counts: that is what capture saves.

    Attributes:
        decision: "captured" or "uncaptured" once decided; None while measuring.
        reason: why, in words (the times in ms, or what rules capture out).
        seconds: the timed calls' seconds, {"uncaptured": [...], "captured": [...]}.
    """

    UNTIMED = {"uncaptured": 1, "captured": WARMUP_CALLS + 1}

    def __init__(self, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter):
        self.sync, self.clock = sync, clock
        self.decision: Optional[str] = None
        self.reason = "measuring"
        self.seconds = {"uncaptured": [], "captured": []}
        self._calls = {"uncaptured": 0, "captured": 0}

    @classmethod
    def decided(cls, decision: str, reason: str) -> "GraphChoice":
        choice = cls(sync=lambda: None)
        choice.decision, choice.reason = decision, reason
        return choice

    def mode(self) -> str:
        """The kind of the next call: "uncaptured" or "captured"."""
        if self.decision is not None:
            return self.decision
        return "uncaptured" if len(self.seconds["uncaptured"]) < TIMED_CALLS else "captured"

    def run(self, mode: str, call: Callable[[], object]):
        """Runs `call` (a call of kind `mode`), timing it while measuring; decides after the last timed one."""
        if self.decision is not None or self._calls[mode] < self.UNTIMED[mode]:
            self._calls[mode] += 1
            return call()
        self.sync()
        start = self.clock()
        out = call()
        self.sync()
        self.seconds[mode].append(self.clock() - start)
        if len(self.seconds["captured"]) == TIMED_CALLS:
            self._decide()
        return out

    def fail(self, exc: Exception) -> None:
        """Capture failed (`exc`, a CaptureError from what the capture raised): decide "uncaptured", saying why."""
        cause = exc.__cause__ or exc
        self.decision = "uncaptured"
        self.reason = f"capture failed ({type(cause).__name__}: {cause})"

    def _decide(self) -> None:
        ms = {k: 1e3 * min(v) for k, v in self.seconds.items()}
        self.decision = "captured" if ms["captured"] < ms["uncaptured"] else "uncaptured"
        self.reason = f"replay {ms['captured']:.3f} ms, uncaptured {ms['uncaptured']:.3f} ms (best of {TIMED_CALLS})"


class CaptureError(RuntimeError):
    """Capturing the meta-step in a CUDA graph failed (something in it needs the host)."""


class CapturedStep:
    """The CUDA graph of one plan (see the module docstring); `run` replaces the plan's uncaptured call."""

    def __init__(self, device: torch.device):
        check_capturable(device)
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Forget the graph (the plan was built again): the next call warms up and captures again."""
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.pool = None
        self.calls = 0
        self.batch: Optional[TaskBatch] = None
        self.alphas: List[torch.Tensor] = []
        self.lr_grad: List[bool] = []
        self.out = None

    def run(self, model, planned, batch: TaskBatch, inner_lr, update_running_stats: bool) -> MetaResult:
        setup = planned.setup
        norm = planned.norm_plan()
        if setup.loss.classification:  # outside the graph: it reads the labels back
            with torch.no_grad():
                theta_a, theta_s = setup.layout.theta()
            check_labels(
                setup.program,
                setup.ops,
                theta_a,
                theta_s,
                batch.support_x,
                [("tasks.support_y", batch.support_y), ("tasks.query_y", batch.query_y)],
            )
        if self.calls < WARMUP_CALLS:
            self.calls += 1
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                out, lr_grads = execute_meta_step(setup, model, batch, norm, inner_lr)
                apply_meta_step(model, setup, norm, out, lr_grads, batch.support_x, update_running_stats)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            return as_result(out)
        alphas = setup.alphas
        if alphas is None:
            with torch.enable_grad():
                alphas = expand_inner_lr(inner_lr, setup.steps, setup.layout.adapted, like=self._like(setup))
        lr_grad = [a.requires_grad and setup.lr_grad for a in alphas]
        if self.graph is None or lr_grad != self.lr_grad or [a.shape for a in alphas] != [a.shape for a in self.alphas]:
            self._capture(model, setup, norm, batch, alphas, lr_grad)
        for static, new in zip(self.batch, batch):
            static.copy_(new, non_blocking=True)
        if setup.alphas is None:
            for static, a in zip(self.alphas, alphas):
                static.copy_(a.detach(), non_blocking=True)
        self.graph.replay()
        out = self.out
        if setup.check_finite and not _finite(out):
            # the uncaptured step says which inner step went wrong (or, rarely, finds nothing to refuse)
            out, lr_grads = execute_meta_step(setup, model, batch, norm, inner_lr)
        else:
            lr_grads = []
            if setup.learnable:
                with torch.enable_grad():
                    lr_grads = _inner_lr_grads(inner_lr, alphas, out.d_alphas)
        result = as_result(out)
        result = MetaResult(**{k: None if v is None else v.clone() for k, v in vars(result).items()})
        apply_meta_step(model, setup, norm, out, lr_grads, batch.support_x, update_running_stats)
        return result

    def _like(self, setup):
        p = next(iter(setup.layout.params.values()))
        return torch.empty((), dtype=p.dtype, device=p.device)

    def _capture(self, model, setup, norm, batch, alphas, lr_grad) -> None:
        self.batch = TaskBatch(*(t.clone() for t in batch))
        self.alphas = [a.detach().clone() for a in alphas] if setup.alphas is None else list(setup.alphas)
        self.lr_grad = list(lr_grad)
        self.pool = torch.cuda.graph_pool_handle() if self.pool is None else self.pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
                theta_a, theta_s = setup.layout.theta()
                req = MetaStepRequest(
                    model=model,
                    layout=setup.layout,
                    loss=setup.loss,
                    batch=self.batch,
                    theta_a=theta_a,
                    theta_s=theta_s,
                    alphas=self.alphas,
                    lr_grad=self.lr_grad,
                    order=setup.order,
                    ops=setup.ops,
                    norm=norm,
                    implicit=setup.implicit,
                    weights=setup.weights,
                    shared_grad=setup.shared_grad,
                    check_finite=False,
                    evaluate_before=setup.evaluate_before,
                    task_chunk=setup.task_chunk,
                    labels_checked=True,
                )
                self.out = setup.engines.run(req)
        except Exception as exc:
            self.graph = None
            raise CaptureError(
                f"cuda_graph=True: capturing the meta-step failed ({type(exc).__name__}: {exc}); this model or "
                "option needs the host inside the step: use cuda_graph=False"
            ) from exc
        self.graph = graph


def _finite(out) -> bool:
    """Whether everything the step returns is finite (one read back)."""
    tensors = [out.d_a, out.d_s, out.query_loss_after, out.support_loss_before]
    tensors += [d for d in out.d_alphas if d is not None]
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


__all__ = [
    "CaptureError",
    "CapturedStep",
    "GraphChoice",
    "TIMED_CALLS",
    "WARMUP_CALLS",
    "check_capturable",
    "check_cuda_graph_option",
    "why_not_capturable",
]
