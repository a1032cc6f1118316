"""Bad input gets a clear error naming the argument; non-finite values are caught and .grad is untouched."""

import pytest
import torch
from torch import nn

import fastmaml

from models import mlp, regression_tasks


@pytest.fixture
def model():
    torch.manual_seed(0)
    return mlp((1, 6, 1))


@pytest.fixture
def tasks():
    return regression_tasks()


def test_mismatched_task_counts(model, tasks):
    sx, sy, qx, qy = tasks
    with pytest.raises(ValueError, match=r"number of tasks T .*query_x.: 2"):
        fastmaml.meta_step(model, (sx, sy, qx[:2], qy[:2]))


def test_mismatched_shots(model, tasks):
    sx, sy, qx, qy = tasks
    with pytest.raises(ValueError, match=r"support_x has 6 examples per task but support_y has 5"):
        fastmaml.meta_step(model, (sx, sy[:, :5], qx, qy))


def test_list_of_tasks_with_different_shots(model, tasks):
    per_task = [tuple(t[i] for t in tasks) for i in range(3)]
    per_task[1] = (per_task[1][0][:4], per_task[1][1][:4], per_task[1][2], per_task[1][3])
    with pytest.raises(ValueError, match="support_x has different shapes across tasks"):
        fastmaml.meta_step(model, per_task)


def test_mismatched_dtypes(model, tasks):
    sx, sy, qx, qy = tasks
    with pytest.raises(TypeError, match="support_x is torch.float32 but query_x is torch.float64"):
        fastmaml.meta_step(model, (sx.float(), sy, qx, qy))
    with pytest.raises(TypeError, match=r"dtype torch.float32 differs from the model's parameters"):
        fastmaml.meta_step(model, tuple(t.float() for t in tasks))


def test_mismatched_devices(model, tasks):
    sx, sy, qx, qy = tasks
    with pytest.raises(ValueError, match="all four tensors must be on one device"):
        fastmaml.meta_step(model, (sx, sy, qx.to("meta"), qy))


