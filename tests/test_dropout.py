"""Dropout in training mode on the fused engine (nn.Dropout, nn.Dropout2d, `F.dropout`, `F.dropout2d`): the
meta-gradient for the masks the inner steps drew, against the per-task `create_graph` oracle in float64 run
with the same masks (`OracleMasks` patches PyTorch's dropout functions to draw fastmaml's, `programs/draws.py`),
every order (the implicit one against its dense solve), Meta-SGD rates, ANIL, the multi-step loss, task chunks,
`adapt`; the masks themselves (rate, independence, reproducibility); eval mode compiles no dropout."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import ORDERS, check_ce, on_fused, tasks_for
from test_implicit import implicit_oracle
from torch import nn

import fastmaml
from fastmaml.programs import draws
from fastmaml.programs.draws import Draws
from fastmaml.programs.fused.dropout import DropoutRule

from oracle import assert_grads_close, autograd_meta_grad, rel_err

SEED = 1234


class OracleMasks(contextlib.AbstractContextManager):
    """While active, `F.dropout` and `F.dropout1d/2d/3d` in training mode (and so nn.Dropout*) apply fastmaml's
    masks of seed SEED for task `t` at inner step `step` (the support pass, or the query pass), numbering the
    dropouts of each forward from 0 in call order as the compiler numbers them. `set` names the scope of the
    next forward."""

    NAMES = {"dropout": 0, "dropout1d": 1, "dropout2d": 2, "dropout3d": 3}

    def __init__(self):
        self.scope, self.node, self.saved = None, 0, {}

    def set(self, t: int, step: int, query: bool) -> None:
        self.scope, self.node = (t, step, query), 0

    def __enter__(self):
        for name, channels in self.NAMES.items():
            self.saved[name] = getattr(F, name)
            setattr(F, name, self._dropout(channels))
        self.saved["scaled_dot_product_attention"] = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = math_attention  # (its dropout: F.dropout)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(F, name, fn)

    def _dropout(self, channels: int):
        def dropout(x, p=0.5, training=True, inplace=False):
            if not training or p == 0:
                return x
            t, step, query = self.scope
            shape = (1, *x.shape[:2], *(1,) * (x.dim() - 2)) if channels else (1, *x.shape)
            with Draws(SEED).at(step, torch.tensor([t]), query=query):
                keep = draws.keep_mask(self.node, p, shape, x.device)[0]
            self.node += 1
            return x * keep / (1 - p)

        return dropout


def math_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention's definition, its dropout by `F.dropout`."""
    s = q @ k.transpose(-2, -1) * (q.size(-1) ** -0.5 if scale is None else scale)
    if is_causal:
        attn_mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return F.dropout(s.softmax(-1), dropout_p) @ v


def maml_scopes(masks: OracleMasks, steps: int, step_weights=None):
    """`autograd_meta_grad`'s `before_forward`: step j's support pass, or the query pass at φ_j (j = K, or
    before step j's support pass where the multi-step loss weighs φ_j)."""
    seen = set()

    def hook(model, t, j):
        query = j == steps or (step_weights is not None and j > 0 and step_weights[j - 1] != 0 and (t, j) not in seen)
        seen.add((t, j))
        masks.set(t, j, query)

    return hook


@pytest.fixture(autouse=True)
def fixed_seed(monkeypatch):
    monkeypatch.setattr(Draws, "fresh", staticmethod(lambda: Draws(SEED)))


class DropMLP(nn.Module):
    def __init__(self, ways=3):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, ways)

    def forward(self, x):
        h = self.drop(torch.tanh(self.fc1(x)))
        h = F.dropout(torch.tanh(self.fc2(h)), 0.5, self.training)
        return self.fc3(h)


