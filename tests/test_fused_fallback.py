"""Models or losses the fused engine does not know run on the torch.func program, and
`fastmaml.explain` names the culprit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.models import conv4
from fastmaml.programs import TorchFuncProgram, select_program
from fastmaml.programs.fused import FusedProgram

from models import regression_tasks
from oracle import assert_grads_close, autograd_meta_grad, check_float32_error, check_meta_step


class Angle(nn.Module):
    """A call of two values without a rule: the torch.func program."""

    def forward(self, x):
        return torch.atan2(x, x + 1.0)


def program_of(model, loss="mse"):
    return select_program(model, ParamLayout(model), resolve_loss(loss))


@pytest.mark.parametrize(
    "model, culprit, kind, why",
    [
        (
            nn.Sequential(nn.Linear(1, 4), nn.Sequential(nn.ReLU(), Angle()), nn.Linear(4, 1)),
            "atan2",
            "call_function atan2",
            "no rule for this operation",
        ),
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm3d(4)), "1", "BatchNorm3d", "it has buffers"),
        (nn.Sequential(nn.Linear(2, 2), nn.AlphaDropout(0.2)), "1", "AlphaDropout", "random layer"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")), "0", "Conv2d", "padding_mode"),
        (nn.Sequential(nn.Linear(2, 2), nn.GELU(approximate="tanh")), "1", "GELU", "approximate"),
        (nn.Sequential(nn.Linear(2, 2), nn.Flatten(0)), "1", "Flatten", "start_dim=0"),
        (nn.LSTM(2, 3), "<model>", "LSTM", "batch_first=False"),
        (nn.LSTM(2, 3, batch_first=True), "output", "output output", "returns (output, (h_n, c_n))"),
    ],
)
def test_unsupported_module_falls_back_and_is_named(model, culprit, kind, why):
    assert isinstance(program_of(model), TorchFuncProgram)
    e = fastmaml.explain(model)
    assert (e.program, e.module, e.kind) == ("torch.func", culprit, kind)
    assert why in e.reason and culprit in str(e) and kind in str(e)


def test_callable_loss_falls_back_and_explain_names_the_loss():
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))

    def l1(out, y):
        return (out - y).abs().mean()

    assert isinstance(program_of(model, l1), TorchFuncProgram)
    e = fastmaml.explain(model, loss=l1)
    assert e.program == "torch.func" and e.module == "" and "l1" in e.reason and "the loss" in str(e)


def test_supported_model_explains_its_plan():
    model = conv4(1, 5, hidden=4)
    e = fastmaml.explain(model, loss="cross_entropy")
    assert e.program == "fused" and e.module is None and not e.mlp_op
    assert e.layers[:3] == (
        "v4 = 0+1+2+3 (Conv2d+BatchNorm2d+ReLU+MaxPool2d)(x)",
        "v5 = 4 (Conv2d)(v4)",
        "v8 = 5+6+7 (BatchNorm2d+ReLU+MaxPool2d)(v5)",
    )
    assert str(e).startswith("fused engine:\n  v4 = 0+1+2+3 (Conv2d+BatchNorm2d+ReLU+MaxPool2d)(x)\n  v5 = 4 (Conv2d)")
    assert isinstance(program_of(model, "cross_entropy"), FusedProgram)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fastmaml.explain("not a model")


def test_dropout_mode_switch_recompiles():
    """The program cache keys on Dropout's mode: eval -> no dropout rule; back to train -> a dropout rule."""
    model = nn.Sequential(nn.Linear(1, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double()
    tasks = regression_tasks()
    model.eval()
    assert not program_of(model).draws_masks
    fastmaml.meta_step(model, tasks)
    model.train()
    assert isinstance(program_of(model), FusedProgram) and program_of(model).draws_masks
    fastmaml.meta_step(model, tasks)


def test_fallback_model_still_gets_the_exact_meta_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 5), Angle(), nn.Tanh(), nn.Linear(5, 1)).double()
    tasks = regression_tasks(T=2)
    model.zero_grad()
    res = fastmaml.meta_step(model, tasks, inner_lr=0.05, steps=1)
    ref_loss, ref_grads, _ = autograd_meta_grad(
        model, tasks, inner_lr=0.05, steps=1, loss_fn=lambda o, y: F.mse_loss(o, y)
    )
    assert abs(float(res.meta_loss - ref_loss)) < 1e-12
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref_grads, 1e-9)


def test_mlp_explains_the_whole_inner_loop_op():
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    e = fastmaml.explain(model)
    assert e.program == "fused" and e.mlp_op and "whole-inner-loop MLP op" in str(e)
    assert not fastmaml.explain(model, loss="cross_entropy").mlp_op  # the op is MSE only


def test_a_learned_scalar_on_the_torch_func_program():
    """A 0-dim parameter (a learned temperature) in a model that falls back: the torch.func program binds it
    (its unbatched view had no sizes), and its meta-gradient is exact."""

    class AngleTemperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.temperature = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            h = self.lin(x)
            return torch.atan2(h, h + 1.0) * self.temperature

    torch.manual_seed(0)
    model = AngleTemperature().double()
    assert isinstance(program_of(model, "cross_entropy"), TorchFuncProgram)
    g = torch.Generator().manual_seed(0)
    sx, qx = (
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
    )
    y = torch.arange(3).repeat(2).expand(2, 6).clone()
    model.zero_grad()
    fastmaml.meta_step(model, (sx, y, qx, y), inner_lr=0.3, steps=2, loss="cross_entropy")
    _, ref, _ = autograd_meta_grad(
        model, (sx, y, qx, y), inner_lr=0.3, steps=2, order="second", loss_fn=F.cross_entropy
    )
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-9)


class Recurrent(nn.Module):
    """An LSTM and a GRU (batch_first), a final state read, and an atan2 of two values (no rule: the torch.func
    program): vmap has no batching rule for aten::lstm."""

    def __init__(self):
        super().__init__()
        self.lstm, self.gru = nn.LSTM(3, 4, batch_first=True), nn.GRU(4, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        out, h = self.gru(out)
        z = out[:, -1] + h[0]
        return self.head(torch.atan2(z, z + 1.0))


def sequence_tasks(seed=5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 6, 5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    sx, qx = x
    return sx, torch.arange(3).repeat(2, 2), qx, torch.arange(3).repeat(2, 2)


@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
def test_recurrent_layers_run_task_by_task_on_the_torch_func_program(order):
    """A model vmap cannot batch (here aten::lstm) runs task by task instead of raising (it did)."""
    torch.manual_seed(5)
    model = Recurrent().double()
    assert isinstance(program_of(model, "cross_entropy"), TorchFuncProgram)
    check_meta_step(
        model, sequence_tasks(), loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.3, steps=2, order=order
    )


def test_recurrent_layers_in_float32_and_with_learned_rates():
    """Float32 LSTM/GRU on the CPU run oneDNN's kernel, which has no forward-mode derivative (the HVP raised):
    the program runs recurrent models with oneDNN off."""
    torch.manual_seed(6)
    model = Recurrent().double()
    check_float32_error(model, sequence_tasks(6), inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy)
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_meta_step(
        model,
        sequence_tasks(7),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=rates,
        steps=2,
        lr_leaves=list(rates.values()),
    )
