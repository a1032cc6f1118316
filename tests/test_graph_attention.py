"""Attention as users write it on the fused engine: nn.MultiheadAttention, nn.TransformerEncoderLayer and
nn.TransformerEncoder (batch_first=True) lowered to their definitions' rules, a decoder block as nanoGPT
writes it (a causal mask registered as a buffer and cut to the sequence, a sinusoidal positional encoding
buffer cut to it, the scale from the head's size), `F.scaled_dot_product_attention` (causal, with a
padding mask, a float mask, an explicit scale) lowered to its definition's rules, against the per-task
`create_graph` oracle in float64, every order. The oracle runs PyTorch's math attention: its CPU flash
attention has no double backward. Tensors the model makes from buffers and sizes are recomputed at every
call."""

import math

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
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastmaml

from oracle import assert_grads_close, autograd_meta_grad, check_adapt_matches_meta_step


class CausalBlock(nn.Module):
    """Tokens `[N, L, 3]`, L up to `max_len`: a pre-norm attention block with the attention written six ways."""

    def __init__(self, ways=3, d=4, heads=2, max_len=8):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(3, d)
        pe = torch.zeros(1, max_len, d)
        pos = torch.arange(max_len).unsqueeze(1).double()
        div = torch.exp(torch.arange(0, d, 2).double() * (-math.log(100.0) / d))
        pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))
        self.c_attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, ways)

    def forward(self, x):
        B, T, _ = x.size()
        h = self.inp(x) + self.pe[:, :T]
        q, k, v = self.c_attn(self.ln(h)).split(4, dim=2)
        q, k, v = (t.view(B, T, self.heads, 2).transpose(1, 2) for t in (q, k, v))  # [N, H, L, 2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
        y = att @ v
        y = y + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        pad = x[:, :, 0] > 1.5  # [N, L]
        y = y + F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
        y = y + F.scaled_dot_product_attention(q, k, v, attn_mask=(1 - self.bias[:, :, :T, :T]) * -1e9, scale=0.7)
        s = q @ k.transpose(-2, -1) / k.size(-1) ** 0.5
        s = s.masked_fill(self.bias[0, 0, :T, :T].triu(1).bool(), -1e4)
        y = y + torch.where(self.bias[0, 0, :T, :T] > 0, s.softmax(-1), 0.0) @ v
        y = y + F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[0, 0, :T, :T] > 0)
        h = h + self.proj(y.transpose(1, 2).contiguous().view(B, T, 4))
        return self.head(h.mean(1) - self.pe[0, :T].sum(0))


def token_tasks(seed=0, length=5):
    return tasks_for((length, 3), ways=3, shots=2, seed=seed)


@pytest.fixture(autouse=True)
def math_attention():
    """PyTorch's attention as its math definition (the oracle's double backward needs it)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


@pytest.mark.parametrize("order", ORDERS)
def test_every_order(order):
    torch.manual_seed(0)
    model = CausalBlock().double()
    assert [n.rule.kind for n in on_fused(model).nodes].count("sdpa") >= 4 * 5
    check_orders_steps(model, token_tasks(), order)


def test_meta_sgd_rates_anil_another_length_and_float32():
    torch.manual_seed(1)
    model = CausalBlock().double()
    check_variants(model, token_tasks(1), token_tasks(2), ["head", "proj"], anil_tasks=token_tasks(1, length=7))


class Encoder(nn.Module):
    """Tokens `[N, L, 3]`: nn.MultiheadAttention (self-attention with a key-padding mask from the input; cross
    attention to the raw tokens with kdim/vdim and no bias, its weights not read), a post-norm ReLU encoder
    layer under a causal mask buffer, and a two-layer pre-norm GELU nn.TransformerEncoder with a final norm."""

    def __init__(self, ways=3, d=4, length=5):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(d, 2, kdim=3, vdim=3, batch_first=True, bias=False)
        self.register_buffer("causal", torch.triu(torch.ones(length, length, dtype=torch.bool), 1))
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        pre_norm = nn.TransformerEncoderLayer(
            d, 2, dim_feedforward=6, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.stack = nn.TransformerEncoder(pre_norm, 2, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, ways)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, key_padding_mask=x[:, :, 0] > 1.0)
        h = h + a + self.cross(h, x, x, need_weights=False)[0]
        h = self.stack(self.layer(h, src_mask=self.causal))
        return self.head(h.mean(1))


@pytest.mark.parametrize("order", ORDERS)
def test_transformer_layers_every_order(order):
    torch.manual_seed(4)
    model = Encoder().double()
    assert [n.rule.kind for n in on_fused(model).nodes].count("MultiheadAttention") >= 4 * 15
    check_orders_steps(model, token_tasks(), order)


def test_transformer_layers_with_meta_sgd_rates_anil_and_float32():
    torch.manual_seed(5)
    model = Encoder().double()
    check_variants(model, token_tasks(1), token_tasks(2), ["head", "stack.norm"])


class Seq2Seq(nn.Module):
    """An encoder layer's output as memory for a post-norm nn.TransformerDecoderLayer (causal target mask
    buffer, memory key-padding mask from the input) and a two-layer pre-norm nn.TransformerDecoder with a
    final norm; nn.MultiheadAttention's weights, averaged and per head, read into the logits."""

    def __init__(self, ways=3, d=4, length=5):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.register_buffer("causal", torch.triu(torch.ones(length, length, dtype=torch.bool), 1))
        self.dec = nn.TransformerDecoderLayer(d, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        pre_norm = nn.TransformerDecoderLayer(
            d, 2, dim_feedforward=6, dropout=0.0, batch_first=True, norm_first=True, activation=nn.GELU()
        )
        self.stack = nn.TransformerDecoder(pre_norm, 2, norm=nn.LayerNorm(d))
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d + 2 * length, ways)

    def forward(self, x):
        h = self.inp(x)
        memory = self.enc(h)
        pad = x[:, :, 0] > 1.0
        y = self.dec(h, memory, tgt_mask=self.causal, memory_key_padding_mask=pad)
        y = self.stack(y, memory, tgt_mask=self.causal)
        out, mean_weights = self.attn(y, y, y)
        per_head = self.attn(y, memory, memory, average_attn_weights=False)[1]  # [N, 2, L, L]
        features = [(y + out).mean(1), mean_weights.mean(1), per_head.mean((2, 3)).repeat(1, 5)[:, :5]]
        return self.head(torch.cat(features, 1))


