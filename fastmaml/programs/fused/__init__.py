"""The fused task-batched engine: a model's `forward` traced into a graph of hand-derived rules."""

from .compiler import Unsupported, compile_model
from .loss_rules import loss_rule
from .program import FusedProgram

__all__ = ["FusedProgram", "Unsupported", "compile_model", "loss_rule", "build", "check_loss"]


def check_loss(loss):
    """The loss rule for `loss` (a resolved `Loss`); raises `Unsupported` for a custom callable."""
    rule = loss_rule(loss)
    if rule is None:
        raise Unsupported(
            "", "loss", f"loss {loss.name!r} is a custom callable; the fused engine knows 'mse' and 'cross_entropy'"
        )
    return rule


def build(model, layout, loss) -> FusedProgram:
    """A FusedProgram for `model` and `loss`; raises `Unsupported` naming the culprit otherwise."""
    rule = check_loss(loss)
    return FusedProgram(layout, loss, compile_model(model, layout), rule)
