"""The fused engine on models written as classes (traced with torch.fx into a graph of rules): each
against the per-task `create_graph` oracle in float64, every order, Meta-SGD rates, K = 0–3, the
BatchNorm modes, ANIL; fallbacks that name their cause."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.programs import FusedProgram, TorchFuncProgram, select_program

from class_models import (
    Concat,
    ConvClassNet,
    MiniImagenetCNN,
    OmniglotCNN,
    OmniglotFC,
    ReadsTwice,
    ResNet12,
    Squeezes,
    WideResNet,
)
from models import regression_tasks
from oracle import assert_grads_close, autograd_meta_grad, check_float32_error, check_meta_step

TOL = 1e-9
ORDERS = ["second", "checkpoint", "first"]


def tasks_for(shape, T=2, ways=5, shots=1, query=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ns, nq = ways * shots, ways * query
    sx = torch.randn(T, ns, *shape, generator=g, dtype=torch.float64)
    qx = torch.randn(T, nq, *shape, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, ns).clone()
    qy = torch.arange(ways).repeat_interleave(query).expand(T, nq).clone()
    return sx, sy, qx, qy


def on_fused(model, loss="cross_entropy", inner_params=None):
    program = select_program(model, ParamLayout(model, inner_params), resolve_loss(loss))
    assert isinstance(program, FusedProgram), fastmaml.explain(model, loss)
    return program


def check_ce(model, tasks, **kwargs):
    on_fused(model, inner_params=kwargs.get("inner_params"))
    return check_meta_step(model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, tol=TOL, **kwargs)


def check_falls_back(model, reason, loss="cross_entropy"):
    """`explain` says `model` takes the torch.func program, for a reason that contains `reason`."""
    e = fastmaml.explain(model, loss)
    assert e.program == "torch.func" and reason in e.reason, e


def check_meta_sgd_rates(model, tasks, rate=0.1, steps=2):
    """`check_ce` with a learnable Meta-SGD rate per parameter entry."""
    rates = {n: torch.full_like(p, rate).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks, inner_lr=rates, steps=steps, lr_leaves=list(rates.values()))


def check_variants(model, tasks, tasks32, inner_params=None, anil_tasks=None):
    """Meta-SGD rates on `tasks`, adaptation of `inner_params` only (ANIL: the rest shared) on `anil_tasks`
    (default `tasks`), and the float32 error on `tasks32` within twice the autograd loop's."""
    check_meta_sgd_rates(model, tasks)
    if inner_params is not None:
        check_ce(model, tasks if anil_tasks is None else anil_tasks, inner_lr=0.3, steps=2, inner_params=inner_params)
    check_float32_error(model, tasks32, inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy)