@pytest.mark.parametrize("order", ORDERS)
def test_decoder_layers_and_attention_weights_every_order(order):
    torch.manual_seed(6)
    model = Seq2Seq().double()
    check_orders_steps(model, token_tasks(), order)


class BufferScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("keep", torch.ones(3, dtype=torch.bool))

    def forward(self, x):
        return self.fc(x * (self.scale * 2)).masked_fill(~self.keep, 0.0)


def test_tensors_made_from_buffers_follow_an_in_place_update():
    """fx's default keeps what forward computes from a buffer as a constant of the trace; the compiler reads
    buffers as nodes, so an in-place update reaches the next meta-step without recompiling."""
    torch.manual_seed(2)
    model = BufferScaled().double()
    tasks = tasks_for((4,), ways=3, shots=2)
    check_ce(model, tasks, inner_lr=0.3, steps=1)
    program = on_fused(model)
    model.scale.fill_(3.0)
    model.keep[1] = False
    check_ce(model, tasks, inner_lr=0.3, steps=1)
    assert on_fused(model) is program


class AngleAttention(nn.Module):
    """Attention with an op that has no rule (atan2 of two values): the torch.func program."""

    def __init__(self, ways=3):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 4), nn.Linear(4, ways)

    def forward(self, x):
        q = self.fc(x).unsqueeze(1)
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        z = y.mean((1, 2))
        return self.head(torch.atan2(z, z + 1.0))


@pytest.mark.parametrize("order", ["second", "checkpoint"])
def test_the_torch_func_program_takes_the_second_order_of_attention(order):
    """PyTorch's CPU flash attention has no forward-mode derivative (the torch.func program's HVP needs one):
    the program runs attention as its math definition."""
    torch.manual_seed(3)
    model = AngleAttention().double()
    assert fastmaml.explain(model, "cross_entropy").program == "torch.func"
    tasks = token_tasks()
    model.zero_grad()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # PyTorch's choice
        fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, order=order, loss="cross_entropy")
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.3, steps=2, order=order, loss_fn=F.cross_entropy)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-9)


class Loops(nn.Module):
    """A Python loop over a buffer's size and a check of a parameter's size: shapes of parameters and buffers
    are numbers when traced (the cache keys on them)."""

    def __init__(self, rows=3):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("proj", torch.randn(rows, 6))

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        out = 0
        for k in range(self.proj.shape[0]):
            out = out + h * self.proj[k]
        assert self.fc.weight.size(0) == 6 and self.proj.dtype == self.fc.weight.dtype
        return self.head(out / self.proj.size(0))


def test_a_loop_over_a_buffers_size_traces_and_a_new_size_recompiles():
    torch.manual_seed(8)
    model = Loops().double()
    tasks = tasks_for((4,), ways=3, shots=2)
    check_ce(model, tasks, inner_lr=0.3, steps=2)
    model.proj = torch.randn(2, 6, dtype=torch.float64)
    check_ce(model, tasks, inner_lr=0.3, steps=2)


def test_what_does_not_compile_says_why():
    class LearnedBias(CausalBlock):
        def forward(self, x):
            q = self.inp(x).unsqueeze(1)
            return self.head(F.scaled_dot_product_attention(q, q, q, attn_mask=self.proj.weight).mean((1, 2)))

    class SequenceFirst(Encoder):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)

    class Weights(Encoder):
        def forward(self, x):
            h = self.inp(x)
            return self.head(self.attn(h, h, h, need_weights=False)[1].mean(1))

    cases = (
        (LearnedBias, "attention mask is a parameter"),
        (SequenceFirst, "batch_first=True"),
        (Weights, "not a tensor computed from the model's input"),
    )
    for cls, reason in cases:
        check_falls_back(cls(), reason)


def test_adapt_matches_meta_step():
    torch.manual_seed(7)
    check_adapt_matches_meta_step(
        Seq2Seq().double(), token_tasks(3), loss_fn=F.cross_entropy, loss="cross_entropy", inner_lr=0.3, steps=2
    )
