"""Vision transformers as timm writes them, on the fused engine: the class token a parameter expanded over
the examples (`self.cls_token.expand(B, -1, -1)`, or `.repeat(B, 1, 1)`) and concatenated along the tokens,
a positional-embedding parameter, and timm's attention, whose `qkv.reshape(B, N, 3, H, d).permute(2, 0, 3,
1, 4)` moves the examples from first until `unbind(0)` (or `qkv[0]`) selects q, k and v; an MLP-Mixer
(token mixing by transposes) and a ConvNeXt block (channels-last by permutes, a layer-scale parameter).
GPT-2's learned positions (an embedding looked up at indices made as the model runs). Each against the
per-task `create_graph` oracle in float64, every order, K = 0-3, Meta-SGD rates, ANIL,
float32 within twice the loop's error, `adapt`; what does not compile falls back and says why."""

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import (
    ORDERS,
    check_ce,
    check_falls_back,
    check_orders_steps,
    check_variants,
    on_fused,
    tasks_for,
)
from torch import nn

from oracle import check_adapt_matches_meta_step


class Attention(nn.Module):
    """timm's `Attention` (qkv bias, no qk-norm, no dropout)."""

    def __init__(self, dim, heads=2, unbind=True):
        super().__init__()
        self.heads, self.head_dim, self.unbind = heads, dim // heads, unbind
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.unbind else (qkv[0], qkv[1], qkv[2])
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, unbind=True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, unbind)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 2 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Images `[N, 1, 8, 8]` -> 4×4 patches -> class token + 4 patch tokens -> two blocks -> the class
    token's head. `repeat`: the class token by `.repeat(B, 1, 1)`."""

    def __init__(self, ways=3, dim=4, heads=2, repeat=False):
        super().__init__()
        self.repeat = repeat
        self.patch_embed = nn.Conv2d(1, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        self.blocks = nn.Sequential(Block(dim, heads), Block(dim, heads, unbind=False))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, ways)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.repeat(x.shape[0], 1, 1) if self.repeat else self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class Mixer(nn.Module):
    """Tokens mixed by an MLP over the transposed tokens, then channels; mean over tokens."""

    def __init__(self, ways=3, tokens=4, dim=4):
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 4, 4)
        self.ln1, self.tokens = nn.LayerNorm(dim), Mlp(tokens, 2 * tokens)
        self.ln2, self.channels = nn.LayerNorm(dim), Mlp(dim, 2 * dim)
        self.head = nn.Linear(dim, ways)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.tokens(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channels(self.ln2(x))
        return self.head(x.mean(dim=1))


class ConvNeXt(nn.Module):
    """A ConvNeXt block: depthwise 3×3, channels-last LayerNorm and MLP by permutes, a layer scale."""

    def __init__(self, ways=3, dim=4):
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 2, 2)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, ways)

    def forward(self, x):
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return self.head((x + y.permute(0, 3, 1, 2)).mean([-2, -1]))


MODELS = {"vit": ViT, "vit_repeat": lambda: ViT(repeat=True), "mixer": Mixer, "convnext": ConvNeXt}


def image_tasks(seed=0):
    return tasks_for((1, 8, 8), ways=3, shots=2, seed=seed)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("order", ORDERS)
def test_models_every_order(name, order):
    torch.manual_seed(1)
    check_orders_steps(MODELS[name]().double(), image_tasks(), order)


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_rates_anil_float32(name):
    torch.manual_seed(2)
    model = MODELS[name]().double()
    check_variants(model, image_tasks(1), image_tasks(2), inner_params=["head"])


def test_vit_adapt_matches_meta_step():
    torch.manual_seed(3)
    kwargs = dict(loss="cross_entropy", inner_lr=0.3, steps=2)
    check_adapt_matches_meta_step(ViT().double(), image_tasks(4), loss_fn=F.cross_entropy, **kwargs)


def test_vit_class_token_only_adapted():
    """The class token and positional embedding adapted alone (their gradient sums over the examples)."""
    torch.manual_seed(4)
    check_ce(ViT().double(), image_tasks(5), inner_lr=0.5, steps=2, inner_params=["cls_token", "pos_embed"])