def check_orders_steps(model, tasks, order, inner_lr=0.3):
    """`check_ce` for `order` at K = 0, 1 and 3 (second order) or K = 2 (the others)."""
    for steps in (0, 1, 3) if order == "second" else (2,):
        check_ce(model, tasks, inner_lr=inner_lr, steps=steps, order=order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_omniglot_cnn(order, steps):
    torch.manual_seed(0)
    check_ce(
        OmniglotCNN(hidden_size=3, layers=3).double(), tasks_for((1, 28, 28)), inner_lr=0.3, steps=steps, order=order
    )


@pytest.mark.parametrize("order", ORDERS)
def test_miniimagenet_cnn(order):
    torch.manual_seed(1)
    check_ce(
        MiniImagenetCNN(hidden_size=3, side=1).double(), tasks_for((3, 18, 18)), inner_lr=0.3, steps=2, order=order
    )


@pytest.mark.parametrize("order", ORDERS)
def test_omniglot_fc(order):
    torch.manual_seed(2)
    check_ce(OmniglotFC().double(), tasks_for((1, 4, 4), shots=2), inner_lr=0.3, steps=2, order=order)


@pytest.mark.parametrize("order", ORDERS + ["implicit"])
def test_class_conv_net_with_view(order):
    torch.manual_seed(3)
    model = ConvClassNet(hidden=3, side=2).double()
    program = on_fused(model)
    assert [n.rule.kind for n in program.nodes].count("reshape") == 1
    kwargs = dict(implicit_lambda=2.0, cg_steps=4) if order == "implicit" else {}
    if order == "implicit":
        fastmaml.meta_step(
            model, tasks_for((1, 8, 8)), inner_lr=0.1, steps=2, order=order, loss="cross_entropy", **kwargs
        )  # runs; its oracle is tests/test_implicit.py's
        return
    check_ce(model, tasks_for((1, 8, 8)), inner_lr=0.3, steps=2, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_resnet12_fully_adapted(order):
    torch.manual_seed(4)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    program = on_fused(model)
    kinds = [n.rule.kind for n in program.nodes]
    assert "BatchNorm2d+LeakyReLU" in kinds and "add" in kinds
    check_ce(model, tasks_for((3, 16, 16), ways=3), inner_lr=0.2, steps=2, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_resnet12_anil(order):
    """Only the head adapts; the body gets the exact mixed second-order term."""
    torch.manual_seed(5)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    check_ce(model, tasks_for((3, 16, 16), ways=3), inner_lr=0.5, steps=3, order=order, inner_params=["classifier"])


@pytest.mark.parametrize("order", ORDERS)
def test_wide_resnet(order):
    """Pre-activation blocks with an identity shortcut (an empty Sequential) and a strided 1×1 one, two blocks
    a stage (WRN-16), fully adapted and ANIL."""
    torch.manual_seed(15)
    model = WideResNet(depth=16).double()
    program = on_fused(model)
    assert [n.rule.kind for n in program.nodes].count("add") == 6
    tasks = tasks_for((3, 16, 16), ways=3)
    check_ce(model, tasks, inner_lr=0.2, steps=2, order=order)
    check_ce(model, tasks, inner_lr=0.5, steps=2, order=order, inner_params=["classifier"])


def test_resnet12_counter_is_restored_and_does_not_recompile():
    """learn2learn's blocks count their calls in forward: tracing restores the counter, and the program
    cache does not key on it (one program, reused)."""
    model = ResNet12(widths=(3, 3, 3, 3)).double()
    first = on_fused(model)
    assert all(b.num_batches_tracked == 0 for b in model.features)
    fastmaml.meta_step(model, tasks_for((3, 16, 16), ways=3), loss="cross_entropy")
    assert on_fused(model) is first


@pytest.mark.parametrize("order", ORDERS)
def test_reads_a_value_twice(order):
    torch.manual_seed(6)
    model = ReadsTwice().double()
    on_fused(model, "mse")
    check_meta_step(
        model,
        regression_tasks(din=3, dout=2),
        loss="mse",
        loss_fn=F.mse_loss,
        inner_lr=0.2,
        steps=2,
        order=order,
        tol=TOL,
    )


@pytest.mark.parametrize("order", ORDERS)
def test_concatenation_and_flatten(order):
    torch.manual_seed(7)
    model = Concat().double()
    check_ce(model, tasks_for((1, 8, 8), ways=3), inner_lr=0.3, steps=2, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_squeeze_unsqueeze_and_sum(order):
    torch.manual_seed(7)
    check_ce(Squeezes().double(), tasks_for((1, 4, 4), ways=3), inner_lr=0.3, steps=2, order=order)


class SqueezesAll(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x).squeeze()  # would drop the examples' dim of a one-example task


class SumsAll(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) * self.lin(x).sum()  # mixes the examples


class PoolsBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(F.avg_pool2d(self.conv(x), x.shape[-1]).flatten(1))  # a kernel size from x's size


def test_squeeze_without_dims_sums_over_everything_and_sizes_from_shapes_fall_back_and_say_why():
    e = fastmaml.explain(SqueezesAll())
    assert e.program == "torch.func" and "squeeze without dims" in e.reason
    e = fastmaml.explain(SumsAll())
    assert e.program == "torch.func" and "a sum over all dimensions" in e.reason
    e = fastmaml.explain(PoolsBySize(), "cross_entropy")
    assert e.program == "torch.func" and "avg_pool2d's kernel_size is computed from tensor sizes" in e.reason
    torch.manual_seed(3)
    check_meta_step(
        PoolsBySize().double(),
        tasks_for((1, 4, 4), ways=3),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.3,
        steps=1,
        tol=TOL,
    )


class MeansExamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) - self.lin(x).mean(-2, keepdim=True)  # dim -2 of [N, 2]: the mean over the batch


def test_a_mean_over_the_batch_is_one_per_task():
    """The model centers its outputs over its batch; per task, the engine does the same over the task's
    examples."""
    torch.manual_seed(4)
    model = MeansExamples().double()
    on_fused(model, "mse")
    check_meta_step(
        model, regression_tasks(din=3, dout=2), loss="mse", loss_fn=F.mse_loss, inner_lr=0.2, steps=2, tol=TOL
    )


def test_meta_sgd_rates_and_learned_scalar():
    torch.manual_seed(8)
    model = ResNet12(widths=(3, 3, 3, 3)).double()
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((3, 16, 16), ways=3), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))
    lr = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.2, 0.1)]
    check_ce(ConvClassNet(hidden=3, side=2).double(), tasks_for((1, 8, 8)), inner_lr=lr, steps=2, lr_leaves=lr)


@pytest.mark.parametrize("mode", ["frozen", "per_step"])
def test_batchnorm_modes_on_a_class_model(mode):
    """Fixed statistics from the layers (frozen) or from per-step buffers (per_step, eval): BatchNorm is an
    affine map, which the oracle reproduces in eval mode."""
    torch.manual_seed(9)
    model = ConvClassNet(hidden=3, side=2).double()
    if mode == "per_step":
        fastmaml.add_per_step_stats(model, steps=2)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            if mode == "per_step":
                m.step_running_mean.copy_(m.running_mean)
                m.step_running_var.copy_(m.running_var)
    model.eval()
    on_fused(model)
    tasks = tasks_for((1, 8, 8))
    fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, loss="cross_entropy", batch_norm=mode)
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.3, steps=2, loss_fn=F.cross_entropy, train=False)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref, TOL)


