"""`MetaStep` plans: `plan(tasks)` is bit for bit what an unplanned `meta_step` computes and writes (returned
values, `.grad` accumulation, learnable rates' gradients, BatchNorm statistics, `NonFiniteError`), on several
calls with new task values and parameters in between; a plan notices every change of the model it cannot
follow and plans again or raises naming it; `meta_step`'s plan cache is keyed right, bounded and weak."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml import plan as plans

from class_models import ConvClassNet
from models import classification_tasks, regression_tasks, small_cnn
from unplanned import reference

pytestmark = pytest.mark.usefixtures("engine")  # every test on the engine meta_step picks and on torch.func

RESULT_FIELDS = (
    "meta_loss",
    "query_loss_after",
    "query_loss_before",
    "support_loss_before",
    "accuracy_before",
    "accuracy_after",
)


def assert_same_result(a, b):
    for f in RESULT_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        assert x is None or torch.equal(x, y), f


def assert_same_model(a, b, leaves_a=(), leaves_b=()):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        assert p.grad is None or torch.equal(p.grad, q.grad), n
    for (n, x), y in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(x, y), n
    for x, y in zip(leaves_a, leaves_b):
        assert (x.grad is None) == (y.grad is None)
        assert x.grad is None or torch.equal(x.grad, y.grad)


def sinusoid(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).to(dtype)


def sinusoid_tasks(seed, dtype=torch.float32):
    return tuple(t.to(dtype) for t in regression_tasks(T=5, ns=10, nq=10, seed=seed))


def conv_net():
    torch.manual_seed(1)
    return ConvClassNet(ways=5, hidden=4, channels=1, side=2, blocks=2).double()


def conv_tasks(seed):
    return classification_tasks(T=3, ways=5, shots=1, query=2, size=8, seed=seed)


def meta_sgd(model):
    g = torch.Generator().manual_seed(3)
    return {
        n: nn.Parameter(0.02 + 0.05 * torch.rand(p.shape, generator=g, dtype=p.dtype))
        for n, p in model.named_parameters()
    }


def maml_pp(model, steps=2):
    return [
        {n: nn.Parameter(torch.full((), 0.05 + 0.01 * j, dtype=p.dtype)) for n, p in model.named_parameters()}
        for j in range(steps)
    ]


CASES = {
    "sinusoid-second": (sinusoid, sinusoid_tasks, dict(steps=2)),
    "sinusoid-first": (sinusoid, sinusoid_tasks, dict(steps=2, order="first")),
    "sinusoid-checkpoint": (sinusoid, sinusoid_tasks, dict(steps=3, order="checkpoint")),
    "sinusoid-implicit": (sinusoid, sinusoid_tasks, dict(steps=2, order="implicit", evaluate_before=False)),
    "sinusoid-learned-scalar": (
        sinusoid,
        sinusoid_tasks,
        dict(steps=2, inner_lr=lambda m: nn.Parameter(torch.tensor(0.05))),
    ),
    "sinusoid-step-weights": (sinusoid, sinusoid_tasks, dict(steps=3, step_weights=[0.2, 0.3, 0.5])),
    "conv-second": (conv_net, conv_tasks, dict(loss="cross_entropy", inner_lr=0.3, steps=2)),
    "conv-first": (conv_net, conv_tasks, dict(loss="cross_entropy", inner_lr=0.3, steps=2, order="first")),
    "conv-checkpoint": (conv_net, conv_tasks, dict(loss="cross_entropy", inner_lr=0.3, steps=3, order="checkpoint")),
    "conv-implicit": (conv_net, conv_tasks, dict(loss="cross_entropy", inner_lr=0.3, steps=2, order="implicit")),
    "conv-meta-sgd": (conv_net, conv_tasks, dict(loss="cross_entropy", inner_lr=meta_sgd, steps=2)),
    "conv-maml++": (
        conv_net,
        conv_tasks,
        dict(loss="cross_entropy", inner_lr=maml_pp, steps=2, step_weights=[0.4, 0.6], order="checkpoint"),
    ),
    "conv-anil": (conv_net, conv_tasks, dict(loss="cross_entropy", inner_lr=0.3, steps=2, inner_params="classifier")),
    "conv-frozen-bn": (
        lambda: small_cnn().eval(),
        conv_tasks,
        dict(loss="cross_entropy", inner_lr=0.2, steps=2, batch_norm="frozen"),
    ),
    "conv-per-step-bn": (
        lambda: fastmaml.add_per_step_stats(small_cnn(), 2),
        conv_tasks,
        dict(loss="cross_entropy", inner_lr=0.2, steps=2, batch_norm="per_step"),
    ),
    "conv-chunks": (conv_net, conv_tasks, dict(loss="cross_entropy", inner_lr=0.3, steps=2, task_chunk=2)),
}


def twins(make, n):
    base = make()
    return [copy.deepcopy(base) for _ in range(n)]


def rates(option, models):
    """The inner_lr option per twin (learnable rates are the twin's own tensors)."""
    if callable(option) and not isinstance(option, nn.Module):
        return [option(m) for m in models]
    return [option] * len(models)


def leaves(inner_lr):
    return fastmaml.inner_lr.learnable_leaves(inner_lr)


def sgd(model, inner_lr):
    with torch.no_grad():
        for p in list(model.parameters()) + leaves(inner_lr):
            if p.grad is not None:
                p.sub_(0.1 * p.grad)


@pytest.mark.parametrize("case", list(CASES))
def test_plan_is_bitwise_meta_step(case):
    """The plan, meta_step (its cached plan) and the unplanned step on three copies of a model, three rounds with
    new task values, an SGD step between rounds, and .grad left to accumulate (round 1) or zeroed (round 2)."""
    make, make_tasks, options = CASES[case]
    update_stats = options.get("batch_norm", "batch") == "batch"
    a, b, c = twins(make, 3)
    la, lb, lc = rates(options.get("inner_lr", 0.01), (a, b, c))
    opts = {k: v for k, v in options.items() if k != "inner_lr"}
    plan = fastmaml.MetaStep(a, make_tasks(10), inner_lr=la, **opts)
    for rnd in range(3):
        tasks = make_tasks(rnd)
        ra = plan(tasks)
        rb = fastmaml.meta_step(b, tasks, inner_lr=lb, **opts)
        rc = reference(c, tasks, inner_lr=lc, update_running_stats=update_stats, **opts)
        assert_same_result(ra, rc)
        assert_same_result(rb, rc)
        assert_same_model(a, c, leaves(la), leaves(lc))
        assert_same_model(b, c, leaves(lb), leaves(lc))
        if rnd != 1:  # round 1: .grad accumulates over two calls
            for m, lr in ((a, la), (b, lb), (c, lc)):
                sgd(m, lr)
                for p in list(m.parameters()) + leaves(lr):
                    if rnd == 0:
                        p.grad = None
                    elif p.grad is not None:
                        p.grad.zero_()
    assert plan.rebuilds == 0
    assert plans.cached_plans(b) == 1


def test_non_finite_raises_as_meta_step_and_leaves_grad():
    a, c = twins(sinusoid, 2)
    sx, sy, qx, qy = sinusoid_tasks(0)
    bad = (sx, sy.index_fill(0, torch.tensor([3]), float("nan")), qx, qy)
    plan = fastmaml.MetaStep(a, bad, steps=2)
    with pytest.raises(fastmaml.NonFiniteError) as got:
        plan(bad)
    with pytest.raises(fastmaml.NonFiniteError) as want:
        reference(c, bad, steps=2)
    assert str(got.value) == str(want.value) and got.value.step == want.value.step
    assert all(p.grad is None for p in a.parameters())
    good = sinusoid_tasks(1)
    assert_same_result(plan(good), reference(c, good, steps=2))
    assert_same_model(a, c)


def test_classification_labels_checked_at_every_call():
    model = conv_net()
    plan = fastmaml.MetaStep(model, conv_tasks(0), loss="cross_entropy")
    sx, sy, qx, qy = conv_tasks(1)
    with pytest.raises(ValueError, match="tasks.query_y: class index 7 is out of range"):
        plan((sx, sy, qx, torch.full_like(qy, 7)))
    with pytest.raises(ValueError, match="tasks.support_y: class indices must be >= 0"):
        plan((sx, torch.full_like(sy, -1), qx, qy))
    assert all(p.grad is None for p in model.parameters())


# ---- changes a plan must notice -------------------------------------------------------------------------


def follow(change, make=sinusoid, make_tasks=sinusoid_tasks, words=(), **options):
    """Applies `change` to a planned model and to its twin: the plan plans again (and says why, with `words`)
    and computes what the unplanned meta_step computes on the changed twin."""
    a, c = twins(make, 2)
    plan = fastmaml.MetaStep(a, make_tasks(0), **options)
    plan(make_tasks(0))
    reference(c, make_tasks(0), **options)
    change(a)
    change(c)
    tasks = make_tasks(1)
    assert_same_result(plan(tasks), reference(c, tasks, **options))
    assert_same_model(a, c)
    assert plan.rebuilds == 1
    for w in words:
        assert w in plan.last_change, plan.last_change
    plan(tasks)  # and runs on without planning again
    assert plan.rebuilds == 1
    return plan, a


def test_replaced_parameter_is_followed():
    def replace(m):
        torch.manual_seed(5)
        m[2].weight = nn.Parameter(torch.randn(40, 40) * 0.1)

    follow(replace, words=("parameter '2.weight' replaced",))


def test_parameter_given_other_storage_is_followed():
    """`p.data = ...` keeps the Parameter object, shape and dtype: the plan's flat views of θ would read the old
    storage, so the guard checks storage too."""

    def rebind(m):
        m[2].weight.data = m[2].weight.data * 0.5

    follow(rebind, words=("other storage",))


def test_resized_parameters_are_followed():
    def resize(m):
        torch.manual_seed(6)
        m[0].weight.data = torch.randn(50, 1)
        m[0].bias.data = torch.randn(50)
        m[2].weight.data = torch.randn(40, 50) * 0.1
        for q in m.parameters():
            q.grad = None  # (a .grad of the old shape would not take the new meta-gradient, planned or not)

    follow(resize, words=("parameter '0.weight': shape (40, 1) -> (50, 1)",))


def test_resized_parameter_with_per_parameter_rates_raises_naming_the_change():
    model = sinusoid()
    lrs = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    plan = fastmaml.MetaStep(model, sinusoid_tasks(0), inner_lr=lrs)
    with torch.no_grad():
        model[4].bias.data = torch.zeros(2)
        model[4].weight.data = torch.zeros(2, 40)
    with pytest.raises(ValueError, match=r"parameter '4.bias': shape \(1,\) -> \(2,\).*inner_lr\['4.weight'\]"):
        plan(sinusoid_tasks(1))


def test_dtype_change_raises_naming_it():
    model = sinusoid()
    plan = fastmaml.MetaStep(model, sinusoid_tasks(0))
    model.double()
    with pytest.raises(TypeError, match="dtype float32 -> float64.*tasks.support_x: dtype torch.float32 differs"):
        plan(sinusoid_tasks(1))
    with pytest.raises(TypeError, match=r"tasks.support_x: \(5, 10, 1\) float64 on cpu, but the plan was built for"):
        plan(sinusoid_tasks(1, torch.float64))


def test_dtype_change_of_model_and_tasks_is_a_new_plan_for_meta_step():
    a, c = twins(sinusoid, 2)
    fastmaml.meta_step(a, sinusoid_tasks(0))
    reference(c, sinusoid_tasks(0))
    a.double()
    c.double()
    tasks = sinusoid_tasks(1, torch.float64)
    assert_same_result(fastmaml.meta_step(a, tasks), reference(c, tasks))
    assert_same_model(a, c)
    assert plans.cached_plans(a) == 2


def test_device_change_raises_naming_it():
    model = sinusoid()
    plan = fastmaml.MetaStep(model, sinusoid_tasks(0))
    model.to("meta")
    with pytest.raises(
        ValueError, match="'0.weight' replaced by another tensor \\(device cpu -> meta\\).*model: on the meta device"
    ):
        plan(sinusoid_tasks(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (moves the model to the GPU)")
def test_device_change_to_cuda_raises_naming_it():
    model = sinusoid()
    plan = fastmaml.MetaStep(model, sinusoid_tasks(0))
    model.cuda()
    with pytest.raises(ValueError, match="device cpu -> cuda"):
        plan(sinusoid_tasks(1))
    with pytest.raises(ValueError, match="tasks.support_x: .* on cuda:0, but the plan was built for"):
        plan(tuple(t.cuda() for t in sinusoid_tasks(1)))


def test_added_and_removed_modules_are_followed():
    follow(lambda m: m.append(nn.Tanh()), words=("module '5' added",))
    follow(lambda m: m.__delitem__(5), lambda: sinusoid().append(nn.Tanh()), words=("module '5' removed",))


def test_replaced_submodule_is_followed():
    def replace(m):
        torch.manual_seed(7)
        m[2] = nn.Linear(40, 40)

    follow(replace, words=("parameter '2.weight' replaced",))


def test_attribute_and_training_flag_changes_are_followed():
    def make():
        torch.manual_seed(8)
        return nn.Sequential(nn.Linear(1, 8), nn.LeakyReLU(0.01), nn.Linear(8, 1)).double()

    def tasks(seed):
        return regression_tasks(seed=seed)

    follow(lambda m: setattr(m[1], "negative_slope", 0.5), make, tasks, words=("'1.negative_slope'", "0.01", "0.5"))
    follow(lambda m: m.eval(), make, tasks, words=("'training' changed from True to False",))


def test_requires_grad_toggle_is_followed():
    _, model = follow(lambda m: m[0].weight.requires_grad_(False), words=("'0.weight': requires_grad True -> False",))
    assert model[0].weight.grad is not None  # from the call before the change; none added after


def test_hook_and_patched_forward_are_followed():
    follow(lambda m: m[1].register_forward_hook(lambda mod, i, o: o * 2), words=("module '1' hooks changed",))

    def patch(m):
        m.forward = lambda x: m[4](torch.tanh(m[2](torch.tanh(m[0](x)))))

    follow(patch, words=("attribute 'forward' added",))


def test_learnable_rate_toggle_is_followed():
    a, c = twins(sinusoid, 2)
    la, lc = torch.tensor(0.05), torch.tensor(0.05)
    plan = fastmaml.MetaStep(a, sinusoid_tasks(0), inner_lr=la, steps=2)
    plan(sinusoid_tasks(0))
    reference(c, sinusoid_tasks(0), inner_lr=lc, steps=2)
    la.requires_grad_(True)
    lc.requires_grad_(True)
    assert_same_result(plan(sinusoid_tasks(1)), reference(c, sinusoid_tasks(1), inner_lr=lc, steps=2))
    assert_same_model(a, c, [la], [lc])
    assert la.grad is not None and plan.rebuilds == 1


def test_rates_in_place_are_read_at_every_call():
    a, c = twins(sinusoid, 2)
    la, lc = torch.tensor(0.05), torch.tensor(0.05)
    plan = fastmaml.MetaStep(a, sinusoid_tasks(0), inner_lr=la)
    plan(sinusoid_tasks(0))
    la.fill_(0.2)
    lc.fill_(0.2)
    assert_same_result(plan(sinusoid_tasks(1)), reference(c, sinusoid_tasks(1), inner_lr=lc))


def test_float_rates_are_read_once():
    model = sinusoid()
    lrs = [0.05, 0.05]
    plan = fastmaml.MetaStep(model, sinusoid_tasks(0), inner_lr=lrs, steps=2)
    lrs[1] = -1.0  # would be refused by meta_step; the plan keeps what it was built with
    plan(sinusoid_tasks(0))


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda t: (t[0][:, :7], t[1][:, :7], t[2], t[3]), ValueError, r"tasks.support_x: \(5, 7, 1\) float32"),
        (lambda t: tuple(x[:3] for x in t), ValueError, r"tasks.support_x: \(3, 10, 1\)"),
        (lambda t: (t[0], t[1], t[2], t[3][..., :0]), ValueError, r"tasks.query_y: \(5, 10, 0\)"),
        (lambda t: tuple(x.double() for x in t), TypeError, "float64 on cpu, but the plan was built for"),
        (lambda t: tuple(x.to("meta") for x in t), ValueError, "on meta, but the plan was built for"),
    ],
)
def test_tasks_of_other_shapes_raise(change, error, words):
    model = sinusoid()
    plan = fastmaml.MetaStep(model, sinusoid_tasks(0))
    with pytest.raises(error, match=words):
        plan(change(sinusoid_tasks(1)))
    assert all(p.grad is None for p in model.parameters())


