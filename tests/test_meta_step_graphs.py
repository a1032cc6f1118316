"""`MetaStep(..., cuda_graph=True)` on a GPU: the warm-up call, the capture and every replay (with new task
values, new parameter values and new learned rates each call) against the uncaptured `meta_step` on a copy of
the model, for every order, learned inner rates and BatchNorm; a non-finite step raises as uncaptured; a
parameter given other storage is captured again; `cuda_graph="auto"` matches the uncaptured step while it
measures and after it chose. Skipped without CUDA (run by benchmarks/gpu_check.sh)."""

import copy

import pytest
import torch
from torch import nn

import fastmaml

from class_models import ConvClassNet
from models import classification_tasks, regression_tasks
from unplanned import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
DEVICE = "cuda"
RTOL = 1e-5  # float32: the same kernels, captured or not (atomics in some backward kernels may reorder sums)
FIELDS = ("meta_loss", "query_loss_after", "query_loss_before", "support_loss_before", "accuracy_after")


def close(a, b, what):
    assert (a is None) == (b is None), what
    if a is not None:
        err = float((a.double() - b.double()).norm())
        assert err <= RTOL * float(b.double().norm()) + 1e-7, f"{what}: {err}"


def sinusoid():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).to(DEVICE)


def sinusoid_tasks(seed):
    return tuple(t.float().to(DEVICE) for t in regression_tasks(T=8, ns=10, nq=10, seed=seed))


def conv():
    torch.manual_seed(1)
    return ConvClassNet(ways=5, hidden=8, channels=1, side=2, blocks=2).to(DEVICE)


def conv_tasks(seed):
    return tuple(
        t.float().to(DEVICE) if t.is_floating_point() else t.to(DEVICE) for t in classification_tasks(seed=seed)
    )


def scalar_rate(model):
    return nn.Parameter(torch.tensor(0.05, device=DEVICE))


def meta_sgd(model):
    g = torch.Generator().manual_seed(3)
    return {
        n: nn.Parameter((0.02 + 0.05 * torch.rand(p.shape, generator=g)).to(DEVICE))
        for n, p in model.named_parameters()
    }


ORDERS = ["second", "first", "checkpoint", "implicit"]
CASES = [
    *[(f"sinusoid-{o}", sinusoid, sinusoid_tasks, dict(steps=2, order=o)) for o in ORDERS],
    ("sinusoid-learned-scalar", sinusoid, sinusoid_tasks, dict(steps=2, inner_lr=scalar_rate)),
    ("sinusoid-meta-sgd", sinusoid, sinusoid_tasks, dict(steps=2, inner_lr=meta_sgd, order="checkpoint")),
    *[(f"conv-{o}", conv, conv_tasks, dict(steps=2, order=o, loss="cross_entropy", inner_lr=0.3)) for o in ORDERS],
    ("conv-meta-sgd", conv, conv_tasks, dict(steps=2, loss="cross_entropy", inner_lr=meta_sgd)),
    ("conv-step-weights", conv, conv_tasks, dict(steps=2, loss="cross_entropy", inner_lr=0.3, step_weights=[0.5, 0.5])),
]


def leaves(lr):
    return fastmaml.inner_lr.learnable_leaves(lr)


def twins(make, options):
    """Two copies of make()'s model, the inner rate of each (made per model when `options` gives a maker), and
    the other options."""
    base = make()
    a, c = copy.deepcopy(base), copy.deepcopy(base)
    rate = options.get("inner_lr", 0.01)
    la, lc = (rate(a), rate(c)) if callable(rate) else (rate, rate)
    return a, c, la, lc, {k: v for k, v in options.items() if k != "inner_lr"}


def rounds(plan, a, c, la, lc, opts, make_tasks, n, before=lambda rnd: None):
    """n calls of `plan` (on model a) against the unplanned step on c, each on new tasks, with new parameter
    values and rates in place after each (the graph reads them); `before(rnd)` runs before each call."""
    for rnd in range(n):
        before(rnd)
        tasks = make_tasks(rnd)
        ra = plan(tasks)
        rc = reference(c, tasks, **dict(opts, inner_lr=lc))
        for f in FIELDS:
            close(getattr(ra, f), getattr(rc, f), f)
        for (name, p), q in zip(a.named_parameters(), c.parameters()):
            close(p.grad, q.grad, name)
        for (name, x), y in zip(a.named_buffers(), c.buffers()):
            close(x.float(), y.float(), name)
        for x, y in zip(leaves(la), leaves(lc)):
            close(x.grad, y.grad, "inner_lr")
        with torch.no_grad():
            for m, lr in ((a, la), (c, lc)):
                for p in list(m.parameters()) + leaves(lr):
                    p.sub_(0.01 * p.grad)
                    p.grad = None