def test_non_floating_model(tasks):
    m = mlp((1, 3, 1))
    m[0].weight = nn.Parameter(torch.ones(3, 1, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"model: parameter '0.weight' has dtype torch.int64"):
        fastmaml.meta_step(m, tasks)


def test_not_a_module(tasks):
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fastmaml.meta_step(lambda x: x, tasks)


@pytest.mark.parametrize(
    "steps,exc,msg",
    [
        (-1, ValueError, "steps: expected a non-negative"),
        (1.5, TypeError, "steps: expected a non-negative int"),
        (True, TypeError, "steps: expected a non-negative int"),
    ],
)
def test_bad_steps(model, tasks, steps, exc, msg):
    with pytest.raises(exc, match=msg):
        fastmaml.meta_step(model, tasks, steps=steps)


@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_non_positive_lr(model, tasks, lr):
    with pytest.raises(ValueError, match=f"inner_lr: the learning rate must be positive and finite, got {lr}"):
        fastmaml.meta_step(model, tasks, inner_lr=lr)
    with pytest.raises(ValueError, match="inner_lr: the learning rate must be positive"):
        fastmaml.meta_step(model, tasks, inner_lr=torch.tensor(lr, dtype=torch.float64))


def test_bad_lr_forms(model, tasks):
    with pytest.raises(ValueError, match=r"inner_lr: a tensor learning rate must be a scalar, got shape \(2,\)"):
        fastmaml.meta_step(model, tasks, inner_lr=torch.ones(2))
    with pytest.raises(ValueError, match=r"no learning rate for adapted parameters \['2.bias'\]"):
        fastmaml.meta_step(model, tasks, inner_lr={n: 0.1 for n in ["0.weight", "0.bias", "2.weight"]})
    with pytest.raises(ValueError, match=r"expected a scalar or a tensor shaped like the parameter \(6, 1\)"):
        fastmaml.meta_step(model, tasks, inner_lr={n: torch.ones(2) for n, _ in model.named_parameters()})
    with pytest.raises(
        ValueError, match="a per-step list must have one entry per inner step; got 1 entries for steps=2"
    ):
        fastmaml.meta_step(model, tasks, steps=2, inner_lr=[0.1])
    with pytest.raises(TypeError, match="inner_lr: expected a positive float"):
        fastmaml.meta_step(model, tasks, inner_lr="fast")


def test_unknown_loss_and_order(model, tasks):
    with pytest.raises(ValueError, match=r"loss: unknown loss 'hinge'; expected one of \['cross_entropy', 'mse'\]"):
        fastmaml.meta_step(model, tasks, loss="hinge")
    with pytest.raises(ValueError, match="order: unknown order 'third'"):
        fastmaml.meta_step(model, tasks, order="third")


def test_wrong_target_types(model, tasks):
    sx, sy, qx, qy = tasks
    with pytest.raises(TypeError, match="support_y: loss='cross_entropy' needs int64 class indices"):
        fastmaml.meta_step(model, tasks, loss="cross_entropy")
    with pytest.raises(
        ValueError, match=r"loss='mse': the model's output per task has shape \(6, 1\) but the target has \(6,\)"
    ):
        fastmaml.meta_step(model, (sx, sy[..., 0], qx, qy[..., 0]))


def test_inner_params_naming_nothing(model, tasks):
    with pytest.raises(ValueError, match=r"inner_params: 'head' names no parameter or module of the model"):
        fastmaml.meta_step(model, tasks, inner_params=["head"])
    with pytest.raises(ValueError, match="inner_params: the predicate selected no parameter"):
        fastmaml.meta_step(model, tasks, inner_params=lambda n, p: False)


def test_unknown_backend(model, tasks):
    with pytest.raises(ValueError, match="backend: unknown backend 'cuda-magic'"):
        fastmaml.meta_step(model, tasks, backend="cuda-magic")


class Angle(nn.Module):
    def forward(self, x):
        return torch.atan2(x, x + 1.0)


def test_dropout_in_training_mode_is_refused_on_the_torch_func_program(tasks):
    m = nn.Sequential(nn.Linear(1, 8), Angle(), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    with pytest.raises(ValueError, match=r"model: it calls a random op \(e.g. Dropout in training mode\)"):
        fastmaml.meta_step(m, tasks)
    m.eval()
    fastmaml.meta_step(m, tasks)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()], [
        None if p.grad is None else p.grad.clone() for p in model.parameters()
    ]


def test_nan_in_support_names_the_step_and_leaves_grads(model, tasks):
    sx, sy, qx, qy = tasks
    model.zero_grad()
    fastmaml.meta_step(model, tasks)  # some existing .grad
    params, grads = _snapshot(model)
    sy = sy.clone()
    sy[1, 2, 0] = float("nan")
    with pytest.raises(
        fastmaml.NonFiniteError, match=r"non-finite support loss or gradient at inner step 0 \(of 3\)"
    ) as e:
        fastmaml.meta_step(model, (sx, sy, qx, qy), steps=3)
    assert e.value.step == 0 and e.value.where == "support loss/gradient"
    p2, g2 = _snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(params, p2))
    assert all(torch.equal(a, b) for a, b in zip(grads, g2))


def test_divergence_reported_at_later_step(tasks):
    torch.manual_seed(0)
    model = mlp((1, 6, 1))
    sx, sy, qx, qy = tasks
    big = (sx * 1e3, sy * 1e3, qx, qy)
    with pytest.raises(fastmaml.NonFiniteError) as e:
        fastmaml.meta_step(model, big, steps=40, inner_lr=1.0)
    assert e.value.step is not None and e.value.step > 0
    assert model[0].weight.grad is None


def test_nan_in_query_is_reported(model, tasks):
    sx, sy, qx, qy = tasks
    qy = qy.clone()
    qy[0, 0, 0] = float("inf")
    model.zero_grad()
    with pytest.raises(fastmaml.NonFiniteError, match="non-finite query loss after 1 inner steps"):
        fastmaml.meta_step(model, (sx, sy, qx, qy))
    assert all(p.grad is None for p in model.parameters())
    # check_finite=False lets it through (user's choice)
    res = fastmaml.meta_step(model, (sx, sy, qx, qy), check_finite=False)
    assert not torch.isfinite(res.meta_loss)


def _ce_tasks(T=2):
    from models import classification_tasks

    return classification_tasks(T=T)