def test_list_of_task_tuples_and_task_batch_are_accepted():
    a, c = twins(sinusoid, 2)
    sx, sy, qx, qy = sinusoid_tasks(0)
    plan = fastmaml.MetaStep(a, fastmaml.TaskBatch(sx, sy, qx, qy))
    per_task = [(sx[t], sy[t], qx[t], qy[t]) for t in range(sx.shape[0])]
    assert_same_result(plan(per_task), reference(c, (sx, sy, qx, qy)))
    assert_same_model(a, c)


def test_plan_of_a_dead_model_raises():
    model = sinusoid()
    plan = fastmaml.MetaStep(model, sinusoid_tasks(0))
    del model
    gc.collect()
    assert plan.model is None
    with pytest.raises(ReferenceError, match="no longer exists"):
        plan(sinusoid_tasks(0))


def test_bad_options_raise_when_the_plan_is_built():
    model = sinusoid()
    with pytest.raises(TypeError, match="steps: expected a non-negative int"):
        fastmaml.MetaStep(model, sinusoid_tasks(0), steps=True)
    with pytest.raises(ValueError, match="inner_lr: the learning rate must be positive"):
        fastmaml.MetaStep(model, sinusoid_tasks(0), inner_lr=-0.1)
    with pytest.raises(TypeError, match="tasks.support_x: dtype torch.float64 differs"):
        fastmaml.MetaStep(model, sinusoid_tasks(0, torch.float64))


