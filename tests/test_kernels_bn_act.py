"""BatchNorm (batch statistics) + leaky ReLU as one op per pass: the C++ CPU kernels (csrc/bn_act.cpp: forward,
backward, value-and-tangent forward, tangent backward) against the torch references
(`batchnorm_act_*` in fastmaml/ops/reference/batchnorm.py) in float64 and float32, slopes 1 (plain BatchNorm),
0.1 (ResNet-12's LeakyReLU) and 0 (ReLU); the properties the fused engine relies on (the forward and the
value-and-tangent forward agree bit for bit; both instruction-set builds give the same bits; so does any
number of threads); opcheck and argument errors; the rules' use of the ops; meta_step of ResNet-12 through
them against the autograd oracle. Every kernel test runs the activations in both layouts the kernels take
(`LAYOUTS`): contiguous (NCHW) and channels-last (the [T, N, C, H·W] view of a channels-last
[T, N, C, H, W]: strides (N·S·C, S·C, 1, C)), against the reference on contiguous inputs.

Error measure: ‖got − want‖ / ‖want‖, except where every (task, channel) has one value (N·S = 1): x̂ is then
0 exactly, the reference computes it as a difference of large terms (x·r·w, r = 1/√eps) and leaves rounding
noise where the kernel leaves 0, so the error is measured against the size of those terms (`scale`).
float32: err(C++) <= 2 · err(reference, float32) + 4 · 2⁻²⁴, both against the float64 reference on the same
inputs (as tests/test_kernels_bn_relu_maxpool_precision.py; 4 · 2⁻²⁴: outputs of a single value, where the
reference can round luckily, carry the rounding of the statistics the backwards get in float32)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.ops import registry
from fastmaml.programs.fused import compile_model
from fastmaml.programs.fused.norm import BatchNormRule
from fastmaml.programs.fused.norm_act import BatchNormLeakyReLURule

from class_models import ResNet12
from oracle import assert_grads_close, autograd_meta_grad, check_meta_step, rel_err

CPU = torch.device("cpu")
EPS = 1e-5
FLOOR = 4 * 2.0**-24  # a few float32 roundings: the backwards' inputs (statistics, z) and the output
OPS = ("train_fwd", "train_bwd", "value_tangent_fwd", "tangent_bwd")
SLOPES = [1.0, 0.1, 0.0]
WEIGHTS = ["task", "common", None]
LAYOUTS = ["nchw", "nhwc"]
FULL_SIZE = ("z", "t_z", "zd", "gx", "t_gx", "t_gxd")  # the outputs of x's shape
# (T, N, C, S): T = 1 and 3; N = 1, 5, 75; C = 1, 3, 16; S = 1 (BatchNorm1d; N·S = 1 too), 5×5, 7×9, 21×21
CASES = [
    (1, 1, 3, 1),
    (3, 5, 16, 1),
    (3, 75, 3, 1),
    (1, 5, 1, 25),
    (3, 5, 3, 63),
    (3, 1, 16, 441),
    (1, 75, 3, 441),
]
IDS = ["T{}N{}C{}S{}".format(*c) for c in CASES]
REAL = (1, 75, 2, 84 * 84)  # the query of a 5-way task at 84×84: planes of 529k values


@pytest.fixture(scope="module", autouse=True)
def cpp():
    ok, why = registry.availability("cpp", CPU)
    assert ok, f"the C++ extension must build here: {why}"


def impl(op, backend):
    return registry.implementation(f"batchnorm_act_{op}", backend)


def to_layout(t, layout):
    """An activation-shaped `[T, N, C, S]` tensor in `layout` (others as they are)."""
    if t is None or t.dim() != 4 or layout == "nchw":
        return t
    return t.transpose(2, 3).contiguous().transpose(2, 3)


def channels_last_strides(shape):
    T, N, C, S = shape
    return (N * S * C, S * C, 1, C)


def assert_layout(res, layout, shape):
    """The full-size outputs of `res` (run_all) come in x's layout: channels-last strides for channels-last x
    (where C and S exceed 1: else the layouts are one), contiguous otherwise."""
    for name in FULL_SIZE:
        if res.get(name) is None:
            continue
        if layout == "nhwc" and shape[2] > 1 and shape[3] > 1:
            assert res[name].stride() == channels_last_strides(shape), (name, res[name].stride())
        else:
            assert res[name].is_contiguous(), name


class Inputs:
    """Random inputs of one case in float64 (`cast` gives them in another dtype): x `[T, N, C, S]` with a mean
    far from 0, weights per task (views into a flat `[T, P]` buffer), common `[C]` or None, and directions
    as the fused engine passes them (ẇ, ḃ per task; None for a shared or absent affine part)."""

    def __init__(self, case, weights, seed=0):
        T, N, C, S = case
        self.g = torch.Generator().manual_seed(seed + T + N + C + S)
        self.T, self.C, self.shape = T, C, case
        self.x = self.randn(*case) * 2 + 3
        self.w, self.b = self.channel(weights), self.channel(weights)
        self.xd = self.randn(*case)
        self.wd = None if weights is None else self.randn(T, 2 * C + 1)[:, 1::2]
        self.bd = None if weights is None else self.randn(T, C)
        self.gz, self.gzd = self.randn(*case), self.randn(*case)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=torch.float64)

    def channel(self, form):
        if form == "task":
            return self.randn(self.T, 2 * self.C + 1)[:, 1::2]  # a non-contiguous view
        return self.randn(self.C) + 1 if form == "common" else None

    @staticmethod
    def cast(t, dtype):
        return None if t is None else t.to(dtype)


def outs(T, C, dtype, k):
    """k NaN-filled `[T, C]` outputs: even ones column blocks of a flat `[T, P]` buffer, odd ones transposed
    `[C, T]` tensors (the out-view conventions of the fused engine)."""
    flat = torch.full((T, k * (C + 1) + 1), float("nan"), dtype=dtype)
    return [
        flat[:, 1 + i * (C + 1) : 1 + i * (C + 1) + C]
        if i % 2 == 0
        else torch.full((C, T), float("nan"), dtype=dtype).t()
        for i in range(k)
    ]


def run_all(backend, inp, slope, dtype=torch.float64, variant=0, need_x=True, z=None, stats=None, layout="nchw"):
    """The four ops of `backend` on `inp` (cast to dtype, activations in `layout`): {name: output}. variant 0:
    all directions; 1: no ẋ; 2: ẋ only (shared affine). The backwards get `z` and `stats` (mean, r, a,
    mean(ẋ)) when given (the same for every backend), else this backend's own forward's."""
    c = lambda t: to_layout(Inputs.cast(t, dtype), layout)  # noqa: E731
    x, w, b = c(inp.x), c(inp.w), c(inp.b)
    xd = None if variant == 1 else c(inp.xd)
    wd, bd = (None, None) if variant == 2 else (c(inp.wd), c(inp.bd))
    T, C = inp.T, inp.C
    res = {}
    res["z"], res["mean"], res["r"] = impl("train_fwd", backend)(x, w, b, EPS, slope)
    tz, res["zd"], res["t_mean"], res["t_r"], res["a"], res["dmean"] = impl("value_tangent_fwd", backend)(
        x, xd, w, b, wd, bd, EPS, slope
    )
    res["t_z"] = tz
    zz = c(z) if z is not None else res["z"]
    mean, r, a, dmean = (
        [c(s) for s in stats] if stats is not None else (res["t_mean"], res["t_r"], res["a"], res["dmean"])
    )
    o = outs(T, C, dtype, 2)
    res["gx"] = impl("train_bwd", backend)(c(inp.gz), zz, x, mean, r, w, EPS, slope, need_x, *o)
    res["gw"], res["gb"] = o
    o = outs(T, C, dtype, 4)
    res["t_gx"], res["t_gxd"] = impl("tangent_bwd", backend)(
        c(inp.gz), c(inp.gzd), zz, x, xd, mean, r, a, dmean, w, wd, slope, need_x, *o
    )
    res["t_gw"], res["t_gwd"], res["t_gb"], res["t_gbd"] = o
    return res


def err(got, want, scale=0.0, same_dtype=True):
    assert (got is None) == (want is None)
    if want is None:
        return 0.0
    assert got.shape == want.shape and (got.dtype == want.dtype or not same_dtype), (got.shape, want.shape, got.dtype)
    return float((got.double() - want.double()).norm()) / max(float(want.double().norm()), scale, 1e-300)


def scales(inp, case, res):
    """Per output, the size of the terms that cancel when every plane has one value (else none): x̂ = (x − μ)·r
    is 0 there, computed from x·r, so its rounding noise is ~ε·r·|x|."""
    if case[1] * case[3] != 1:
        return {}
    norm = lambda t: float(t.double().norm())  # noqa: E731
    top = lambda t, default: default if t is None else float(t.double().abs().max())  # noqa: E731
    r, x, w, wd = float(res["r"].double().max()), norm(inp.x), top(inp.w, 1.0), top(inp.wd, 0.0)
    gz, gzd = norm(inp.gz), norm(inp.gzd)
    return {
        "z": r * x * w,
        "t_z": r * x * w,
        "zd": r * x * wd,
        "gw": r * x * gz,
        "t_gw": r * x * gz,
        "t_gwd": r * x * (gz + gzd),
        "gx": r * w * gz,
        "t_gx": r * w * gz,
        "t_gxd": r * (w * gzd + wd * gz),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_matches_reference(case, slope, weights, layout):
    inp = Inputs(case, weights)
    for variant in (0, 1, 2):
        for need_x in (True, False) if variant == 0 else (True,):
            ref = run_all("torch", inp, slope, variant=variant, need_x=need_x)
            # the same masks
            got = run_all("cpp", inp, slope, variant=variant, need_x=need_x, z=ref["z"], layout=layout)
            assert_layout(got, layout, case)
            s = scales(inp, case, ref)
            for name in ref:
                e = err(got[name], ref[name], s.get(name, 0.0))
                assert e < 1e-12, (name, variant, need_x, e)
            if not need_x:
                assert got["gx"] is None and got["t_gx"] is None and got["t_gxd"] is None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_real_size(layout):
    """A plane of the real size (75 images of 84×84: 529k values), LeakyReLU(0.1), per-task weights."""
    inp = Inputs(REAL, "task")
    ref = run_all("torch", inp, 0.1)
    got = run_all("cpp", inp, 0.1, z=ref["z"], layout=layout)
    assert_layout(got, layout, REAL)
    for name in ref:
        assert err(got[name], ref[name]) < 1e-12, name


def test_no_directions_give_no_tangent():
    """ẋ, ẇ, ḃ all None (a layer before every adapted parameter): ż None, a and mean(ẋ) 0, z the forward's."""
    inp = Inputs((3, 5, 3, 25), "task")
    for backend in ("cpp", "torch"):
        z, zd, mean, r, a, dmean = impl("value_tangent_fwd", backend)(inp.x, None, inp.w, inp.b, None, None, EPS, 0.1)
        assert zd is None and not a.any() and not dmean.any()
        assert torch.equal(z, impl("train_fwd", backend)(inp.x, inp.w, inp.b, EPS, 0.1)[0])


