"""order="checkpoint" keeps nothing for backward that grows with `steps` beyond the fast weights
(counted deterministically with saved_tensors_hooks and the tape's own byte count)."""
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


def saved_bytes(fn):
    """Bytes of every tensor autograd saves for backward while `fn` runs (then backward is run)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return total


def adapt_and_outer(model, tasks, steps, order):
    sx, sy, qx, qy = tasks
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.1, steps=steps, order=order, loss="cross_entropy")
    logits = adapted(qx)
    return torch.stack([F.cross_entropy(logits[t], qy[t]) for t in range(logits.shape[0])]).mean()


@pytest.mark.parametrize("order,per_step", [("checkpoint", 1), ("second", 2)])
def test_saved_bytes_grow_only_by_fast_weights(order, per_step):
    torch.manual_seed(0)
    model = small_cnn(channels=4)
    tasks = classification_tasks(T=3)
    T, P = 3, sum(p.numel() for p in model.parameters())
    fast_weights = T * P * 8  # one [T, P] float64 buffer
    b1 = saved_bytes(lambda: adapt_and_outer(model, tasks, 1, order))
    b6 = saved_bytes(lambda: adapt_and_outer(model, tasks, 6, order))
    # activations of the query pass are there once, whatever the number of steps
    assert b1 > fast_weights
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