def test_cuda_graph_on_cpu_raises():
    with pytest.raises(ValueError, match="cuda_graph=True.*CUDA"):
        fastmaml.MetaStep(sinusoid(), sinusoid_tasks(0), cuda_graph=True)


# ---- meta_step's plan cache -----------------------------------------------------------------------------


def test_meta_step_reuses_one_plan_per_shape_and_options():
    model = sinusoid()
    for seed in range(3):
        fastmaml.meta_step(model, sinusoid_tasks(seed))
    assert plans.cached_plans(model) == 1
    fastmaml.meta_step(model, sinusoid_tasks(0), inner_lr=0.02)
    fastmaml.meta_step(model, tuple(t[:4] for t in sinusoid_tasks(0)))
    model.eval()
    fastmaml.meta_step(model, sinusoid_tasks(0))
    assert plans.cached_plans(model) == 4


def test_meta_step_keys_on_option_values_and_types():
    a, c = twins(sinusoid, 2)
    for lr, steps in ((0.01, 1), (0.2, 1), (0.2, 2), ([0.1, 0.3], 2), ({n: 0.1 for n, _ in a.named_parameters()}, 1)):
        tasks = sinusoid_tasks(steps)
        assert_same_result(
            fastmaml.meta_step(a, tasks, inner_lr=lr, steps=steps), reference(c, tasks, inner_lr=lr, steps=steps)
        )
        assert_same_model(a, c)
    with pytest.raises(TypeError, match="steps: expected a non-negative int"):
        fastmaml.meta_step(a, sinusoid_tasks(0), steps=True)  # not the plan of steps=1
    with pytest.raises(ValueError, match="inner_lr: the learning rate must be positive"):
        fastmaml.meta_step(a, sinusoid_tasks(0), inner_lr=-0.2)


