"""Engines: how a whole meta-step runs. `meta_grad(request)` picks one for the model:
- the whole-inner-loop MLP op (engine/mlp.py) for an MLP under MSE, orders second/checkpoint/first;
- the sweep engine (engine/general.py) over the model's Program (the fused graph, or torch.func) otherwise.
`InnerLoop` (engine/sweeps.py) wraps the sweeps as one autograd Function for `adapt`.
"""

from __future__ import annotations

from ..programs import Program, select_program
from .general import SweepEngine
from .mlp import MlpEngine, mlp_plan
from .request import MetaGrad, MetaStepRequest
from .sweeps import ORDERS, Implicit, InnerLoop, InnerLoopSpec

__all__ = [
    "ORDERS",
    "Implicit",
    "InnerLoop",
    "InnerLoopSpec",
    "MetaGrad",
    "MetaStepRequest",
    "meta_grad",
    "program_for",
]


def program_for(model, layout, loss) -> Program:
    """The cached Program of `model` (see programs/select.py)."""
    return select_program(model, layout, loss)


def meta_grad(req: MetaStepRequest) -> MetaGrad:
    """The meta-gradient and losses of one meta-step, from the engine that runs the model."""
    program = select_program(req.model, req.layout, req.loss)
    plan, _ = mlp_plan(program, req.loss)
    if plan is not None:
        out = MlpEngine(plan).run(req)
        if out is not None:
            return out
    return SweepEngine(program).run(req)
