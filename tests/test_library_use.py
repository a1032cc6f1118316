"""fastmaml inside other people's code: the losses people pass, a torch.compile'd model, a DDP wrapper, frozen
parameters; each against the float64 oracle where a gradient is involved."""

import subprocess
import sys
import textwrap
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml

from class_models import ConvClassNet
from models import classification_tasks, mlp, regression_tasks
from oracle import assert_grads_close, autograd_meta_grad, check_meta_step, rel_err

TOL = 1e-9


@pytest.mark.parametrize(
    "loss, kind", [(nn.CrossEntropyLoss(), "ce"), (F.cross_entropy, "ce"), (nn.MSELoss(), "mse"), (F.mse_loss, "mse")]
)
def test_pytorch_losses_are_the_builtin_ones(loss, kind):
    torch.manual_seed(0)
    if kind == "ce":
        model, tasks = ConvClassNet(hidden=3, side=2).double(), classification_tasks()
    else:
        model, tasks = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).double(), regression_tasks()
    e = fastmaml.explain(model, loss)
    assert e.program == "fused" and (e.mlp_op or kind == "ce")
    res = check_meta_step(
        model, tasks, loss=loss, loss_fn=F.cross_entropy if kind == "ce" else F.mse_loss, inner_lr=0.3, steps=2, tol=TOL
    )
    assert (res.accuracy_after is not None) == (kind == "ce")


def test_other_loss_settings_are_custom_and_explained():
    e = fastmaml.explain(ConvClassNet(hidden=3, side=2), nn.CrossEntropyLoss(label_smoothing=0.1))
    assert e.program == "torch.func" and "custom callable" in e.reason


def test_compiled_model_runs_like_the_model():
    """torch.compile's wrapper is unwrapped: same names (inner_params), same engine, same gradient."""
    torch.manual_seed(1)
    model = ConvClassNet(hidden=3, side=2).double()
    compiled = torch.compile(model)
    assert fastmaml.explain(compiled, "cross_entropy").program == "fused"
    tasks = classification_tasks()
    model.zero_grad()
    fastmaml.meta_step(compiled, tasks, inner_lr=0.3, steps=2, loss="cross_entropy", inner_params=["classifier"])
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, ref, _ = autograd_meta_grad(
        model,
        tasks,
        inner_lr=0.3,
        steps=2,
        loss_fn=F.cross_entropy,
        inner_params=["classifier.weight", "classifier.bias"],
    )
    assert_grads_close(got, ref, TOL)
    sx, sy, qx, qy = tasks
    adapted = fastmaml.adapt(compiled, sx, sy, inner_lr=0.3, loss="cross_entropy")
    assert set(adapted.params) == {n for n, _ in model.named_parameters()}


def test_ddp_wrapper_is_refused_with_a_pointer():
    """A DistributedDataParallel wrapper would leave unsynchronized gradients: a clear error instead."""
    code = textwrap.dedent("""
        import os, tempfile, torch, torch.distributed as dist, fastmaml
        from torch import nn
        dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
        model = nn.parallel.DistributedDataParallel(nn.Linear(1, 1))
        tasks = tuple(torch.randn(2, 3, 1) for _ in range(4))
        try:
            fastmaml.meta_step(model, tasks)
        except TypeError as e:
            print("REFUSED", e)
        dist.destroy_process_group()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED model: a DistributedDataParallel wrapper" in out.stdout, out.stderr
    assert "fastmaml.distributed.all_reduce_grads" in out.stdout


def test_frozen_parameters_neither_adapt_nor_get_a_meta_gradient():
    torch.manual_seed(2)
    model = mlp((1, 6, 6, 1))
    model[0].weight.requires_grad_(False)
    tasks = regression_tasks()
    e = fastmaml.explain(model)
    assert e.frozen == ("0.weight",) and "frozen (not adapted, no meta-gradient): 0.weight" in str(e)
    model.zero_grad()
    fastmaml.meta_step(model, tasks, inner_lr=0.2, steps=2)
    assert model[0].weight.grad is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.2, steps=2, loss_fn=F.mse_loss, inner_params=trainable)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert_grads_close(got, {n: ref[n] for n in trainable}, TOL)
    # named one by one, a frozen parameter adapts (and still gets no meta-gradient)
    model.zero_grad()
    names = [n for n, _ in model.named_parameters()]
    fastmaml.meta_step(model, tasks, inner_lr=0.2, steps=2, inner_params=names)
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.2, steps=2, loss_fn=F.mse_loss)
    assert model[0].weight.grad is None
    assert_grads_close(
        {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, {n: ref[n] for n in trainable}, TOL
    )
    with pytest.raises(ValueError, match="inner_params: '0' holds only frozen parameters"):
        fastmaml.meta_step(
            nn.Sequential(nn.Linear(1, 1).requires_grad_(False), nn.Linear(1, 1)).double(), tasks, inner_params=["0"]
        )
    with pytest.raises(ValueError, match="model: every parameter is frozen"):
        fastmaml.meta_step(mlp((1, 2, 1)).requires_grad_(False), tasks)


def test_task_batch_to_keeps_integer_labels():
    tasks = fastmaml.TaskBatch(*classification_tasks())
    moved = tasks.to(torch.float32)
    assert moved.support_x.dtype == torch.float32 and moved.support_y.dtype == torch.int64
    assert tasks.to("cpu", torch.float16).query_y.dtype == torch.int64


def test_under_no_grad_with_a_learnable_rate():
    torch.manual_seed(3)
    model, tasks = mlp((1, 5, 1)), regression_tasks()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        fastmaml.meta_step(model, tasks, inner_lr=lr, steps=2)
    assert lr.grad is not None and torch.isfinite(lr.grad)


def _compiled(fn, **kwargs):
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_meta_step_and_adapt_inside_a_compiled_function(backend):
    """A graph break around fastmaml's calls; the rest of the function is compiled; same numbers as eager."""
    torch.manual_seed(4)
    model, tasks = mlp((1, 5, 1)), regression_tasks()
    sx, sy, qx, qy = tasks
    if backend == "eager":  # meta_step (inductor: adapt only, to keep the test short)
        model.zero_grad()
        step = _compiled(
            lambda scale: fastmaml.meta_step(model, tasks, inner_lr=0.2, steps=2).meta_loss * scale, backend=backend
        )
        loss = step(torch.tensor(2.0, dtype=torch.float64))
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        res = fastmaml.meta_step(model, tasks, inner_lr=0.2, steps=2)
        assert float(loss) == 2 * float(res.meta_loss)
        assert all(torch.equal(a, p.grad) for a, p in zip(got, model.parameters()))

    def outer(qx):
        adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.2, steps=2)
        return ((adapted(qx) - qy) ** 2).mean()

    model.zero_grad()
    _compiled(outer, backend=backend)(qx).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    outer(qx).backward()
    for a, p in zip(got, model.parameters()):
        assert (a - p.grad).norm() <= 1e-12 * p.grad.norm()


