"""The whole-inner-loop MLP engine: a model that compiles to a chain Linear, act, ..., Linear (ReLU or
Tanh, every Linear with a bias, every parameter adapted) under MSE runs its whole meta-step as one op
(`ops.mlp_meta_step`, contract in fastmaml/ops/mlp.py), in chunks of tasks like the general engine.

It covers orders "second", "checkpoint" and "first" without step weights and returns None otherwise, or
when the result is not finite (the general engine then reruns the step and says at which inner step).
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch

from ..ops.mlp import ACTIVATIONS, MAX_LAYERS, MlpPlan, MlpStepResult
from ..programs import FusedProgram, Program
from ..programs.fused.dense import LinearRule
from ..programs.fused.pointwise import ReLURule, TanhRule
from ..schedule import check_memory, task_budget_chunks
from .request import MetaGrad, MetaStepRequest

_ACTS = {ReLURule: ACTIVATIONS.index("relu"), TanhRule: ACTIVATIONS.index("tanh")}


def mlp_plan(program: Program, loss) -> Tuple[Optional[MlpPlan], str]:
    """(the MLP op's plan, "") if `program` is such an MLP under MSE, else (None, why not)."""
    if getattr(loss, "name", None) != "mse" or not loss.builtin:
        return None, "the MLP op does MSE only"
    if not isinstance(program, FusedProgram):
        return None, "the model does not run on the fused engine"
    if program.layout.shared.size:
        return None, "some parameters are not adapted (inner_params)"
    nodes = program.nodes
    if program.graph.chain_rules() is None or len(nodes) % 2 == 0 or len(nodes) // 2 + 1 > MAX_LAYERS:
        return None, f"expected a chain Linear, act, Linear, ..., Linear of at most {MAX_LAYERS} Linear layers"
    linears, acts = nodes[0::2], nodes[1::2]
    if not all(type(n.rule) is LinearRule for n in linears):
        return None, "expected Linear layers at even positions"
    kinds = {type(n.rule) for n in acts}
    if len(kinds) > 1 or not kinds <= set(_ACTS):
        return None, "expected one activation type (ReLU or Tanh) between the Linear layers"
    refs = [r for n in linears for r in n.params]
    if (
        any(r is None or r.group != "a" for r in refs)
        or [r.index for r in refs] != list(range(len(refs)))
        or len(refs) != len(program.layout.adapted.slots)
    ):
        return None, "expected every Linear with a bias, its parameters adapted in layer order"
    shapes = [program.layout.adapted.slots[r.index].shape for r in refs[0::2]]
    if any(a[0] != b[1] for a, b in zip(shapes, shapes[1:])):
        return None, "consecutive Linear layers do not chain"
    sizes = (shapes[0][1],) + tuple(s[0] for s in shapes)
    return MlpPlan(sizes, _ACTS[type(acts[0].rule)] if acts else 0), ""


class MlpSchedule(NamedTuple):
    """`Schedule` of the MLP op: the chunks, one task's state in bytes, and, where no rate is learned, the α_j
    list `alphas` it was planned with and its `[K, P]` rows (both None otherwise): a call with that same list
    (a plan's constant rates) passes the rows as they are."""

    chunks: List[slice]
    per_task: int
    alphas: Optional[list]
    rows: Optional[torch.Tensor]


class MlpEngine:
    """The meta-step of an MLP as one op per chunk of tasks."""

    def __init__(self, plan: MlpPlan):
        self.plan = plan

    def schedule(self, req: MetaStepRequest) -> Optional[MlpSchedule]:
        """The task chunks of `req` (they depend only on its shapes and options), or None when the op does not
        take the request (other orders, step weights, shapes that are not this MLP's)."""
        if req.order not in ("second", "checkpoint", "first") or req.weights is not None:
            return None
        sx, sy, qx, qy = req.batch
        d0, dL = self.plan.sizes[0], self.plan.sizes[-1]
        if sx.dim() != 3 or sx.shape[2] != d0 or sy.shape != (*sx.shape[:2], dL) or qy.shape != (*qx.shape[:2], dL):
            return None  # the general engine raises the precise error
        theta, K = req.theta_a, req.steps
        # per task: φ_j and g_j of every step, and the activations of every step's support pass and the query's
        per_task = theta.element_size() * (
            2 * (K + 1) * theta.numel() + 2 * (K * sx.shape[1] + qx.shape[1]) * sum(self.plan.sizes)
        )
        chunks = task_budget_chunks(req.batch.num_tasks, per_task, theta.device, req.task_chunk)
        if any(req.lr_grad):  # learned rates: their list (and autograd graph) is new at every call
            return MlpSchedule(chunks, per_task, None, None)
        # constant rates (a plan passes the same α_j list at every call): stacked once
        P = theta.shape[-1]
        rows = torch.stack([a.expand(P) for a in req.alphas]) if K else theta.new_zeros(0, P)
        return MlpSchedule(chunks, per_task, req.alphas, rows)

    def run(self, req: MetaStepRequest, schedule: Optional[MlpSchedule] = None) -> Optional[MetaGrad]:
        """The meta-step of `req` as one op per chunk, or None (see the module docstring); schedule:
        `self.schedule(req)` computed beforehand (a `MetaStep` plan)."""
        if schedule is None:
            schedule = self.schedule(req)
            if schedule is None:
                return None
        chunks, per_task = schedule.chunks, schedule.per_task
        T, K = req.batch.num_tasks, req.steps
        check_memory(
            per_task,
            chunks[0].stop - chunks[0].start,
            req.theta_a.device,
            steps=K,
            order=req.order,
            chunk_given=req.task_chunk is not None,
        )
        alphas = schedule.rows if schedule.rows is not None and req.alphas is schedule.alphas else req.alphas
        if len(chunks) == 1:  # the whole batch (not views of it: one call's worth of slicing saved)
            parts = [self._op(req, alphas, *req.batch)]
        else:
            parts = [self._op(req, alphas, *(t[sl] for t in req.batch)) for sl in chunks]
        if len(parts) == 1:
            out = parts[0]
        else:
            weights = [(sl.stop - sl.start) / T for sl in chunks]  # each part is a mean over its own tasks
            out = MlpStepResult(
                torch.cat([p.query_loss_after for p in parts]),
                sum(p.grad * w for p, w in zip(parts, weights)),
                [
                    None if d[0] is None else sum(x * w for x, w in zip(d, weights))
                    for d in zip(*(p.d_alphas for p in parts))
                ],
                None if parts[0].query_loss_before is None else torch.cat([p.query_loss_before for p in parts]),
                None if parts[0].support_loss_before is None else torch.cat([p.support_loss_before for p in parts]),
            )
        loss = out.query_loss_after.mean()
        # (a sum is non-finite if any term is, or, rarely, if it overflows: then the general path reruns for nothing)
        if req.check_finite and not math.isfinite(out.grad.sum().add_(loss).item()):
            return None
        return MetaGrad(
            out.grad,
            None,
            out.d_alphas,
            loss,
            out.query_loss_after,
            out.support_loss_before if K else None,
            out.query_loss_before if req.evaluate_before else None,
        )

    def _op(self, req: MetaStepRequest, alphas, sx, sy, qx, qy) -> MlpStepResult:
        return req.ops.mlp_meta_step(
            self.plan, req.theta_a, sx, sy, qx, qy, alphas, req.order, req.lr_grad, req.evaluate_before
        )
