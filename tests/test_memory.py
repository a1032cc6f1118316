"""order="checkpoint" keeps at most `checkpoint_slots(K)` (max(2, ⌈log2 K⌉)) fast weights for backward, and
"second" grows only by the fast weights and gradients (counted deterministically with
saved_tensors_hooks and the tape's own byte count)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastmaml
from fastmaml.engine.sweeps import forward_sweep
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.ops import resolve
from fastmaml.programs import select_program
from fastmaml.schedule import checkpoint_slots, checkpoint_steps, replay_phis

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
    with (
        torch.autograd.graph.saved_tensors_hooks(lambda t: outer.append(t) or t, lambda t: t)
        if HOOKS_AROUND_TORCH_FUNC
        else contextlib.nullcontext()
    ):
        logits = adapted(qx)
        loss = torch.stack([F.cross_entropy(logits[t], qy[t]) for t in range(logits.shape[0])]).mean()
    loss.backward()
    return inner + nbytes(outer)


@pytest.mark.parametrize("order,extra_buffers", [("checkpoint", checkpoint_slots), ("second", lambda K: 2 * (K - 1))])
def test_saved_bytes_grow_only_by_fast_weights(order, extra_buffers):
    torch.manual_seed(0)
    model = small_cnn(channels=4)
    tasks = classification_tasks(T=3)
    T, P = 3, sum(p.numel() for p in model.parameters())
    fast_weights = T * P * 8  # one [T, P] float64 buffer
    b1 = saved_bytes(model, tasks, 1, order)
    # what the forward sweep keeps (φ_0 = θ at least) and the query pass's activations, once
    assert b1 > (fast_weights if HOOKS_AROUND_TORCH_FUNC else fast_weights / T)
    alpha = 8  # each step's α (a float64 scalar here) is an input of InnerLoop, saved too
    for K in (6, 12):
        assert saved_bytes(model, tasks, K, order) - b1 <= extra_buffers(K) * fast_weights + (K - 1) * alpha


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 7, 10, 20])
@pytest.mark.parametrize("slots", [0, 1, 2, 3])
def test_replay_visits_every_step_in_reverse_with_bounded_snapshots(K, slots):
    """replay_phis yields φ_K−1 … φ_0, each advanced from the right snapshot, with never more than θ,
    `slots` snapshots and the φ_j in hand alive at once."""
    keep = checkpoint_steps(K, slots)
    alive = set()

    class Phi:
        def __init__(self, j):
            self.j = j
            alive.add(id(self))

        def __del__(self):
            alive.discard(id(self))

    kept = [Phi(j) if j in keep else None for j in range(K)]
    replayed = []

    def advance(phi, a, b):
        assert phi.j == a and b > a
        replayed.append(b - a)
        return Phi(b)

    seen = []
    for j, phi in replay_phis(kept, advance, slots):
        assert phi.j == j
        seen.append(j)
        assert len(alive) <= slots + 2  # θ, ≤ slots snapshots, the φ_j in hand
        del phi
    assert seen == list(range(K - 1, -1, -1))
    assert kept == [None] * K  # the tape's snapshots were handed over (and freed after use)
    assert len(keep) <= slots + 1


@pytest.mark.parametrize("order,expected", [("checkpoint", ["phi"]), ("second", ["phi", "grad"]), ("first", [])])
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
        _, tape, _ = forward_sweep(
            program,
            resolve("torch", "cpu"),
            theta_a,
            theta_s,
            alphas,
            sx,
            sy,
            order=order,
            keep_grads=False,
            check_finite=True,
        )
        # φ_0 is θ itself ([P], shared by the tasks); later fast weights are [T, P]
        kept = steps if order == "second" else len(checkpoint_steps(steps))
        phis = (P + (kept - 1) * T * P) * 8 if "phi" in expected else 0
        grads = steps * T * P * 8 if "grad" in expected else 0
        assert tape.nbytes() == phis + grads


@pytest.mark.skipif(
    not HOOKS_AROUND_TORCH_FUNC, reason="lifting saved_tensors_hooks around torch.func needs torch >= 2.5"
)
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


@pytest.mark.parametrize("K", [5, 10, 20, 200, 800, 3000])
def test_checkpoint_replay_is_near_linear_in_steps(K):
    """With the default `checkpoint_slots(K)` snapshots the replay costs at most (K/2)·⌈log2 K⌉ + K inner
    steps (the bisection never runs out of slots on a long segment), not K²."""
    replayed = []

    def advance(phi, a, b):
        replayed.append(b - a)
        return b

    keep = checkpoint_steps(K)
    order = [j for j, _ in replay_phis([j if j in keep else None for j in range(K)], advance)]
    assert order == list(reversed(range(K)))
    assert len(keep) <= checkpoint_slots(K) + 1
    assert sum(replayed) <= K // 2 * checkpoint_slots(K) + K
