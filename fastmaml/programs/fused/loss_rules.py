"""Loss rules of the fused engine (per-task mean loss): value, gradient w.r.t. the output, and the
gradient's tangent (MSE: ġ = 2ẏ/M; softmax cross-entropy: ġz = p ⊙ (ż − ⟨p, ż⟩)/N)."""

from __future__ import annotations

import torch.nn.functional as F

from ...losses import resolve_loss


class MSERule:
    name = "mse"

    def check(self, out, y):
        if out.shape != y.shape:
            raise ValueError(
                f"loss='mse': the model's output per task has shape {tuple(out.shape[1:])} but the target has "
                f"{tuple(y.shape[1:])}; expected equal shapes (e.g. y as [T, N, 1] for a 1-output model)"
            )

    def value(self, out, y):
        """Per-task loss `[T]`."""
        self.check(out, y)
        diff = (out - y).flatten(1)
        return (diff * diff).mean(1)

    def grad(self, ops, out, y):
        """-> (loss `[T]`, ∂loss/∂out, saved for the tangent)."""
        self.check(out, y)
        loss, g = ops.mse_grad(out, y)
        return loss, g, None

    def grad_tangent(self, ops, saved, outd):
        return ops.mse_grad_tangent(outd)


class CrossEntropyRule:
    name = "cross_entropy"

    def check(self, out, y):
        if out.dim() != 3 or y.dim() != 2 or out.shape[:2] != y.shape:
            raise ValueError(
                f"loss='cross_entropy': expected logits [N, C] and class indices [N] per task, got "
                f"{tuple(out.shape[1:])} and {tuple(y.shape[1:])}"
            )

    def value(self, out, y):
        self.check(out, y)
        T, N = y.shape
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(T, N).mean(1)

    def grad(self, ops, out, y):
        self.check(out, y)
        loss, g, p = ops.cross_entropy_grad(out, y)
        return loss, g, p

    def grad_tangent(self, ops, p, outd):
        return ops.cross_entropy_grad_tangent(p, outd)


LOSS_RULES = {"mse": MSERule, "cross_entropy": CrossEntropyRule}


def loss_rule(loss):
    """The rule for a named loss, or None (a callable loss runs on the torch.func program)."""
    cls = LOSS_RULES.get(loss.name)
    if cls is None or loss.fn is not resolve_loss(loss.name).fn:
        return None
    return cls()


__all__ = ["MSERule", "CrossEntropyRule", "loss_rule"]