def test_functional_layers_with_own_parameters():
    """F.linear / F.conv2d / F.batch_norm on the model's own parameters, and a buffer as a constant."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(3, 1, 3, 3) * 0.5)
            self.b1 = nn.Parameter(torch.randn(3) * 0.1)
            self.gamma = nn.Parameter(torch.rand(3) + 0.5)
            self.beta = nn.Parameter(torch.randn(3) * 0.1)
            self.w2 = nn.Parameter(torch.randn(4, 3 * 4 * 4) * 0.2)
            self.register_buffer("shift", torch.randn(3, 1, 1))

        def forward(self, x):
            x = F.conv2d(x, self.w1, self.b1, padding=1)
            x = F.batch_norm(x, None, None, self.gamma, self.beta, training=True)
            x = F.leaky_relu(x - self.shift, 0.2)
            x = F.max_pool2d(x, 2)
            return F.linear(x.reshape(x.shape[0], -1), self.w2)

    torch.manual_seed(10)
    check_ce(Functional().double(), tasks_for((1, 8, 8), ways=4), inner_lr=0.3, steps=2)


def test_tied_parameters():
    """A bias shared by two layers, a weight shared by two nn.Linear, one layer called twice, a decoder
    using the encoder's weight transposed (a derived tensor): the gradient sums every use (fused engine)."""
    torch.manual_seed(11)
    a, c = nn.Linear(3, 4), nn.Linear(4, 4)
    c.bias = a.bias
    tied_bias = nn.Sequential(a, nn.Tanh(), c).double()
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    tied_weight = nn.Sequential(first, nn.Tanh(), second).double()
    lin = nn.Linear(3, 3)
    called_twice = nn.Sequential(lin, nn.Tanh(), lin).double()

    class TransposedDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 5)
            self.dec_bias = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_bias)

    cases = (
        (tied_bias, 4, FusedProgram),
        (tied_weight, 3, FusedProgram),
        (called_twice, 3, FusedProgram),
        (TransposedDecoder().double(), 3, FusedProgram),
    )
    for model, dout, kind in cases:
        assert isinstance(select_program(model, ParamLayout(model), resolve_loss("mse")), kind)
        for order in ORDERS:
            check_meta_step(
                model,
                regression_tasks(din=3, dout=dout),
                loss="mse",
                loss_fn=F.mse_loss,
                inner_lr=0.2,
                steps=2,
                order=order,
                tol=TOL,
            )


