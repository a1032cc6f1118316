"""meta_step over chunks of tasks (`task_chunk`, or sized by `TASK_STATE_BYTES`): the same meta-gradient
as the autograd oracle (float64, rel. error < 1e-9) and the same results as one chunk, for every order,
learnable per-step learning rates, shared (non-adapted) weights and per-step BatchNorm statistics."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastmaml
from fastmaml import schedule
from fastmaml.engine import general
from fastmaml.errors import NonFiniteError
from fastmaml.schedule import state_buffers, task_chunks

from models import classification_tasks, small_cnn
from oracle import check_meta_step

TOL = 1e-9


def lr_leaves(model, steps):
    """Per-step, per-parameter learnable learning rates (MAML++ / Meta-SGD style)."""
    return [
        {n: torch.tensor(0.1 + 0.01 * j, dtype=torch.float64, requires_grad=True) for n, _ in model.named_parameters()}
        for j in range(steps)
    ]


@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_meta_step_matches_the_oracle(order, chunk):
    torch.manual_seed(0)
    model = small_cnn(channels=3)
    steps = 2
    lrs = lr_leaves(model, steps)
    leaves = [t for d in lrs for t in d.values()]
    check_meta_step(
        model,
        classification_tasks(T=5, seed=3),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=lrs,
        steps=steps,
        order=order,
        lr_leaves=leaves,
        tol=TOL,
        task_chunk=chunk,
    )


@pytest.mark.parametrize("order", ["second", "first", "implicit"])
def test_chunks_with_shared_weights_give_the_same_result(order):
    """Only the head adapts (ANIL): the body's meta-gradient (∂L/∂ψ) sums over chunks too; every
    per-task result comes back in task order."""
    torch.manual_seed(0)
    model = small_cnn(channels=3)
    tasks = classification_tasks(T=5, seed=4)
    kwargs = dict(inner_lr=0.2, steps=2, order=order, loss="cross_entropy", inner_params=["9"])
    whole = fastmaml.meta_step(model, tasks, **kwargs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    parts = fastmaml.meta_step(model, tasks, task_chunk=2, **kwargs)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=TOL, atol=1e-14)
    for field in (
        "meta_loss",
        "query_loss_after",
        "query_loss_before",
        "support_loss_before",
        "accuracy_after",
        "accuracy_before",
    ):
        torch.testing.assert_close(getattr(parts, field), getattr(whole, field), rtol=TOL, atol=0)


def test_chunks_update_per_step_statistics_like_one_chunk():
    model = fastmaml.add_per_step_stats(small_cnn(channels=3), steps=2)
    tasks = classification_tasks(T=5, seed=5)
    chunked = copy.deepcopy(model)
    fastmaml.meta_step(model, tasks, inner_lr=0.1, steps=2, loss="cross_entropy", batch_norm="per_step")
    fastmaml.meta_step(chunked, tasks, inner_lr=0.1, steps=2, loss="cross_entropy", batch_norm="per_step", task_chunk=2)
    for (name, a), (_, b) in zip(model.named_buffers(), chunked.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)
    for a, b in zip(model.parameters(), chunked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=TOL, atol=1e-14)


def test_state_budget_sizes_the_chunks(monkeypatch):
    """With the default task_chunk=None the chunks follow the per-task state: here a budget of one
    task's state gives one task per chunk, and the meta-gradient still matches the oracle."""
    model = small_cnn(channels=3)
    steps = 3
    per_task = sum(p.numel() for p in model.parameters()) * 8 * state_buffers("second", steps, False)
    monkeypatch.setitem(schedule.TASK_STATE_BYTES, "cpu", per_task)
    calls = []
    real = general.task_budget_chunks
    monkeypatch.setattr(general, "task_budget_chunks", lambda *a: calls.append(real(*a)) or calls[-1])
    check_meta_step(
        model,
        classification_tasks(T=3, seed=6),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.1,
        steps=steps,
        tol=TOL,
    )
    assert calls == [[slice(0, 1), slice(1, 2), slice(2, 3)]]


def test_task_chunks():
    assert task_chunks(5, 10, 25) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert task_chunks(5, 100, 25) == [slice(i, i + 1) for i in range(5)]  # at least one task per chunk
    assert task_chunks(5, 1, 1 << 20) == [slice(0, 5)]
    assert task_chunks(5, 10, 25, size=3) == [slice(0, 3), slice(3, 5)]
    assert state_buffers("second", 10, False) > state_buffers("checkpoint", 10, False)
    # checkpoint: log2 K snapshots besides the working buffers
    assert state_buffers("checkpoint", 100, False) == state_buffers("checkpoint", 1, False) + 7 - 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_task_chunk(bad):
    tasks = classification_tasks(T=2)
    with pytest.raises(ValueError, match=r"task_chunk: expected None or a positive int"):
        fastmaml.meta_step(small_cnn(), tasks, loss="cross_entropy", task_chunk=bad)


def test_non_finite_in_a_later_chunk_touches_no_grad():
    model = small_cnn(channels=3)
    sx, sy, qx, qy = classification_tasks(T=4)
    sx = sx.clone()
    sx[3, 0, 0, 0, 0] = float("nan")  # the last chunk's support set
    with pytest.raises(NonFiniteError, match="inner step 0"):
        fastmaml.meta_step(model, (sx, sy, qx, qy), loss="cross_entropy", task_chunk=2)
    assert all(p.grad is None for p in model.parameters())