@pytest.mark.parametrize("name, make, make_tasks, options", CASES, ids=[c[0] for c in CASES])
def test_capture_and_replay_match_the_uncaptured_step(name, make, make_tasks, options):
    a, c, la, lc, opts = twins(make, options)
    plan = fastmaml.MetaStep(a, make_tasks(9), inner_lr=la, cuda_graph=True, **opts)
    rounds(plan, a, c, la, lc, opts, make_tasks, 4)  # 0: warm-up (uncaptured), 1: capture and replay, 2-3: replays
    assert plan._graph.graph is not None and plan.rebuilds == 0


def test_non_finite_replay_raises_as_uncaptured():
    a, c = sinusoid(), sinusoid()
    plan = fastmaml.MetaStep(a, sinusoid_tasks(0), cuda_graph=True, steps=2)
    plan(sinusoid_tasks(0))
    plan(sinusoid_tasks(1))  # captured
    sx, sy, qx, qy = sinusoid_tasks(2)
    bad = (sx, sy.index_fill(0, torch.tensor([3], device=DEVICE), float("nan")), qx, qy)
    for p in a.parameters():
        p.grad = None
    with pytest.raises(fastmaml.NonFiniteError) as got:
        plan(bad)
    with pytest.raises(fastmaml.NonFiniteError) as want:
        reference(c, bad, steps=2)
    assert str(got.value) == str(want.value)
    assert all(p.grad is None for p in a.parameters())


def test_parameter_with_other_storage_is_captured_again():
    a, c = sinusoid(), sinusoid()
    plan = fastmaml.MetaStep(a, sinusoid_tasks(0), cuda_graph=True)
    plan(sinusoid_tasks(0))
    plan(sinusoid_tasks(1))
    for m in (a, c):
        m[2].weight.data = m[2].weight.data * 0.5  # same Parameter, same shape, other storage
        for p in m.parameters():
            p.grad = None
    r = plan(sinusoid_tasks(2))
    assert plan.rebuilds == 1 and "storage" in plan.last_change
    want = reference(c, sinusoid_tasks(2))
    close(r.meta_loss, want.meta_loss, "meta_loss")
    for p, q in zip(a.parameters(), c.parameters()):
        close(p.grad, q.grad, "grad")


@pytest.mark.parametrize("name, make, make_tasks, options", [CASES[0], CASES[-2]], ids=[CASES[0][0], CASES[-2][0]])
def test_auto_matches_the_uncaptured_step_while_measuring_and_after(name, make, make_tasks, options):
    a, c, la, lc, opts = twins(make, options)
    plan = fastmaml.MetaStep(a, make_tasks(9), inner_lr=la, cuda_graph="auto", **opts)
    decide = 1 + 2 * fastmaml.graphs.TIMED_CALLS + fastmaml.graphs.WARMUP_CALLS + 1

    def undecided_until_the_last_timed_call(rnd):
        assert (plan.graph_choice.decision is None) == (rnd < decide)

    rounds(plan, a, c, la, lc, opts, make_tasks, decide + 2, undecided_until_the_last_timed_call)
    choice = plan.graph_choice
    assert choice.decision in ("captured", "uncaptured") and "ms" in choice.reason
    assert (plan._graph is None) == (choice.decision == "uncaptured")


def test_dropout_in_training_mode_is_not_captured():
    """A graph would replay one call's masks at every call: cuda_graph=True raises, "auto" runs uncaptured."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Dropout(0.2), nn.Linear(40, 1)).to(DEVICE)
    with pytest.raises(ValueError, match="dropout in training mode"):
        fastmaml.MetaStep(model, sinusoid_tasks(0), inner_lr=0.05, cuda_graph=True)
    plan = fastmaml.MetaStep(model, sinusoid_tasks(0), inner_lr=0.05, cuda_graph="auto")
    assert plan.graph_choice.decision == "uncaptured" and "dropout" in plan.graph_choice.reason
    plan(sinusoid_tasks(1))
    assert plan._graph is None