def test_meta_step_follows_the_backend_environment_variable(monkeypatch):
    from fastmaml.ops import registry

    model = sinusoid()
    fastmaml.meta_step(model, sinusoid_tasks(0))
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    fastmaml.meta_step(model, sinusoid_tasks(0))
    tables = [p._plan.setup.ops for p in plans._PLANS[model].values()]
    assert [t.backend for t in tables] == ["auto", "torch"]


def test_meta_step_with_predicates_and_learned_rates_made_at_every_call():
    """A new predicate and a new dict of rates every call (a common loop): each call still computes what the
    unplanned step does with that call's arguments."""
    a, c = twins(conv_net, 2)
    la = meta_sgd(a)
    lc = {n: nn.Parameter(la[n].detach().clone()) for n in la}
    for rnd, head_only in enumerate((True, False, True)):
        pick = (lambda n, p: n.startswith("classifier")) if head_only else (lambda n, p: True)
        keep = [n for n, p in a.named_parameters() if pick(n, p)]
        tasks = conv_tasks(rnd)
        opts = dict(loss="cross_entropy", steps=2)
        ra = fastmaml.meta_step(a, tasks, inner_lr={n: la[n] for n in keep}, inner_params=pick, **opts)
        rc = reference(c, tasks, inner_lr={n: lc[n] for n in keep}, inner_params=pick, **opts)
        assert_same_result(ra, rc)
        assert_same_model(a, c, list(la.values()), list(lc.values()))


