"""The general engine: a meta-step over any Program (fused graph or torch.func), in chunks of tasks.

Per chunk: the forward sweep (K inner steps), the query loss and its gradient, the reverse sweep; the
chunks' meta-gradients are summed as they go, so one chunk's state is alive at a time. In "second" order
the forward sweep also keeps the steps' activations within `schedule.activation_tape_budget` (its
free-memory cap read when the meta-step is planned), and the reverse sweep's HVPs skip the convolutions'
primal recomputation; in "implicit" order the conjugate-gradient HVPs at φ_K share theirs. The chunk size
comes from the per-task state (`schedule.state_buffers`) and the device's budget, or `task_chunk`; the
memory a chunk needs is checked before anything is allocated.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from ..errors import NonFiniteError
from ..losses import accuracy
from ..programs import Program
from ..programs.draws import Draws, at
from ..schedule import activation_tape_budget, check_memory, state_buffers, tape_memory_cap, task_budget_chunks
from .request import MetaGrad, MetaStepRequest
from .sweeps import forward_sweep, reverse_sweep


class Schedule(NamedTuple):
    """How an engine runs one meta-step shape: its chunks of tasks, one task's state in bytes (for the
    memory check of every call) and the activation tape's cap from the free memory (read when it is planned,
    so a captured CUDA graph reads no free memory; `ACTIVATION_TAPE_BYTES` itself is read at every call)."""

    chunks: List[slice]
    per_task: int
    tape_cap: int = 0  # the activation tape's memory cap (`tape_memory_cap`; 0: no tape, -1: uncapped)


class _ChunkGrad(NamedTuple):
    """One chunk's share of the meta-gradient (already divided by the whole batch's T) and of the result."""

    d_a: Optional[torch.Tensor]  # [Pa]
    d_s: Optional[torch.Tensor]  # [Ps]
    d_alphas: Optional[List[Optional[torch.Tensor]]]  # per step
    query_loss: torch.Tensor  # [Tc]
    accuracy: Optional[torch.Tensor]  # [Tc]
    support_before: Optional[torch.Tensor]  # [Tc]
    recorded: Optional[list]  # per step 0..K, the chunk's BatchNorm batch statistics
    weighted_loss: Optional[torch.Tensor]  # [Tc] Σ_j w_j L_query(φ_j) with step weights, else None


def _add(total: Optional[torch.Tensor], t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """total + t, where None is nothing yet (or nothing at all: a gradient not asked for)."""
    if t is None:
        return total
    return t if total is None else total.add_(t)


def _cat_stats(chunks):
    """Per-chunk BatchNorm statistics [[(mean [Tc, C], var [Tc, C], count) or None per layer]] -> one list
    over all tasks."""
    return [
        None
        if chunks[0][i] is None
        else (torch.cat([c[i][0] for c in chunks]), torch.cat([c[i][1] for c in chunks]), chunks[0][i][2])
        for i in range(len(chunks[0]))
    ]


def check_query_loss(loss, step: int, check_finite: bool) -> None:
    if check_finite and not bool(torch.isfinite(loss).all()):
        raise NonFiniteError(
            f"non-finite query loss after {step} inner steps: {loss.mean().item()}", where="query loss", step=step
        )


def check_labels(program: Program, ops, theta_a, theta_s, x, fields) -> None:
    """Class indices below the model's number of outputs, checked before any loss reads them (an index out of
    range is a device-side assert on CUDA). The number of outputs is measured once per input shape by a
    forward of the first task; `fields`: [(name, labels `[T, N]`)]."""
    key = (tuple(x.shape[2:]), x.dtype, x.device)
    classes = program.output_sizes.get(key)
    if classes is None:
        with torch.no_grad(), Draws(0).at(0):  # (any masks: not PyTorch's generator's numbers)
            classes = program.output_sizes[key] = program.forward(ops, theta_a, theta_s, x[:1]).shape[-1]
    for field, y in fields:
        top = int(y.max())
        if top >= classes:
            raise ValueError(
                f"{field}: class index {top} is out of range for the model's {classes} outputs "
                f"(expected indices in [0, {classes - 1}])"
            )


class SweepEngine:
    """The meta-step of `program` by forward and reverse sweeps (every order, step weights, BatchNorm
    modes, learnable rates, shared parameters)."""

    def __init__(self, program: Program):
        self.program = program

    def schedule(self, req: MetaStepRequest) -> Schedule:
        """The task chunks of `req` (they depend only on its shapes and options)."""
        per_task = (
            req.layout.adapted.size
            * req.theta_a.element_size()
            * state_buffers(req.order, req.steps, any(req.lr_grad), req.weights is not None)
        )
        device = req.theta_a.device
        tape = tape_memory_cap(device) if req.order in ("second", "implicit") and self.program.keeps_activations else 0
        return Schedule(task_budget_chunks(req.batch.num_tasks, per_task, device, req.task_chunk), per_task, tape)

    def run(self, req: MetaStepRequest, schedule: Optional[Schedule] = None) -> MetaGrad:
        """The meta-step of `req`; schedule: `self.schedule(req)` computed beforehand (a `MetaStep` plan)."""
        program, T, K = self.program, req.batch.num_tasks, req.steps
        theta_a = req.theta_a
        if req.loss.classification and not req.labels_checked:
            check_labels(
                program,
                req.ops,
                theta_a,
                req.theta_s,
                req.batch.support_x,
                [("tasks.support_y", req.batch.support_y), ("tasks.query_y", req.batch.query_y)],
            )
        chunks, per_task, tape_cap = schedule if schedule is not None else self.schedule(req)
        tape_budget = activation_tape_budget(theta_a.device, tape_cap) if tape_cap else 0
        check_memory(
            per_task,
            chunks[0].stop - chunks[0].start,
            theta_a.device,
            steps=K,
            order=req.order,
            chunk_given=req.task_chunk is not None,
        )
        parts, d_a, d_s, d_alphas = [], None, None, [None] * K
        draws = Draws.fresh() if program.draws_masks else None
        for sl in chunks:  # the meta-gradients are summed as the chunks go: one chunk's state alive at a time
            part = self._chunk(req, sl, T, tape_budget, None if draws is None else draws.chunk(sl.start))
            d_a, d_s = _add(d_a, part.d_a), _add(d_s, part.d_s)
            d_alphas = [_add(total, d) for total, d in zip(d_alphas, part.d_alphas)]
            parts.append(part._replace(d_a=None, d_s=None, d_alphas=None))
        if req.check_finite and d_s is not None and not bool(torch.isfinite(d_s).all()):
            raise NonFiniteError(
                "non-finite meta-gradient of the shared (non-adapted) parameters", where="shared meta-gradient"
            )
        query_after = torch.cat([p.query_loss for p in parts])
        meta_loss = query_after.mean() if req.weights is None else torch.cat([p.weighted_loss for p in parts]).mean()
        recorded = None
        if parts[0].recorded is not None:
            recorded = [_cat_stats([p.recorded[j] for p in parts]) for j in range(len(parts[0].recorded))]
        acc_after = torch.cat([p.accuracy for p in parts]) if req.loss.classification else None
        before_loss = before_acc = None
        if req.evaluate_before:
            if K == 0:
                before_loss, before_acc = query_after, acc_after
            else:
                qx, qy = req.batch.query_x, req.batch.query_y
                with at(draws, 0, query=True):
                    loss, out = program.evaluate(req.ops, theta_a, req.theta_s, qx, qy, bn_stats=req.norm.stats(0))
                before_loss = loss.detach()
                before_acc = accuracy(out.detach(), qy) if req.loss.classification else None
        support_before = torch.cat([p.support_before for p in parts]) if K else None
        return MetaGrad(
            d_a, d_s, d_alphas, meta_loss, query_after, support_before, before_loss, acc_after, before_acc, recorded
        )

    def _chunk(self, req: MetaStepRequest, sl: slice, T: int, tape_budget: int, draws: Optional[Draws]) -> _ChunkGrad:
        """Forward sweep, query loss and gradient, reverse sweep for the tasks `sl` of the batch; with step
        weights w_1..w_K, the query loss after every step j with w_j > 0 (the multi-step loss); tape_budget:
        bytes of activations the sweeps may keep; draws: the chunk's dropout masks (None: none)."""
        program, ops, norm, weights = self.program, req.ops, req.norm, req.weights
        sx, sy, qx, qy = (t[sl] for t in req.batch)
        theta_s, alphas, K = req.theta_s, req.alphas, req.steps
        shared_grad, check_finite = req.shared_grad, req.check_finite
        # per-step statistics, or (batch mode) step 0's for the running statistics (`apply_meta_step`)
        recorded = [] if norm.record or norm.updates_running_stats else None
        phi, tape, support_before = forward_sweep(
            program,
            ops,
            req.theta_a,
            theta_s,
            alphas,
            sx,
            sy,
            order=req.order,
            keep_grads=any(req.lr_grad),
            check_finite=check_finite,
            norm=norm,
            recorded=recorded,
            record_first_only=not norm.record,
            implicit=req.implicit,
            keep_phis=weights is not None,
            activation_budget=tape_budget,
            draws=draws,
        )
        with at(draws, K, query=True):
            q = program.loss_grad(
                ops, phi, theta_s, qx, qy, shared_grad=shared_grad, bn_stats=norm.stats(K), record_stats=norm.record
            )
            if norm.record:
                query_stats = program.record_stats_of(q, ops, phi, theta_s, qx)
        check_query_loss(q.loss, K, check_finite)
        last = 1.0 if weights is None else weights[-1]
        weighted = None if weights is None else q.loss.detach() * last

        def batch_share(t, w):  # w × this chunk's share (a sum over its tasks) of the mean over all T tasks
            return t / T if w == 1.0 else t * (w / T)

        shared_terms = [batch_share(q.grad_shared.sum(0), last)] if shared_grad else []

        def step_loss_grad(j, phi_j):  # ∂/∂φ_j of w_j mean_t L_query_t(φ_j), and its loss and ψ-gradient
            nonlocal weighted
            w = weights[j - 1]
            if w == 0:
                return None
            with at(draws, j, query=True):
                qj = program.loss_grad(ops, phi_j, theta_s, qx, qy, shared_grad=shared_grad, bn_stats=norm.stats(j))
            check_query_loss(qj.loss, j, check_finite)
            weighted = weighted + qj.loss.detach() * w
            if shared_grad:
                shared_terms.append(batch_share(qj.grad_shared.sum(0), w))
            return batch_share(qj.grad, w)

        d_a, d_s, d_alphas = reverse_sweep(
            program,
            ops,
            tape,
            batch_share(q.grad, last),
            theta_s,
            alphas,
            sx,
            sy,
            shared_grad=shared_grad,
            lr_grad=req.lr_grad,
            check_finite=check_finite,
            norm=norm,
            step_loss_grad=step_loss_grad if weights is not None else None,
            draws=draws,
        )
        if shared_grad:
            d_s = d_s + sum(shared_terms)
        if norm.record:
            recorded.append(query_stats)
        return _ChunkGrad(
            d_a,
            d_s,
            d_alphas,
            q.loss.detach(),
            accuracy(q.output.detach(), qy) if req.loss.classification else None,
            None if support_before is None else support_before.detach(),
            recorded,
            weighted,
        )