def bounded(got, ref32, ref64, name):
    assert got.dtype == ref32.dtype, name
    e_cpp, e_ref = err(got, ref64, same_dtype=False), err(ref32, ref64, same_dtype=False)
    assert e_cpp <= 2 * e_ref + FLOOR, (name, e_cpp, e_ref)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("slope", [1.0, 0.1])
@pytest.mark.parametrize("case", CASES[1:] + [REAL], ids=IDS[1:] + ["T{}N{}C{}S{}".format(*REAL)])
def test_float32_within_the_references_own_error(case, slope, layout):
    """float32 against the float64 reference, bound by the float32 reference's own error; the backwards get
    the float64 forward's z and statistics rounded to float32, so that they differ by their arithmetic only.
    ż is compared as k·ẏ with each run's own mask k (a near-zero y may round to the other side in float32)."""
    inp = Inputs(case, "task")
    ref64 = run_all("torch", inp, slope)
    stats = (ref64["t_mean"], ref64["t_r"], ref64["a"], ref64["dmean"])
    run32 = {
        b: run_all(b, inp, slope, torch.float32, z=ref64["z"], stats=stats, layout=lay)
        for b, lay in (("cpp", layout), ("torch", "nchw"))
    }
    assert_layout(run32["cpp"], layout, case)
    yd64 = run_all("torch", inp, 1.0)["zd"]  # ẏ: the tangent before the mask
    for name in ref64:
        if name == "zd":
            k = {b: torch.where(run32[b]["t_z"] > 0, 1.0, float(torch.tensor(slope).float())) for b in run32}
            bounded(run32["cpp"]["zd"].double() / k["cpp"], run32["torch"]["zd"].double() / k["torch"], yd64, name)
            continue
        bounded(run32["cpp"][name], run32["torch"][name], ref64[name], name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("slope", SLOPES)
def test_forward_and_value_tangent_forward_agree_bit_for_bit(slope, dtype, layout):
    """The Hessian-vector product pass recomputes a step's forward with the value-and-tangent op: z, the
    mean and r must be the forward's bit for bit (else an activation decision at a near-tie differs)."""
    inp = Inputs((3, 75, 3, 441), "task")
    c = lambda t: to_layout(Inputs.cast(t, dtype), layout)  # noqa: E731
    x, w, b = (c(t) for t in (inp.x, inp.w, inp.b))
    z, mean, r = impl("train_fwd", "cpp")(x, w, b, EPS, slope)
    for xd, wd, bd in ((inp.xd, inp.wd, inp.bd), (None, inp.wd, inp.bd), (inp.xd, None, None), (None, None, None)):
        xd, wd, bd = (c(t) for t in (xd, wd, bd))
        tz, _, tmean, tr, _, _ = impl("value_tangent_fwd", "cpp")(x, xd, w, b, wd, bd, EPS, slope)
        assert torch.equal(tz, z) and torch.equal(tmean, mean) and torch.equal(tr, r)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_instruction_set_builds_give_the_same_bits(monkeypatch, layout):
    """The baseline and AVX2 builds of the kernels ($FASTMAML_CPU_ISA, read per call) do the same operations
    in the same order (channels-last: with a remainder of channels past the last whole vector, and one of
    several blocks of rows)."""
    cases = [((3, 5, 3, 63), 0.1, torch.float32), ((1, 75, 3, 441), 1.0, torch.float64)]
    if layout == "nhwc":
        cases += [((2, 75, 19, 441), 0.1, torch.float32), ((2, 75, 19, 441), 0.0, torch.float64)]
    for case, slope, dtype in cases:
        inp = Inputs(case, "task")
        runs = []
        for isa in ("auto", "baseline"):
            monkeypatch.setenv("FASTMAML_CPU_ISA", isa)
            runs.append(run_all("cpp", inp, slope, dtype, layout=layout))
        for name in runs[0]:
            assert torch.equal(runs[0][name], runs[1][name]), (case, name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_number_of_threads_changes_no_bit(layout):
    """The reductions run in a fixed order whatever the number of threads (channels-last: the blocks of rows
    of one task are added up in order; T = 1 spreads one task's blocks over the threads)."""
    threads = torch.get_num_threads()
    for case, dtype in (((1, 75, 16, 441), torch.float32), ((3, 75, 5, 441), torch.float64)):
        inp = Inputs(case, "task")
        runs = []
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                runs.append(run_all("cpp", inp, 0.1, dtype, layout=layout))
        finally:
            torch.set_num_threads(threads)
        for name in runs[0]:
            assert torch.equal(runs[0][name], runs[1][name]), (case, name)


@pytest.mark.parametrize("slope", [1.0, 0.1])
def test_mixed_layouts_give_the_matched_layouts_bits(slope):
    """The full-size inputs besides x (gz, ġz, z, ẋ) are brought into x's layout: any mix gives the result
    of matched layouts, in x's layout."""
    case = (3, 5, 16, 63)
    inp = Inputs(case, "task")
    for x_layout, other in (("nhwc", "nchw"), ("nchw", "nhwc")):
        matched = run_all("cpp", inp, slope, layout=x_layout)
        ref = run_all("torch", inp, slope)
        mixed_inp = Inputs(case, "task")
        for name in ("xd", "gz", "gzd"):
            setattr(mixed_inp, name, to_layout(getattr(inp, name), other))
        mixed_inp.x = to_layout(inp.x, x_layout)
        mixed = run_all("cpp", mixed_inp, slope, z=to_layout(matched["z"], other), layout="nchw")
        assert_layout(mixed, x_layout, case)
        for name in matched:
            assert torch.equal(mixed[name], matched[name]), (x_layout, name)
            assert err(mixed[name], ref[name]) < 1e-12, (x_layout, name)


@pytest.mark.parametrize("slope", SLOPES)
def test_reference_takes_channels_last(slope):
    """The torch references on channels-last activations give the contiguous ones' results."""
    for case in ((3, 5, 16, 63), (1, 75, 3, 441)):
        inp = Inputs(case, "task")
        want = run_all("torch", inp, slope)
        got = run_all("torch", inp, slope, layout="nhwc")
        for name in want:
            assert err(got[name], want[name]) < 1e-12, (case, name)


def test_non_finite_values_stay_in_their_plane():
    inp = Inputs((2, 5, 3, 25), "task")
    x = inp.x.clone()
    x[1, 2, 0, 7] = float("nan")
    z, mean, r = impl("train_fwd", "cpp")(x, inp.w, inp.b, EPS, 0.1)
    assert torch.isnan(mean[1, 0]) and torch.isnan(z[1, :, 0]).all()
    assert torch.isfinite(z[0]).all() and torch.isfinite(z[1, :, 1:]).all()


def test_calls_the_kernels_do_not_take_run_the_reference():
    """`supports` sends other dtypes, inputs that record a graph and negative slopes to the reference."""
    inp = Inputs((3, 5, 3, 25), "task")
    table = registry.resolve("cpp", CPU)
    fwd = registry.spec("batchnorm_act_train_fwd", "cpp").supports
    assert fwd(inp.x, inp.w, inp.b, EPS, 0.1) is None
    assert fwd(inp.x.half(), None, None, EPS, 0.1) == "dtype torch.float16"
    assert "slope" in fwd(inp.x, inp.w, inp.b, EPS, -0.5)
    assert "[T, N, C, S]" in fwd(inp.x[0], None, None, EPS, 0.1)
    w = inp.w.clone().requires_grad_()
    assert "require grad" in fwd(inp.x, w, inp.b, EPS, 0.1)
    z, _, _ = table.batchnorm_act_train_fwd(inp.x, w, inp.b, EPS, 0.1)  # the reference: differentiable
    assert z.requires_grad
    x16 = inp.x.to(torch.bfloat16)
    got = table.batchnorm_act_train_fwd(x16, None, None, EPS, 0.1)
    want = registry.reference("batchnorm_act_train_fwd")(x16, None, None, EPS, 0.1)
    assert all(torch.equal(g, f) for g, f in zip(got, want))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_and_argument_errors(layout):
    """opcheck (the shape-only kernels give the real ones' shapes and layouts) and the argument errors."""
    inp = Inputs((3, 2, 3, 5), "task")
    x, w, b, xd, wd, bd = inp.x, inp.w.contiguous(), inp.b.contiguous(), inp.xd, inp.wd.contiguous(), inp.bd
    x, xd, inp.gz, inp.gzd = (to_layout(t, layout) for t in (x, xd, inp.gz, inp.gzd))
    lib = torch.ops.fastmaml
    torch.library.opcheck(lib.bn_act_fwd.default, (x, w, b, EPS, 0.1))
    z, mean, r = lib.bn_act_fwd(x, w, b, EPS, 0.1)
    for zz, need_x in ((z, True), (z, False), (None, True)):
        torch.library.opcheck(
            lib.bn_act_bwd.default, (inp.gz, zz, x, mean, r, w, 0.1 if zz is not None else 1.0, need_x)
        )
    for xxd in (xd, None):
        torch.library.opcheck(lib.bn_act_tangent_fwd.default, (x, xxd, w, b, wd, bd, EPS, 0.1))
    _, _, _, _, a, dmean = lib.bn_act_tangent_fwd(x, xd, w, b, wd, bd, EPS, 0.1)
    for xxd, need_x in ((xd, True), (None, False)):
        torch.library.opcheck(
            lib.bn_act_tangent_bwd.default, (inp.gz, inp.gzd, z, x, xxd, mean, r, a, dmean, w, wd, 0.1, need_x)
        )
    with pytest.raises(RuntimeError, match=r"w: expected per-task channel values \[3, 3\]"):
        lib.bn_act_fwd(x, w[:, :2], b, EPS, 0.1)
    with pytest.raises(RuntimeError, match="b: expected dtype Double"):
        lib.bn_act_fwd(x, w, b.float(), EPS, 0.1)
    with pytest.raises(RuntimeError, match=r"x: expected activations \[T, N, C, S\]"):
        lib.bn_act_fwd(x[0], w, b, EPS, 0.1)
    with pytest.raises(RuntimeError, match="slope: expected a finite slope >= 0"):
        lib.bn_act_fwd(x, w, b, EPS, -1.0)
    with pytest.raises(RuntimeError, match="z: the forward's output is needed"):
        lib.bn_act_bwd(inp.gz, None, x, mean, r, w, 0.1, True)
    with pytest.raises(RuntimeError, match="xd: expected the shape"):
        lib.bn_act_tangent_fwd(x, xd[:, :1], w, b, wd, bd, EPS, 0.1)
    with pytest.raises(RuntimeError, match="gzd: expected the shape"):
        lib.bn_act_tangent_bwd(inp.gz, inp.gzd[:1], z, x, xd, mean, r, a, dmean, w, wd, 0.1, True)
    for op in OPS:
        assert registry.spec(f"batchnorm_act_{op}", "cpp").devices == ("cpu",)


# ---------------------------------------------------------------- the rules, end to end


def spy(monkeypatch):
    """Counts the calls of the C++ ops (through the op table of backend "cpp")."""
    calls = []
    for name in ("bn_act_fwd", "bn_act_bwd", "bn_act_tangent_fwd", "bn_act_tangent_bwd"):
        real = getattr(torch.ops.fastmaml, name)

        def counted(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(torch.ops.fastmaml, name, counted, raising=False)
    return calls


def resnet_tasks(T=2, ways=3, shots=1, query=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ns, nq = ways * shots, ways * query
    sx = torch.randn(T, ns, 3, size, size, generator=g, dtype=torch.float64)
    qx = torch.randn(T, nq, 3, size, size, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, ns).clone()
    qy = torch.arange(ways).repeat_interleave(query).expand(T, nq).clone()
    return sx, sy, qx, qy


def grads(model, tasks, backend, **kw):
    model.zero_grad()
    fastmaml.meta_step(model, tasks, loss="cross_entropy", backend=backend, **kw)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
def test_resnet12_meta_gradient_cpp_against_torch_and_oracle(order, monkeypatch):
    """ResNet-12 (BatchNorm + LeakyReLU(0.1) and plain BatchNorm in every block) in float64: the meta-gradient
    with the C++ ops against the reference backend and the per-task autograd oracle."""
    torch.manual_seed(4)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    tasks = resnet_tasks()
    kw = dict(inner_lr=0.2, steps=2, order=order)
    calls = spy(monkeypatch)
    got = grads(model, tasks, "cpp", **kw)
    assert {"bn_act_fwd", "bn_act_bwd"} <= set(calls)
    if order != "first":
        assert {"bn_act_tangent_fwd", "bn_act_tangent_bwd"} <= set(calls)
    calls.clear()
    ref = grads(model, tasks, "torch", **kw)
    assert not calls  # the reference backend runs the unfused BatchNorm ops
    _, oracle, _ = autograd_meta_grad(model, tasks, loss_fn=F.cross_entropy, **kw)
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in sorted(g)])  # noqa: E731
    assert rel_err(flat(got), flat(ref)) < 1e-9
    assert_grads_close(got, oracle, 1e-9)


def test_resnet12_anil_cpp():
    """Only the head adapts: the body's BatchNorms run with shared weights and without tangents (ẋ, ẇ, ḃ
    None) and get the mixed second-order term."""
    torch.manual_seed(5)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    check_meta_step(
        model,
        resnet_tasks(seed=1),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.5,
        steps=2,
        inner_params=["classifier"],
        tol=1e-9,
        backend="cpp",
    )


def test_batchnorm1d_rules_cpp():
    """BatchNorm1d (S = 1) + LeakyReLU(0.2) fused, and a plain BatchNorm1d (the BatchNorm rule, slope 1)."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.LeakyReLU(0.2), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
    ).double()
    rules = compile_model(model).chain_rules()
    assert isinstance(rules[1], BatchNormLeakyReLURule) and type(rules[3]) is BatchNormRule
    g = torch.Generator().manual_seed(2)
    tasks = (
        torch.randn(3, 6, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (3, 6), generator=g),
        torch.randn(3, 9, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (3, 9), generator=g),
    )
    check_meta_step(
        model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.3, steps=2, tol=1e-9, backend="cpp"
    )
