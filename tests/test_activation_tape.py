"""The "second" order's activation tape (`FusedProgram.loss_grad(activations=)`, reused by `hvp`): the same
meta-gradient as recomputing, in float64, on ResNet-12 and conv nets written as classes, fully adapted and
ANIL (shared body: the HVP's plan needs more than the forward sweep kept), Meta-SGD rates, per-step
BatchNorm, a budget that tapes only some steps; and the tape really spares the convolutions' recomputation."""

import pytest
import torch
from test_graph_models import tasks_for

import fastmaml
import fastmaml.programs.fused.conv as conv_module
from fastmaml import schedule
from fastmaml.engine.sweeps import forward_sweep
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.ops import resolve
from fastmaml.programs import FusedProgram, select_program

from class_models import OmniglotCNN, ResNet12
from oracle import rel_err


def meta_grads(model, tasks, tape_bytes, monkeypatch, order="second", **kwargs):
    """`.grad` of every parameter (and of `lr_leaves`) after one meta_step with `tape_bytes` of activation tape
    on the CPU (0: none)."""
    monkeypatch.setitem(schedule.ACTIVATION_TAPE_BYTES, "cpu", tape_bytes)
    leaves = kwargs.pop("lr_leaves", ())
    model.zero_grad(set_to_none=True)
    for leaf in leaves:
        leaf.grad = None
    res = fastmaml.meta_step(model, tasks, loss="cross_entropy", order=order, **kwargs)  # a cached plan, reused
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return res.meta_loss.item(), grads + [leaf.grad.clone() for leaf in leaves]


def assert_same(a, b, tol=1e-12):
    """Same meta-loss and meta-gradient (all parameters as one vector: some have a true gradient of 0)."""
    assert a[0] == pytest.approx(b[0], rel=tol)
    assert [g.shape for g in a[1]] == [g.shape for g in b[1]]
    assert rel_err(torch.cat([g.flatten() for g in a[1]]), torch.cat([g.flatten() for g in b[1]])) < tol