class DropConv(nn.Module):
    """Channel dropout (nn.Dropout2d, F.dropout2d) after BatchNorm and ReLU, dropout before the head."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop2d = nn.Dropout2d(0.25)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(4 * 3 * 3, ways)

    def forward(self, x):
        h = self.drop2d(F.relu(self.bn(self.conv1(x))))
        h = F.dropout2d(torch.tanh(self.conv2(h)), 0.4, self.training)
        return self.head(self.drop(h.flatten(1)))


class DropTransformer(nn.Module):
    """Tokens `[N, L, 3]`: nn.TransformerEncoderLayer (its four dropouts), nn.TransformerDecoderLayer on the
    encoder's output (norm first, causal; six), nn.MultiheadAttention with its weights (attention dropout),
    F.scaled_dot_product_attention with dropout_p."""

    def __init__(self, ways=3, d=4):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.3, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(d, 2, 6, dropout=0.2, batch_first=True, norm_first=True)
        self.attn = nn.MultiheadAttention(d, 2, dropout=0.25, batch_first=True)
        self.head = nn.Linear(d, ways)

    def forward(self, x):
        h = self.inp(x)
        m = self.enc(h)
        causal = nn.Transformer.generate_square_subsequent_mask(5, device=x.device)
        h = self.dec(h, m, tgt_is_causal=True, tgt_mask=causal)
        a, w = self.attn(h, m, m)
        q = a.unsqueeze(1)
        h = h + F.scaled_dot_product_attention(q, q, q, dropout_p=0.4).squeeze(1) + w.sum(-1, keepdim=True)
        return self.head(h.mean(1))


MODELS = {"mlp": (DropMLP, (4,)), "conv": (DropConv, (1, 7, 7)), "transformer": (DropTransformer, (5, 3))}
NUM_DROPOUTS = {"mlp": 2, "conv": 3, "transformer": 12}


def check_with_masks(model, tasks, steps, **kwargs):
    on_fused(model, inner_params=kwargs.get("inner_params"))  # compiled (and cached) before the patch
    with OracleMasks() as masks:
        hook = maml_scopes(masks, steps, kwargs.get("step_weights"))
        check_ce(model, tasks, steps=steps, before_forward=hook, **kwargs)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("order", ORDERS)
def test_every_order_with_the_same_masks(name, order):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    model = cls().double()
    assert sum(isinstance(n.rule, DropoutRule) for n in on_fused(model).nodes) == NUM_DROPOUTS[name]
    tasks = tasks_for(shape, ways=3, shots=2)
    for steps in (0, 1, 3) if order == "second" else (5,):
        check_with_masks(model, tasks, steps, inner_lr=0.3, order=order)


def test_rates_anil_multi_step_loss():
    torch.manual_seed(1)
    model = DropConv().double()
    tasks = tasks_for((1, 7, 7), ways=3, shots=2, seed=1)
    rates = {n: torch.full_like(p, 0.2).requires_grad_() for n, p in model.named_parameters()}
    check_with_masks(model, tasks, 2, inner_lr=rates, lr_leaves=list(rates.values()))
    check_with_masks(model, tasks, 2, inner_lr=0.3, inner_params=["head"])
    check_with_masks(model, tasks, 3, inner_lr=0.3, step_weights=[0.2, 0.0, 1.0])


def test_float32_error_with_the_same_masks():
    """float32 within twice the autograd loop's own float32 error against float64, the loops drawing
    fastmaml's masks."""
    torch.manual_seed(8)
    model64 = DropTransformer().double()
    model32 = copy.deepcopy(model64).float()
    on_fused(model32)  # compiled before the patch
    tasks = tasks_for((5, 3), ways=3, shots=2, seed=8)
    tasks32 = tuple(t.float() if t.is_floating_point() else t for t in tasks)
    model32.zero_grad()
    fastmaml.meta_step(model32, tasks32, inner_lr=0.3, steps=2, loss="cross_entropy")
    ours = torch.cat([p.grad.double().flatten() for p in model32.parameters()])
    with OracleMasks() as masks:
        _, ref, _ = autograd_meta_grad(
            model64, tasks, inner_lr=0.3, steps=2, loss_fn=F.cross_entropy, before_forward=maml_scopes(masks, 2)
        )
        _, loop, _ = autograd_meta_grad(
            model32, tasks32, inner_lr=0.3, steps=2, loss_fn=F.cross_entropy, before_forward=maml_scopes(masks, 2)
        )
    names = [n for n, _ in model64.named_parameters()]
    want = torch.cat([ref[n].flatten() for n in names])
    theirs = rel_err(torch.cat([loop[n].double().flatten() for n in names]), want)
    assert rel_err(ours, want) <= 2 * max(theirs, 1e-7), (rel_err(ours, want), theirs)


def test_implicit_with_the_same_masks():
    """iMAML: the steps draw steps 0..K-1's masks, the conjugate-gradient HVPs at φ_K step K's."""
    torch.manual_seed(2)
    model = DropMLP().double()
    sx, sy, qx, qy = tasks_for((4,), ways=3, shots=2, seed=2)
    steps, lam = 2, 2.0
    model.zero_grad()
    fastmaml.meta_step(
        model, (sx, sy, qx, qy), inner_lr=0.1, steps=steps, order="implicit", loss="cross_entropy",
        implicit_lambda=lam, cg_steps=40,
    )  # fmt: skip
    schedule = [(j, False) for j in range(steps + 1)] + [(steps, True)]  # the steps, the Hessian, the query
    calls = []

    def scope(module, args):
        t, k = divmod(len(calls), len(schedule))
        calls.append(k)
        masks.set(t, *schedule[k])

    with OracleMasks() as masks:
        handle = model.register_forward_pre_hook(scope)
        try:
            names = [n for n, _ in model.named_parameters()]
            want = implicit_oracle(
                model, (sx, sy, qx, qy), lr=0.1, steps=steps, lam=lam, adapted=names, loss_fn=F.cross_entropy
            )
        finally:
            handle.remove()
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want, 1e-8)