class Angles(nn.Module):
    """atan2 of two values: no rule (a call of one value would run through torch.func in the fused program)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return torch.atan2(h, h + 1.0)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.lin(x)
        return -self.lin(x)


def test_unsupported_op_and_untraceable_model_fall_back_and_are_named():
    e = fastmaml.explain(Angles())
    assert e.program == "torch.func" and "atan2" in e.kind and "no rule" in e.reason
    assert "test_graph_models.py" in e.source and "torch.atan2" in e.source
    e = fastmaml.explain(Branches())
    assert e.program == "torch.func" and "tracing forward" in e.reason
    assert "test_graph_models.py" in e.source and "x.sum() > 0" in e.source
    for model in (Angles().double(), Branches().double()):
        assert isinstance(select_program(model, ParamLayout(model), resolve_loss("mse")), TorchFuncProgram)
        check_meta_step(
            model, regression_tasks(din=3, dout=3), loss="mse", loss_fn=F.mse_loss, inner_lr=0.2, steps=1, tol=TOL
        )


def test_explain_prints_the_graph():
    text = str(fastmaml.explain(ResNet12(widths=(3, 3, 3, 3)), "cross_entropy"))
    assert text.startswith("fused engine:")
    assert "features.0.bn1+features.0.relu (BatchNorm2d+LeakyReLU)" in text
    assert "(add)" in text and "classifier (Linear)" in text


def test_class_conv_net_matches_its_sequential_twin():
    """The class-written conv net and the same layers as an nn.Sequential compile to the same rules and give
    bitwise the same meta-gradient."""
    torch.manual_seed(13)
    model = ConvClassNet(hidden=4, side=2).double()
    seq = nn.Sequential(*model.features, nn.Flatten(), model.classifier)
    tasks = tasks_for((1, 8, 8))
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    seq_kinds = [n.rule.kind for n in on_fused(seq).nodes]
    assert [k for k in kinds if k != "reshape"] == [k for k in seq_kinds if k != "Flatten"]
    fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, loss="cross_entropy")
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fastmaml.meta_step(seq, tasks, inner_lr=0.3, steps=2, loss="cross_entropy")
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, seq.parameters()))


@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_relu_before_max_pool_pools_first_with_ties_and_zero_maxima(pool):
    """ReLU + MaxPool2d is one rule that pools first (`ReLUMaxPool2dRule`): on integer maps full of ties, zero
    maxima and all-negative windows (integer 1×1 weights keep them exact at θ), with overlapping and padded
    windows, it matches autograd through the unfused pair."""
    k, s, p = pool

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Conv2d(2, 3, 1)
            self.head = nn.Linear(3 * 9, 3)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.mix(x)), k, s, p)
            return self.head(F.adaptive_avg_pool2d(x, 3).flatten(1))

    torch.manual_seed(11)
    model = Net().double()
    with torch.no_grad():
        model.mix.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0], [-1.0, 0.0]]).view(3, 2, 1, 1))
        model.mix.bias.zero_()
    assert "relu+max_pool2d" in [n.rule.kind for n in on_fused(model).nodes]
    g = torch.Generator().manual_seed(0)
    sx, sy, qx, qy = tasks_for((2, 6, 6), ways=3)
    sx, qx = (torch.randint(-2, 3, t.shape, generator=g).double() for t in (sx, qx))
    for order in ORDERS:
        check_ce(model, (sx, sy, qx, qy), inner_lr=0.3, steps=1, order=order)


class CosineClassifier(nn.Module):
    """A cosine classifier (Baseline++'s head): unit-norm features against unit-norm class weights, scaled."""

    def __init__(self, ways=3, eps=1e-12):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.weight = nn.Parameter(torch.randn(ways, 3 * 4 * 4))
        self.eps = eps

    def forward(self, x):
        f = F.normalize(self.features(x).flatten(1), dim=1, eps=self.eps)
        return 10.0 * F.linear(f, F.normalize(self.weight, dim=-1, eps=self.eps))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("inner_params", [None, ["weight"], ["features"]])
def test_cosine_classifier(order, inner_params):
    """F.normalize of the features and of the head's weight rows; the head adapted, shared, or the only part
    adapted (ANIL)."""
    torch.manual_seed(12)
    model = CosineClassifier().double()
    kinds = [n.rule.kind for n in on_fused(model, inner_params=inner_params).nodes]
    assert "normalize" in kinds and "linear(normalized weight)" in kinds
    check_ce(model, tasks_for((1, 8, 8), ways=3), inner_lr=0.5, steps=2, order=order, inner_params=inner_params)


def test_normalize_below_eps_over_tokens_and_with_meta_sgd_rates():
    """Rows whose norm is below eps (divided by eps: a linear map), a normalization over the last dim of
    tokens `[N, L, D]`, per-parameter rates."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(2, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = F.normalize(torch.tanh(self.embed(x)), dim=-1, eps=1.5)  # ‖h‖ ranges across 1.5
            return self.head(F.normalize(h, dim=2).mean(1))

    torch.manual_seed(13)
    model = Tokens().double()
    check_ce(model, tasks_for((3, 2), ways=3), inner_lr=0.3, steps=2)
    rates = {n: torch.full_like(p, 0.2).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((3, 2), ways=3), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))
    check_ce(CosineClassifier(eps=4.0).double(), tasks_for((1, 8, 8), ways=3), inner_lr=0.5, steps=2)


def test_global_max_pool_written_functionally():
    class GlobalMax(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(F.adaptive_max_pool2d(F.elu(self.conv(x)), 1).flatten(1))

    torch.manual_seed(14)
    for order in ORDERS:
        check_ce(GlobalMax().double(), tasks_for((1, 7, 6), ways=3), inner_lr=0.3, steps=2, order=order)


def test_normalize_that_does_not_compile_falls_back_and_says_why():
    class L1(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return F.normalize(self.fc(x), p=1.0)

    class OverExamples(L1):
        def forward(self, x):
            return F.normalize(self.fc(x), dim=0)

    e = fastmaml.explain(L1())
    assert e.program == "torch.func" and "p=2" in e.reason, e
    e = fastmaml.explain(OverExamples())
    assert e.program == "torch.func" and "examples' dim" in e.reason, e


class LearnedScales(nn.Module):
    """Parameters in a model's arithmetic: a per-channel scale and a bias on conv maps, a positional embedding
    on tokens, a learned temperature on a cosine classifier's logits."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(2, 1, 1) + 0.5)
        self.beta = nn.Parameter(torch.randn(2, 1, 1) * 0.1)
        self.pos = nn.Parameter(torch.randn(4, 8) * 0.1)  # 4 tokens of 8 features
        self.lead = nn.Parameter(torch.randn(1, 4, 8) * 0.1)
        self.weight = nn.Parameter(torch.randn(ways, 8))
        self.temperature = nn.Parameter(torch.tensor(5.0))

    def forward(self, x):
        h = torch.tanh(self.conv(x) * self.gamma - self.beta)  # [N, 2, 4, 4]
        tokens = self.pos + h.view(h.size(0), 4, 8)
        tokens = torch.add(tokens, self.lead, alpha=0.5)
        f = F.normalize(tokens.mean(1), dim=-1)
        return self.temperature * F.linear(f, F.normalize(self.weight, dim=1))


@pytest.mark.parametrize("order", ORDERS)
def test_parameters_in_arithmetic(order):
    torch.manual_seed(15)
    model = LearnedScales().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds.count("mul") == 2 and kinds.count("add") == 2 and kinds.count("sub") == 1, kinds
    check_ce(model, tasks_for((1, 4, 4), ways=3), inner_lr=0.3, steps=2, order=order)
    check_ce(model, tasks_for((1, 4, 4), ways=3), inner_lr=0.3, steps=2, order=order, inner_params=["temperature"])


def test_parameters_in_arithmetic_with_meta_sgd_rates_and_a_parameter_over_the_examples():
    torch.manual_seed(16)
    model = LearnedScales().double()
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((1, 4, 4), ways=3), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))

    class PerExample(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.offsets = nn.Linear(3, 3), nn.Parameter(torch.zeros(3, 3))

        def forward(self, x):
            return self.fc(x) + self.offsets  # [N, 3] + [3, 3]: one offset per example (N = 3)

    with pytest.raises(ValueError, match=r"add.*spans the examples' dim"):
        fastmaml.meta_step(
            PerExample().double(), tasks_for((3,), ways=3, shots=1, query=1), inner_lr=0.1, loss="cross_entropy"
        )


class Mixer(nn.Module):
    """An MLP-Mixer-like token model: token mixing through a transpose, channel mixing with SiLU, a permute,
    a slice of every token's first features, the first token as the summary (`h[:, 0]`), Softplus."""

    def __init__(self, tokens=3, dim=4, ways=3):
        super().__init__()
        self.embed = nn.Linear(2, dim)
        self.token_mix = nn.Linear(tokens, tokens)
        self.channel_mix = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim // 2 + dim, ways)
        self.soft = nn.Softplus(beta=2.0, threshold=1.0)  # ‖βx‖ crosses the threshold: both pieces

    def forward(self, x):
        h = self.embed(x)  # [N, L, D]
        h = h + self.token_mix(h.transpose(1, 2)).transpose(-1, -2)
        h = h + self.channel_mix(h)
        p = F.silu(h.permute(0, 2, 1)).permute(0, 2, 1)
        first = p[..., :2].sum(1)  # [N, D/2]
        return self.head(torch.cat([first, self.soft(h[:, 0])], dim=1))


@pytest.mark.parametrize("order", ORDERS)
def test_token_mixing_model(order):
    torch.manual_seed(17)
    model = Mixer().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert {"transpose", "permute", "getitem", "silu", "SiLU", "Softplus"} <= set(kinds), kinds
    check_ce(model, tasks_for((3, 2), ways=3), inner_lr=0.4, steps=2, order=order)
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((3, 2), ways=3), inner_lr=rates, steps=1, order=order, lr_leaves=list(rates.values()))


