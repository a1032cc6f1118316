"""A conv net's first block (Conv2d of the model's input + BatchNorm2d + ReLU + MaxPool2d) as one rule: the C++
CPU kernels (csrc/conv_bn_relu_maxpool.cpp) against the torch references (ops/reference/block_tail.py) and
autograd on odd and real shapes, both instruction-set builds, float32 against float64; opcheck; clear errors;
the compiler's fusion; meta_step through the fused rule against the autograd oracle (float64), and against the
same model without the fusion (per-step statistics recorded alike)."""

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastmaml
from fastmaml.ops import registry
from fastmaml.programs.fused import compile_model, conv_block, memory_format

from class_models import ConvClassNet, MiniImagenetCNN
from models import classification_tasks
from oracle import assert_grads_close, check_meta_step

DEVICE = torch.device("cpu")
# (T, N, Ci, H, W, C, kernel, stride, padding, dilation, k): Omniglot's first layer (75 images of 28×28, one
# channel), miniImageNet's (84×84, three channels), odd sizes (rows shorter than a vector block, a remainder the
# windows skip), stride 2, no padding, dilation 2, a 2×2 kernel, k = 3, 1×1 convolutions
CASES = [
    (1, 75, 1, 28, 28, 8, 3, 1, 1, 1, 2),
    (1, 5, 3, 84, 84, 4, 3, 1, 1, 1, 2),
    (3, 2, 1, 5, 7, 3, 3, 1, 1, 1, 2),
    (2, 4, 3, 13, 11, 5, 3, 1, 1, 1, 2),
    (2, 3, 2, 9, 10, 4, 3, 2, 0, 1, 2),
    (1, 2, 1, 12, 12, 3, 3, 1, 2, 2, 3),
    (2, 2, 2, 10, 9, 3, 2, 1, 1, 1, 2),
    (2, 3, 3, 6, 8, 5, 1, 1, 0, 1, 2),
]
IDS = ["T{}N{}Ci{}H{}W{}C{}k{}s{}p{}d{}pool{}".format(*c) for c in CASES]


@pytest.fixture(scope="module")
def cpp():
    ok, why = registry.availability("cpp", DEVICE)
    if not ok:
        pytest.skip(why)
    ops = ("fwd", "bwd", "tangent_fwd", "tangent_bwd")
    return {f"conv_bn_relu_maxpool_{op}": registry.implementation(f"conv_bn_relu_maxpool_{op}", "cpp") for op in ops}


def inputs(case, dtype, seed=0):
    T, N, Ci, H, W, C, kk, s, p, d, k = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = r(T, N, Ci, H, W) * 0.5 + 2.0  # a mean far from 0 (the patches' covariance cancels it)
    return x, r(T, C, Ci, kk, kk), r(T, C), r(T, C) * 0.5 + 1.0, r(T, C), [s, s], [p, p], [d, d], k


def autograd_block(x, cw, cb, w, b, eps, k, stride, padding, dilation):
    """z of the block with autograd's ops (per-task convolution, batch statistics), differentiable in
    (cw, cb, w, b)."""
    ys = torch.stack([F.conv2d(x[t], cw[t], cb[t], stride, padding, dilation) for t in range(x.shape[0])])
    mean = ys.mean((1, 3, 4), keepdim=True)
    var = ys.var((1, 3, 4), unbiased=False, keepdim=True)
    col = lambda v: v[:, None, :, None, None]  # noqa: E731
    a = (ys - mean) / torch.sqrt(var + eps) * col(w) + col(b)
    z = F.max_pool2d(F.relu(a).flatten(0, 1), k)
    return z.view(*ys.shape[:2], *z.shape[1:])


def relative(got, want):
    return float(
        (got.detach().double() - want.detach().double()).norm() / want.detach().double().norm().clamp_min(1e-300)
    )


