"""The fused task-batched engine: models built of standard layers compiled into hand-derived rules."""
from .compiler import Unsupported, compile_model
from .loss_rules import loss_rule
from .program import FusedProgram

__all__ = ["FusedProgram", "Unsupported", "compile_model", "loss_rule", "build", "check_loss"]


def check_loss(loss):
    """The loss rule for `loss` (a resolved `Loss`); raises `Unsupported` for a custom callable."""
    rule = loss_rule(loss)
    if rule is None:
        raise Unsupported("", "loss", f"loss {loss.name!r} is a custom callable; the fused engine knows "
                                      "'mse' and 'cross_entropy'")
    return rule


def build(model, layout, loss) -> FusedProgram:
    """A FusedProgram for `model` and `loss`; raises `Unsupported` naming the culprit otherwise."""
    return FusedProgram(layout, loss, compile_model(model), check_loss(loss))