def test_reorderings_that_move_the_examples_fall_back_and_say_why():
    class Moves(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.fc, self.how = nn.Linear(2, 2), how

        def forward(self, x):
            h = self.fc(x)
            return self.fc(
                {"t": lambda: h.transpose(0, 1), "p": lambda: h.permute(1, 0, 2), "i": lambda: h[0]}[self.how]()
            )

    for how, words in (
        ("t", "examples' dim 0 stays first"),
        ("p", "moves the examples' dim"),
        ("i", "keep every example"),
    ):
        e = fastmaml.explain(Moves(how))
        assert e.program == "torch.func" and words in e.reason, (how, e)

    class PicksAnExample(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)[..., 0, :]  # x [N, 2]: `...` spans nothing, 0 picks an example

    tasks = tuple(t.double() if t.is_floating_point() else t for t in tasks_for((2,), ways=2))
    with pytest.raises(ValueError, match=r"getitem.*reaches the examples' dim 0"):
        fastmaml.meta_step(PicksAnExample().double(), tasks, inner_lr=0.1, loss="cross_entropy")


class MatmulHead(nn.Module):
    """Weights applied as `x @ W` (W `[in, out]`, a parameter) and through `torch.matmul` with a buffer."""

    def __init__(self, ways=3):
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.W = nn.Parameter(torch.randn(4, 5) * 0.5)
        self.register_buffer("proj", torch.randn(5, 4) * 0.5)
        self.out = nn.Parameter(torch.randn(4, ways) * 0.5)

    def forward(self, x):
        h = torch.tanh(self.embed(x) @ self.W)
        return torch.matmul(torch.matmul(h, self.proj).mean(1), self.out)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("inner_params", [None, ["out"], ["embed"]])
def test_matmul_with_parameters(order, inner_params):
    torch.manual_seed(18)
    model = MatmulHead().double()
    assert [n.rule.kind for n in on_fused(model, inner_params=inner_params).nodes].count("matmul") == 3
    check_ce(model, tasks_for((3, 2), ways=3), inner_lr=0.4, steps=2, order=order, inner_params=inner_params)


class Sequence1d(nn.Module):
    """A 1-d conv net on sequences `[N, C, L]`: Conv1d + BatchNorm1d + ReLU, a strided dilated Conv1d, and
    `F.conv1d` with the model's own weight and padding="same"."""

    def __init__(self, ways=3):
        super().__init__()
        self.c1, self.bn = nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3)
        self.c2 = nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2)
        self.w3 = nn.Parameter(torch.randn(4, 4, 5) * 0.3)
        self.head = nn.Linear(4, ways)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = torch.tanh(F.conv1d(torch.tanh(self.c2(h)), self.w3, padding="same"))
        return self.head(h.mean(2))


