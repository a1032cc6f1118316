"""The lowering of attention to existing rules: `F.scaled_dot_product_attention`, nn.MultiheadAttention and the
Transformer encoder and decoder layers and stacks (batch_first=True), each as its definition (projections,
heads, scaled scores, masks, softmax, products, residuals, LayerNorm, the feed-forward block), so their
second order needs no rule of its own. A part of the compiler's `_Lowering` (compiler.py), which it extends.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .dense import LinearRule
from .joins import AddRule, AffineRule, HostOperandRule, ProductRule
from .lowered import AttentionOutput, Host, Mask, Value, argument_spec, bind_arguments
from .mask import LogicalRule, WhereRule
from .pointwise import GELURule, ReLURule
from .shape import MeanRule, PartRule, ReshapeRule, SqueezeRule, TransposeRule
from .softmax import SoftmaxRule

TRANSFORMER_LAYERS = (
    nn.TransformerEncoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoderLayer,
    nn.TransformerDecoder,
)


class AttentionLowering:
    """The attention part of the compiler's `_Lowering`: these methods use its `emit`, `fail`, `value`,
    `param`, `host_value`, `map_expr`, `module_params` and `example_norm_rule`."""

    def op_sdpa(self, a, inplace):
        """F.scaled_dot_product_attention as its definition, softmax(q kᵀ · scale + mask) v, with the rules of
        its parts: scale 1/√E from the query's size unless given; `attn_mask` a mask (False: left out),
        a value or a buffer, or tensors made as the model runs (boolean: left out where False; else added);
        `is_causal` the lower-triangular mask of the query's and key's lengths; `dropout_p` dropout of the
        attention weights."""
        if a["enable_gqa"]:
            self.fail("F.scaled_dot_product_attention with enable_gqa=True")
        q, k, v = (self.value(a[key], key) for key in ("query", "key", "value"))
        name, mask, scale = self.name(), a["attn_mask"], a["scale"]
        if scale is None:
            qv = q.vid
            scale = Host(lambda env: env[qv].shape[-1] ** -0.5, (qv,))
        elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
            self.fail("F.scaled_dot_product_attention's scale must be a number")
        scores = self.attention_scores(name, "sdpa", q, k, scale)
        if a["is_causal"]:
            if mask is not None:
                self.fail("F.scaled_dot_product_attention with both attn_mask and is_causal")
            qv, kv = q.vid, k.vid

            def causal(env):
                L, S = env[qv].shape[-2], env[kv].shape[-2]
                return torch.ones(L, S, dtype=torch.bool, device=env[qv].device).tril()

            scores = self.emit(
                HostOperandRule(name, "sdpa", "keep", float("-inf")), [scores], host=Host(causal, (qv, kv))
            )
        elif mask is not None:
            scores = self.attention_mask(name, "sdpa", scores, mask, blocks=False)
        return self.attention_output(name, "sdpa", scores, v, a["dropout_p"])[0]

    def attention_scores(self, name: str, kind: str, q: Value, k: Value, scale) -> Value:
        """q kᵀ · scale (a number, or a `Host` number) of `[..., L, E]` and `[..., S, E]`."""
        kt = self.emit(TransposeRule(name, kind, -2, -1), [k])
        scores = self.emit(ProductRule(name, kind, matmul=True), [q, kt])
        if isinstance(scale, Host):
            return self.emit(HostOperandRule(name, kind, "mul"), [scores], host=scale)
        return self.emit(AffineRule(name, kind, float(scale)), [scores])

    def attention_mask(self, name: str, kind: str, scores: Value, mask, blocks: bool) -> Value:
        """scores with an attention mask applied: a boolean mask leaves out (−inf) where it is True (`blocks`:
        nn.MultiheadAttention's convention) or where it is False (F.scaled_dot_product_attention's); a float
        mask is added. The mask is a mask or a value computed from the input, a buffer, or made as the model
        runs."""
        if isinstance(mask, Mask):
            if not blocks:
                mask = Mask(self.emit(LogicalRule(name, kind, "not"), [mask]).vid)
            return self.emit(WhereRule(name, kind, a=float("-inf")), [mask, scores])
        if isinstance(mask, Value):
            return self.emit(AddRule(name, kind), [scores, mask])
        if self._made_on_host(mask):
            op = "attn_block" if blocks else "attn_keep"
            return self.emit(HostOperandRule(name, kind, op), [scores], host=self.host_value(mask))
        self.fail(f"{kind}'s attention mask is a parameter or derived tensor (a learned bias: add it to q kᵀ)")

    def attention_output(self, name: str, kind: str, scores: Value, v: Value, dropout=0.0) -> Tuple[Value, Value]:
        """(w v, w), w = softmax(scores) after dropout with probability `dropout`."""
        weights = self.emit(SoftmaxRule(name, kind, -1, False), [scores])
        weights = self.dropout(weights, dropout, 0, kind, name)
        return self.emit(ProductRule(name, kind, matmul=True), [weights, v]), weights

    def heads(self, name: str, kind: str, x: Value, heads: int, merge: bool) -> Value:
        """`[N, L, H·D]` split into heads `[N, H, L, D]`, or (`merge`) heads merged back."""
        v = x.vid
        if merge:
            t = self.emit(TransposeRule(name, kind, 1, 2), [x])
            host = Host(lambda env: (env[v].shape[1], env[v].shape[3], env[v].shape[2] * env[v].shape[4]), (v,))
            return self.emit(ReshapeRule(name, kind), [t], host=host)
        host = Host(lambda env: (env[v].shape[1], env[v].shape[2], heads, env[v].shape[3] // heads), (v,))
        return self.emit(TransposeRule(name, kind, 1, 2), [self.emit(ReshapeRule(name, kind), [x], host=host)])

    def multihead_attention(
        self, m: nn.MultiheadAttention, path: str, query, key, value, kpm, mask
    ) -> Tuple[Value, Value]:
        """nn.MultiheadAttention(batch_first=True) as its definition: the in-projections (self-attention: one
        by in_proj_weight, cut in three; else its slices, or q/k/v_proj_weight), heads, scaled scores,
        `key_padding_mask` [N, S] and `attn_mask` [L, S] (boolean: True leaves out; float: added), softmax,
        dropout (in training mode), heads merged, out_proj.
        Returns the output `[N, L, E]` and the attention weights per head `[N, H, L, S]`."""
        kind = "MultiheadAttention"
        if not m.batch_first:
            self.fail(
                "batch_first=False takes the sequence first and the examples second; the fused engine needs the "
                "examples' dim first (nn.MultiheadAttention(..., batch_first=True))"
            )
        if m.bias_k is not None or m.add_zero_attn:
            self.fail("add_bias_kv or add_zero_attn")
        E, H = m.embed_dim, m.num_heads

        def part(ref, i, shape):
            if ref is None:
                return None
            expr = self.map_expr(ref, lambda t: t[i * E : (i + 1) * E], f"{{}}[{i * E}:{(i + 1) * E}]", shape)
            return self.param(expr, "in_proj")

        b = self.module_params(m, ("in_proj_bias",), path)[0]
        self_attention = isinstance(query, Value) and all(
            isinstance(t, Value) and t.vid == query.vid for t in (key, value)
        )
        if m._qkv_same_embed_dim and self_attention:
            # self-attention: one projection by the whole in_proj_weight, cut in three (as PyTorch does)
            w = self.module_params(m, ("in_proj_weight",), path)[0]
            qkv = self.emit(LinearRule(path, kind, E), [self.value(query)], (w, b))
            projected = [self.emit(PartRule(path, kind, -1, i, chunks=3), [qkv]) for i in range(3)]
        else:
            if m._qkv_same_embed_dim:
                w = self.module_params(m, ("in_proj_weight",), path)[0]
                weights, sizes = [part(w, i, (E, E)) for i in range(3)], (E, E, E)
            else:
                weights = list(self.module_params(m, ("q_proj_weight", "k_proj_weight", "v_proj_weight"), path))
                sizes = (E, m.kdim, m.vdim)
            projected = [
                self.emit(LinearRule(path, kind, n), [self.value(x)], (w, part(b, i, (E,))))
                for i, (x, w, n) in enumerate(zip((query, key, value), weights, sizes))
            ]
        q, k, v = (self.heads(path, kind, t, H, False) for t in projected)
        scores = self.attention_scores(path, kind, q, k, (E // H) ** -0.5)
        if kpm is not None:
            if not isinstance(kpm, (Mask, Value)):
                self.fail("key_padding_mask other than a mask or value computed from the input ([N, S])")
            kv = Value(kpm.vid)
            for d in (1, 1):  # [N, S] -> [N, 1, 1, S]
                kv = self.emit(SqueezeRule(path, kind, (d,), unsqueeze=True), [kv])
            scores = self.attention_mask(path, kind, scores, type(kpm)(kv.vid), blocks=True)
        if mask is not None:
            scores = self.attention_mask(path, kind, scores, mask, blocks=True)
        out, weights = self.attention_output(path, kind, scores, v, m.dropout if m.training else 0.0)
        out = self.heads(path, kind, out, H, True)
        out_params = self.module_params(m.out_proj, ("weight", "bias"), f"{path}.out_proj")
        return self.emit(LinearRule(path, kind, E), [out], out_params), weights

    def call_multihead_attention(self, n: fx.Node, m: nn.MultiheadAttention) -> "AttentionOutput":
        spec = argument_spec(
            "query",
            "key",
            "value",
            ("key_padding_mask", None),
            ("need_weights", True),
            ("attn_mask", None),
            ("average_attn_weights", True),
            ("is_causal", False),
        )
        try:
            a = bind_arguments(
                spec, [self.arg(x) for x in n.args], {k: self.arg(v) for k, v in n.kwargs.items()}, "call"
            )
        except TypeError as e:
            self.fail(str(e))
        out, weights = self.multihead_attention(
            m, n.target, a["query"], a["key"], a["value"], a["key_padding_mask"], a["attn_mask"]
        )
        if not a["need_weights"]:
            return AttentionOutput(out, None)
        if a["average_attn_weights"]:
            weights = self.emit(MeanRule(n.target, "MultiheadAttention", (1,)), [weights])
        return AttentionOutput(out, weights)

    def call_transformer(self, n: fx.Node, m: nn.Module) -> Value:
        """nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer and
        nn.TransformerDecoder (batch_first=True) as their definitions."""
        if isinstance(m, (nn.TransformerEncoder, nn.TransformerEncoderLayer)):
            names = ("src", ("mask", None), ("src_key_padding_mask", None), ("is_causal", None))
            if isinstance(m, nn.TransformerEncoderLayer):
                names = ("src", ("src_mask", None), ("src_key_padding_mask", None), ("is_causal", False))
        else:
            names = ("tgt", "memory", ("tgt_mask", None), ("memory_mask", None), ("tgt_key_padding_mask", None))
            names += (("memory_key_padding_mask", None), ("tgt_is_causal", None), ("memory_is_causal", False))
        try:
            a = bind_arguments(
                argument_spec(*names),
                [self.arg(x) for x in n.args],
                {k: self.arg(v) for k, v in n.kwargs.items()},
                "call",
            )
        except TypeError as e:
            self.fail(str(e))
        stack = isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder))
        layers = [(layer, f"{n.target}.layers.{i}") for i, layer in enumerate(m.layers)] if stack else [(m, n.target)]
        if "src" in a:
            x, memory = self.value(a["src"]), None
            masks = (a["mask"] if "mask" in a else a["src_mask"], a["src_key_padding_mask"])
        else:
            x, memory = self.value(a["tgt"]), self.value(a["memory"], "memory")
            masks = (a["tgt_mask"], a["tgt_key_padding_mask"], a["memory_mask"], a["memory_key_padding_mask"])
        for layer, path in layers:
            x = self.transformer_layer(layer, path, x, memory, masks)
        if stack and m.norm is not None:
            x = self.layer_norm(m.norm, f"{n.target}.norm", x)
        return x

    def layer_norm(self, m: nn.Module, path: str, x: Value) -> Value:
        rule = self.example_norm_rule(m, path, type(m).__name__)
        return self.emit(rule, [x], self.module_params(m, ("weight", "bias"), path))

    def transformer_layer(self, m: nn.Module, path: str, x: Value, memory: Optional[Value], masks) -> Value:
        """One nn.TransformerEncoderLayer (`memory` None; masks (attn, key padding)) or
        nn.TransformerDecoderLayer (masks (self attn, self key padding, memory attn, memory key padding)):
        self-attention, the decoder's attention to `memory`, and the feed-forward block, each with its
        residual, LayerNorm after (or, `norm_first`, before) each; dropout (in training mode) of the attention
        weights, of each block's output and inside the feed-forward block, in PyTorch's order."""
        kind = type(m).__name__

        def dropout(h, d: nn.Dropout, where: str):
            return self.dropout(h, d.p if d.training else 0.0, 0, "Dropout", f"{path}.{where}")

        act = m.activation
        if act is F.relu or isinstance(act, nn.ReLU):
            act_rule = ReLURule
        elif act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
            act_rule = GELURule
        else:
            self.fail(f"activation {act!r}; the fused engine lowers relu and gelu")

        def self_attention(h):
            return self.multihead_attention(m.self_attn, f"{path}.self_attn", h, h, h, masks[1], masks[0])[0]

        def memory_attention(h):
            attn = f"{path}.multihead_attn"
            return self.multihead_attention(m.multihead_attn, attn, h, memory, memory, masks[3], masks[2])[0]

        def feed_forward(h):
            lin1, lin2 = f"{path}.linear1", f"{path}.linear2"
            h = self.emit(
                LinearRule(lin1, "Linear", m.linear1.in_features),
                [h],
                self.module_params(m.linear1, ("weight", "bias"), lin1),
            )
            h = dropout(self.emit(act_rule(path, kind), [h]), m.dropout, "dropout")
            return self.emit(
                LinearRule(lin2, "Linear", m.linear2.in_features),
                [h],
                self.module_params(m.linear2, ("weight", "bias"), lin2),
            )

        blocks = [self_attention] + ([memory_attention] if memory is not None else []) + [feed_forward]
        for i, block in enumerate(blocks, 1):
            norm, drop = getattr(m, f"norm{i}"), getattr(m, f"dropout{i}")
            if m.norm_first:
                h = dropout(block(self.layer_norm(norm, f"{path}.norm{i}", x)), drop, f"dropout{i}")
                x = self.emit(AddRule(path, kind), [x, h])
            else:
                h = dropout(block(x), drop, f"dropout{i}")
                x = self.layer_norm(norm, f"{path}.norm{i}", self.emit(AddRule(path, kind), [x, h]))
        return x
