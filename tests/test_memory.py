"""order="checkpoint" keeps nothing for backward that grows with `steps` beyond the fast weights
(counted deterministically with saved_tensors_hooks and the tape's own byte count)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastmaml
from fastmaml.inner_loop import forward_sweep
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.ops import resolve
from fastmaml.programs import select_program
from models import classification_tasks, small_cnn


# torch < 2.5: torch.func transforms (vmap too) refuse to run under saved_tensors_hooks at all
HOOKS_AROUND_TORCH_FUNC = hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks")


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_bytes(model, tasks, steps, order):
    """Bytes kept for backward by adapt + a query loss: what InnerLoop saved, plus everything autograd
    saves in the query pass (counted by saved_tensors_hooks where torch allows). Runs the backward too."""
    sx, sy, qx, qy = tasks
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.1, steps=steps, order=order, loss="cross_entropy")
    inner = nbytes(adapted.phi.grad_fn.saved_tensors)
    outer = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: outer.append(t) or t, lambda t: t) \
            if HOOKS_AROUND_TORCH_FUNC else contextlib.nullcontext():
        logits = adapted(qx)
        loss = torch.stack([F.cross_entropy(logits[t], qy[t]) for t in range(logits.shape[0])]).mean()
    loss.backward()
    return inner + nbytes(outer)


@pytest.mark.parametrize("order,per_step", [("checkpoint", 1), ("second", 2)])
def test_saved_bytes_grow_only_by_fast_weights(order, per_step):
    torch.manual_seed(0)
    model = small_cnn(channels=4)
    tasks = classification_tasks(T=3)
    T, P = 3, sum(p.numel() for p in model.parameters())
    fast_weights = T * P * 8  # one [T, P] float64 buffer
    b1 = saved_bytes(model, tasks, 1, order)
    b6 = saved_bytes(model, tasks, 6, order)
    # what the forward sweep keeps (φ_0 = θ at least) and the query pass's activations, once
    assert b1 > (fast_weights if HOOKS_AROUND_TORCH_FUNC else fast_weights / T)
    alpha = 8  # each step's α (a float64 scalar here) is an input of InnerLoop, saved too
    assert b6 - b1 <= 5 * (per_step * fast_weights + alpha)


@pytest.mark.parametrize("order,expected", [("checkpoint", ["phi"]), ("second", ["phi", "grad"]),
                                            ("first", [])])
def test_tape_contents(order, expected):
    torch.manual_seed(1)
    model = small_cnn(channels=4)
    sx, sy, _, _ = classification_tasks(T=3)
    layout = ParamLayout(model)
    program = select_program(model, layout, resolve_loss("cross_entropy"))
    theta_a, theta_s = (t.detach() for t in layout.theta())
    T, P = 3, theta_a.numel()
    for steps in (1, 4, 8):
        alphas = [torch.tensor(0.1, dtype=torch.float64)] * steps
        _, tape, _ = forward_sweep(program, resolve("torch", "cpu"), theta_a, theta_s, alphas, sx, sy,
                                   order=order, keep_grads=False, check_finite=True)
        # φ_0 is θ itself ([P], shared by the tasks); later fast weights are [T, P]
        phis = (P + (steps - 1) * T * P) * 8 if "phi" in expected else 0
        grads = steps * T * P * 8 if "grad" in expected else 0
        assert tape.nbytes() == phis + grads


@pytest.mark.skipif(not HOOKS_AROUND_TORCH_FUNC,
                    reason="lifting saved_tensors_hooks around torch.func needs torch >= 2.5")
def test_adapt_under_save_on_cpu_hooks():
    """A user's saved_tensors_hooks (here save_on_cpu) around adapt do not break torch.func inside."""
    torch.manual_seed(2)
    model = small_cnn(channels=2)
    sx, sy, qx, qy = classification_tasks()
    with torch.autograd.graph.save_on_cpu():
        adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.1, steps=2, loss="cross_entropy")
        logits = adapted(qx)
        loss = torch.stack([F.cross_entropy(logits[t], qy[t]) for t in range(3)]).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