class Permutes(nn.Module):
    """Examples moved and brought back: a permute undone by a transpose, `select`, a permute of a Permuted."""

    def __init__(self, ways=3):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(8, ways)

    def forward(self, x):  # [N, 6]
        h = self.fc(x).view(x.size(0), 2, 3)  # [N, 2, 3]
        a = h.permute(1, 2, 0).transpose(1, 2).transpose(0, 1)  # [N, 2, 3] again (no copy)
        b = h.permute(2, 0, 1).select(0, 1)  # [N, 2]
        c = h.permute(1, 0, 2).permute(1, 0, 2)[:, :, 2]  # [N, 2]
        d = torch.unbind(h.permute(2, 1, 0), dim=1)[0].permute(1, 0)  # [N, 3]
        e = h.unbind(-1)[1] + h.select(1, 0)[:, :2]  # [N, 2]
        return self.head(torch.cat([a.sum(2), b, c + e, d[:, :2]], 1).tanh())


@pytest.mark.parametrize("order", ORDERS)
def test_permutes_that_bring_the_examples_back(order):
    torch.manual_seed(5)
    check_orders_steps(Permutes().double(), tasks_for((6,), ways=3, shots=2), order)


class ExamplesMoved(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # [N, L, 4]
        return self.fc(x.permute(1, 0, 2)).mean(0)


class SelectsExamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # [N, L, 4]
        return self.fc(x.permute(1, 0, 2)[:, 0])


class TiledParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.token = nn.Parameter(torch.zeros(1, 2, 4))

    def forward(self, x):  # [N, L, 4]
        return self.fc(torch.cat([self.token.repeat(x.size(0), 2, 1), x], 1)).mean(1)


class FixedCount(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.token = nn.Parameter(torch.zeros(1, 1, 4))

    def forward(self, x):  # [N, L, 4]
        return self.fc(torch.cat([self.token.expand(6, -1, -1), x], 1)).mean(1)


@pytest.mark.parametrize(
    "cls, reason",
    [
        (ExamplesMoved, "moves the examples' dim 0 from first"),
        (SelectsExamples, "a permute moved to 1"),
        (TiledParameter, "repeated (tiled)"),
        (FixedCount, "expand it over the examples first"),
    ],
)
def test_what_does_not_compile_falls_back_and_says_why(cls, reason):
    check_falls_back(cls(), reason)


class LearnedPositions(nn.Module):
    """Tokens `[N, L, 3]` with GPT-2's learned positions, `self.wpe(torch.arange(L, device=x.device))`, and
    `F.embedding` of a position buffer cut to the sequence (its padding row gets no gradient)."""

    def __init__(self, ways=3, d=4):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.wpe = nn.Embedding(8, d)
        self.extra = nn.Parameter(torch.randn(6, d) * 0.5)
        self.register_buffer("positions", torch.tensor([0, 2, 1, 3, 0, 4, 5]))
        self.block = Block(d, 2)
        self.head = nn.Linear(d, ways)

    def forward(self, x):
        L = x.size(1)
        h = self.inp(x) + self.wpe(torch.arange(L, device=x.device))
        h = h + F.embedding(self.positions[:L], self.extra, padding_idx=0)
        return self.head(self.block(h).mean(1))


@pytest.mark.parametrize("order", ORDERS)
def test_learned_positions(order):
    torch.manual_seed(6)
    model = LearnedPositions().double()
    assert [n.rule.kind for n in on_fused(model).nodes].count("embedding") == 2
    check_orders_steps(model, tasks_for((5, 3), ways=3, shots=2), order)


def test_learned_positions_rates_anil_and_float32():
    torch.manual_seed(7)
    tasks = tasks_for((5, 3), ways=3, shots=2, seed=7)
    check_variants(LearnedPositions().double(), tasks, tasks_for((5, 3), ways=3, shots=2, seed=8), ["head"])