def test_task_chunks_draw_the_same_masks():
    """A task's masks depend on its index in the batch, not on the chunk it runs in."""
    torch.manual_seed(3)
    model = DropConv().double()
    tasks = tasks_for((1, 7, 7), T=5, ways=3, shots=2, seed=3)
    grads = []
    for chunk in (None, 2):
        model.zero_grad()
        fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, loss="cross_entropy", task_chunk=chunk)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel_err(grads[1], grads[0]) < 1e-12


def test_adapt_with_the_same_masks():
    """`adapt`'s backward sees the masks its steps drew; its query forward, in the query scope, meta_step's."""
    torch.manual_seed(4)
    model = DropMLP().double()
    sx, sy, qx, qy = tasks_for((4,), ways=3, shots=2, seed=4)
    kwargs = dict(inner_lr=0.3, steps=2, loss="cross_entropy")
    model.zero_grad()
    fastmaml.meta_step(model, (sx, sy, qx, qy), **kwargs)
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    adapted = fastmaml.adapt(model, sx, sy, **kwargs)
    with Draws(SEED).at(2, query=True):
        out = adapted(qx)
    sum(F.cross_entropy(out[t], qy[t]) for t in range(sx.shape[0])).div(sx.shape[0]).backward()
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want, 1e-10)


def test_masks_rate_independence_and_reproducibility():
    shape = (4, 50, 10, 10)
    with Draws(7).at(1):
        a = draws.keep_mask(0, 0.3, shape, "cpu")
        again = draws.keep_mask(0, 0.3, shape, "cpu")
        other_node = draws.keep_mask(1, 0.3, shape, "cpu")
    with Draws(7).at(1, query=True):
        query = draws.keep_mask(0, 0.3, shape, "cpu")
    with Draws(7).at(2):
        other_step = draws.keep_mask(0, 0.3, shape, "cpu")
    with Draws(8).at(1):
        other_seed = draws.keep_mask(0, 0.3, shape, "cpu")
    with Draws(7).chunk(2).at(1, torch.tensor([1, 0])):  # tasks 3 and 2 of the batch
        picked = draws.keep_mask(0, 0.3, (2, *shape[1:]), "cpu")
    assert a.dtype == torch.bool and a.shape == shape
    assert torch.equal(a, again) and torch.equal(picked, a[[3, 2]])
    assert abs(a.float().mean().item() - 0.7) < 0.01
    for b in (other_node, query, other_step, other_seed, a[[1, 2, 3, 0]]):  # other streams, other tasks
        agree = (a == b).float().mean().item()
        assert abs(agree - (0.7**2 + 0.3**2)) < 0.01, agree  # as independent masks agree
    with Draws(7).at(0):
        assert draws.keep_mask(0, 0.0, shape, "cpu").all() and not draws.keep_mask(0, 1.0, shape, "cpu").any()
    torch.manual_seed(5)
    outside = draws.keep_mask(0, 0.3, shape, "cpu")  # outside a meta-step: PyTorch's generator
    torch.manual_seed(5)
    assert torch.equal(outside, torch.rand(shape) >= 0.3)


def test_seeded_meta_steps_are_reproducible(monkeypatch):
    monkeypatch.undo()  # the seed from PyTorch's generator
    torch.manual_seed(6)
    model = DropMLP().double()
    tasks = tasks_for((4,), ways=3, shots=2, seed=6)
    grads = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model.zero_grad()
        fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, loss="cross_entropy")
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1]) and rel_err(grads[2], grads[0]) > 1e-3


def test_eval_mode_compiles_no_dropout():
    torch.manual_seed(7)
    model = DropConv().double()
    tasks = tasks_for((1, 7, 7), ways=3, shots=2, seed=7)
    assert "Dropout2d" in str(fastmaml.explain(model, "cross_entropy"))
    model.drop.eval()
    model.drop2d.eval()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds.count("dropout2d") == 1 and "Dropout" not in kinds and "Dropout2d" not in kinds, kinds
    model.eval()
    assert not any(isinstance(n.rule, DropoutRule) for n in on_fused(model).nodes)
    model.zero_grad()
    fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, loss="cross_entropy", batch_norm="frozen")
    _, want, _ = autograd_meta_grad(model, tasks, inner_lr=0.3, steps=2, loss_fn=F.cross_entropy, train=False)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want, 1e-9)


class InPlaceReadAgain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5, inplace=True)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.drop(h) + h  # PyTorch: h is overwritten


class BadRate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.dropout(self.fc(x), 1.5, self.training)


@pytest.mark.parametrize(
    "cls, reason",
    [(BadRate, "expected a number in [0, 1]"), (InPlaceReadAgain, "overwrites a value that is read again")],
)
def test_what_does_not_compile_falls_back_and_says_why(cls, reason):
    e = fastmaml.explain(cls(), "cross_entropy")
    assert e.program == "torch.func" and reason in e.reason, e
