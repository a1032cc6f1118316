"""The compiled-program cache is correct by construction: a changed module attribute (a slope, eps, a custom
module's constant, dropout p) compiles a new program (checked against the float64 oracle after the change),
replaced parameters are noticed, models are held weakly, and the torch.func path is safe from threads."""

import gc
import threading
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.programs import FusedProgram, TorchFuncProgram, select, select_program

from models import classification_tasks, regression_tasks
from oracle import check_meta_step

TOL = 1e-9


class Tempered(nn.Module):
    """A custom module whose forward reads a plain attribute."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)
        self.temperature = 1.0

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x) / self.temperature))


def program(model, loss="mse"):
    return select_program(model, ParamLayout(model), resolve_loss(loss))


def check_mse(model, tasks):
    return check_meta_step(model, tasks, loss="mse", loss_fn=F.mse_loss, inner_lr=0.2, steps=2, tol=TOL)


def test_custom_attribute_change_recompiles():
    torch.manual_seed(0)
    model = Tempered().double()
    tasks = regression_tasks(din=3, dout=2)
    first = program(model)
    assert isinstance(first, FusedProgram)
    check_mse(model, tasks)
    model.temperature = 0.25
    assert program(model) is not first
    check_mse(model, tasks)


def test_leaky_slope_and_batchnorm_eps_changes_recompile():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.LeakyReLU(0.01),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 16, 5),
    ).double()
    tasks = classification_tasks(size=8)

    def check():
        check_meta_step(model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.3, steps=2, tol=TOL)

    check()
    model[2].negative_slope = 0.5
    check()
    model[1].eps = 0.3
    check()


def test_dropout_p_change_in_training_mode_recompiles():
    model = nn.Sequential(nn.Linear(1, 4), nn.Dropout(0.0), nn.Linear(4, 1)).double()
    tasks = regression_tasks()
    fastmaml.meta_step(model, tasks)
    assert isinstance(program(model), FusedProgram) and not program(model).draws_masks
    model[1].p = 0.5
    assert program(model).draws_masks and program(model).nodes[1].rule.p == 0.5
    fastmaml.meta_step(model, tasks)


def test_replaced_parameter_and_training_flag_recompile():
    torch.manual_seed(2)
    model = Tempered().double()
    tasks = regression_tasks(din=3, dout=2)
    first = program(model)
    model.lin.weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    assert program(model) is not first
    check_mse(model, tasks)
    second = program(model)
    model.eval()
    assert program(model) is not second


def test_monkeypatched_forward_recompiles():
    torch.manual_seed(3)
    model = Tempered().double()
    tasks = regression_tasks(din=3, dout=2)
    check_mse(model, tasks)
    model.forward = types.MethodType(lambda self, x: self.out(torch.sigmoid(self.lin(x))), model)
    check_mse(model, tasks)


def test_a_forward_hook_keeps_the_model_off_the_fused_engine():
    model = Tempered().double()
    handle = model.lin.register_forward_hook(lambda m, i, o: o * 2)
    e = fastmaml.explain(model)
    assert e.program == "torch.func" and e.module == "lin" and "hooks" in e.reason
    check_mse(model, regression_tasks(din=3, dout=2))
    handle.remove()
    assert isinstance(program(model), FusedProgram)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Tempered().double(),
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(),
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Softsign(), nn.Linear(4, 2)).double(),
    ],
)
def test_programs_do_not_keep_models_alive(make):
    """200 fresh models in a loop (fused, MLP op, torch.func): none stays alive."""
    tasks = regression_tasks(din=3, dout=2)
    gc.collect()
    cached_before = len(select._CACHE)  # models other tests keep alive
    refs = []
    for _ in range(200):
        model = make()
        fastmaml.meta_step(model, tasks, inner_lr=0.1)
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    assert len(select._CACHE) <= cached_before


def test_programs_per_model_are_bounded():
    model = Tempered().double()
    for t in range(10):
        model.temperature = 1.0 + t
        program(model)
    assert select.cached_programs(model) == select.MAX_PROGRAMS_PER_MODEL


class Angles(nn.Module):
    """atan2 of two values (no rule): the torch.func program."""

    def forward(self, x):
        return torch.atan2(x, x + 1.0)


def softsign_net():
    """A layer without a rule (Softsign) inside a fused program: its torch.func rule (functional.py)."""
    return nn.Sequential(nn.Linear(3, 4), nn.Softsign(), nn.Linear(4, 2))


def angle_net():
    return nn.Sequential(nn.Linear(3, 4), Angles(), nn.Linear(4, 2))


@pytest.mark.parametrize("make, kind", [(angle_net, TorchFuncProgram), (softsign_net, FusedProgram)])
def test_torch_func_from_several_threads(make, kind):
    """torch.func's forward-AD levels are per process: the torch.func program and the fused program's
    torch.func rules serialize their calls (no errors, the same result as one thread)."""
    torch.manual_seed(4)
    model = make().double()
    assert isinstance(program(model), kind)
    tasks = regression_tasks(din=3, dout=2)
    model.zero_grad()
    fastmaml.meta_step(model, tasks, inner_lr=0.2, steps=2)
    want = [p.grad.clone() for p in model.parameters()]
    errors, results = [], []

    def worker():
        try:
            clone = make().double()
            clone.load_state_dict(model.state_dict())
            for _ in range(5):
                clone.zero_grad()
                fastmaml.meta_step(clone, tasks, inner_lr=0.2, steps=2)
            results.append([p.grad.clone() for p in clone.parameters()])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for r in results for a, b in zip(r, want))


def test_adapted_model_backward_uses_its_own_backend():
    """The op table travels with the call: an AdaptedModel's backward runs the backend of the `adapt` that made
    it, even after a later call on the same model asked for another backend."""
    from fastmaml.ops import registry

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    sx, sy, qx, qy = regression_tasks(din=3, dout=2)
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.1, steps=2, backend="torch")
    assert adapted.ops is registry.resolve("torch", "cpu")
    fastmaml.adapt(model, sx, sy, inner_lr=0.1, steps=2, backend="cpp")
    calls = []
    real = registry.implementation("adjoint_update", "torch")

    def spy(*args):
        calls.append("torch")
        return real(*args)

    original = adapted.ops.adjoint_update
    adapted.ops.adjoint_update = spy
    try:
        F.mse_loss(adapted(qx), qy).backward()
    finally:
        adapted.ops.adjoint_update = original
    assert calls == ["torch", "torch"]