@pytest.mark.parametrize("order", ORDERS)
def test_conv1d_sequence_model(order):
    torch.manual_seed(19)
    model = Sequence1d().double()
    assert [n.rule.kind for n in on_fused(model).nodes].count("Conv1d") == 2
    check_ce(model, tasks_for((2, 9), ways=3), inner_lr=0.3, steps=2, order=order)
    check_ce(model, tasks_for((2, 9), ways=3), inner_lr=0.3, steps=2, order=order, inner_params=["head", "w3"])
    check_ce(model, tasks_for((2, 130), ways=3), inner_lr=0.3, steps=1, order=order)  # long: the per-task loop


class Attention(nn.Module):
    """Products of values: squeeze-and-excitation on conv maps, a gate, `x * sigmoid(x)` (one value read twice
    by a product), self-attention over the map's positions (softmax of q kᵀ, then @ v), attention pooling with
    a learned query (`h @ q`), a log-softmax inside."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.se1, self.se2 = nn.Linear(4, 2), nn.Linear(2, 4)
        self.fq, self.fk, self.fv = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.gate = nn.Linear(4, 4)
        self.query = nn.Parameter(torch.randn(4, 1) * 0.5)
        self.head = nn.Linear(4, ways)

    def forward(self, x):
        h = self.conv(x)  # [N, 4, H, W]
        s = torch.sigmoid(self.se2(F.relu(self.se1(h.mean((2, 3))))))
        h = h * s.view(s.size(0), 4, 1, 1)
        t = h.flatten(2).transpose(1, 2)  # [N, HW, 4]
        t = t * torch.sigmoid(t)
        att = torch.softmax(self.fq(t) @ self.fk(t).transpose(-2, -1) * 0.5, dim=-1)
        t = t + att @ self.fv(t)
        t = t * torch.sigmoid(self.gate(t))
        weights = F.softmax(t @ self.query, dim=1)  # [N, HW, 1] over the positions
        pooled = (weights * t).sum(1)
        return self.head(F.log_softmax(pooled, dim=-1))


@pytest.mark.parametrize("order", ORDERS)
def test_products_softmax_and_attention(order):
    torch.manual_seed(20)
    model = Attention().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds.count("mul") >= 4 and kinds.count("matmul") == 3 and "softmax" in kinds and "log_softmax" in kinds
    check_ce(model, tasks_for((1, 3, 3), ways=3), inner_lr=0.5, steps=2, order=order)
    rates = {n: torch.full_like(p, 0.2).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((1, 3, 3), ways=3), inner_lr=rates, steps=1, order=order, lr_leaves=list(rates.values()))


def test_an_in_place_product_of_a_value_read_again_is_refused():
    class Overwrites(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.g = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            h = self.fc(x)
            kept = h
            h.mul_(torch.sigmoid(self.g(x)))  # overwrites `kept` too
            return kept + h

    e = fastmaml.explain(Overwrites())
    assert e.program == "torch.func" and "in-place" in e.reason, e

    class Augmented(Overwrites):
        """`h *= g` where h is also kept: fx's own Proxy traced it as `h = h * g` (the graph read kept unchanged)."""

        def forward(self, x):
            h = self.fc(x)
            kept = h
            h *= torch.sigmoid(self.g(x))
            return kept + h

    e = fastmaml.explain(Augmented())
    assert e.program == "torch.func" and "in-place" in e.reason and "h *= torch.sigmoid" in e.source, e
    check_meta_step(Augmented().double(), regression_tasks(din=2, dout=2), loss="mse", loss_fn=F.mse_loss, inner_lr=0.2)

    class Accumulates(Overwrites):
        """`out += identity` and `n += 1` on a size, nothing else holding `out`: compiles."""

        def forward(self, x):
            identity = self.fc(x)
            out = self.g(identity)
            out += identity
            n = x.size(1)
            n -= 1
            return out.view(x.size(0), n + 1)

    assert [n.rule.kind for n in on_fused(Accumulates(), loss="mse").nodes] == ["Linear", "Linear", "add", "reshape"]
    check_meta_step(
        Accumulates().double(), regression_tasks(din=2, dout=2), loss="mse", loss_fn=F.mse_loss, inner_lr=0.2
    )

    class ResidualAsStatement(nn.Module):
        """`out.add_(identity)` as a statement: its result unused, the change seen through `out` (fx records
        the write as a node nothing reads; dropping it would lose the residual)."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            out = self.fc(x)
            out.add_(x)
            return torch.relu(out)

    e = fastmaml.explain(ResidualAsStatement())
    assert e.program == "torch.func" and "in-place" in e.reason and "out.add_(x)" in e.source, e
    check_meta_step(
        ResidualAsStatement().double(), regression_tasks(din=2, dout=2), loss="mse", loss_fn=F.mse_loss, inner_lr=0.2
    )


@pytest.mark.parametrize("order", ORDERS)
def test_piecewise_activations_written_functionally_on_every_piece(order):
    """F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.softplus on pre-activations spread over
    ±8, so that every piece (and Hardswish's curved middle) is reached. PyTorch has no double backward for
    hardsigmoid, so the oracle runs a twin that writes it relu6(x + 3) / 6."""

    class Pieces(nn.Module):
        def __init__(self, hardsigmoid=F.hardsigmoid):
            super().__init__()
            self.fc, self.out = nn.Linear(3, 6), nn.Linear(36, 3)
            self.hardsigmoid = hardsigmoid

        def forward(self, x):
            h = 8.0 * torch.tanh(self.fc(x))
            acts = (F.relu6(h), F.hardtanh(h, -2.0, 3.0), F.hardswish(h), self.hardsigmoid(h), F.silu(h), F.softplus(h))
            return self.out(torch.cat(acts, dim=1))

    torch.manual_seed(21)
    model = Pieces().double()
    twin = Pieces(lambda h: F.relu6(h + 3.0) / 6.0).double()
    twin.load_state_dict(model.state_dict())
    assert {"relu6", "hardtanh", "hardswish", "hardsigmoid", "silu", "softplus"} <= {
        n.rule.kind for n in on_fused(model).nodes
    }
    tasks = tasks_for((3,), ways=3, query=4)
    model.zero_grad()
    fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, order=order, loss="cross_entropy")
    _, ref, _ = autograd_meta_grad(twin, tasks, inner_lr=0.3, steps=2, order=order, loss_fn=F.cross_entropy)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref, TOL)
    layers = nn.Sequential(nn.Linear(3, 3), nn.Hardsigmoid(), nn.ReLU6(), nn.Hardtanh(), nn.Hardswish(), nn.Softplus())
    assert [n.rule.kind for n in on_fused(layers, loss="mse").nodes][1:] == [
        "Hardsigmoid",
        "ReLU6",
        "Hardtanh",
        "Hardswish",
        "Softplus",
    ]


class Gated(nn.Module):
    """Gated linear units: `a, b = h.chunk(2, -1)` with a sigmoid gate, `F.glu`, the parts of `split` with a
    list of sizes and with a size (the last part shorter), an uneven chunk (5 into 3 + 2)."""

    def __init__(self, ways=3):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 8), nn.Linear(4, 10), nn.Linear(5, 5)
        self.head = nn.Linear(4 + 3 + 2 + 2 + 3, ways)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        h = a * torch.sigmoid(b)  # [N, 4]
        g = F.glu(self.fc2(h), dim=1)  # [N, 5]
        first, rest = torch.split(g, [2, 3], dim=1)
        tail = self.fc3(g).split(3, dim=-1)[1]  # 5 -> 3 + 2: the second part has 2
        c0, c1 = torch.tanh(g).chunk(2, 1)  # 5 -> 3 + 2
        return self.head(torch.cat([h, rest, first, tail, c0], dim=1) + 0.0 * c1.sum(1, keepdim=True))


@pytest.mark.parametrize("order", ORDERS)
def test_chunks_splits_and_glu(order):
    torch.manual_seed(22)
    model = Gated().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds.count("chunk") == 4 and kinds.count("split") == 3 and kinds.count("glu") == 2, kinds
    check_ce(model, tasks_for((3,), ways=3, query=3), inner_lr=0.4, steps=2, order=order)


def test_a_chunk_that_is_not_there_or_along_the_examples_says_so():
    class Missing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(x).chunk(4, dim=1)[3]  # 3 features cut in chunks of 1: there are 3 parts

    tasks = tuple(t.double() if t.is_floating_point() else t for t in tasks_for((2,), ways=2))
    with pytest.raises(ValueError, match=r"part 3 of chunk along dim 1 does not exist"):
        fastmaml.meta_step(Missing().double(), tasks, inner_lr=0.1, loss="cross_entropy")

    class AlongExamples(Missing):
        def forward(self, x):
            return self.fc(x).chunk(2, dim=0)[0]

    e = fastmaml.explain(AlongExamples())
    assert e.program == "torch.func" and "the examples' dim" in e.reason, e


class Elementwise(nn.Module):
    """Elementwise math on positive and signed pre-activations: a distance-like `((a - b) ** 2).sum(-1)`,
    exp, log, sqrt, rsqrt, reciprocal, a fractional power, square, abs, sin, cos."""

    def __init__(self, ways=3):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(3, 4), nn.Linear(3, 4)
        self.head = nn.Linear(4 * 10 + 1, ways)

    def forward(self, x):
        s = self.fc(x)
        p = F.softplus(s) + 0.5  # positive
        dist = ((s - self.fc2(x)) ** 2).sum(-1, keepdim=True)
        parts = [
            torch.exp(-p),
            torch.log(p),
            p.sqrt(),
            torch.rsqrt(p),
            torch.reciprocal(p),
            p.pow(1.5),
            torch.square(s),
            s.abs(),
            torch.sin(s),
            s.cos(),
        ]
        return self.head(torch.cat(parts + [dist], dim=1))


@pytest.mark.parametrize("order", ORDERS)
def test_elementwise_math(order):
    torch.manual_seed(23)
    model = Elementwise().double()
    kinds = {n.rule.kind for n in on_fused(model).nodes}
    assert {"exp", "log", "sqrt", "rsqrt", "reciprocal", "pow", "abs", "sin", "cos"} <= kinds, kinds
    check_ce(model, tasks_for((3,), ways=3, query=3), inner_lr=0.3, steps=2, order=order)


class Broadcasts(nn.Module):
    """torch.stack along a feature dim, expand of a size-1 dim (sizes computed from the input's size) and
    expand_as, repeat, F.pad with a constant and with a negative amount (a crop)."""

    def __init__(self, ways=3):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(3, 4), nn.Linear(3, 4)
        self.head = nn.Linear(2 * 4 + 4 * 3 + 4 * 2 + 3 * 4 + 3, ways)

    def forward(self, x):
        a, b = self.fc(x), self.fc2(x)
        stacked = torch.stack([a, torch.tanh(b)], dim=1).flatten(1)  # [N, 2·4]
        tokens = a.unsqueeze(1).expand(-1, 3, x.size(1) + 1)  # [N, 3, 4]
        scaled = b.unsqueeze(1).expand_as(tokens) * tokens  # [N, 3, 4]
        tiled = torch.sigmoid(b).repeat(1, 2)  # [N, 8]
        padded = F.pad(scaled, (0, 0, 1, 0), value=0.5)[:, :, :3]  # [N, 4, 3]
        cropped = F.pad(a, (0, -1))  # [N, 3]
        return self.head(torch.cat([stacked, tokens.flatten(1), tiled, padded.flatten(1), cropped], dim=1))


@pytest.mark.parametrize("order", ORDERS)
def test_stack_expand_repeat_pad(order):
    torch.manual_seed(24)
    model = Broadcasts().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds.count("expand") == 2 and {"stack", "repeat", "pad"} <= set(kinds), kinds
    check_ce(model, tasks_for((3,), ways=3, query=3), inner_lr=0.3, steps=2, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_clamp_and_bmm(order):
    class Clamps(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2, self.head = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(3 * 4 + 9, 3)

        def forward(self, x):  # x [N, 3, 2]
            h = 3.0 * torch.tanh(self.fc(x).mean(1))
            parts = [h.clamp(min=0.1), torch.clamp(h, -1.0, 2.0), h.clamp_max(0.5)]
            scores = torch.bmm(self.fc(x), self.fc2(x).transpose(1, 2)).flatten(1)  # [N, 9]
            return self.head(torch.cat(parts + [scores], dim=1))

    torch.manual_seed(25)
    model = Clamps().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds.count("clamp") == 3 and "matmul" in kinds, kinds
    check_ce(model, tasks_for((3, 2), ways=3, query=3), inner_lr=0.3, steps=2, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_maximum_over_a_dim(order):
    """A PointNet-like global feature: the maximum over points, as torch.amax, x.max(d)[0] and x.max(d).values
    (keepdim too); the indices do not compile."""

    class Points(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(2, 4), nn.Linear(12, 3)

        def forward(self, x):  # x [N, points, 2]
            h = torch.tanh(self.fc(x))
            a = torch.amax(h, dim=1)
            b = h.max(1)[0]
            c = torch.max(h.transpose(1, 2), dim=-1, keepdim=True).values.squeeze(-1)
            return self.head(torch.cat([a, b * b, c], dim=1))

    torch.manual_seed(26)
    model = Points().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds.count("max") == 2 and kinds.count("amax") == 1, kinds
    check_ce(model, tasks_for((5, 2), ways=3, query=3), inner_lr=0.3, steps=2, order=order)

    class Indices(Points):
        def forward(self, x):
            return self.head(self.fc(x).max(1)[1].double().repeat(1, 3))

    e = fastmaml.explain(Indices())
    assert e.program == "torch.func", e


def test_a_negative_dim_that_reaches_the_examples_raises_naming_the_layer():
    """dim=-2 of per-example `[D]` values is the examples' dim: softmax, normalize, max and chunk over it raise."""

    class OverExamples(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.fc, self.op = nn.Linear(2, 2), op

        def forward(self, x):
            return self.op(self.fc(x))

    tasks = tuple(t.double() if t.is_floating_point() else t for t in tasks_for((2,), ways=2))
    for op, what in (
        (lambda h: torch.softmax(h, -2), "a softmax"),
        (lambda h: F.normalize(h, dim=-2), "a normalization"),
        (lambda h: torch.amax(h, -2, keepdim=True), "a maximum"),
        (lambda h: h.chunk(1, -2)[0], "a chunk"),
    ):
        model = OverExamples(op).double()
        on_fused(model)
        with pytest.raises(ValueError, match=rf"dim=-2 is not a feature dim.*\({what} over the examples' dim"):
            fastmaml.meta_step(model, tasks, inner_lr=0.1, loss="cross_entropy")