def test_fullgraph_compile_says_to_call_outside():
    model, tasks = mlp((1, 3, 1)), regression_tasks()
    step = _compiled(lambda x: fastmaml.meta_step(model, tasks).meta_loss + x, backend="eager", fullgraph=True)
    with pytest.raises(
        Exception,
        match="fastmaml.meta_step runs its own sweeps and kernels outside torch.compile "
        "graphs .* with fullgraph=True, call it outside the compiled function",
    ):
        step(torch.zeros((), dtype=torch.float64))


def test_autocast_is_refused_with_what_to_do():
    model, tasks = mlp((1, 3, 1)).float(), [t.float() for t in regression_tasks()]
    sx, sy, qx, _ = tasks
    adapted = fastmaml.adapt(model, sx, sy)
    params = {n: p.detach() for n, p in model.named_parameters()}
    calls = {
        "meta_step": lambda: fastmaml.meta_step(model, tasks),
        "adapt": lambda: fastmaml.adapt(model, sx, sy),
        "AdaptedModel.forward": lambda: adapted(qx),
        "fastmaml.func.meta_grad": lambda: fastmaml.func.meta_grad(model, params, tasks),
    }
    for what, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(
                RuntimeError,
                match=rf"{what} does not run under torch.autocast\('cpu', "
                r"dtype=torch.bfloat16\).*enabled=False.*precision='bf16'.*model.to\(torch.bfloat16",
            ):
                call()
            with torch.autocast("cpu", enabled=False):
                call()


def test_bfloat16_model_under_auto_falls_back_per_op():
    """A bf16 conv net under backend="auto": the ops whose kernel does not take bf16 run the reference (and
    `fastmaml info` says so), the others their kernel. Against the float64 oracle on the same bf16-rounded
    weights and inputs, its meta-gradient is as close as PyTorch's own autograd loop run in bf16."""
    from fastmaml.ops import registry

    torch.manual_seed(7)
    low = ConvClassNet(hidden=3, side=2).to(torch.bfloat16)
    low_tasks = fastmaml.TaskBatch(*classification_tasks()).to(torch.bfloat16)
    model = deepcopy(low).double()
    flat = lambda grads: torch.cat([grads[n].double().reshape(-1) for n, _ in model.named_parameters()])  # noqa: E731
    _, ref, _ = autograd_meta_grad(
        model, tuple(low_tasks.to(torch.float64)), inner_lr=0.1, steps=1, loss_fn=F.cross_entropy
    )
    _, loop, _ = autograd_meta_grad(low, tuple(low_tasks), inner_lr=0.1, steps=1, loss_fn=F.cross_entropy)
    bound = 3 * rel_err(flat(loop), flat(ref))
    grads = {}
    for backend in ("auto", "torch"):
        low.zero_grad()
        fastmaml.meta_step(low, low_tasks, inner_lr=0.1, steps=1, loss="cross_entropy", backend=backend)
        grads[backend] = flat({n: p.grad for n, p in low.named_parameters()})
        assert rel_err(grads[backend], flat(ref)) < bound, backend
    assert rel_err(grads["auto"], grads["torch"]) < 1e-2
    table = registry.resolve("auto", "cpu")
    if registry.availability("cpp", torch.device("cpu"))[0]:  # the C++ kernel, which takes float32/float64 only
        why = table.describe()["bn_relu_maxpool_train_fwd"]
        assert why.startswith("cpp") and "dtypes float32, float64, else the reference" in why


