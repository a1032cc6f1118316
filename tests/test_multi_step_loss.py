"""MAML++'s multi-step loss (`meta_step(..., step_weights=...)`) against the autograd oracle (float64, rel.
error < 1e-9): every order, the fused engine and the torch.func program, learned rates, a shared body;
`msl_weights` against the MAML++ schedule; bad weights name the argument."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml

from models import classification_tasks, mlp, regression_tasks, small_cnn
from oracle import check_meta_step

ORDERS = ["second", "checkpoint", "first"]


def mse(out, y):
    return F.mse_loss(out, y)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [0.0, 0.7, 0.3], [0.5, 0.0, 0.0]])
def test_mlp_matches_the_oracle(engine, order, weights):
    torch.manual_seed(0)
    check_meta_step(
        mlp((1, 13, 7, 1), act=nn.Tanh),
        regression_tasks(T=3, ns=6, nq=5),
        loss="mse",
        loss_fn=mse,
        inner_lr=0.05,
        steps=3,
        order=order,
        step_weights=weights,
    )


@pytest.mark.parametrize("order", ORDERS)
def test_conv_net_with_batchnorm_matches_the_oracle(engine, order):
    torch.manual_seed(0)
    check_meta_step(
        small_cnn(channels=3),
        classification_tasks(T=2, ways=3),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.3,
        steps=2,
        order=order,
        step_weights=[0.4, 0.6],
    )


@pytest.mark.parametrize("order", ORDERS)
def test_learned_rates_and_a_shared_body(order):
    """Per-step learned rates get the multi-step loss's gradient; a body outside the inner loop (ANIL)
    gets every query pass's term."""
    torch.manual_seed(1)
    model = mlp((1, 9, 6, 1))
    tasks = regression_tasks(T=2, ns=5, nq=4)
    lrs = [torch.tensor(0.04 + 0.01 * j, dtype=torch.float64, requires_grad=True) for j in range(4)]
    check_meta_step(
        model,
        tasks,
        loss="mse",
        loss_fn=mse,
        inner_lr=lrs,
        steps=4,
        order=order,
        lr_leaves=lrs,
        step_weights=fastmaml.msl_weights(4, 1, 3),
    )
    check_meta_step(
        model,
        tasks,
        loss="mse",
        loss_fn=mse,
        inner_lr=0.05,
        steps=3,
        order=order,
        inner_params=["4"],
        step_weights=[0.3, 0.3, 0.4],
    )


def test_last_step_only_is_the_plain_meta_step():
    torch.manual_seed(2)
    model = mlp((1, 8, 1))
    tasks = regression_tasks(T=2)
    model.zero_grad()
    plain = fastmaml.meta_step(model, tasks, inner_lr=0.1, steps=2)
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    weighted = fastmaml.meta_step(model, tasks, inner_lr=0.1, steps=2, step_weights=[0.0, 1.0])
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)
    torch.testing.assert_close(weighted.meta_loss, plain.meta_loss, rtol=1e-12, atol=0)


def test_msl_weights_follow_the_maml_plus_plus_schedule():
    assert fastmaml.msl_weights(1, 0, 10) == [1.0]
    assert fastmaml.msl_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    mid = fastmaml.msl_weights(5, 5, 10)  # half-way: (1 − ½)/5 = 0.1 each, the last (1 + ½·4)/5 = 0.6
    assert mid == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6]) and sum(mid) == pytest.approx(1.0)
    late = fastmaml.msl_weights(5, 100, 10)
    assert late == pytest.approx([0.006] * 4 + [1 - 4 * 0.006])
    for bad, match in (((0, 1, 1), "steps"), ((3, -1, 1), "progress"), ((3, 1, 0), "anneal")):
        with pytest.raises(ValueError, match=match):
            fastmaml.msl_weights(*bad)


@pytest.mark.parametrize(
    "weights, order, error, match",
    [
        ([0.5, 0.5], "second", ValueError, r"step_weights: expected 3 weights \(one per inner step, steps=3\), got 2"),
        ([0.5, -0.1, 0.6], "second", ValueError, "finite non-negative"),
        ([0.5, float("nan"), 0.6], "first", ValueError, "finite non-negative"),
        ([0.3, 0.3, 0.4], "implicit", ValueError, "order='implicit' has no per-step query losses"),
        (["a", 0.3, 0.4], "second", TypeError, "step_weights: expected a sequence of 3 floats"),
        (0.5, "second", TypeError, "step_weights: expected a sequence of 3 floats"),
    ],
)
def test_bad_weights_name_the_argument(weights, order, error, match):
    with pytest.raises(error, match=match):
        fastmaml.meta_step(
            mlp((1, 4, 1)), regression_tasks(T=2), inner_lr=0.1, steps=3, order=order, step_weights=weights
        )
