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

__all__ = ["ORDERS", "Implicit", "InnerLoop", "InnerLoopSpec", "MetaGrad", "MetaStepRequest", "meta_grad",
           "program_for", "engine_name"]


def program_for(req_or_model, layout=None, loss=None) -> Program:
    """The cached Program of a model (see programs/select.py)."""
    if isinstance(req_or_model, MetaStepRequest):
        return select_program(req_or_model.model, req_or_model.layout, req_or_model.loss)
    return select_program(req_or_model, layout, loss)


def meta_grad(req: MetaStepRequest) -> MetaGrad:
    """The meta-gradient and losses of one meta-step, from the engine that runs the model."""
    program = program_for(req)
    plan, _ = mlp_plan(program, req.loss)
    if plan is not None:
        out = MlpEngine(plan).run(req)
        if out is not None:
            return out
    return SweepEngine(program).run(req)


def engine_name(program: Program, loss) -> str:
    """"mlp op", "fused" or "torch.func": what runs `meta_step` for this program (orders second, checkpoint
    and first without step weights for the MLP op)."""
    return "mlp op" if mlp_plan(program, loss)[0] is not None else program.name