CASES = {
    "resnet12": lambda: (ResNet12(widths=(3, 4, 3, 4)), (3, 16, 16), {}),
    "resnet12-anil": lambda: (ResNet12(widths=(3, 4, 3, 4)), (3, 16, 16), {"inner_params": ["classifier"]}),
    "resnet12-per-step-bn": lambda: (
        fastmaml.add_per_step_stats(ResNet12(widths=(3, 3, 3, 3)), 3),
        (3, 16, 16),
        {"batch_norm": "per_step"},
    ),
    "omniglot-cnn": lambda: (OmniglotCNN(output_size=5, hidden_size=4, layers=2), (1, 28, 28), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tape_gives_the_recomputed_meta_gradient(case, monkeypatch):
    torch.manual_seed(0)
    model, shape, kwargs = CASES[case]()
    model = model.double()
    tasks = tasks_for(shape, T=3, ways=5 if case == "omniglot-cnn" else 3)
    assert isinstance(
        select_program(model, ParamLayout(model, kwargs.get("inner_params")), resolve_loss("cross_entropy")),
        FusedProgram,
    )
    kwargs = dict(inner_lr=0.1, steps=3, **kwargs)
    taped = meta_grads(model, tasks, 1 << 30, monkeypatch, **kwargs)
    recomputed = meta_grads(model, tasks, 0, monkeypatch, **kwargs)
    assert_same(taped, recomputed)


def test_tape_with_learned_rates(monkeypatch):
    torch.manual_seed(1)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    rates = {n: torch.full_like(p, 0.05, requires_grad=True) for n, p in model.named_parameters()}  # Meta-SGD
    leaves = list(rates.values())
    tasks = tasks_for((3, 16, 16), T=2, ways=3)
    kwargs = dict(inner_lr=rates, steps=2, lr_leaves=leaves)
    assert_same(
        meta_grads(model, tasks, 1 << 30, monkeypatch, **kwargs), meta_grads(model, tasks, 0, monkeypatch, **kwargs)
    )


def _sweep_tape(model, tasks, steps, tape_bytes):
    layout = ParamLayout(model)
    program = select_program(model, layout, resolve_loss("cross_entropy"))
    theta_a, theta_s = (t.detach() for t in layout.theta())
    alphas = [torch.tensor(0.1, dtype=torch.float64)] * steps
    sx, sy = tasks[0], tasks[1]
    _, tape, _ = forward_sweep(
        program,
        resolve("torch", "cpu"),
        theta_a,
        theta_s,
        alphas,
        sx,
        sy,
        order="second",
        keep_grads=False,
        check_finite=True,
        activation_budget=tape_bytes,
    )
    return program, tape


def test_budget_tapes_the_first_steps_that_fit(monkeypatch):
    torch.manual_seed(2)
    model = ResNet12(widths=(3, 3, 3, 3)).double()
    tasks = tasks_for((3, 16, 16), T=2, ways=3)
    program, full = _sweep_tape(model, tasks, 4, 1 << 30)
    assert all(a is not None for a in full.activations) and len(full.activations) == 4
    convs = [i for i, n in enumerate(program.nodes) if isinstance(n.rule, conv_module.ConvRule)]
    # every convolution's output, and its input gradient unless its input is the data (value 0)
    inner = [i for i in convs if program.nodes[i].inputs != (0,)]
    assert len(inner) == len(convs) - 2  # the first block's conv1 and shortcut read the data
    assert set(full.activations[0]) == {("y", i) for i in convs} | {("gx", i) for i in inner}
    per_step = sum(t.numel() * t.element_size() for t in full.activations[0].values())
    _, part = _sweep_tape(model, tasks, 4, 2 * per_step + per_step // 2)
    assert [a is not None for a in part.activations] == [True, True, False]
    assert full.nbytes() - part.nbytes() == 2 * per_step
    # the meta-gradient with 2 of 4 steps taped is the untaped one
    kwargs = dict(inner_lr=0.1, steps=4)
    assert_same(
        meta_grads(model, tasks, 2 * per_step + per_step // 2, monkeypatch, **kwargs),
        meta_grads(model, tasks, 0, monkeypatch, **kwargs),
    )


def count_conv_forwards(monkeypatch, model, tasks, **kwargs):
    """{tape bytes: calls of `conv_forward` in one meta_step} without and with the tape (after one call that
    measures the task chunks)."""
    calls = []
    real = conv_module.conv_forward

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(conv_module, "conv_forward", counting)
    meta_grads(model, tasks, 0, monkeypatch, **kwargs)
    counts = {}
    for tape_bytes in (0, 1 << 30):
        calls.clear()
        meta_grads(model, tasks, tape_bytes, monkeypatch, **kwargs)
        counts[tape_bytes] = len(calls)
    return counts[0] - counts[1 << 30]


def convolutions(model, inner_params=None):
    program = select_program(model, ParamLayout(model, inner_params), resolve_loss("cross_entropy"))
    return sum(isinstance(n.rule, conv_module.ConvRule) for n in program.nodes)


def test_tape_spares_the_primal_convolutions(monkeypatch):
    """With the tape, each reverse-sweep HVP runs no convolution forward of its own (only the tangent's):
    K fewer `conv_forward` calls per convolution node than without it."""
    torch.manual_seed(3)
    model = ResNet12(widths=(3, 3, 3, 3)).double()
    tasks = tasks_for((3, 16, 16), T=2, ways=3)
    spared = count_conv_forwards(monkeypatch, model, tasks, inner_lr=0.1, steps=3)
    assert spared == 3 * convolutions(model)


@pytest.mark.parametrize("inner_params", [None, ["classifier"]])
def test_implicit_hvps_share_their_activations(inner_params, monkeypatch):
    """order="implicit": the conjugate-gradient HVPs at φ_K after the first reuse its activations (and the
    shared weights' HVP too, for ANIL): the same meta-gradient, cg_steps − 1 (+ 1) fewer primal forwards."""
    torch.manual_seed(5)
    model = ResNet12(widths=(3, 3, 3, 3)).double()
    tasks = tasks_for((3, 16, 16), T=2, ways=3)
    kwargs = dict(order="implicit", inner_lr=0.1, steps=2, cg_steps=4, implicit_lambda=2.0, inner_params=inner_params)
    assert_same(
        meta_grads(model, tasks, 1 << 30, monkeypatch, **kwargs), meta_grads(model, tasks, 0, monkeypatch, **kwargs)
    )
    spared = count_conv_forwards(monkeypatch, model, tasks, **kwargs)
    assert spared == (3 + (inner_params is not None)) * convolutions(model, inner_params)


def test_checkpoint_and_adapt_keep_no_activations():
    """Only meta_step's "second" order tapes: "checkpoint" keeps its log K fast weights and `adapt` (whose
    tape autograd holds until backward) its fast weights and gradients."""
    torch.manual_seed(4)
    model = ResNet12(widths=(3, 3, 3, 3)).double()
    tasks = tasks_for((3, 16, 16), T=2, ways=3)
    layout = ParamLayout(model)
    program = select_program(model, layout, resolve_loss("cross_entropy"))
    theta_a, theta_s = (t.detach() for t in layout.theta())
    alphas = [torch.tensor(0.1, dtype=torch.float64)] * 3
    _, tape, _ = forward_sweep(
        program,
        resolve("torch", "cpu"),
        theta_a,
        theta_s,
        alphas,
        tasks[0],
        tasks[1],
        order="checkpoint",
        keep_grads=False,
        check_finite=True,
        activation_budget=1 << 30,
    )
    assert tape.activations == []
    # adapt saves θ, ψ, the support set, the rates and the tape's [T, P] fast weights and gradients: besides the
    # support set, nothing larger than [T, P] (a convolution's output here is [T, 5, 3, 16, 16], larger)
    adapted = fastmaml.adapt(model, tasks[0], tasks[1], inner_lr=0.1, steps=3, loss="cross_entropy")
    T, P = tasks[0].shape[0], theta_a.numel()
    assert T * 5 * 3 * 16 * 16 > T * P
    others = [t for t in adapted.phi.grad_fn.saved_tensors if t is not tasks[0] and t is not tasks[1]]
    assert max(t.numel() for t in others) <= T * P