def test_meta_step_plans_per_model_are_bounded():
    model = sinusoid()
    for T in range(1, plans.MAX_PLANS_PER_MODEL + 4):
        fastmaml.meta_step(model, tuple(t[:1].repeat(T, 1, 1) for t in sinusoid_tasks(0)))
    assert plans.cached_plans(model) == plans.MAX_PLANS_PER_MODEL


@pytest.mark.parametrize(
    "make, tasks, options",
    [
        (sinusoid, sinusoid_tasks, {}),
        (conv_net, conv_tasks, dict(loss="cross_entropy")),
        (conv_net, conv_tasks, dict(loss="cross_entropy", inner_params="predicate")),
    ],
    ids=["mlp", "conv-bn", "conv-bn-predicate"],
)
def test_cached_plans_do_not_keep_models_alive(make, tasks, options):
    """100 fresh models through meta_step (a predicate that closes over its model, too): none stays alive, and
    the cache has no entry left for them."""
    example = tasks(0)
    gc.collect()
    before = len(plans._PLANS)
    refs = []
    for _ in range(100):
        model = make()
        opts = dict(options)
        if opts.get("inner_params") == "predicate":
            head = model.classifier
            opts["inner_params"] = lambda n, p, head=head: any(p is q for q in head.parameters())
        fastmaml.meta_step(model, example, **opts)
        refs.append(weakref.ref(model))
        del model, opts
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    assert len(plans._PLANS) <= before


