"""BatchNorm followed by ReLU as one rule: the Triton kernels (kernels/batchnorm_relu.py via
fastmaml/ops/backends/triton_norm.py) against the torch references (fastmaml/ops/reference/), on CUDA or under
the Triton interpreter on CPU; the compiler's fusion; meta_step through the fused rule against the
autograd oracle (float64), backends torch and triton."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastmaml  # noqa: E402
from fastmaml.layout import ParamLayout  # noqa: E402
from fastmaml.losses import resolve_loss  # noqa: E402
from fastmaml.models import conv4  # noqa: E402
from fastmaml.ops import registry  # noqa: E402
from fastmaml.ops.backends import triton_norm  # noqa: E402
from fastmaml.programs import select_program  # noqa: E402
from fastmaml.programs.fused import FusedProgram, build, compile_model  # noqa: E402
from fastmaml.programs.fused.conv_block import ConvBlockRule  # noqa: E402
from fastmaml.programs.fused.norm import BatchNormRule  # noqa: E402
from fastmaml.programs.fused.norm_act import BatchNormReLUMaxPoolRule, BatchNormReLURule  # noqa: E402

from kernel_checks import DEVICE, DTYPES, Case, assert_close, check_outs, directions  # noqa: E402
from models import classification_tasks  # noqa: E402
from oracle import assert_grads_close, autograd_meta_grad, check_meta_step, rel_err  # noqa: E402

# (T, N, C, S, weights): N·S = 1 (degenerate batch statistics), odd C and S, T = 1 and 3, a channel
# longer than one block of the interpreter-sized launches
CASES = [(1, 1, 3, 1, "common"), (3, 1, 3, 5, "task"), (3, 2, 3, 5, None), (1, 3, 2, 345, "common")]
IDS = [f"T{t}N{n}C{c}S{s}-{w}" for t, n, c, s, w in CASES]
# real sizes, slow under the interpreter (its time grows with T·C): conv4's first BatchNorm at 84×84 (75 query
# images, one of its channels) and ResNet-12's first stage (5 support images, two of its channels)
REAL = [(1, 75, 1, 84 * 84, "task"), (2, 5, 2, 84 * 84, "common")]
PARAMS = [pytest.param(*c, id=i) for c, i in zip(CASES, IDS)] + [
    pytest.param(*c, id=i, marks=pytest.mark.slow) for c, i in zip(REAL, ["conv4-84-query", "resnet12-84-support"])
]


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    ok, why = registry.availability("triton", DEVICE)
    assert ok, why


def impls(name):
    return registry.implementation(name, "torch"), registry.implementation(name, "triton")


def relu_case(T, N, C, S, weights, dtype):
    """A Case, and a BatchNorm weight and bias in its weights form."""
    case = Case(T, N, C, S, weights, dtype, seed=11)
    return case, case.channel(), case.channel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C,S,weights", PARAMS)
def test_forward(T, N, C, S, weights, dtype):
    case, w, b = relu_case(T, N, C, S, weights, dtype)
    ref, tri = impls("batchnorm_relu_fwd")
    for batch in (True, False):
        stats = case.stats(batch)
        want = ref(case.x.clone(), w, b, 1e-5, *stats)
        got = tri(case.x, w, b, 1e-5, *stats)
        for name, u, v in zip(("z", "xhat", "r"), got, want):
            assert_close(u, v, dtype, (batch, name))
        assert N * S == 1 or (want[0] > 0).any() and (want[0] == 0).any()  # the ReLU mask matters
    ref, tri = impls("batchnorm_relu_train_fwd")
    for name, u, v in zip(("z", "mean", "r"), tri(case.x, w, b, 1e-3), ref(case.x, w, b, 1e-3)):
        assert_close(u, v, dtype, ("train", name))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C,S,weights", PARAMS)
def test_backward(T, N, C, S, weights, dtype):
    case, w, b = relu_case(T, N, C, S, weights, dtype)
    gz = torch.cat([case.act(), case.act()], dim=-1)[..., ::2]  # a non-contiguous gradient
    z, xhat, r = impls("batchnorm_relu_fwd")[0](case.x, w, b, 1e-5)
    z_train, mean, r_train = impls("batchnorm_relu_train_fwd")[0](case.x, w, b, 1e-5)
    for need_x, n_outs in ((True, 2), (False, 1), (True, 0)):
        for batch in (True, False):
            pairs, flat = case.outs(2)
            gw, gb = pairs[:n_outs] + [(None, None)] * (2 - n_outs)
            ref, tri = impls("batchnorm_relu_bwd")
            want = ref(gz, z, xhat, r, w, batch, need_x, gw[1], gb[1])
            got = tri(gz, z, xhat, r, w, batch, need_x, gw[0], gb[0])
            assert_close(got, want, dtype, ("gx", batch, need_x))
            check_outs([gw, gb], flat, dtype)
        (gw, gb), flat = case.outs(2)
        ref, tri = impls("batchnorm_relu_train_bwd")
        want = ref(gz, z_train, case.x, mean, r_train, w, 1e-5, need_x, gw[1], gb[1])
        got = tri(gz, z_train, case.x, mean, r_train, w, 1e-5, need_x, gw[0], gb[0])
        assert_close(got, want, dtype, ("train gx", need_x))
        check_outs([gw, gb], flat, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C,S,weights", PARAMS)
def test_value_tangent_forward(T, N, C, S, weights, dtype):
    case, w, b = relu_case(T, N, C, S, weights, dtype)
    ref, tri = impls("batchnorm_relu_value_tangent_fwd")
    for batch in (True, False):
        stats = case.stats(batch)
        for i in range(4):  # directions() variants, and no tangent at all
            xd, wd, bd = directions(case, w, i) if i < 3 else (None, None, None)
            want = ref(case.x, xd, w, b, wd, bd, 1e-5, *stats)
            got = tri(case.x, xd, w, b, wd, bd, 1e-5, *stats)
            for name, u, v in zip(("z", "zd", "xhat", "xhd", "a", "r"), got, want):
                assert_close(u, v, dtype, (batch, i, name))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C,S,weights", PARAMS)
def test_tangent_backward(T, N, C, S, weights, dtype):
    case, w, b = relu_case(T, N, C, S, weights, dtype)
    gz = case.act()
    gzd = torch.cat([case.act(), case.act()], dim=-1)[..., 1::2]  # non-contiguous
    ref, tri = impls("batchnorm_relu_tangent_bwd")
    for batch in (True, False):
        stats = case.stats(batch)
        for i in range(3):
            xd, wd, bd = directions(case, w, i)
            z, _, xhat, xhd, a, r = impls("batchnorm_relu_value_tangent_fwd")[0](case.x, xd, w, b, wd, bd, 1e-5, *stats)
            for need_x in (True, False) if i == 0 else (True,):
                outs, flat = case.outs(4)
                if i == 2:  # a shared affine part: no gw, ġw outputs
                    outs[0] = outs[1] = (None, None)
                want = ref(gz, gzd, z, xhat, xhd, a, r, w, wd, batch, need_x, *(o[1] for o in outs))
                got = tri(gz, gzd, z, xhat, xhd, a, r, w, wd, batch, need_x, *(o[0] for o in outs))
                scale = float(r.abs().max()) * float(gz.norm() + gzd.norm())
                for name, u, v in zip(("gx", "gxd"), got, want):
                    assert_close(u, v, dtype, (batch, i, need_x, name), scale)
                check_outs(outs, flat, dtype)


def test_opcheck():
    """Schemas, fake implementations and declared mutations of the custom ops."""
    triton_norm._bn_relu()  # imports kernels/batchnorm_relu.py
    lib = torch.ops.fastmaml_triton
    case = Case(2, 2, 3, 5, "task", torch.float64)
    x, w, b = case.x, case.channel(), case.channel(per_task=False)
    (gw, _), (gb, _) = case.outs(2)[0]
    stats = case.stats(False)
    torch.library.opcheck(lib.batchnorm_relu_fwd.default, (x, w, b, None, None, 1e-5, True))
    z, xhat, mean, r = lib.batchnorm_relu_fwd(x, w, b, None, None, 1e-5, True)
    torch.library.opcheck(lib.batchnorm_relu_bwd.default, (x, z, x, mean, r, None, True, False, None, gb))
    torch.library.opcheck(lib.batchnorm_relu_value_tangent_fwd.default, (x, x, w, b, w, w, None, None, 1e-5))
    torch.library.opcheck(lib.batchnorm_relu_value_tangent_fwd.default, (x, None, None, None, None, None, *stats, 1e-5))
    z, _, xhat, xhd, a, r = lib.batchnorm_relu_value_tangent_fwd(x, x, w, b, w, w, None, None, 1e-5)
    torch.library.opcheck(
        lib.batchnorm_relu_tangent_bwd.default, (x, x, z, xhat, xhd, a, r, w, w, True, True, gw, None, gb, None)
    )


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    _, tri = impls("batchnorm_relu_value_tangent_fwd")
    with pytest.raises(ValueError, match="xd: expected"):
        tri(x, x[..., :2], None, None, None, None, 1e-5)
    with pytest.raises(ValueError, match="mean, var: give both"):
        tri(x, None, None, None, None, None, 1e-5, torch.zeros(4, device=DEVICE))
    z, xhat, r = impls("batchnorm_relu_fwd")[1](x, None, None, 1e-5)
    with pytest.raises(ValueError, match="z: expected"):
        impls("batchnorm_relu_bwd")[1](xhat, z.double(), xhat, r, None, True, True, None, None)


# ---------------------------------------------------------------- the compiler's fusion and the rule


def kinds(model):
    return [(type(r).__name__, r.describe()) for r in compile_model(model).chain_rules()]


def test_compiler_fuses_batchnorm_relu_pairs_only():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),
        nn.Sequential(nn.ReLU(inplace=True)),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.ReLU(),
        nn.BatchNorm2d(2),
        nn.Identity(),
        nn.ReLU(),
        nn.BatchNorm2d(2),
        nn.Flatten(),
        nn.Linear(50, 3),
        nn.BatchNorm1d(3),
    )
    assert kinds(model) == [
        ("ConvRule", "0.0 (Conv2d)"),
        ("BatchNormReLURule", "0.1+1.0 (BatchNorm2d+ReLU)"),
        ("BatchNormRule", "2 (BatchNorm2d)"),
        ("TanhRule", "3 (Tanh)"),
        ("ReLURule", "4 (ReLU)"),
        ("BatchNormReLURule", "5+7 (BatchNorm2d+ReLU)"),
        ("BatchNormRule", "8 (BatchNorm2d)"),
        ("FlattenRule", "9 (Flatten)"),
        ("LinearRule", "10 (Linear)"),
        ("BatchNormRule", "11 (BatchNorm1d)"),
    ]
    rules = compile_model(model).chain_rules()
    assert [r.index for r in rules if isinstance(r, BatchNormRule)] == [0, 1, 2, 3, 4]
    # the parameters still belong to the BatchNorm modules' paths
    program = build(model.double(), ParamLayout(model), resolve_loss("cross_entropy"))
    names = program.layout.adapted.names
    assert [names[program.nodes[i].params[0].index] for i, _ in program.norms] == [
        "0.1.weight",
        "2.weight",
        "5.weight",
        "8.weight",
        "11.weight",
    ]
    assert isinstance(program.norms[0][1], BatchNormReLURule)


@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_meta_step_conv4_matches_oracle(backend, order, monkeypatch):
    """conv4 on the fused engine, ops of `backend` (its BatchNorm+ReLU+MaxPool tails run the BatchNorm+ReLU
    ops in the tangent passes and with fixed statistics)."""
    monkeypatch.setenv(registry.ENV_VAR, backend)
    torch.manual_seed(0)
    model = conv4(1, 2, hidden=2, image_size=16).double().to(DEVICE)
    program = select_program(model, ParamLayout(model), resolve_loss("cross_entropy"))
    assert isinstance(program, FusedProgram)
    tails = (BatchNormReLUMaxPoolRule, ConvBlockRule)  # the first with its convolution
    assert sum(isinstance(r, tails) for r in program.graph.chain_rules()) == 4
    table = registry.resolve(backend, DEVICE)
    assert {table.chosen[n][0] for n in table.chosen if n.startswith("batchnorm_relu")} == {backend}
    tasks = [t.to(DEVICE) for t in classification_tasks(T=2, ways=2, shots=1, query=1, size=16)]
    check_meta_step(
        model,
        tasks,
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.4,
        steps=2 if order == "checkpoint" else 1,
        order=order,
        tol=1e-9,
    )


def test_meta_step_frozen_statistics_and_shared_body():
    """Triton ops, fixed statistics (the fused rule's affine path; on the torch ops in
    tests/test_batchnorm_modes.py), the body shared: only the last convolution and the head adapt."""
    torch.manual_seed(0)
    model = conv4(1, 3, hidden=2, image_size=16).double().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(2, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(2, generator=g, dtype=torch.float64))
    tasks = [t.to(DEVICE) for t in classification_tasks(T=2, ways=3, shots=1, query=1, size=16)]
    inner = ["12", "17"]
    model.zero_grad()
    res = fastmaml.meta_step(
        model,
        tasks,
        inner_lr=0.3,
        steps=2,
        loss="cross_entropy",
        batch_norm="frozen",
        inner_params=inner,
        backend="triton",
    )
    adapted = [n for n, _ in model.named_parameters() if n.split(".")[0] in inner]
    ref_loss, ref_grads, _ = autograd_meta_grad(
        model, tasks, inner_lr=0.3, steps=2, loss_fn=F.cross_entropy, inner_params=adapted, train=False
    )
    assert rel_err(res.meta_loss, ref_loss) < 1e-9
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref_grads, 1e-9)
