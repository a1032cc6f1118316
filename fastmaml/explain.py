"""`fastmaml.explain(model, loss)`: which Program a model runs on, and why."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .layout import ParamLayout
from .losses import LossLike, resolve_loss
from .ops import mlp_step
from .programs import fused


@dataclass(frozen=True)
class Explanation:
    """program: "fused" or "torch.func"; for a fallback, `module` / `kind` name the culprit
    (module "" when the loss is the reason) and `reason` says why. `layers`: the fused plan.
    mlp_op: `meta_step` runs the model as one whole-inner-loop MLP op (ops/mlp_step.py) when all its
    parameters adapt and the order is "second", "checkpoint" or "first"."""

    program: str
    module: Optional[str] = None
    kind: Optional[str] = None
    reason: Optional[str] = None
    layers: tuple = ()
    mlp_op: bool = False

    def __str__(self) -> str:
        if self.program == "fused":
            plan = "fused engine: " + " -> ".join(self.layers)
            if self.mlp_op:
                plan += ("; meta_step with every parameter adapted runs it as the whole-inner-loop MLP op "
                         "(orders second, checkpoint, first)")
            return plan
        culprit = f"module {self.module!r} ({self.kind})" if self.module else "the loss"
        return f"torch.func fallback: {culprit}: {self.reason}"


def explain(model: nn.Module, loss: LossLike = "mse") -> Explanation:
    """Says whether `meta_step`/`adapt` run `model` with `loss` on the fused engine or fall back to the
    torch.func program, naming the module (path and type) that causes a fallback."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    try:
        fused.check_loss(resolve_loss(loss))
        rules = fused.compile_model(model)
    except fused.Unsupported as e:
        return Explanation("torch.func", e.module, e.kind, e.reason)
    mlp_op = mlp_step.why_not(model, ParamLayout(model), resolve_loss(loss)) is None
    return Explanation("fused", layers=tuple(r.describe() for r in rules), mlp_op=mlp_op)
