"""`fastmaml.explain(model, loss)`: which engine runs a model, its graph of rules, or why it falls back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .engine import mlp_plan
from .layout import InnerParams, ParamLayout
from .losses import LossLike, resolve_loss
from .programs import fused
from .programs.base import MODEL_CALL_LOCK


@dataclass(frozen=True)
class Explanation:
    """What runs a model.

    Attributes:
        program: "fused" or "torch.func".
        module, kind: for a fallback, the culprit: a module path and type, or an fx node name and its
            operation ("" module when the loss is the reason).
        reason: why the fused engine cannot run it.
        source: the line of the model's code ("file:line: code") where fx knows it.
        layers: the fused graph, one line per node (`v3 = layer1.0 (Conv2d)(v2)`).
        mlp_op: `meta_step` runs the model as one whole-inner-loop MLP op (orders second, checkpoint and
            first, no step weights).
        frozen: the parameters with `requires_grad=False`: not adapted (unless `inner_params` names them one
            by one) and given no meta-gradient.
    """

    program: str
    module: Optional[str] = None
    kind: Optional[str] = None
    reason: Optional[str] = None
    source: str = ""
    layers: tuple = ()
    mlp_op: bool = False
    frozen: tuple = ()

    def __str__(self) -> str:
        frozen = f"\nfrozen (not adapted, no meta-gradient): {', '.join(self.frozen)}" if self.frozen else ""
        if self.program == "fused":
            head = "fused engine"
            if self.mlp_op:
                head += (
                    "; meta_step runs it as the whole-inner-loop MLP op (orders second, checkpoint, first, "
                    "without step weights)"
                )
            return head + ":\n  " + "\n  ".join(self.layers) + frozen
        culprit = f"{self.module!r} ({self.kind})" if self.module else "the loss"
        where = f"\n  at {self.source}" if self.source else ""
        return f"torch.func fallback: {culprit}: {self.reason}{where}{frozen}"


def explain(model: nn.Module, loss: LossLike = "mse", inner_params: InnerParams = None) -> Explanation:
    """Says whether `meta_step`/`adapt` run `model` with `loss` on the fused engine (and how) or fall back to
    the torch.func program, naming the module or traced operation (with its source line) that causes a
    fallback.

    Args:
        model: the model as passed to `meta_step`.
        loss: the loss as passed to `meta_step`.
        inner_params: as passed to `meta_step` (decides whether the MLP op applies).

    Returns:
        An `Explanation`; `print` it for a readable summary.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # torch.compile's wrapper: meta_step runs the module inside
    layout = ParamLayout(model, inner_params)
    frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    loss_obj = resolve_loss(loss)
    try:
        fused.check_loss(loss_obj)
        with MODEL_CALL_LOCK:
            graph = fused.compile_model(model, layout)
    except fused.Unsupported as e:
        return Explanation("torch.func", e.module, e.kind, e.reason, e.source, frozen=frozen)
    program = fused.FusedProgram(layout, loss_obj, graph, fused.check_loss(loss_obj))
    return Explanation(
        "fused", layers=tuple(program.describe()), mlp_op=mlp_plan(program, loss_obj)[0] is not None, frozen=frozen
    )