def _pytorch_running_stats(model, support_x):
    """{buffer name: value} after one train-mode forward of each task's support set from the same statistics,
    averaged over the tasks (what meta_step promises), computed by PyTorch's own BatchNorm."""
    per_task = []
    for t in range(support_x.shape[0]):
        copy = deepcopy(model).train()
        with torch.no_grad():
            copy(support_x[t])
        per_task.append(dict(copy.named_buffers()))
    return {n: torch.stack([b[n] for b in per_task]).double().mean(0).to(per_task[0][n].dtype) for n in per_task[0]}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_statistics_follow_pytorch_train_mode(momentum):
    torch.manual_seed(6)
    model = ConvClassNet(hidden=3, side=2).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(4)
    tasks = classification_tasks()
    expected = _pytorch_running_stats(model, tasks[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fastmaml.meta_step(model, tasks, inner_lr=0.3, loss="cross_entropy")
    for n, b in model.named_buffers():
        assert rel_err(b, expected[n]) < 1e-12, n
    for chunked in (dict(task_chunk=1), {}):  # in task chunks, and through adapt: the same update
        model.load_state_dict(state)
        if chunked:
            fastmaml.meta_step(model, tasks, inner_lr=0.3, loss="cross_entropy", **chunked)
        else:
            fastmaml.adapt(model, tasks[0], tasks[1], inner_lr=0.3, loss="cross_entropy")
        for n, b in model.named_buffers():
            assert rel_err(b, expected[n]) < 1e-12, n
    # opted out, in eval mode, or through fastmaml.func: left as they are
    model.load_state_dict(state)
    fastmaml.meta_step(model, tasks, inner_lr=0.3, loss="cross_entropy", update_running_stats=False)
    fastmaml.adapt(model, tasks[0], tasks[1], inner_lr=0.3, loss="cross_entropy", update_running_stats=False)
    fastmaml.meta_step(model.eval(), tasks, inner_lr=0.3, loss="cross_entropy")
    fastmaml.func.meta_grad(model.train(), dict(model.named_parameters()), tasks, inner_lr=0.3, loss="cross_entropy")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize(
    "options",
    [
        dict(steps=1),
        dict(steps=2, order="first", task_chunk=1),
        dict(steps=2, order="implicit", inner_solver="backtracking"),
        dict(steps=0),
    ],
    ids=["K1", "first-chunked", "implicit-backtracking", "K0"],
)
def test_running_statistics_taken_from_the_inner_loop(options, monkeypatch):
    """The running statistics' update takes the support sets' batch statistics at θ from the inner loop's
    step 0 (no forward of its own); with K = 0 there is none and it runs its own: the same update either way."""
    from fastmaml.programs.fused.program import FusedProgram

    torch.manual_seed(7)
    model = ConvClassNet(hidden=3, side=2).double()
    tasks = classification_tasks()
    expected = _pytorch_running_stats(model, tasks[0])
    calls = []
    batch_stats = FusedProgram.batch_stats
    monkeypatch.setattr(FusedProgram, "batch_stats", lambda self, *a: calls.append(1) or batch_stats(self, *a))
    fastmaml.meta_step(model, tasks, inner_lr=0.3, loss="cross_entropy", **options)
    assert bool(calls) == (options["steps"] == 0)
    for n, b in model.named_buffers():
        assert rel_err(b, expected[n]) < 1e-12, n


def test_grad_is_a_tensor_of_its_own():
    model, tasks = mlp((1, 4, 1)), regression_tasks()
    fastmaml.meta_step(model, tasks)
    grads = [p.grad for p in model.parameters()]
    assert all(g._base is None for g in grads)
    assert len({g.untyped_storage().data_ptr() for g in grads}) == len(grads)


def test_adapted_model_is_a_module():
    model, (sx, sy, qx, qy) = mlp((1, 4, 1)), regression_tasks()
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.1, steps=2)
    assert isinstance(adapted, nn.Module) and list(adapted.parameters()) == []
    assert "tasks=3, steps=2" in repr(adapted)
    assert adapted(qx).shape == qy.shape


def test_version_and_typing_marker():
    out = subprocess.run([sys.executable, "-m", "fastmaml", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"fastmaml {fastmaml.__version__}", out.stderr
    from pathlib import Path

    assert (Path(fastmaml.__file__).parent / "py.typed").is_file()
