"""BatchNorm2d + ReLU + MaxPool2d as one rule: the C++ CPU kernels (csrc/bn_relu_maxpool.cpp: forward,
backward, and both with tangents) against the torch references (fastmaml/ops/reference/block_tail.py) on odd shapes,
float32 and float64, contiguous and channels-last activations (outputs in x's layout, other inputs in any layout,
results independent of the number of threads); opcheck; the compiler's fusion; meta_step through the fused rule
against the autograd oracle (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.ops import registry
from fastmaml.programs.fused import compile_model
from fastmaml.programs.fused.conv_block import ConvBlockRule
from fastmaml.programs.fused.norm_act import BatchNormReLUMaxPoolRule

from models import classification_tasks, small_cnn
from oracle import check_meta_step

DEVICE = torch.device("cpu")
# (T, N, C, H, W, k): T = 1, one image, one channel, odd H and W (a remainder the windows skip but the
# statistics count), k = 3, a 28×28 plane, 16 channels, 75 images, 3×3 maps pooled by k = 3 (k = 2 pools them
# to the same shape: the backward, which infers the window from the shapes, must not take its 2×2 path), 75
# images of 14×14 (the contiguous kernels' rows of 7 windows: one vector block of 4 and one overlapping it), a
# real layer (5 images of 84×84, 32 channels: several blocks of rows per image in the channels-last kernels)
CASES = [
    (1, 1, 1, 2, 2, 2),
    (3, 2, 3, 5, 7, 2),
    (2, 5, 4, 9, 10, 3),
    (1, 3, 2, 28, 28, 2),
    (2, 1, 3, 4, 4, 1),
    (3, 5, 16, 11, 9, 2),
    (1, 75, 3, 7, 5, 2),
    (2, 3, 2, 3, 3, 3),
    (1, 75, 4, 14, 14, 2),
    (1, 5, 32, 84, 84, 2),
]
IDS = ["T{}N{}C{}H{}W{}k{}".format(*c) for c in CASES]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
LAYOUTS = ["contiguous", "channels_last"]


def in_layout(t, layout):
    """t `[T, N, C, H, W]` with contiguous or channels-last strides (those of a contiguous `[T, N, H, W, C]`)."""
    if layout == "contiguous":
        return t.contiguous()
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def is_channels_last(t):
    return t.permute(0, 1, 3, 4, 2).is_contiguous()


def assert_layout(t, layout):
    """t has the strides of `layout` (channels-last and contiguous coincide for one channel)."""
    assert is_channels_last(t) if layout == "channels_last" else t.is_contiguous(), (layout, t.shape, t.stride())


@pytest.fixture(scope="module")
def cpp():
    ok, why = registry.availability("cpp", DEVICE)
    assert ok, f"the C++ extension must build here: {why}"
    return tuple(registry.implementation(f"bn_relu_maxpool_train_{op}", "cpp") for op in ("fwd", "bwd"))


def reference():
    return (registry.reference("bn_relu_maxpool_train_fwd"), registry.reference("bn_relu_maxpool_train_bwd"))


def inputs(case, weights, dtype, seed=0, layout="contiguous"):
    """x in `layout`, w, b in the form `weights`, and a sampler r (r(*x.shape) in x's layout: `act`)."""
    T, N, C, H, W, k = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = in_layout(r(T, N, C, H, W) * 2 + 0.5, layout)
    w = {"task": r(T, C), "common": r(C), None: None}[weights]
    b = {"task": r(T, C), "common": r(C), None: None}[weights]
    return x, w, b, r


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", ["task", "common", None])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_reference(cpp, case, weights, dtype, layout):
    x, w, b, _ = inputs(case, weights, dtype, layout=layout)
    k = case[-1]
    z, idx, mean, r = cpp[0](x, w, b, 1e-5, k)
    z_ref, idx_ref, mean_ref, r_ref = reference()[0](x, w, b, 1e-5, k)
    assert z.shape == z_ref.shape and idx.dtype == torch.int64
    assert_layout(z, layout)
    assert_layout(idx, layout)
    assert torch.equal(idx, idx_ref)
    for got, ref in ((z, z_ref), (mean, mean_ref), (r, r_ref)):
        assert rel(got, ref) < TOL[dtype]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", ["task", "common", None])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_reference(cpp, case, weights, dtype, layout):
    x, w, b, r = inputs(case, weights, dtype, layout=layout)
    k = case[-1]
    z, idx, mean, invstd = (in_layout(t, layout) if t.dim() == 5 else t for t in reference()[0](x, w, b, 1e-5, k))
    gz = in_layout(r(*z.shape), layout)
    T, C = x.shape[0], x.shape[2]
    outs = {}
    for name, (_, bwd) in (("cpp", cpp), ("ref", reference())):
        gw, gb = x.new_full((T, C), float("nan")), x.new_full((T, C), float("nan"))
        gx = bwd(gz, z, idx, x, mean, invstd, w, 1e-5, k, True, gw, gb)
        outs[name] = (gx, gw, gb)
    assert_layout(outs["cpp"][0], layout)
    for got, ref in zip(outs["cpp"], outs["ref"]):
        assert rel(got, ref) < TOL[dtype]
    # no input gradient asked: None, and the parameter gradients still written
    gw, gb = x.new_zeros(T, C), x.new_zeros(T, C)
    assert cpp[1](gz, z, idx, x, mean, invstd, w, 1e-5, k, False, gw, gb) is None
    assert rel(gw, outs["ref"][1]) < TOL[dtype] and rel(gb, outs["ref"][2]) < TOL[dtype]


def tangent_ops(backend):
    return tuple(registry.implementation(f"bn_relu_maxpool_tangent_{op}", backend) for op in ("fwd", "bwd"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", ["task", "common", None])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tangent_forward_and_backward_match_reference(cpp, case, weights, dtype, layout):
    x, w, b, r = inputs(case, weights, dtype, layout=layout)
    T, C, k = x.shape[0], x.shape[2], case[-1]
    xd, wd, bd = in_layout(r(*x.shape), layout), r(T, C), r(T, C) if weights is not None else None
    got = tangent_ops("cpp")[0](x, xd, w, b, wd, bd, 1e-5, k)
    ref = tangent_ops("torch")[0](x, xd, w, b, wd, bd, 1e-5, k)
    for t in got[:3]:  # z, ż, idx
        assert_layout(t, layout)
    assert torch.equal(got[2], ref[2])  # idx
    for g, f in zip(got[:2] + got[3:], ref[:2] + ref[3:]):  # z, ż, mean, r, a, mean(ẋ)
        assert rel(g, f) < TOL[dtype]
    z, _, idx, mean, invstd, a, dmean = ref
    z, idx = in_layout(z, layout), in_layout(idx, layout)
    gz, gzd = in_layout(r(*z.shape), layout), in_layout(r(*z.shape), layout)
    outs = {}
    for backend in ("cpp", "torch"):
        bufs = [x.new_full((T, C), float("nan")) for _ in range(4)]
        gx, gxd = tangent_ops(backend)[1](gz, gzd, z, idx, x, xd, mean, invstd, a, dmean, w, wd, k, True, *bufs)
        outs[backend] = (gx, gxd, *bufs)
    for t in outs["cpp"][:2]:
        assert_layout(t, layout)
    for g, f in zip(outs["cpp"], outs["torch"]):
        assert rel(g, f) < TOL[dtype]
    bufs = [x.new_zeros(T, C) for _ in range(4)]
    assert tangent_ops("cpp")[1](gz, gzd, z, idx, x, xd, mean, invstd, a, dmean, w, wd, k, False, *bufs) == (None, None)
    for g, f in zip(bufs, outs["torch"][2:]):
        assert rel(g, f) < TOL[dtype]


def run_ops(x, xd, w, b, wd, bd, k, gz, gzd, layout_of_rest):
    """Every op on x (gz, gzd `[T, N, C, Ho, Wo]`): the forwards on x, xd; the backwards on the forward's z, idx;
    the other full-size inputs (xd, gz, gzd, z, idx) in `layout_of_rest`. -> {op: outputs}."""
    lib, lay = torch.ops.fastmaml, lambda t: in_layout(t, layout_of_rest)  # noqa: E731
    fwd = lib.bn_relu_maxpool_fwd(x, w, b, 1e-5, k)
    z, idx, mean, invstd = fwd
    bwd = lib.bn_relu_maxpool_bwd(lay(gz), lay(z), lay(idx), x, mean, invstd, w, True)
    tfwd = lib.bn_relu_maxpool_tangent_fwd(x, lay(xd), w, b, wd, bd, 1e-5, k)
    z, _, idx, mean, invstd, a, dmean = tfwd
    tbwd = lib.bn_relu_maxpool_tangent_bwd(
        lay(gz), lay(gzd), lay(z), lay(idx), x, lay(xd), mean, invstd, a, dmean, w, wd, True
    )
    return {"fwd": fwd, "bwd": bwd, "tangent_fwd": tfwd, "tangent_bwd": tbwd}


def channels_last_case(case, dtype):
    x, w, b, r = inputs(case, "task", dtype, layout="channels_last")
    T, C, k = x.shape[0], x.shape[2], case[-1]
    pooled = (*x.shape[:3], x.shape[3] // k, x.shape[4] // k)
    return dict(x=x, xd=r(*x.shape), w=w, b=b, wd=r(T, C), bd=r(T, C), k=k, gz=r(*pooled), gzd=r(*pooled))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES[5:], ids=IDS[5:])
def test_channels_last_outputs_and_mixed_layouts(cpp, case, dtype):
    """A channels-last x: every full-size output (z, ż, idx, gx, ġx) channels-last; the other full-size
    inputs in x's layout or not give the same bits."""
    args = channels_last_case(case, dtype)
    matched = run_ops(**args, layout_of_rest="channels_last")
    mixed = run_ops(**args, layout_of_rest="contiguous")
    for op in matched:
        for got, want in zip(mixed[op], matched[op]):
            assert torch.equal(got, want), op
            if got.dim() == 5:
                assert is_channels_last(got), (op, got.stride())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_instruction_set_builds_give_the_same_bits(cpp, monkeypatch, dtype):
    """The contiguous kernels' baseline and AVX2 builds ($FASTMAML_CPU_ISA, read per call) do the same
    operations in the same order: every op, on rows shorter than a vector block, rows of whole blocks, rows
    ending in an overlapping block, odd sizes and a window other than 2×2."""
    for case in (CASES[1], CASES[3], CASES[5], CASES[7], CASES[8]):
        x, w, b, r = inputs(case, "task", dtype)
        T, C, k = x.shape[0], x.shape[2], case[-1]
        pooled = (*x.shape[:3], x.shape[3] // k, x.shape[4] // k)
        args = dict(x=x, xd=r(*x.shape), w=w, b=b, wd=r(T, C), bd=r(T, C), k=k, gz=r(*pooled), gzd=r(*pooled))
        runs = []
        for isa in ("auto", "baseline"):
            monkeypatch.setenv("FASTMAML_CPU_ISA", isa)
            runs.append(run_ops(**args, layout_of_rest="contiguous"))
        for op in runs[0]:
            for got, want in zip(runs[0][op], runs[1][op]):
                assert torch.equal(got, want), (case, op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_independent_of_threads(cpp, dtype):
    """Per-block sums combined in block order: the same bits on 1 and 2 threads (a real layer: many blocks)."""
    args = channels_last_case(CASES[-1], dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_ops(**args, layout_of_rest="channels_last")
        torch.set_num_threads(2)
        two = run_ops(**args, layout_of_rest="channels_last")
    finally:
        torch.set_num_threads(threads)
    for op in one:
        for a, b in zip(one[op], two[op]):
            assert torch.equal(a, b), op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES[1:], ids=IDS[1:])
def test_channels_last_value_tangent_recomputes_the_forward_bit_for_bit(cpp, case, dtype):
    args = channels_last_case(case, dtype)
    out = run_ops(**args, layout_of_rest="channels_last")
    z, zd, idx, mean, invstd, a, dmean = out["tangent_fwd"]
    for name, f, t in zip(("z", "idx", "mean", "invstd"), out["fwd"], (z, idx, mean, invstd)):
        assert torch.equal(f, t), name


def test_reference_takes_channels_last(cpp):
    """The torch references on channels-last inputs give the values they give on contiguous ones."""
    case, layout = CASES[5], "channels_last"
    x, w, b, r = inputs(case, "task", torch.float64)
    T, C, k = x.shape[0], x.shape[2], case[-1]
    xd, wd, bd = r(*x.shape), r(T, C), r(T, C)
    fwd, tfwd = reference()[0], tangent_ops("torch")[0]
    want, got = fwd(x, w, b, 1e-5, k), fwd(in_layout(x, layout), w, b, 1e-5, k)
    tan_want = tfwd(x, xd, w, b, wd, bd, 1e-5, k)
    tan_got = tfwd(in_layout(x, layout), in_layout(xd, layout), w, b, wd, bd, 1e-5, k)
    for g, f in zip(got + tan_got, want + tan_want):
        assert rel(g, f) < TOL[torch.float64]
    z, idx, mean, invstd = want
    gz = r(*z.shape)
    outs = []
    for lay in ("contiguous", layout):
        bufs = [x.new_full((T, C), float("nan")) for _ in range(6)]
        cl = lambda t, lay=lay: in_layout(t, lay)  # noqa: E731
        gx = reference()[1](cl(gz), cl(z), cl(idx), cl(x), mean, invstd, w, 1e-5, k, True, *bufs[:2])
        gxs = tangent_ops("torch")[1](
            cl(gz), cl(gz), cl(z), cl(idx), cl(x), cl(xd), mean, invstd, *tan_want[5:], w, wd, k, True, *bufs[2:]
        )
        outs.append((gx, *gxs, *bufs))
    for g, f in zip(*outs):
        assert rel(g, f) < TOL[torch.float64]


def test_tangent_without_input_or_weight_directions_runs_the_reference(cpp):
    """ẋ or ẇ zero (None): the kernel's `supports` declines the call and the cpp op table runs the reference,
    with the same results and saved state."""
    x, w, b, r = inputs(CASES[1], "task", torch.float64)
    T, C = x.shape[0], x.shape[2]
    table = registry.resolve("cpp", DEVICE)
    for xd, wd in ((None, r(T, C)), (r(*x.shape), None), (None, None)):
        assert registry.spec("bn_relu_maxpool_tangent_fwd", "cpp").supports(x, xd, w, b, wd, None, 1e-5, 2)
        got = table.bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, None, 1e-5, 2)
        ref = tangent_ops("torch")[0](x, xd, w, b, wd, None, 1e-5, 2)
        for g, f in zip(got, ref):
            assert (g is None and f is None) or torch.equal(g, f)


def test_non_finite_input_propagates(cpp):
    x, w, b, _ = inputs(CASES[1], "task", torch.float64)
    x[1, 0, 2, 3, 3] = float("nan")
    z, _, mean, _ = cpp[0](x, w, b, 1e-5, 2)
    assert torch.isnan(mean[1, 2]) and torch.isnan(z[1, :, 2]).all() and torch.isfinite(z[0]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(cpp, layout):
    """The Meta kernels' outputs as the CPU kernels' (shapes and strides: x's layout) among opcheck's checks."""
    x, w, b, r = inputs(CASES[1], "task", torch.float64, layout=layout)
    lib = torch.ops.fastmaml
    meta = lambda t: t.to("meta")  # noqa: E731
    xd = in_layout(r(*x.shape), layout)
    z, idx, mean, invstd = lib.bn_relu_maxpool_fwd(x, w, b, 1e-5, 2)
    gz = in_layout(r(*z.shape), layout)
    for op, args in (
        (lib.bn_relu_maxpool_fwd, (x, w, b, 1e-5, 2)),
        (lib.bn_relu_maxpool_tangent_fwd, (x, xd, w, b, w, b, 1e-5, 2)),
        (lib.bn_relu_maxpool_bwd, (gz, z, idx, x, mean, invstd, w, True)),
        (lib.bn_relu_maxpool_tangent_bwd, (gz, gz, z, idx, x, xd, mean, invstd, mean, mean, w, w, True)),
    ):
        for real, fake in zip(op(*args), op(*(meta(a) if isinstance(a, torch.Tensor) else a for a in args))):
            assert real.shape == fake.shape and real.stride() == fake.stride()
    torch.library.opcheck(lib.bn_relu_maxpool_fwd.default, (x, w, b, 1e-5, 2))
    torch.library.opcheck(lib.bn_relu_maxpool_bwd.default, (gz, z, idx, x, mean, invstd, w, True))
    torch.library.opcheck(lib.bn_relu_maxpool_bwd.default, (gz, z, idx, x, mean, invstd, w, False))
    wd, bd = r(*w.shape), r(*b.shape)
    torch.library.opcheck(lib.bn_relu_maxpool_tangent_fwd.default, (x, xd, w, b, wd, bd, 1e-5, 2))
    z, zd, idx, mean, invstd, a, dmean = lib.bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, bd, 1e-5, 2)
    for need_x in (True, False):
        torch.library.opcheck(
            lib.bn_relu_maxpool_tangent_bwd.default,
            (gz, in_layout(r(*z.shape), layout), z, idx, x, xd, mean, invstd, a, dmean, w, wd, need_x),
        )


def test_bad_arguments_name_the_argument(cpp):
    x, w, b, _ = inputs(CASES[1], "task", torch.float64)
    lib = torch.ops.fastmaml
    with pytest.raises(RuntimeError, match=r"w: expected per-task channel values \[3, 3\]"):
        lib.bn_relu_maxpool_fwd(x, w[:, :2], b, 1e-5, 2)
    with pytest.raises(RuntimeError, match="b: expected dtype Double"):
        lib.bn_relu_maxpool_fwd(x, w, b.float(), 1e-5, 2)
    with pytest.raises(RuntimeError, match=r"x: expected activations \[T, N, C, H, W\]"):
        lib.bn_relu_maxpool_fwd(x[0], w, b, 1e-5, 2)
    with pytest.raises(RuntimeError, match="k: expected a pooling window"):
        lib.bn_relu_maxpool_fwd(x, w, b, 1e-5, 6)
    with pytest.raises(RuntimeError, match="xd: expected the shape"):
        lib.bn_relu_maxpool_tangent_fwd(x, x[:, :1], w, b, w, b, 1e-5, 2)
    with pytest.raises(RuntimeError, match=r"wd: expected per-task channel values"):
        lib.bn_relu_maxpool_tangent_fwd(x, x, w, b, w[0], b, 1e-5, 2)


def test_kernels_only_for_cpu():
    """The C++ block kernel has no CUDA implementation: on CUDA the reference runs."""
    for op in ("train_fwd", "train_bwd", "tangent_fwd", "tangent_bwd"):
        assert registry.spec(f"bn_relu_maxpool_{op}", "cpp").devices == ("cpu",)


def kinds(model):
    return [r.describe() for r in compile_model(model).chain_rules()]


def test_compiler_fuses_non_overlapping_pools_only():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # fused
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(3),  # fused
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),  # overlapping
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2, padding=1),  # padding
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),  # ceil mode
        nn.BatchNorm2d(2),
        nn.MaxPool2d(2),  # no ReLU
        nn.Flatten(),
    )
    assert kinds(model) == [
        "0+1+2+3 (Conv2d+BatchNorm2d+ReLU+MaxPool2d)",  # the first block, with its convolution (conv_block.py)
        "4+5+6 (BatchNorm2d+ReLU+MaxPool2d)",
        "7+8 (BatchNorm2d+ReLU)",
        "9 (MaxPool2d)",
        "10+11 (BatchNorm2d+ReLU)",
        "12 (MaxPool2d)",
        "13+14 (BatchNorm2d+ReLU)",
        "15 (MaxPool2d)",
        "16 (BatchNorm2d)",
        "17 (MaxPool2d)",
        "18 (Flatten)",
    ]
    rules = compile_model(model).chain_rules()
    assert isinstance(rules[0], ConvBlockRule) and isinstance(rules[0].tail, BatchNormReLUMaxPoolRule)
    assert rules[0].k == 2 and isinstance(rules[1], BatchNormReLUMaxPoolRule) and rules[1].k == 3
    assert [r.index for r in rules if hasattr(r, "index")] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_meta_step_matches_oracle(backend, order, monkeypatch):
    """Conv → BN → ReLU → MaxPool ×2 (both tails fused, the first with its convolution) through meta_step,
    float64, ops of `backend`."""
    monkeypatch.setenv(registry.ENV_VAR, backend)
    torch.manual_seed(0)
    model = small_cnn(channels=3, size=10)
    rules = compile_model(model).chain_rules()
    assert isinstance(rules[0], ConvBlockRule) and isinstance(rules[2], BatchNormReLUMaxPoolRule)
    check_meta_step(
        model,
        classification_tasks(T=3, size=10, seed=2),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.3,
        steps=2,
        order=order,
        tol=1e-9,
    )


def test_explain_names_the_fused_tail():
    e = fastmaml.explain(small_cnn(channels=3), loss="cross_entropy")
    assert e.layers[:3] == (
        "v4 = 0+1+2+3 (Conv2d+BatchNorm2d+ReLU+MaxPool2d)(x)",
        "v5 = 4 (Conv2d)(v4)",
        "v8 = 5+6+7 (BatchNorm2d+ReLU+MaxPool2d)(v5)",
    )
