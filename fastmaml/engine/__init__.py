"""Engines: how a whole meta-step runs. `meta_grad(request)` picks one for the model:
- the whole-inner-loop MLP op (engine/mlp.py) for an MLP under MSE, orders second/checkpoint/first;
- the sweep engine (engine/general.py) over the model's Program (the fused graph, or torch.func) otherwise;
  under the "bf16" precision policy over that Program in bf16 (programs/mixed.py).
Every run sets the policy's TF32 flags for its duration (fastmaml/precision.py).
`InnerLoop` (engine/sweeps.py) wraps the sweeps as one autograd Function for `adapt`.
"""

from __future__ import annotations

from typing import Optional

from ..precision import math_mode
from ..programs import Program, select_program
from ..programs.mixed import MixedProgram
from .general import SweepEngine
from .mlp import MlpEngine, MlpSchedule, mlp_plan
from .request import MetaGrad, MetaStepRequest
from .sweeps import INNER_SOLVERS, ORDERS, Implicit, InnerLoop, InnerLoopSpec

__all__ = [
    "INNER_SOLVERS",
    "ORDERS",
    "Engines",
    "Implicit",
    "InnerLoop",
    "InnerLoopSpec",
    "MetaGrad",
    "MetaStepRequest",
    "engines_for",
    "meta_grad",
    "program_for",
]


def program_for(model, layout, loss) -> Program:
    """The cached Program of `model` (see programs/select.py)."""
    return select_program(model, layout, loss)


class Engines:
    """The engines of one program for one meta-step shape, with their task chunks planned once: the MLP op
    where it takes the request, else (or when its result is not finite) the sweep engine. Holds no module."""

    def __init__(self, program: Program, req: MetaStepRequest):
        self.program = program
        self.precision = req.precision
        mixed = req.precision is not None and req.precision.compute != req.theta_a.dtype
        plan = None if mixed else mlp_plan(program, req.loss)[0]  # the MLP op computes in the weights' dtype
        self.mlp: Optional[MlpEngine] = None if plan is None else MlpEngine(plan)
        self.mlp_schedule: Optional[MlpSchedule] = None if self.mlp is None else self.mlp.schedule(req)
        if self.mlp_schedule is None:
            self.mlp = None
        self.sweep = SweepEngine(MixedProgram(program, req.precision.compute, req.model) if mixed else program)
        self.sweep_schedule = self.sweep.schedule(req)

    @property
    def name(self) -> str:
        """Which engine runs the step: "mlp op" or the program's name."""
        return "mlp op" if self.mlp is not None else self.sweep.program.name

    def run(self, req: MetaStepRequest) -> MetaGrad:
        """The meta-gradient and losses of `req` (of the shape these engines were planned for)."""
        if self.precision is None:  # PyTorch's math settings as they are (no context to enter on every call)
            return self._run(req)
        with math_mode(self.precision, req.theta_a.device):
            return self._run(req)

    def _run(self, req: MetaStepRequest) -> MetaGrad:
        if self.mlp is not None:
            out = self.mlp.run(req, self.mlp_schedule)
            if out is not None:
                return out
        return self.sweep.run(req, self.sweep_schedule)


def engines_for(req: MetaStepRequest) -> Engines:
    """The engines of `req`'s model (its cached Program) for `req`'s shape."""
    return Engines(select_program(req.model, req.layout, req.loss), req)


def meta_grad(req: MetaStepRequest) -> MetaGrad:
    """The meta-gradient and losses of one meta-step, from the engine that runs the model."""
    return engines_for(req).run(req)