@pytest.mark.parametrize(
    "bad_label, match",
    [
        (5, r"tasks.support_y: class index 5 is out of range for the model's 5"),
        (-1, r"tasks.support_y: class indices must be >= 0, got -1"),
        (-100, r"no ignore_index"),
    ],
)
@pytest.mark.parametrize("fused", [True, False])
def test_class_labels_out_of_range(bad_label, match, fused):
    from models import small_cnn

    model = small_cnn(channels=2)
    if not fused:
        model = nn.Sequential(model, nn.Softsign())  # no rule for Softsign: the torch.func program
    sx, sy, qx, qy = _ce_tasks()
    sy = sy.clone()
    sy[1, 0] = bad_label
    with pytest.raises(ValueError, match=match):
        fastmaml.meta_step(model, (sx, sy, qx, qy), loss="cross_entropy")
    with pytest.raises(ValueError, match=match.replace("tasks.", "")):
        fastmaml.adapt(model, sx, sy, loss="cross_entropy")
    qy = qy.clone()
    qy[0, 1] = 7
    with pytest.raises(ValueError, match="tasks.query_y: class index 7"):
        fastmaml.meta_step(model, (sx, _ce_tasks()[1], qx, qy), loss="cross_entropy")


def test_target_dtype_must_match_inputs(model, tasks):
    sx, sy, qx, qy = tasks
    with pytest.raises(TypeError, match=r"tasks.support_y: dtype torch.float32 differs from the inputs' torch.float64"):
        fastmaml.meta_step(model, (sx, sy.float(), qx, qy.float()))


def test_meta_device(tasks):
    with pytest.raises(ValueError, match="tasks.support_x: on the meta device"):
        fastmaml.meta_step(mlp((1, 6, 1)), tuple(t.to("meta") for t in tasks))
    with pytest.raises(ValueError, match="model: on the meta device"):
        fastmaml.meta_step(mlp((1, 6, 1)).to("meta"), tasks)


@pytest.mark.parametrize(
    "lr, match",
    [
        (float("inf"), "inner_lr: the learning rate must be positive and finite"),
        (0.0, "inner_lr: the learning rate must be positive"),
        (
            {"0.weight": 0.0, "0.bias": 0.1, "2.weight": 0.1, "2.bias": 0.1},
            r"inner_lr\['0.weight'\]: the learning rate must be positive",
        ),
        (
            {"0.weight": -0.1, "0.bias": 0.1, "2.weight": 0.1, "2.bias": 0.1},
            r"inner_lr\['0.weight'\]: the learning rate must be positive",
        ),
    ],
)
def test_bad_learning_rates(model, tasks, lr, match):
    with pytest.raises(ValueError, match=match):
        fastmaml.meta_step(model, tasks, inner_lr=lr)


def test_empty_inner_params(model, tasks):
    with pytest.raises(ValueError, match="inner_params: an empty list adapts nothing"):
        fastmaml.meta_step(model, tasks, inner_params=[])


def test_model_returning_a_tuple(tasks):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def forward(self, x):
            return self.lin(x), x

    e = fastmaml.explain(Pair())
    assert e.program == "torch.func" and "returns a tuple" in e.reason
    with pytest.raises(TypeError, match="model: forward returned tuple"):
        fastmaml.meta_step(Pair().double(), tasks)


def test_huge_steps_fail_up_front_naming_steps(model, tasks):
    """The memory a call needs is checked before anything is allocated."""
    with pytest.raises(MemoryError, match=r"steps: 10000000000 inner steps with order='second' need about"):
        fastmaml.meta_step(model, tasks, steps=10**10)
    with pytest.raises(MemoryError, match=r"steps: .*order='checkpoint' \(memory grows as log K\)"):
        fastmaml.meta_step(
            nn.Sequential(nn.Linear(1, 4000), nn.Tanh(), nn.Linear(4000, 1)).double(),
            tasks,
            steps=10**10,
            order="first",
            inner_lr=torch.tensor(0.01, dtype=torch.float64, requires_grad=True),
        )


def test_adapt_without_steps_has_no_support_loss(model, tasks):
    sx, sy, _, _ = tasks
    assert fastmaml.adapt(model, sx, sy, steps=0).support_loss_before is None
    assert fastmaml.adapt(model, sx, sy, steps=1).support_loss_before.shape == (sx.shape[0],)