def test_an_explicit_plan_does_not_keep_its_model_alive():
    model = conv_net()
    plan = fastmaml.MetaStep(model, conv_tasks(0), loss="cross_entropy")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None and plan.model is None


def test_bound_layout_writes_what_meta_step_writes():
    """The plan's θ and `.grad` writes (flat views made once, one copy per parameter) against the unplanned
    ones, on flat gradients at a storage offset and with a stride, into empty and into existing `.grad`."""
    from fastmaml.calls import _accumulate
    from fastmaml.layout import BoundLayout, ParamLayout

    a, c = twins(lambda: small_cnn(), 2)
    a[0].weight.requires_grad_(False)
    c[0].weight.requires_grad_(False)
    la, lc = ParamLayout(a, inner_params="9"), ParamLayout(c, inner_params="9")
    bound = BoundLayout(la)
    for got, want in zip(bound.theta(), lc.theta()):
        assert torch.equal(got, want.detach()) and not got.requires_grad
    pa, ps = la.adapted.size, la.shared.size
    for d_a, d_s in (
        (torch.randn(pa + 9, dtype=torch.float64)[9:], torch.randn(ps, dtype=torch.float64)),
        (torch.randn(2 * pa, dtype=torch.float64)[::2], torch.randn(ps + 3, dtype=torch.float64)[3:]),
    ):
        for _ in range(2):  # into None, then added
            bound.accumulate(d_a, d_s)
            _accumulate(lc, d_a, d_s)
            assert_same_model(a, c)
            assert all(p.grad is None or p.grad._base is None for p in a.parameters())
        for p in list(a.parameters()) + list(c.parameters()):
            p.grad = None