@pytest.mark.parametrize("isa", ["native", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_match_autograd_and_the_reference(cpp, case, isa, monkeypatch):
    """float64: z and every weight gradient within 1e-12 of autograd's (the conv bias's gradient is exactly 0:
    a constant before batch statistics); idx and the patch moments as the reference gives them."""
    if isa == "baseline":
        monkeypatch.setenv("FASTMAML_CPU_ISA", "baseline")
    x, cw, cb, w, b, stride, padding, dilation, k = inputs(case, torch.float64)
    geo = (stride, padding, dilation)
    z, idx, mean, r, pmean, pcov = cpp["conv_bn_relu_maxpool_fwd"](x, cw, cb, w, b, 1e-5, k, *geo)
    ref = registry.reference("conv_bn_relu_maxpool_fwd")(x, cw, cb, w, b, 1e-5, k, *geo)
    leaves = [t.clone().requires_grad_() for t in (cw, cb, w, b)]
    want = autograd_block(x, *leaves, 1e-5, k, *geo)
    assert relative(z, want.detach()) < 1e-12
    assert torch.equal(idx, ref[1])
    for got, exp in zip((mean, r, pmean, pcov), ref[2:]):
        assert relative(got, exp) < 1e-12
    gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = cpp["conv_bn_relu_maxpool_bwd"](gz, z, idx, x, cw, cb, w, pmean, pcov, 1e-5, k, *geo)
    refs = registry.reference("conv_bn_relu_maxpool_bwd")(gz, z, idx, x, cw, cb, w, pmean, pcov, 1e-5, k, *geo)
    autograds = torch.autograd.grad(want, leaves, gz)
    for name, got, exp, ag in zip(("gcw", "gcb", "gw", "gb"), grads, refs, autograds):
        assert got.shape == ag.shape, name
        if name == "gcb":
            assert torch.equal(got, torch.zeros_like(got))
            assert float(ag.abs().max()) < 1e-9 * float(autograds[0].abs().max())
            continue
        assert relative(got, ag) < 1e-12, name
        assert relative(exp, ag) < 1e-12, name


def directions(case, dtype, seed=3):
    """Random directions (dcw, dcb, dw, db) of a case's parameters."""
    T, _, Ci, _, _, C, kk = case[:7]
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(T, C, Ci, kk, kk), r(T, C), r(T, C), r(T, C)


@pytest.mark.parametrize("isa", ["native", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tangent_kernels_match_autograd_and_the_reference(cpp, case, isa, monkeypatch):
    """float64: ż against torch.func.jvp; the backward's outputs against autograd's gradient of ⟨gz, z⟩ and their
    tangents against its Hessian-vector product plus Jᵀ ġz; z and idx the forward's bits."""
    if isa == "baseline":
        monkeypatch.setenv("FASTMAML_CPU_ISA", "baseline")
    x, cw, cb, w, b, stride, padding, dilation, k = inputs(case, torch.float64)
    geo = (stride, padding, dilation)
    dirs = directions(case, torch.float64)
    tangent = cpp["conv_bn_relu_maxpool_tangent_fwd"](x, cw, cb, w, b, *dirs, 1e-5, k, *geo)
    z, zd, idx = tangent[:3]
    forward = cpp["conv_bn_relu_maxpool_fwd"](x, cw, cb, w, b, 1e-5, k, *geo)
    assert torch.equal(z, forward[0]) and torch.equal(idx, forward[1])
    ref = registry.reference("conv_bn_relu_maxpool_tangent_fwd")(x, cw, cb, w, b, *dirs, 1e-5, k, *geo)
    block = lambda *ps: autograd_block(x, *ps, 1e-5, k, *geo)  # noqa: E731
    _, zd_want = torch.func.jvp(block, (cw, cb, w, b), dirs)
    assert relative(zd, zd_want) < 1e-12 and relative(ref[1], zd_want) < 1e-12
    g = torch.Generator().manual_seed(4)
    gz, gzd = (torch.randn(z.shape, generator=g, dtype=torch.float64) for _ in range(2))
    args = (gz, gzd, z, idx, x, cw, cb, w, dirs[0], dirs[2], *tangent[5:], 1e-5, k, *geo)
    got = cpp["conv_bn_relu_maxpool_tangent_bwd"](*args)
    refs = registry.reference("conv_bn_relu_maxpool_tangent_bwd")(*args)
    leaves = [t.clone().requires_grad_() for t in (cw, cb, w, b)]
    zz = block(*leaves)
    grads = torch.autograd.grad((zz * gz).sum(), leaves, create_graph=True)
    hv = torch.autograd.grad(sum((gi * di).sum() for gi, di in zip(grads, dirs)), leaves, retain_graph=True)
    jt = torch.autograd.grad((zz * gzd).sum(), leaves)
    want = [gi.detach() for gi in grads] + [h + j for h, j in zip(hv, jt)]
    names = ("gcw", "gcb", "gw", "gb", "gcw'", "gcb'", "gw'", "gb'")
    for name, a, r_, e in zip(names, got, refs, want):
        if name.startswith("gcb"):  # exactly zero: a constant before batch statistics
            assert torch.equal(a, torch.zeros_like(a)) and float(e.abs().max()) < 1e-9 * float(want[0].abs().max())
            continue
        assert relative(a, e) < 1e-11, name
        assert relative(r_, e) < 1e-11, name


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:4], ids=IDS[:2] + IDS[3:4])
def test_float32_error_within_autograds_own(cpp, case):
    """float32 against float64: z and the weight gradients no worse than twice autograd's float32 error on the
    same problem (plus a floor of 1e-6)."""
    args64 = inputs(case, torch.float64)
    args32 = inputs(case, torch.float32)
    geo = args64[5:8]
    k = args64[8]
    z64 = autograd_block(args64[0], *[t.clone().requires_grad_() for t in args64[1:5]], 1e-5, k, *geo)
    gz = torch.randn(z64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in args64[1:5]]
    want = torch.autograd.grad(autograd_block(args64[0], *leaves64, 1e-5, k, *geo), leaves64, gz)
    leaves32 = [t.clone().requires_grad_() for t in args32[1:5]]
    z_ag = autograd_block(args32[0], *leaves32, 1e-5, k, *geo)
    ag32 = torch.autograd.grad(z_ag, leaves32, gz.float())
    x, cw, cb, w, b = args32[:5]
    z, idx, _, _, pmean, pcov = cpp["conv_bn_relu_maxpool_fwd"](x, cw, cb, w, b, 1e-5, k, *geo)
    assert relative(z, z64.detach()) <= 2 * relative(z_ag.detach(), z64.detach()) + 1e-6
    grads = cpp["conv_bn_relu_maxpool_bwd"](gz.float(), z, idx, x, cw, cb, w, pmean, pcov, 1e-5, k, *geo)
    for name, got, ag, exp in zip(("gcw", "gw", "gb"), grads[:1] + grads[2:], ag32[:1] + ag32[2:], want[:1] + want[2:]):
        assert relative(got, exp) <= 2 * relative(ag, exp) + 1e-6, name


def all_outputs(cpp, args, dtype):
    """Every output of the four kernels on one case's `args` (random gradients and directions)."""
    x, cw, cb, w, b, stride, padding, dilation, k = args
    geo = (stride, padding, dilation)
    fwd = cpp["conv_bn_relu_maxpool_fwd"](x, cw, cb, w, b, 1e-5, k, *geo)
    g = torch.Generator().manual_seed(3)
    gz, gzd = (torch.randn(fwd[0].shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    bwd = cpp["conv_bn_relu_maxpool_bwd"](gz, fwd[0], fwd[1], x, cw, cb, w, *fwd[4:], 1e-5, k, *geo)
    dirs = directions(CASES[0], dtype)
    tfwd = cpp["conv_bn_relu_maxpool_tangent_fwd"](x, cw, cb, w, b, *dirs, 1e-5, k, *geo)
    tbwd = cpp["conv_bn_relu_maxpool_tangent_bwd"](
        gz, gzd, fwd[0], fwd[1], x, cw, cb, w, dirs[0], dirs[2], *fwd[4:], 1e-5, k, *geo
    )
    return fwd + bwd + tfwd + tbwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_instruction_set_builds_give_the_same_bits(cpp, dtype, monkeypatch):
    """The AVX2 build (vector planes, vector pick sums) and the baseline build (SSE planes, scalar pick sums)."""
    args = inputs(CASES[0], dtype)
    outs = []
    for isa in ("native", "baseline"):
        if isa == "baseline":
            monkeypatch.setenv("FASTMAML_CPU_ISA", "baseline")
        outs.append(all_outputs(cpp, args, dtype))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_threads(cpp):
    args = inputs(CASES[0], torch.float32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(all_outputs(cpp, args, torch.float32))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_opcheck(cpp):
    x, cw, cb, w, b, stride, padding, dilation, k = inputs(CASES[2], torch.float64)
    lib = torch.ops.fastmaml
    torch.library.opcheck(lib.conv_bn_relu_maxpool_fwd.default, (x, cw, cb, w, b, 1e-5, k, stride, padding, dilation))
    z, idx, _, _, pmean, pcov = lib.conv_bn_relu_maxpool_fwd(x, cw, cb, w, b, 1e-5, k, stride, padding, dilation)
    torch.library.opcheck(
        lib.conv_bn_relu_maxpool_bwd.default,
        (torch.randn_like(z), z, idx, x, cw, cb, w, pmean, pcov, 1e-5, k, stride, padding, dilation),
    )
    dcw, dcb, dw, db = directions(CASES[2], torch.float64)
    geo = (stride, padding, dilation)
    torch.library.opcheck(
        lib.conv_bn_relu_maxpool_tangent_fwd.default, (x, cw, cb, w, b, dcw, dcb, dw, db, 1e-5, k, *geo)
    )
    torch.library.opcheck(
        lib.conv_bn_relu_maxpool_tangent_bwd.default,
        (torch.randn_like(z), torch.randn_like(z), z, idx, x, cw, cb, w, dcw, dw, pmean, pcov, 1e-5, k, *geo),
    )


def test_errors_name_the_argument(cpp):
    x, cw, cb, w, b, stride, padding, dilation, k = inputs(CASES[2], torch.float64)
    fwd = torch.ops.fastmaml.conv_bn_relu_maxpool_fwd
    with pytest.raises(RuntimeError, match="cw: expected at most 32 taps"):
        fwd(x.expand(-1, -1, 4, -1, -1).contiguous(), torch.randn(3, 3, 4, 3, 3, dtype=x.dtype), cb, w, b, 1e-5, k,
            stride, padding, dilation)  # fmt: skip
    with pytest.raises(RuntimeError, match="cb: expected per-task channel values"):
        fwd(x, cw, cb[:, :2], w, b, 1e-5, k, stride, padding, dilation)
    with pytest.raises(RuntimeError, match="k: expected a pooling window"):
        fwd(x, cw, cb, w, b, 1e-5, 9, stride, padding, dilation)
    with pytest.raises(RuntimeError, match="stride: expected two values >= 1"):
        fwd(x, cw, cb, w, b, 1e-5, k, [0, 1], padding, dilation)
    z, idx, _, _, pmean, pcov = fwd(x, cw, cb, w, b, 1e-5, k, stride, padding, dilation)
    with pytest.raises(RuntimeError, match="gz: expected pooled planes"):
        torch.ops.fastmaml.conv_bn_relu_maxpool_bwd(
            torch.randn_like(z), z, idx, x, cw, cb, w, pmean, pcov, 1e-5, 3, stride, padding, dilation
        )
    with pytest.raises(RuntimeError, match="pcov: expected float64"):
        torch.ops.fastmaml.conv_bn_relu_maxpool_bwd(
            torch.randn_like(z), z, idx, x, cw, cb, w, pmean, pcov.float(), 1e-5, k, stride, padding, dilation
        )


# ---------------------------------------------------------------- the rule in the engine


class _Calls(TorchDispatchMode):
    """Counts the calls of each first-block kernel."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "conv_bn_relu_maxpool" in name:
            self.count[name.split(".")[1]] += 1
        return func(*args, **(kwargs or {}))


def tasks_for(shape, T=2):
    return classification_tasks(T=T, ways=3, shots=2, query=3, shape=shape)


def test_the_compiler_fuses_a_first_block_only():
    text = str(fastmaml.explain(ConvClassNet(hidden=3, side=2)))
    assert "features.0+features.1+features.2+features.3 (Conv2d+BatchNorm2d+ReLU+MaxPool2d)(x)" in text
    assert "features.5+features.6+features.7 (BatchNorm2d+ReLU+MaxPool2d)" in text  # the second block's conv reads v4
    rgb = str(fastmaml.explain(ConvClassNet(hidden=3, side=2, channels=3)))  # 27 taps: more than MAX_TAPS
    assert "Conv2d+BatchNorm2d" not in rgb and "features.0 (Conv2d)(x)" in rgb


@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
@pytest.mark.parametrize(
    "model_fn", [lambda: ConvClassNet(hidden=3, side=2), lambda: MiniImagenetCNN(3, 4, channels=1)]
)
def test_meta_step_through_the_fused_block_matches_the_oracle(cpp, order, model_fn):
    torch.manual_seed(3)
    model = model_fn().double()
    shape = (1, 8, 8) if isinstance(model, ConvClassNet) else (1, 16, 16)
    tasks = tasks_for(shape)
    calls = _Calls()
    with calls:
        check_meta_step(
            model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.1, steps=2, order=order,
            backend="cpp", tol=1e-9,
        )  # fmt: skip
    kernels = {"conv_bn_relu_maxpool_fwd", "conv_bn_relu_maxpool_bwd"}
    if order != "first":  # the Hessian-vector products of the support set
        kernels |= {"conv_bn_relu_maxpool_tangent_fwd", "conv_bn_relu_maxpool_tangent_bwd"}
    assert set(calls.count) == kernels, calls.count


def test_meta_sgd_rates_and_anil_through_the_fused_block(cpp):
    torch.manual_seed(4)
    model = ConvClassNet(hidden=3, side=2).double()
    tasks = tasks_for((1, 8, 8))
    lr = [torch.full((), 0.1, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    check_meta_step(model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=lr, steps=2,
                    lr_leaves=lr, backend="cpp", tol=1e-9)  # fmt: skip
    check_meta_step(model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.1, steps=2,
                    inner_params=["classifier"], backend="cpp", tol=1e-9)  # fmt: skip


def test_per_step_statistics_recorded_as_without_the_fusion(cpp, monkeypatch):
    """Training with per-step statistics: the fused block records the convolution output's batch statistics
    (`normalized_input`), as the unfused rules do, and gives the same meta-gradient."""
    torch.manual_seed(5)
    fused = fastmaml.add_per_step_stats(ConvClassNet(hidden=3, side=2).double(), steps=2)
    plain = copy.deepcopy(fused)
    tasks = tasks_for((1, 8, 8))

    def run(model):
        model.train()
        fastmaml.meta_step(model, tasks, inner_lr=0.1, steps=2, loss="cross_entropy", batch_norm="per_step",
                           backend="cpp")  # fmt: skip
        return {n: p.grad for n, p in model.named_parameters()}, {n: b.clone() for n, b in model.named_buffers()}

    grads, buffers = run(fused)
    assert "Conv2d+BatchNorm2d+ReLU+MaxPool2d" in str(fastmaml.explain(fused))
    monkeypatch.setattr(conv_block.ConvBlockRule, "fusable", staticmethod(lambda conv: False))
    assert "Conv2d+BatchNorm2d" not in str(fastmaml.explain(plain))
    grads_plain, buffers_plain = run(plain)
    assert_grads_close(grads, grads_plain, 1e-10)
    for n in buffers:
        if buffers[n].is_floating_point():
            assert torch.allclose(buffers[n], buffers_plain[n], rtol=1e-10, atol=1e-12), n


def test_the_fused_block_keeps_the_programs_memory_format(cpp):
    """A one-channel input of a large map runs channels-last (memory_format.py): the fused block's output
    follows it, as the block tail's would, and its gradients match the unfused rules'."""
    torch.manual_seed(7)
    model = ConvClassNet(hidden=4, side=9)  # float32, 36×36 input: channels-last under "auto"
    (block,) = [n.rule for n in compile_model(model).nodes if isinstance(n.rule, conv_block.ConvBlockRule)]
    ops = registry.resolve("cpp", DEVICE)
    x = memory_format.to_format(torch.randn(2, 3, 1, 36, 36), "channels_last")
    assert memory_format.choose("auto", x) == "channels_last"
    conv, norm = model.features[0], model.features[1]
    p = (conv.weight.detach(), conv.bias.detach(), norm.weight.detach(), norm.bias.detach(), None)
    with torch.no_grad():
        z, saved = block.forward(ops, x, p, True)
        want, saved_plain = block.forward(registry.resolve("torch", DEVICE), x, p, True)
    assert memory_format.follows_channels_last(z)
    assert relative(z, want) < 1e-6
    gz = memory_format.to_format(torch.randn(want.shape), "channels_last")
    outs = [torch.empty(2, *t.shape) for t in p[:4]]
    outs_plain = [torch.empty(2, *t.shape) for t in p[:4]]
    with torch.no_grad():
        block.backward(ops, gz, saved, p, False, outs)
        block.backward(registry.resolve("torch", DEVICE), gz, saved_plain, p, False, outs_plain)
    for got, exp in zip(outs[:1] + outs[2:], outs_plain[:1] + outs_plain[2:]):
        assert relative(got, exp) < 1e-4


def test_differentiable_forward_of_a_fused_model():
    """`fastmaml.adapt` (the differentiable forward: the composed rules) on a model with a fused first block."""
    torch.manual_seed(6)
    model = ConvClassNet(hidden=3, side=2).double()
    sx, sy, qx, _ = tasks_for((1, 8, 8), T=1)
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.1, steps=1, loss="cross_entropy")
    out = adapted(qx)[0]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(sx[0]), sy[0]), list(params.values()))
    fast = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
    want = torch.func.functional_call(model, fast, (qx[0],))
    assert relative(out, want) < 1e-10
    assert isinstance(model.features[0], nn.Conv2d)
