"""Compiles a model into a graph of rules by tracing its `forward` with torch.fx, or says which node keeps
it off the fused engine.

Layers with rules stay leaf modules: Linear, Conv1d and Conv2d (any groups, zero padding), ConvTranspose1d/2d/3d
and Conv3d (conv_nd.py), BatchNorm1d/2d,
LayerNorm, GroupNorm, InstanceNorm1d/2d (without running statistics), ReLU, LeakyReLU, Tanh, Sigmoid, ELU,
SELU, CELU, GELU (exact), SiLU, Softplus, Mish, PReLU, Hardtanh, ReLU6, Hardswish, Hardsigmoid, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d, AdaptiveMaxPool2d, Flatten (start_dim >= 1), Identity, Dropout and Dropout1d/2d/3d (dropout.py),
the context layers of `fastmaml.context` (ContextConcat, FiLM: CAVIA), and the parameter-free layers that
map each example linearly (Upsample, PixelShuffle, PixelUnshuffle, the padding layers, Unfold, Fold:
example_maps.py). MultiheadAttention and the Transformer encoder and decoder layers and stacks
(batch_first=True) are lowered to the rules of their definitions. Any other torch.nn layer (without buffers
or randomness) runs its own forward per task through torch.func (functional.py): nn.LSTM/GRU/RNN with
batch_first=True (their output and each layer's final state `h_n[i]`, `c_n[i]` read), nn.MaxPool1d, nn.Softsign,
nn.LocalResponseNorm, ... Everything else a model does is traced into nodes, which map to rules (and a
function or method without one, of one value and numbers, parameters or buffers, runs through torch.func
the same way: `torch.sort(h, -1).values`, `torch.cumprod`, `torch.special.erf`):
- the functional forms `F.relu`/`relu_`, `F.leaky_relu`, `F.elu`, `F.selu`, `F.celu`, `F.gelu`, `F.silu`, `F.softplus`,
  `F.hardtanh`, `F.relu6`, `F.hardswish`, `F.hardsigmoid`, `torch.tanh`, `torch.sigmoid`, elementwise math
  (`exp`, `log`, `sqrt`, `rsqrt`, `reciprocal`, `abs`, `sin`, `cos`, `x ** c`, `torch.square`), `clamp` by
  numbers, `F.max_pool2d`, `F.avg_pool2d`, `F.adaptive_avg_pool2d`, `F.adaptive_max_pool2d`, `F.dropout`
  and `F.dropout1d/2d/3d`, softmax and log_softmax over a per-example dim; `F.linear`, `F.conv1d`, `F.conv2d`,
  `F.batch_norm`, `F.layer_norm`, `F.group_norm` and `F.instance_norm` (on the input's statistics) on the
  model's own parameters; `x @ W` / `torch.matmul(x, W)` with W `[in, out]` a parameter or buffer;
  `F.normalize` (p=2) of a value over a per-example dim, and of a Linear weight's rows as `F.linear`'s
  weight (a cosine classifier);
- `x.mean(dims)` and `x.sum(dims)` over per-example dims, the maximum over one (`torch.amax(x, d)`,
  `x.max(d)[0]`, `.values`), `x.var(dims)` / `x.std(dims)` (any correction), `torch.logsumexp(x, dims)`,
  the Euclidean norm (`x.norm(dim=...)`, `torch.norm(x, p=2, dim=...)`, `torch.linalg.vector_norm`,
  `torch.linalg.norm` of vectors);
  `torch.flatten`, `x.flatten`, `x.view`, `x.reshape` that keep the examples
  apart (sizes may come from the model's own arithmetic on `x.size()` / `x.shape`); `x.squeeze(dims)` and
  `x.unsqueeze(dim)` of per-example dims; `x.permute(...)` and `x.transpose(a, b)` that keep the examples'
  dim first, or move it until a part is selected (`unbind(0)`, `[i]`) or it comes back first (a `Permuted`:
  timm's attention); `x.unbind(d)`, `x.select(d, i)`; indexing of per-example dims with slices and integers
  (`x[:, 1:3]`, `x[:, 0]`, `x[..., :4]`);
  the parts of `x.chunk(n, dim)` / `x.split(sizes, dim)` along a per-example dim, and `F.glu`;
  `x.expand(...)` / `x.expand_as(y)` of size-1 dims and `x.repeat(...)` keeping the examples' dim; `F.pad`
  (constant); indexing with None (`x[:, None]`); per-example linear maps (example_maps.py): `F.interpolate`,
  `F.pad`'s other modes, `flip`, `roll`, `cumsum`, `tril`/`triu`, `F.pixel_shuffle`/`pixel_unshuffle`,
  `F.unfold`/`F.fold`; `torch.einsum` of one value, two values, or a value and a parameter (einsum.py);
  `F.scaled_dot_product_attention`, lowered to the rules of its definition; conversions of a value to the
  parameters' own dtype or device (`x.float()` in a float32 model, `.to(x.device)`), which are the value;
- joins: `+`, `torch.add`, `-` (residual branches), `torch.cat` and `torch.stack` along a feature dim;
  products of two values and their matrix products (`a * b`, `a @ b`, `torch.bmm`: gates, attention),
  division by a value (times its reciprocal), the elementwise maximum and minimum of two values
  (`torch.maximum`, `torch.max(a, b)`, `torch.minimum`, `torch.min(a, b)`), `F.mish` (x · tanh(softplus(x))),
  `F.prelu` with the model's own slopes;
- masks (mask.py): comparisons of values (`x > 0`, `a <= b`, `x != 0`), `&`, `|`, `^`, `~`, their shape
  operations, read by `torch.where(mask, a, b)` (values or numbers), `x.masked_fill(mask, value)` (−inf
  before a softmax), a product with a value, or converted to one (`mask.float()`, `.to(x.dtype)`,
  `.type_as(x)`); a mask has no derivative;
  constants: multiplication or division by a number or a buffer, adding a constant, negation; parameters:
  a value times, plus, minus or divided by one of the model's parameters broadcast over the examples (a
  learned temperature or scale, a learned bias or positional embedding);
- derived tensors: any computation on parameters and buffers alone (no input, no size of it), read where
  a parameter goes (`torch.sigmoid(self.gate) * h`, `F.linear(x, W + A @ B)`, `self.enc.weight.t()`):
  recorded as the model's own code and run per task by derived.py. Random functions and in-place writes
  of parameters fail the node; a parameter's shape (`.shape`, `.size()`) is a number. A parameter (or
  derived tensor) expanded over the examples, `p.expand(x.size(0), ...)`, `p.repeat(x.size(0), 1, ...)`,
  `p.expand_as(x)` (ViT's class token, CAVIA's context as its paper's code writes it), is a value of
  ExpandParamRule; an embedding at indices the model makes as it runs (GPT-2's `self.wpe(torch.arange(L))`),
  of HostEmbeddingRule (embedding.py). A weight PyTorch computes from other parameters as its layer runs
  (`torch.nn.utils.parametrize`, the `torch.nn.utils.weight_norm` hook: programs/reparam.py) is a derived
  tensor too, read by its layer or in `forward` (fx traces the parametrized property as a call of its
  ParametrizationList).
- tensors and numbers made from sizes and buffers alone, as the model runs (`self.pe[:, : x.size(1)]`,
  `self.bias[:, :, :T, :T] == 0`, `k.size(-1) ** 0.5`): `Host` values evaluated at every call, read by a
  value's `+`, `-`, `*`, `/`, `masked_fill` and `torch.where` (HostOperandRule). The tracer reads buffers as
  nodes, so what forward computes from a buffer follows its in-place updates.
A layer's sizes (windows, strides, dims) must be numbers when traced; one the model computes from the
input's shape as it runs (`F.avg_pool2d(x, x.shape[-1])`) fails the node (only reshapes, expand and the
arithmetic above take such values). In-place writes (`x.add_(y)`, `h += y`, inplace activations) compile
where no later node reads the overwritten value (`_Lowering.finish`).
A value several nodes read has its gradients summed (graph.py). BatchNorm + ReLU (+ MaxPool2d) and
BatchNorm + LeakyReLU are fused, and ReLU + MaxPool2d pools first (`graph.fuse`).

`Unsupported` names the culprit: the module path and type, or the fx node's op and target, with the line
of the model's code where fx knows it. Tracing fails on data-dependent control flow (`if x.sum() > 0`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ... import batchnorm
from ...context import CONTEXT_LAYERS, ContextConcat, FiLM
from ...layout import ParamLayout
from .. import reparam
from .attention import TRANSFORMER_LAYERS, AttentionLowering
from .base import Rule
from .context import ContextConcatRule, FiLMRule
from .conv import Conv1dRule, ConvRule, Geometry
from .conv_nd import ConvNdRule
from .dense import LinearRule, TransposedLinearRule
from .derived import Derived
from .dropout import DropoutRule
from .einsum import ELLIPSIS, EinsumParamRule, EinsumRule, EinsumSumRule, Equation
from .embedding import HostEmbeddingRule
from .example_maps import ExampleMapRule
from .example_norm import ExampleNormRule
from .functional import FunctionalRule
from .graph import Graph, Node, Ref, fuse
from .joins import AddRule, AffineRule, CatRule, HostOperandRule, MaximumRule, ParamAffineRule, ProductRule
from .l2norm import NormalizedLinearRule, NormalizeRule
from .lowered import (
    AttentionOutput,
    DtypeOf,
    Host,
    LayerOutput,
    Mask,
    MaxOverDim,
    NormalizedParam,
    ParamExpr,
    Parts,
    Permuted,
    Unbound,
    Value,
    argument_spec,
    bind_arguments,
    has_host,
)
from .mask import COMPARISONS, LOGICAL, CompareRule, LogicalRule, MaskCastRule, WhereRule
from .norm import BatchNormRule
from .pointwise import (
    ClampRule,
    ELURule,
    GELURule,
    HardsigmoidRule,
    HardswishRule,
    HardtanhRule,
    LeakyReLURule,
    MathRule,
    PReLURule,
    ReLURule,
    SigmoidRule,
    SiLURule,
    SoftplusRule,
    TanhRule,
)
from .pooling import AdaptiveAvgPool2dRule, AdaptiveMaxPool2dRule, AvgPool2dRule, MaxOverDimRule, MaxPool2dRule
from .reduce import LogSumExpRule, NormRule, VarRule
from .shape import (
    ExpandParamRule,
    ExpandRule,
    FlattenRule,
    MeanRule,
    PadRule,
    PartRule,
    PermuteRule,
    RepeatRule,
    ReshapeRule,
    SliceRule,
    SqueezeRule,
    SumRule,
    TransposeRule,
)
from .softmax import SoftmaxRule

# dropout layers, and the per-example dims after the channels their masks broadcast over (0: per entry)
_DROPOUTS = {nn.Dropout: 0, nn.Dropout1d: 1, nn.Dropout2d: 2, nn.Dropout3d: 3}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d)
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
_SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)  # SELU's fixed α and scale
# layers that draw random numbers in training mode
_RANDOM_LAYERS = tuple(
    getattr(nn, name)
    for name in (
        "AlphaDropout",
        "FeatureAlphaDropout",
        "RReLU",
        "FractionalMaxPool2d",
        "FractionalMaxPool3d",
    )
    if hasattr(nn, name)
)
# convolutions computed task by task by aten.convolution (conv_nd.py)
_CONV_ND_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv3d)
_CONSTANT_PADS = tuple(
    getattr(nn, name) for name in ("ConstantPad1d", "ConstantPad2d", "ConstantPad3d") if hasattr(nn, name)
)
# parameter-free layers that map each example linearly (example_maps.py; some are newer than torch 2.4)
_EXAMPLE_MAP_LAYERS = tuple(
    getattr(nn, name)
    for name in (
        "Upsample",
        "UpsamplingNearest2d",
        "UpsamplingBilinear2d",
        "PixelShuffle",
        "PixelUnshuffle",
        "ReflectionPad1d",
        "ReflectionPad2d",
        "ReflectionPad3d",
        "ReplicationPad1d",
        "ReplicationPad2d",
        "ReplicationPad3d",
        "CircularPad1d",
        "CircularPad2d",
        "CircularPad3d",
        "Unfold",
        "Fold",
    )
    if hasattr(nn, name)
)


class Unsupported(Exception):
    """The model cannot run on the fused engine; `module` / `kind` name the culprit ("" for the loss),
    `source` the line of the model's code where known."""

    def __init__(self, module: str, kind: str, reason: str, source: str = ""):
        where = f" at {source}" if source else ""
        super().__init__(f"{module} ({kind}){where}: {reason}" if module else reason)
        self.module, self.kind, self.reason, self.source = module, kind, reason, source
        self.volatile: Dict[str, frozenset] = {}  # attributes the trace of forward changed (restored)


# ---------------------------------------------------------------------------------------------- tracing


def _frame(text: str) -> str:
    """The last `File "...", line N` frame of a stack trace as "file:line: code"."""
    found = [
        f
        for f in re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', text or "")
        if "/torch/" not in f[0] and "fastmaml/programs" not in f[0]
    ]
    if not found:
        return ""
    path, line, code = found[-1]
    return f"{path}:{line}: {code.strip()}"


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of `exc`'s traceback outside torch (the model's code)."""
    tb, frame = exc.__traceback__, ""
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if "/torch/" not in path and "fastmaml/programs" not in path:
            code = inspect.getframeinfo(tb.tb_frame).code_context
            frame = f"{path}:{tb.tb_lineno}: {code[0].strip() if code else ''}"
        tb = tb.tb_next
    return frame


# what a parameter's or buffer's shape, dtype and device alone decide (the program cache keys on them)
_STATIC_TENSOR_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "size", "dim", "numel"})


class _Proxy(fx.Proxy):
    """fx's Proxy with augmented assignment recorded as what it is on tensors, an in-place write: fx's own
    falls back to `h = h + y`, so a model that kept `h` under another name read it unchanged in the graph
    (eager PyTorch reads the sum). The compiler then checks the write like any other (`_Lowering.finish`).
    A parameter's or buffer's shape, dtype and device are the real ones (`range(self.mask.shape[0])` traces,
    as it did while fx read buffers as plain tensors)."""

    def __getattr__(self, k):
        if k in _STATIC_TENSOR_ATTRIBUTES and self.node.op == "get_attr":
            path, _, name = self.node.target.rpartition(".")
            module = self.tracer.root.get_submodule(path)  # its tensors from its dicts: fx patches getattr
            held = module._buffers.get(name, module._parameters.get(name))
            if isinstance(held, torch.Tensor):
                return getattr(held, k)
        return super().__getattr__(k)

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other):
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other):
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other):
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})


class _Tracer(fx.Tracer):
    """fx's Tracer with buffers read as nodes (`proxy_buffer_attributes`): fx's default runs what forward
    computes from a buffer as it traces and keeps the result as a constant of the graph, which an in-place
    update of the buffer (`model.mask.fill_(...)`) would not reach; as nodes, they run at every call."""

    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in CONTEXT_LAYERS or super().is_leaf_module(m, module_qualified_name)


class _Root(nn.Module):
    """Holds a model that is itself one layer (e.g. a bare nn.Linear), so that it traces as a leaf."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


ROOT = "layer"  # the path of the wrapped layer in `_Root`, reported as "<model>"


def trace(model: nn.Module) -> fx.GraphModule:
    """The fx graph of `model.forward` (one tensor input; other arguments at their defaults). A model that
    is itself a leaf layer (a torch.nn module other than a container) is traced as one call of it."""
    if "forward" in model.__dict__:
        raise Unsupported(
            "<model>", type(model).__name__, "forward is replaced on the instance (fx traces the class's forward)"
        )
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):
        root = _Root(model)
        return fx.GraphModule(root, tracer.trace(root))
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise Unsupported("<model>", type(model).__name__, "forward takes no positional input")
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise Unsupported(
                "<model>", type(model).__name__, f"forward takes a second input {p.name!r}; meta_step calls model(x)"
            )
        concrete[p.name] = p.default
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # data-dependent control flow, calls fx cannot follow
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise Unsupported(
            "<model>", type(model).__name__, f"tracing forward with torch.fx failed: {first}", _user_frame(exc)
        ) from None
    return fx.GraphModule(tracer.root, graph)


# ---------------------------------------------------------------------------------------------- lowering

_FUNC_NAMES = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu_: "relu",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.elu: "elu",
    F.elu_: "elu",
    F.selu: "selu",
    torch.selu: "selu",
    F.celu: "celu",
    torch.celu: "celu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.softplus: "softplus",
    F.hardtanh: "hardtanh",
    F.relu6: "relu6",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.exp: "exp",
    torch.log: "log",
    torch.sqrt: "sqrt",
    torch.rsqrt: "rsqrt",
    torch.reciprocal: "reciprocal",
    torch.abs: "abs",
    torch.sin: "sin",
    torch.cos: "cos",
    torch.square: "square",
    torch.pow: "pow",
    operator.pow: "pow",
    F.max_pool2d: "max_pool2d",
    torch.max_pool2d: "max_pool2d",
    F.avg_pool2d: "avg_pool2d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    F.adaptive_max_pool2d: "adaptive_max_pool2d",
    torch.mean: "mean",
    torch.sum: "sum",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
    torch.flatten: "flatten",
    torch.permute: "permute",
    torch.unbind: "unbind",
    torch.select: "select",
    torch.chunk: "chunk",
    torch.split: "split",
    F.glu: "glu",
    torch.transpose: "transpose",
    torch.reshape: "reshape",
    F.linear: "linear",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    torch.clamp: "clamp",
    torch.clip: "clamp",
    operator.matmul: "matmul",
    F.conv2d: "conv2d",
    F.conv1d: "conv1d",
    F.batch_norm: "batch_norm",
    F.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    F.instance_norm: "instance_norm",
    F.normalize: "normalize",
    F.softmax: "softmax",
    F.log_softmax: "log_softmax",
    torch.softmax: "softmax_t",
    torch.log_softmax: "log_softmax_t",
    F.dropout: "dropout",
    F.embedding: "embedding",
    F.dropout1d: "dropout1d",
    F.dropout2d: "dropout2d",
    F.dropout3d: "dropout3d",
    torch.cat: "cat",
    torch.stack: "stack",
    torch.amax: "amax",
    torch.max: "max",
    torch.min: "min",
    torch.maximum: "maximum",
    torch.minimum: "minimum",
    torch.var: "var",
    torch.std: "std",
    torch.logsumexp: "logsumexp",
    torch.norm: "norm",
    torch.linalg.vector_norm: "vector_norm",
    torch.linalg.norm: "linalg_norm",
    F.mish: "mish",
    F.prelu: "prelu",
    torch.prelu: "prelu",
    F.pad: "pad",
    torch.concat: "cat",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    operator.neg: "neg",
    torch.neg: "neg",
    operator.gt: "gt",
    operator.lt: "lt",
    operator.ge: "ge",
    operator.le: "le",
    operator.eq: "eq",
    operator.ne: "ne",
    torch.gt: "gt",
    torch.lt: "lt",
    torch.ge: "ge",
    torch.le: "le",
    torch.eq: "eq",
    torch.ne: "ne",
    operator.and_: "and",
    operator.or_: "or",
    operator.xor: "xor",
    operator.invert: "not",
    torch.logical_and: "and",
    torch.logical_or: "or",
    torch.logical_xor: "xor",
    torch.logical_not: "not",
    torch.where: "where",
    torch.masked_fill: "masked_fill",
    torch.einsum: "einsum",
    F.interpolate: "interpolate",
    torch.flip: "flip",
    torch.roll: "roll",
    torch.cumsum: "cumsum",
    torch.tril: "tril",
    torch.triu: "triu",
    F.pixel_shuffle: "pixel_shuffle",
    F.pixel_unshuffle: "pixel_unshuffle",
    F.unfold: "unfold",
    F.fold: "fold",
    F.scaled_dot_product_attention: "sdpa",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    F.conv3d: "conv3d",
}
for _name in ("_max_pool2d", "max_pool2d_with_indices"):
    if hasattr(F, _name):
        _FUNC_NAMES[getattr(F, _name)] = "max_pool2d"
if hasattr(torch, "concatenate"):
    _FUNC_NAMES[torch.concatenate] = "cat"
_INPLACE_FUNCS = {
    torch.relu_,
    F.relu_,
    F.leaky_relu_,
    F.elu_,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
}
_METHOD_NAMES = {
    "relu": "relu",
    "relu_": "relu",
    "tanh": "tanh",
    "tanh_": "tanh",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "exp": "exp",
    "log": "log",
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "reciprocal": "reciprocal",
    "abs": "abs",
    "sin": "sin",
    "cos": "cos",
    "square": "square",
    "pow": "pow",
    "mean": "mean",
    "sum": "sum",
    "squeeze": "squeeze",
    "unsqueeze": "unsqueeze",
    "flatten": "flatten",
    "permute": "permute",
    "unbind": "unbind",
    "select": "select",
    "transpose": "transpose",
    "chunk": "chunk",
    "split": "split",
    "repeat": "repeat",
    "expand": "expand",
    "expand_as": "expand",
    "amax": "amax",
    "min": "min",
    "maximum": "maximum",
    "minimum": "minimum",
    "var": "var",
    "std": "std",
    "logsumexp": "logsumexp",
    "norm": "norm",
    "max": "max",
    "view": "view",
    "reshape": "view",
    "matmul": "matmul",
    "bmm": "matmul",
    "clamp": "clamp",
    "clip": "clamp",
    "clamp_min": "clamp_min",
    "clamp_max": "clamp_max",
    "softmax": "softmax_t",
    "log_softmax": "log_softmax_t",
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "sub_": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "div_": "div",
    "neg": "neg",
    "contiguous": "alias",
    "clone": "alias",
    **{name: name for name in ("gt", "lt", "ge", "le", "eq", "ne")},
    "logical_and": "and",
    "logical_or": "or",
    "logical_xor": "xor",
    "logical_not": "not",
    "__and__": "and",
    "__or__": "or",
    "__xor__": "xor",
    "__invert__": "not",
    "masked_fill": "masked_fill",
    **{name: name for name in ("flip", "roll", "cumsum", "tril", "triu")},
    **{name: "cast" for name in ("float", "double", "half", "bfloat16", "to", "type_as", "type")},
}
_SPECS = {
    "relu": argument_spec("input", ("inplace", False)),
    "tanh": argument_spec("input"),
    **{
        name: argument_spec("input")
        for name in ("exp", "log", "sqrt", "rsqrt", "reciprocal", "abs", "sin", "cos", "square")
    },
    "pow": argument_spec("input", "exponent"),
    "clamp": argument_spec("input", ("min", None), ("max", None)),
    "clamp_min": argument_spec("input", "min"),
    "clamp_max": argument_spec("input", "max"),
    "sigmoid": argument_spec("input"),
    "leaky_relu": argument_spec("input", ("negative_slope", 0.01), ("inplace", False)),
    "elu": argument_spec("input", ("alpha", 1.0), ("inplace", False)),
    "selu": argument_spec("input", ("inplace", False)),
    "celu": argument_spec("input", ("alpha", 1.0), ("inplace", False)),
    "gelu": argument_spec("input", ("approximate", "none")),
    "silu": argument_spec("input", ("inplace", False)),
    "softplus": argument_spec("input", ("beta", 1.0), ("threshold", 20.0)),
    "hardtanh": argument_spec("input", ("min_val", -1.0), ("max_val", 1.0), ("inplace", False)),
    "relu6": argument_spec("input", ("inplace", False)),
    "hardswish": argument_spec("input", ("inplace", False)),
    "hardsigmoid": argument_spec("input", ("inplace", False)),
    "max_pool2d": argument_spec(
        "input",
        "kernel_size",
        ("stride", None),
        ("padding", 0),
        ("dilation", 1),
        ("ceil_mode", False),
        ("return_indices", False),
    ),
    "avg_pool2d": argument_spec(
        "input",
        "kernel_size",
        ("stride", None),
        ("padding", 0),
        ("ceil_mode", False),
        ("count_include_pad", True),
        ("divisor_override", None),
    ),
    "adaptive_avg_pool2d": argument_spec("input", "output_size"),
    "adaptive_max_pool2d": argument_spec("input", "output_size", ("return_indices", False)),
    "mean": argument_spec("input", ("dim", None), ("keepdim", False), ("dtype", None)),
    "sum": argument_spec("input", ("dim", None), ("keepdim", False), ("dtype", None)),
    "squeeze": argument_spec("input", ("dim", None)),
    "unsqueeze": argument_spec("input", "dim"),
    "flatten": argument_spec("input", ("start_dim", 0), ("end_dim", -1)),
    "permute": argument_spec("input", "dims"),
    "unbind": argument_spec("input", ("dim", 0)),
    "select": argument_spec("input", "dim", "index"),
    "chunk": argument_spec("input", "chunks", ("dim", 0)),
    "split": argument_spec("input", "split_size_or_sections", ("dim", 0)),
    "glu": argument_spec("input", ("dim", -1)),
    "transpose": argument_spec("input", "dim0", "dim1"),
    "reshape": argument_spec("input", "shape"),
    "linear": argument_spec("input", "weight", ("bias", None)),
    "matmul": argument_spec("input", "other"),
    "conv2d": argument_spec(
        "input", "weight", ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)
    ),
    "conv1d": argument_spec(
        "input", "weight", ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)
    ),
    "batch_norm": argument_spec(
        "input",
        "running_mean",
        "running_var",
        ("weight", None),
        ("bias", None),
        ("training", False),
        ("momentum", 0.1),
        ("eps", 1e-5),
    ),
    "layer_norm": argument_spec("input", "normalized_shape", ("weight", None), ("bias", None), ("eps", 1e-5)),
    "group_norm": argument_spec("input", "num_groups", ("weight", None), ("bias", None), ("eps", 1e-5)),
    "instance_norm": argument_spec(
        "input",
        ("running_mean", None),
        ("running_var", None),
        ("weight", None),
        ("bias", None),
        ("use_input_stats", True),
        ("momentum", 0.1),
        ("eps", 1e-5),
    ),
    "normalize": argument_spec("input", ("p", 2.0), ("dim", 1), ("eps", 1e-12), ("out", None)),
    "softmax": argument_spec("input", ("dim", None), ("_stacklevel", 3), ("dtype", None)),
    "log_softmax": argument_spec("input", ("dim", None), ("_stacklevel", 3), ("dtype", None)),
    "softmax_t": argument_spec("input", "dim", ("dtype", None)),
    "log_softmax_t": argument_spec("input", "dim", ("dtype", None)),
    **{
        name: argument_spec("input", ("p", 0.5), ("training", True), ("inplace", False))
        for name in ("dropout", "dropout1d", "dropout2d", "dropout3d")
    },
    "embedding": argument_spec(
        "input",
        "weight",
        ("padding_idx", None),
        ("max_norm", None),
        ("norm_type", 2.0),
        ("scale_grad_by_freq", False),
        ("sparse", False),
    ),
    "cat": argument_spec("tensors", ("dim", 0)),
    "stack": argument_spec("tensors", ("dim", 0)),
    "amax": argument_spec("input", ("dim", None), ("keepdim", False)),
    "min": argument_spec("input", ("dim", None), ("keepdim", False)),
    "maximum": argument_spec("input", "other"),
    "minimum": argument_spec("input", "other"),
    "var": argument_spec("input", ("dim", None), ("unbiased", None), ("keepdim", False), ("correction", None)),
    "std": argument_spec("input", ("dim", None), ("unbiased", None), ("keepdim", False), ("correction", None)),
    "logsumexp": argument_spec("input", "dim", ("keepdim", False)),
    "norm": argument_spec("input", ("p", "fro"), ("dim", None), ("keepdim", False), ("out", None), ("dtype", None)),
    "vector_norm": argument_spec(
        "input", ("ord", 2), ("dim", None), ("keepdim", False), ("dtype", None), ("out", None)
    ),
    "linalg_norm": argument_spec(
        "input", ("ord", None), ("dim", None), ("keepdim", False), ("out", None), ("dtype", None)
    ),
    "mish": argument_spec("input", ("inplace", False)),
    "prelu": argument_spec("input", "weight"),
    "max": argument_spec("input", ("dim", None), ("keepdim", False)),
    "pad": argument_spec("input", "pad", ("mode", "constant"), ("value", None)),
    "add": argument_spec("input", "other", ("alpha", 1)),
    "sub": argument_spec("input", "other", ("alpha", 1)),
    "mul": argument_spec("input", "other"),
    "div": argument_spec("input", "other", ("rounding_mode", None)),
    "neg": argument_spec("input"),
    "alias": argument_spec("input", ("memory_format", None)),
    **{name: argument_spec("input", "other") for name in ("gt", "lt", "ge", "le", "eq", "ne", "and", "or", "xor")},
    "not": argument_spec("input"),
    "where": argument_spec("condition", "input", "other"),
    "masked_fill": argument_spec("input", "mask", "value"),
    "interpolate": argument_spec(
        "input",
        ("size", None),
        ("scale_factor", None),
        ("mode", "nearest"),
        ("align_corners", None),
        ("recompute_scale_factor", None),
        ("antialias", False),
    ),
    "roll": argument_spec("input", "shifts", ("dims", None)),
    "cumsum": argument_spec("input", "dim", ("dtype", None)),
    "tril": argument_spec("input", ("diagonal", 0)),
    "triu": argument_spec("input", ("diagonal", 0)),
    "pixel_shuffle": argument_spec("input", "upscale_factor"),
    "pixel_unshuffle": argument_spec("input", "downscale_factor"),
    "unfold": argument_spec("input", "kernel_size", ("dilation", 1), ("padding", 0), ("stride", 1)),
    "fold": argument_spec("input", "output_size", "kernel_size", ("dilation", 1), ("padding", 0), ("stride", 1)),
    **{
        name: argument_spec(
            "input",
            "weight",
            ("bias", None),
            ("stride", 1),
            ("padding", 0),
            ("output_padding", 0),
            ("groups", 1),
            ("dilation", 1),
        )
        for name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
    },
    "conv3d": argument_spec(
        "input", "weight", ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)
    ),
    "sdpa": argument_spec(
        "query",
        "key",
        "value",
        ("attn_mask", None),
        ("dropout_p", 0.0),
        ("is_causal", False),
        ("scale", None),
        ("enable_gqa", False),
    ),
}
# augmented assignment on a number made from sizes (`n -= 1`): numbers are not written in place
_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


# elementwise functions of one value that MathRule computes by name
_MATH = frozenset({"exp", "log", "sqrt", "rsqrt", "reciprocal", "abs", "sin", "cos"})
# random functions: refused where a derived tensor or a tensor made from sizes would call them
_RANDOM = frozenset(
    {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rand", "randn"}
    | {"rand_like", "randn_like", "randint", "randint_like", "randperm", "bernoulli", "normal", "multinomial"}
)
# functions whose results are integers (indices, counts), booleans or Python values: no function rule
_INTEGER_RESULTS = frozenset(
    {"argmax", "argmin", "argsort", "argwhere", "nonzero", "bucketize", "searchsorted", "unique"}
    | {"unique_consecutive", "bincount", "histc", "count_nonzero", "item", "tolist", "long", "int", "bool"}
    | {"isnan", "isinf", "isfinite", "isneginf", "isposinf", "signbit", "isclose", "allclose", "equal", "any", "all"}
    | {"numel", "nelement", "element_size", "stride", "is_contiguous", "data_ptr", "ndimension"}
)


class _Weight(NamedTuple):
    """Where a function without a rule takes its `index`-th parameter (`_Lowering.function_call`)."""

    index: int


_VALUE = object()  # where a function without a rule takes the value
# Python values a model computes with as it runs (besides None and Ellipsis)
_CONSTANTS = (bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
# what a parameter's shape, dtype and device decide: plain values when traced, not derived tensors
_STATIC_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
_STATIC_METHODS = frozenset({"size", "dim", "numel"})


# arguments that are tensors (values, parameters) and ops whose other arguments may be computed from sizes
_TENSOR_ARGUMENTS = frozenset(
    {"input", "other", "tensors", "weight", "bias", "running_mean", "running_var", "condition", "mask"}
    | {"query", "key", "value", "attn_mask"}
)
_CAST_DTYPES = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
_FLIPPED = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge", "eq": "eq", "ne": "ne"}
# shape operations a mask goes through (it stays a mask)
_MASK_SHAPE_OPS = frozenset({"unsqueeze", "squeeze", "view", "flatten", "permute", "transpose", "expand", "repeat"})
_HOST_ARGUMENT_OPS = frozenset({"reshape", "add", "sub", "mul", "div", "interpolate", "fold"})


class _Lowering(AttentionLowering):
    """Maps the fx nodes of one traced model to graph nodes."""

    def __init__(self, gm: fx.GraphModule, layout, bn_index: Dict[int, int], root_wrapped: bool):
        self.gm = gm
        self.root_wrapped = root_wrapped
        self.layout_groups = {"a": layout.adapted, "s": layout.shared}
        self.slot = {}  # id(parameter) -> Ref
        for g, group in self.layout_groups.items():
            for k, name in enumerate(group.names):
                self.slot[id(layout.params[name])] = Ref(g, k)
        self.layout = layout
        self.bn_index = bn_index
        self.derived: List[Derived] = []
        # id(ParamExpr) -> (it, its Ref("d", k)); the entry keeps the expression alive, so that its id is not
        # reused by a later expression (which would then read this one's derived tensor)
        self.derived_refs: Dict[int, Tuple[ParamExpr, Ref]] = {}
        self.env: Dict[fx.Node, Any] = {}
        self.nodes: List[Node] = []
        self.num_values = 1
        self.fx_node: Optional[fx.Node] = None
        self.num_dropouts = 0  # dropouts in training mode so far (each one's number names its masks' stream)

    # -------------------------------------------------------------- helpers
    def fail(self, reason: str):
        n = self.fx_node
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", repr(n.target))
        if n.op == "call_module":
            kind = type(self.gm.get_submodule(n.target)).__name__
            raise Unsupported(self.name() or "<model>", kind, reason, _frame(n.stack_trace))
        raise Unsupported(n.name, f"{n.op} {target}", reason, _frame(n.stack_trace))

    def arg(self, a):
        """An fx argument -> Value, Host, Ref (parameter/constant), or a Python value (lists mapped); a
        recurrent layer's output part becomes a value when read."""
        if isinstance(a, fx.Node):
            v = self.env[a]
            return self.layer_output(v) if isinstance(v, LayerOutput) else v
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, slice):
            return slice(self.arg(a.start), self.arg(a.stop), self.arg(a.step))
        return a

    def host_value(self, a) -> Host:
        """A Python value (possibly computed from sizes at run time) or a buffer as a Host."""
        if isinstance(a, Host):
            return a
        if isinstance(a, Ref) and a.group == "c":  # a buffer
            const = a.const
            return Host(lambda env: const, ())
        if isinstance(a, (Value, Ref, Parts, MaxOverDim, NormalizedParam, ParamExpr, Permuted, Unbound, Mask)):
            self.fail("a tensor is used where a size or number is expected (or torch.max's indices)")
        if isinstance(a, (list, tuple)):
            parts = [self.host_value(x) for x in a]
            kind = type(a)
            return Host(lambda env: kind(p.fn(env) for p in parts), tuple(v for p in parts for v in p.reads))
        if isinstance(a, slice):
            start, stop, step = (self.host_value(x) for x in (a.start, a.stop, a.step))
            return Host(
                lambda env: slice(start.fn(env), stop.fn(env), step.fn(env)), start.reads + stop.reads + step.reads
            )
        return Host(lambda env: a, ())

    def emit(
        self, rule: Rule, inputs, params=(), stats=None, host: Optional[Host] = None, inplace: bool = False
    ) -> Value:
        out = self.num_values
        self.num_values += 1
        self.nodes.append(
            Node(
                rule,
                tuple(v.vid for v in inputs),
                out,
                tuple(params),
                stats,
                host.fn if host is not None else None,
                host.reads if host is not None else (),
                inplace,
                _frame(self.fx_node.stack_trace),
            )
        )
        return Value(out)

    def value(self, a, what: str = "input") -> Value:
        if isinstance(a, Permuted):
            self.fail(
                f"its {what} is permuted to {a.dims}, which moves the examples' dim 0 from first; the fused engine "
                "needs it first again (select the leading dim, x[i] or x.unbind(0), or permute back) before this"
            )
        if isinstance(a, Mask):
            self.fail(f"its {what} is a mask (a comparison); convert it to a value first, e.g. mask.to(x.dtype)")
        if not isinstance(a, Value):
            self.fail(f"its {what} is not a tensor computed from the model's input")
        return a

    def param(self, a, what: str) -> Optional[Ref]:
        """A parameter, derived tensor or constant operand (of F.linear, F.conv2d, the norms, a product)."""
        if a is None or isinstance(a, Ref):
            return a
        if isinstance(a, (ParamExpr, NormalizedParam)):
            return self.derive(a)
        self.fail(f"its {what} is not one of the model's parameters or buffers, or computed from them alone")

    # -------------------------------------------------------------- derived tensors
    def flat_args(self, n: fx.Node) -> list:
        """Node n's arguments, mapped (`arg`), with lists, tuples and slices opened."""
        found: list = []

        def walk(a):
            if isinstance(a, (list, tuple)):
                for x in a:
                    walk(x)
            elif isinstance(a, slice):
                walk((a.start, a.stop, a.step))
            else:
                found.append(a)

        walk(self.arg(list(n.args)))
        walk(self.arg(list(n.kwargs.values())))
        return found

    def pure(self, n: fx.Node) -> bool:
        """Whether node n computes from parameters and buffers alone (it reads one, and no value or size).
        `F.normalize` of a parameter stays a `NormalizedParam` (a cosine classifier's own rule takes it)."""
        found = self.flat_args(n)
        if any(isinstance(v, (Value, Host, Parts, MaxOverDim, Permuted, Unbound, Mask, DtypeOf)) for v in found):
            return False
        if n.target is F.normalize and isinstance(found[0] if found else None, Ref):
            return False
        return any(isinstance(v, (Ref, ParamExpr, NormalizedParam)) for v in found)

    def host_only(self, n: fx.Node) -> bool:
        """Whether node n computes from sizes, buffers and constants alone (no value or parameter): a tensor or
        number the model makes as it runs (`self.pe[:, : x.size(1)]`, `self.bias[:, :, :T, :T] == 0`,
        `q.size(-1) ** 0.5`, `nn.Transformer.generate_square_subsequent_mask(5, device=x.device)`), evaluated
        per call as a `Host`."""
        return all(
            isinstance(v, (Host, *_CONSTANTS)) or v is None or v is Ellipsis or (isinstance(v, Ref) and v.group == "c")
            for v in self.flat_args(n)
        )

    def host_expr(self, n: fx.Node) -> Host:
        """Node n (see `host_only`) as a `Host` running the model's own call per call."""
        target = _OUT_OF_PLACE.get(n.target, n.target)
        name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        if name in _RANDOM:
            self.fail("a random tensor (exact meta-gradients need the model's computation fixed)")
        if target in _INPLACE_FUNCS or (n.op == "call_method" and name.endswith("_") and not name.endswith("__")):
            self.fail("an in-place operation on a buffer or a tensor made from sizes; write it out of place")
        args = self.host_value(self.arg(tuple(n.args)))
        keys = tuple(n.kwargs)
        kwargs = self.host_value(self.arg(tuple(n.kwargs.values())))

        def fn(env):
            a, kw = args.fn(env), dict(zip(keys, kwargs.fn(env)))
            return getattr(a[0], target)(*a[1:], **kw) if n.op == "call_method" else target(*a, **kw)

        return Host(fn, args.reads + kwargs.reads)

    def text_of(self, a) -> str:
        """How the model writes fx argument a (for `explain`)."""
        if isinstance(a, fx.Node):
            v = self.env.get(a)
            if isinstance(v, ParamExpr):
                return v.text
            return str(a.target) if a.op == "get_attr" else a.name
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self.text_of(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner})"
        return repr(a)

    def param_expr(self, n: fx.Node):
        """Node n (computed from parameters and buffers alone) as a `ParamExpr`; a parameter's shape (`.shape`,
        `.size()`, `.dim()`, ...) as the number it is."""
        target = n.target
        name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        if name in _RANDOM:
            self.fail("a random function of parameters (exact meta-gradients need it fixed)")
        if target in _INPLACE_FUNCS or (n.op == "call_method" and name.endswith("_") and not name.endswith("__")):
            self.fail("an in-place operation on a parameter or buffer; write it out of place")
        leaves: List[Ref] = []
        index: Dict[tuple, int] = {}

        def leaf(ref: Ref) -> int:
            key = (ref.group, ref.index)
            if key not in index:
                index[key] = len(leaves)
                leaves.append(ref)
            return index[key]

        def lift(a) -> Callable[[list], Any]:
            if isinstance(a, NormalizedParam):
                a = self.as_expr(a)
            if isinstance(a, ParamExpr):
                ids, fn = [leaf(r) for r in a.leaves], a.fn
                return lambda L: fn([L[i] for i in ids])
            if isinstance(a, Ref):
                if a.group == "c":
                    c = a.const
                    return lambda L: c
                i = leaf(a)
                return lambda L: L[i]
            if isinstance(a, (list, tuple)):
                parts, kind = [lift(x) for x in a], type(a)
                return lambda L: kind(p(L) for p in parts)
            if isinstance(a, slice):
                start, stop, step = lift(a.start), lift(a.stop), lift(a.step)
                return lambda L: slice(start(L), stop(L), step(L))
            return lambda L: a

        args = [lift(self.arg(a)) for a in n.args]
        kwargs = {k: lift(self.arg(v)) for k, v in n.kwargs.items()}
        texts = [self.text_of(a) for a in n.args] + [f"{k}={self.text_of(v)}" for k, v in n.kwargs.items()]
        if n.op == "call_method":

            def fn(L):
                return getattr(args[0](L), target)(*(a(L) for a in args[1:]), **{k: v(L) for k, v in kwargs.items()})

            text = f"{texts[0]}.{name}({', '.join(texts[1:])})"
        else:

            def fn(L):
                return target(*(a(L) for a in args), **{k: v(L) for k, v in kwargs.items()})

            text = f"{texts[0]}.{n.args[1]}" if target is getattr else f"{name}({', '.join(texts)})"
        try:
            with torch.no_grad():
                example = fn([self.tensor_of(r) for r in leaves])
        except Exception as e:  # noqa: BLE001 - the model's own code, reported as the reason
            self.fail(f"computing it from the model's parameters failed: {type(e).__name__}: {e}")
        static = (n.op == "call_method" and name in _STATIC_METHODS) or (
            target is getattr and n.args[1] in _STATIC_ATTRIBUTES
        )
        if static:
            return example
        if not leaves and isinstance(example, torch.Tensor):  # buffers alone: a constant, made per call
            return Host(lambda env: fn([]), ())
        if not isinstance(example, torch.Tensor) or not example.is_floating_point():
            self.fail("a computation on parameters whose result is not a floating-point tensor")
        return ParamExpr(fn, tuple(leaves), text, tuple(example.shape))

    def as_expr(self, a) -> ParamExpr:
        """A parameter, buffer, normalized parameter or derived tensor as a `ParamExpr`."""
        if isinstance(a, ParamExpr):
            return a
        if isinstance(a, NormalizedParam):
            inner, dim, eps = self.as_expr(a.ref), a.dim, a.eps
            f = inner.fn
            return ParamExpr(
                lambda L: F.normalize(f(L), dim=dim, eps=eps), inner.leaves, f"normalize({inner.text})", inner.shape
            )
        if a.group == "c":
            c = a.const
            return ParamExpr(lambda L: c, (), "<buffer>", tuple(c.shape))
        return ParamExpr(lambda L: L[0], (a,), self.ref_name(a), self.shape_of(a))

    def map_expr(self, a, fn: Callable, text: str, shape: Optional[Tuple[int, ...]] = None) -> ParamExpr:
        """`fn(a)` for a parameter, buffer or derived tensor a, of `shape` (default: a's); `text` formats a's."""
        a = self.as_expr(a)
        inner = a.fn
        return ParamExpr(lambda L: fn(inner(L)), a.leaves, text.format(a.text), a.shape if shape is None else shape)

    def derive(self, expr) -> Ref:
        """The graph's Ref("d", k) of a derived tensor, checked to run under torch.func for every task."""
        expr = self.as_expr(expr)
        known = self.derived_refs.get(id(expr))
        if known is not None:
            return known[1]
        d = Derived(expr.fn, expr.leaves, tuple(self.shape_of(r) for r in expr.leaves), expr.shape, expr.text)
        if d.leaves:
            one = [self.tensor_of(r).detach().unsqueeze(0) for r in d.leaves]
            try:
                g = d.value(one)
                d.pullback_tangent(one, one, g, g)
            except Exception as e:  # noqa: BLE001 - an op torch.func cannot transform
                self.fail(
                    f"{d.text}: torch.func (vmap, jvp, vjp), which computes it for every task, fails on it: "
                    f"{type(e).__name__}: {e}"
                )
        ref = Ref("d", len(self.derived))
        self.derived_refs[id(expr)] = (expr, ref)
        self.derived.append(d)
        return ref

    def tensor_of(self, ref: Ref) -> torch.Tensor:
        return self.layout.params[self.layout_groups[ref.group].names[ref.index]]

    def ref_name(self, ref: Ref) -> str:
        return self.layout_groups[ref.group].names[ref.index]

    def name(self) -> str:
        """The module path of a layer ("" for a model that is one layer), else the fx node's name."""
        n = self.fx_node
        if n.op == "call_module":
            return "" if self.root_wrapped and n.target == ROOT else n.target
        return n.name

    # -------------------------------------------------------------- fx node kinds
    def run(self) -> Graph:
        out = None
        for n in self.gm.graph.nodes:
            self.fx_node = n
            if n.op == "placeholder":
                self.env[n] = Value(0) if not self.env else n.args[0] if n.args else None
            elif n.op == "get_attr":
                self.env[n] = self.get_attr(n.target)
            elif n.op == "call_module":
                self.env[n] = self.call_module(n)
            elif n.op in ("call_function", "call_method"):
                self.env[n] = self.call(n)
            elif n.op == "output":
                out = self.arg(n.args[0])
                if not isinstance(out, Value):
                    self.fail(
                        "the model returns "
                        + (
                            "a tuple or dict"
                            if isinstance(out, (tuple, list, dict))
                            else "something that is not a tensor computed from its input"
                        )
                        + "; fastmaml needs forward(x) to return one tensor [N, ...]"
                    )
        return self.finish(out)

    def get_attr(self, target: str):
        obj = owner = self.gm
        for part in target.split("."):
            owner, obj = obj, getattr(obj, part)
        if isinstance(owner, nn.Module) and not isinstance(obj, nn.Parameter):
            expr = self.reparametrized(owner, part, target.rpartition(".")[0])
            if expr is not None:  # a weight-norm hook's weight, read outside its layer's call
                return expr
        if isinstance(obj, nn.Parameter):
            ref = self.slot.get(id(obj))
            if ref is None:
                self.fail(f"parameter {target!r} is not among the model's parameters")
            return ref
        if isinstance(obj, torch.Tensor):
            return Ref("c", const=obj)
        return obj

    def module_params(self, m: nn.Module, names, path: Optional[str] = None) -> Tuple[Optional[Ref], ...]:
        """Module m's tensors `names` as Refs (None where absent); `path`: m's module path (default: the node's)."""
        refs = []
        for pn in names:
            expr = self.reparametrized(m, pn, self.fx_node.target if path is None else path)
            if expr is not None:  # a parametrized or weight-normalized weight
                refs.append(self.derive(expr))
                continue
            p = getattr(m, pn, None)
            if p is None:
                refs.append(None)
            elif isinstance(p, nn.Parameter):
                refs.append(self.slot[id(p)])
            else:  # a plain tensor attribute (e.g. a frozen weight): a constant
                refs.append(Ref("c", const=p))
        return tuple(refs)

    def reparametrized(self, m: nn.Module, name: str, path: str) -> Optional[ParamExpr]:
        """Module m's tensor `name` as a derived tensor where PyTorch computes it from other parameters
        (programs/reparam.py: parametrizations, the weight-norm hook), else None."""
        try:
            r = reparam.reparametrization(m, name, path)
        except ValueError as e:
            self.fail(str(e))
        return None if r is None else self.reparametrization_expr(r)

    def reparametrization_expr(self, r: "reparam.Reparametrization") -> ParamExpr:
        leaves = tuple(self.slot.get(id(p)) for p in r.params)
        if None in leaves:
            self.fail(f"{r.text}: computed from a tensor that is not among the model's parameters")
        with torch.no_grad():
            shape = tuple(r.fn(list(r.params)).shape)
        return ParamExpr(r.fn, leaves, r.text, shape)

    def call_module(self, n: fx.Node):
        m = self.gm.get_submodule(n.target)
        if isinstance(m, parametrize.ParametrizationList):  # a parametrized tensor read in forward
            if n.args or n.kwargs:
                self.fail("a ParametrizationList called with arguments")
            try:
                return self.reparametrization_expr(reparam.parametrization_list(m, n.target))
            except ValueError as e:
                self.fail(str(e))
        if isinstance(m, nn.MultiheadAttention):
            return self.call_multihead_attention(n, m)
        if isinstance(m, TRANSFORMER_LAYERS):
            return self.call_transformer(n, m)
        x = self.arg(n.args[0]) if n.args else self.arg(next(iter(n.kwargs.values()), None))
        if len(n.args) + len(n.kwargs) != 1:
            self.fail("a layer called with more or fewer than one argument")
        if isinstance(m, nn.Embedding) and isinstance(x, (Host, Ref)):
            weight = self.module_params(m, ("weight",))[0]
            return self.host_embedding(x, weight, m.padding_idx, m.max_norm, m.scale_grad_by_freq)
        x = self.value(x)
        cls = parametrize.type_before_parametrizations(m)
        name, kind = self.name(), cls.__name__
        inplace = bool(getattr(m, "inplace", False))
        if cls is nn.Identity:
            return x
        if cls in _DROPOUTS:
            return self.dropout(x, m.p if m.training else 0.0, _DROPOUTS[cls], kind, inplace=inplace)
        if cls is nn.Linear:
            return self.emit(LinearRule(name, kind, m.in_features), [x], self.module_params(m, ("weight", "bias")))
        if cls is nn.Conv2d:
            self.check_conv(m.padding_mode, m.padding, m.kernel_size, m.dilation)
            geometry = Geometry(m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
            rule = ConvRule(name, kind, geometry, m.in_channels)
            return self.emit(rule, [x], self.module_params(m, ("weight", "bias")))
        if cls in _CONV_ND_LAYERS:
            return self.conv_nd_layer(m, cls, x)
        if cls is nn.Conv1d:
            self.check_conv(m.padding_mode, m.padding, m.kernel_size, m.dilation)
            rule = Conv1dRule(name, kind, m.kernel_size, m.stride, m.padding, m.dilation, m.in_channels, m.groups)
            return self.emit(rule, [x], self.module_params(m, ("weight", "bias")))
        if cls in _NORMS:
            rule = BatchNormRule(name, kind, m.eps, m.num_features, self.bn_index[id(m)])
            return self.emit(rule, [x], self.module_params(m, ("weight", "bias")))
        if cls in (nn.LayerNorm, nn.GroupNorm) or cls in _INSTANCE_NORMS:
            return self.emit(self.example_norm_rule(m, name, kind), [x], self.module_params(m, ("weight", "bias")))
        if cls is nn.ReLU:
            return self.emit(ReLURule(name, kind), [x], inplace=inplace)
        if cls is nn.LeakyReLU:
            return self.emit(LeakyReLURule(name, kind, m.negative_slope), [x], inplace=inplace)
        if cls is nn.ELU:
            return self.emit(ELURule(name, kind, m.alpha), [x], inplace=inplace)
        if cls is nn.SELU:
            return self.emit(ELURule(name, kind, *_SELU), [x], inplace=inplace)
        if cls is nn.CELU:
            return self.emit(ELURule(name, kind, m.alpha, 1.0, 1.0 / m.alpha), [x], inplace=inplace)
        if cls is nn.GELU:
            if m.approximate != "none":
                self.fail(f"approximate={m.approximate!r}; the fused engine supports 'none'")
            return self.emit(GELURule(name, kind), [x])
        if cls is nn.SiLU:
            return self.emit(SiLURule(name, kind), [x], inplace=inplace)
        if cls in (nn.Hardtanh, nn.ReLU6):
            rule = HardtanhRule(name, kind, float(m.min_val), float(m.max_val))
            return self.emit(rule, [x], inplace=inplace)
        if cls is nn.Hardswish:
            return self.emit(HardswishRule(name, kind), [x], inplace=inplace)
        if cls is nn.Hardsigmoid:
            return self.emit(HardsigmoidRule(name, kind), [x], inplace=inplace)
        if cls is nn.Mish:
            return self.mish(x, kind)
        if cls is nn.PReLU:
            return self.emit(PReLURule(name, kind, m.num_parameters), [x], self.module_params(m, ("weight",)))
        if cls is nn.Softplus:
            return self.emit(SoftplusRule(name, kind, float(m.beta), float(m.threshold)), [x])
        if cls is nn.Tanh:
            return self.emit(TanhRule(name, kind), [x])
        if cls is nn.Sigmoid:
            return self.emit(SigmoidRule(name, kind), [x])
        if cls is nn.MaxPool2d:
            if m.return_indices:
                self.fail("return_indices=True (the output is a tuple)")
            return self.emit(
                MaxPool2dRule(name, kind, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode), [x]
            )
        if cls is nn.AvgPool2d:
            return self.emit(
                AvgPool2dRule(
                    name, kind, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
                ),
                [x],
            )
        if cls is nn.AdaptiveAvgPool2d:
            return self.emit(AdaptiveAvgPool2dRule(name, kind, m.output_size), [x])
        if cls is nn.AdaptiveMaxPool2d:
            if m.return_indices:
                self.fail("return_indices=True (the output is a tuple)")
            return self.emit(AdaptiveMaxPool2dRule(name, kind, m.output_size), [x])
        if cls is ContextConcat:
            return self.emit(ContextConcatRule(name, kind, m.num_context), [x], self.module_params(m, ("context",)))
        if cls is FiLM:
            return self.emit(
                FiLMRule(name, kind, m.num_channels, m.num_context), [x], self.module_params(m, FiLMRule.param_names)
            )
        if cls is nn.Flatten:
            if m.start_dim == 0:
                self.fail("start_dim=0 would merge the examples of a task")
            return self.emit(FlattenRule(name, kind, m.start_dim, m.end_dim), [x])
        if isinstance(m, _CONSTANT_PADS):  # as F.pad(x, pad, value=v): the constant padding's own rule
            return self.emit(PadRule(name, kind, tuple(m.padding), float(m.value)), [x])
        if cls in _EXAMPLE_MAP_LAYERS:  # parameter-free: the rule runs its own copy
            layer = copy.deepcopy(m)
            return self.emit(ExampleMapRule(name, kind, lambda batch, _: layer(batch)), [x])
        return self.functional_layer(m, cls, x)

    def functional_layer(self, m: nn.Module, cls, x: Value):
        """A torch.nn layer without a rule: its own forward per task through torch.func (functional.py); a
        recurrent layer's tuple as a LayerOutput, read by parts."""
        names = [n for n, _ in m.named_parameters()]
        if any("." in n for n in names):
            self.fail("not a layer the fused engine knows, and its parameters live in sublayers")
        if next(m.buffers(), None) is not None:
            self.fail(
                "not a layer the fused engine knows, and it has buffers (which its torch.func rule would not update)"
            )
        if isinstance(m, _RANDOM_LAYERS) and m.training:
            self.fail("a random layer in training mode; exact meta-gradients need it fixed (call .eval() on it)")
        if isinstance(m, _RECURRENT) and not m.batch_first:  # (the cells take [N, H]: the examples first)
            self.fail(
                "batch_first=False puts the examples second; the fused engine needs them first (batch_first=True)"
            )
        weights = self.module_params(m, names)
        layer = copy.deepcopy(m)  # the rule's own copy, its weights given per call

        def call(batch, *w):
            return torch.func.functional_call(layer, dict(zip(names, w)), (batch,))

        kind = f"{cls.__name__} (torch.func)"
        if isinstance(m, _RECURRENT) or cls is nn.LSTMCell:
            return LayerOutput(call, weights, x, self.name(), kind, cls.__name__)
        ranks = [len(self.shape_of(r)) for r in weights]
        recurrent = isinstance(m, nn.RNNCellBase)
        return self.emit(FunctionalRule(self.name(), kind, call, ranks, recurrent=recurrent), [x], weights)

    def host_embedding(self, indices, weight: Ref, padding_idx, max_norm, scale_grad_by_freq) -> Value:
        """An embedding looked up at indices made as the model runs (from sizes, constants or a buffer), the
        same for every example: an HostEmbeddingRule reading the examples' count from the input."""
        if max_norm is not None or scale_grad_by_freq:
            self.fail("an embedding with max_norm (it renormalizes its weight in place) or scale_grad_by_freq")
        rule = HostEmbeddingRule(self.name(), "embedding", self.shape_of(weight)[0], padding_idx)
        return self.emit(rule, [Value(0)], (weight,), host=self.host_value(indices))

    def op_embedding(self, a, inplace):
        if not isinstance(a["input"], (Host, Ref)):
            self.fail("an embedding of a value computed from the input (the fused engine takes floating-point inputs)")
        weight = self.param(a["weight"], "weight")
        if weight is None or weight.group == "c":
            self.fail("F.embedding's weight is not one of the model's parameters")
        return self.host_embedding(a["input"], weight, a["padding_idx"], a["max_norm"], a["scale_grad_by_freq"])

    def function_call(self, n: fx.Node) -> LayerOutput:
        """A function or method without a rule, of one value and constants, parameters or buffers
        (`torch.sort(h, dim=-1).values`, `torch.cumprod(h, 1)`, `torch.special.erf(h)`): the model's own call per
        task through torch.func (functional.py), its result read whole or by parts (`LayerOutput`)."""
        target = n.target
        name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        if name in _RANDOM:
            self.fail("a random function; exact meta-gradients need the model's computation fixed")
        if name.endswith("_") and not name.endswith("__") or target in _INPLACE_FUNCS:
            self.fail("an in-place operation without a rule; write it out of place")
        if name in _INTEGER_RESULTS:
            self.fail(f"{name} returns integers, booleans or a Python value, which carry no gradient")
        found = self.flat_args(n)
        values = [v for v in found if isinstance(v, Value)]
        plain = all(isinstance(v, (Value, Ref, ParamExpr, *_CONSTANTS)) or v is None or v is Ellipsis for v in found)
        if len(values) != 1 or any(v.vid != values[0].vid for v in values) or not plain:
            self.fail(
                "no rule for this operation in the fused engine (a call without one runs through torch.func when "
                "it reads one value, and otherwise numbers, parameters or buffers)"
            )
        weights: List[Ref] = []

        def template(a):
            """The argument with the value as `_VALUE` and each parameter as its index in `weights`."""
            if isinstance(a, Value):
                return _VALUE
            if isinstance(a, Ref) and a.group == "c":
                return a.const
            if isinstance(a, (Ref, ParamExpr)):
                weights.append(self.param(a, "argument"))
                return _Weight(len(weights) - 1)
            if isinstance(a, (list, tuple)):
                return type(a)(template(x) for x in a)
            if isinstance(a, slice):
                return slice(template(a.start), template(a.stop), template(a.step))
            return a

        args = template(self.arg(tuple(n.args)))
        kwargs = {k: template(self.arg(v)) for k, v in n.kwargs.items()}
        method = n.op == "call_method"

        def call(batch, *w):
            def fill(a):
                if a is _VALUE:
                    return batch
                if isinstance(a, _Weight):
                    return w[a.index]
                if isinstance(a, (list, tuple)):
                    return type(a)(fill(x) for x in a)
                if isinstance(a, slice):
                    return slice(fill(a.start), fill(a.stop), fill(a.step))
                return a

            a, kw = fill(args), {k: fill(v) for k, v in kwargs.items()}
            return getattr(a[0], target)(*a[1:], **kw) if method else target(*a, **kw)

        return LayerOutput(call, tuple(weights), values[0], self.name(), f"{name} (torch.func)", None)

    def layer_output(self, out: LayerOutput) -> Value:
        """The part of a recurrent layer's output a node reads (`LayerOutput.readable`) as a FunctionalRule."""
        if out.value is not None:
            return out.value
        if not out.readable():
            if out.layer == "LSTMCell":
                self.fail(f"{out.kind} returns (h, c): read h or c")
            self.fail(
                f"{out.kind} returns (output, {'(h_n, c_n)' if out.layer == 'LSTM' else 'h_n'}): read output, or one "
                "layer's final state h_n[i] (whose examples are second: the fused engine needs them first)"
            )
        call, path, kind = out.call, out.path, out.kind

        def part(batch, *w):
            y = call(batch, *w)
            for k in path:
                if out.layer is None and not isinstance(y, tuple):
                    raise ValueError(
                        f"model layer {out.name} ({kind}): it returns a tensor, which the model indexes by {k!r} as "
                        "if it were a tuple of results; index per-example dims (y[:, k])"
                    )
                y = getattr(y, k) if isinstance(k, str) else y[k]
            return y

        ranks = [len(self.shape_of(r)) for r in out.weights]
        rule = FunctionalRule(out.name, kind, part, ranks, recurrent=out.layer is not None)
        out.value = self.emit(rule, [out.x], out.weights)
        return out.value

    def conv_nd_rule(self, kind: str, weight_shape, stride, padding, dilation, groups, output_padding=None):
        """ConvNdRule for a weight of `weight_shape`; `output_padding` None: an ordinary convolution."""
        dims = len(weight_shape) - 2

        def expand(v, what):
            v = list(v) if isinstance(v, (list, tuple)) else [v] * dims
            if len(v) != dims or not all(isinstance(k, int) and not isinstance(k, bool) for k in v):
                self.fail(f"{kind}'s {what} must be a number or {dims} numbers")
            return v

        dilation = expand(dilation, "dilation")
        if isinstance(padding, str):  # "valid" or symmetric "same" (checked by check_conv)
            padding = (
                [0] * dims if padding == "valid" else [d * (k - 1) // 2 for d, k in zip(dilation, weight_shape[2:])]
            )
        transposed = output_padding is not None
        return ConvNdRule(
            self.name(),
            kind,
            len(weight_shape),
            expand(stride, "stride"),
            expand(padding, "padding"),
            dilation,
            transposed,
            expand(output_padding if transposed else 0, "output_padding"),
            groups,
        )

    def conv_nd_layer(self, m: nn.Module, cls, x: Value) -> Value:
        """ConvTranspose1d/2d/3d and Conv3d (zero padding; conv_nd.py)."""
        if m.padding_mode != "zeros":
            self.fail(f"padding_mode={m.padding_mode!r}; the fused engine supports 'zeros'")
        self.check_conv(m.padding_mode, m.padding, m.kernel_size, m.dilation)
        output_padding = None if cls is nn.Conv3d else m.output_padding
        rule = self.conv_nd_rule(
            cls.__name__, tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups, output_padding
        )
        return self.emit(rule, [x], self.module_params(m, ("weight", "bias")))

    def op_conv_nd(self, a, inplace, rank: int, what: str, transposed: bool) -> Value:
        """F.conv_transpose1d/2d/3d and F.conv3d on the model's own weight."""
        w = self.param(a["weight"], "weight")
        if w is None or len(self.shape_of(w)) != rank:
            self.fail(f"{what} needs a weight of {rank} dims")
        shape = self.shape_of(w)
        if not transposed:
            self.check_conv("zeros", a["padding"], shape[2:], a["dilation"])
        output_padding = a["output_padding"] if transposed else None
        rule = self.conv_nd_rule(what, shape, a["stride"], a["padding"], a["dilation"], a["groups"], output_padding)
        return self.emit(rule, [self.value(a["input"])], (w, self.param(a["bias"], "bias")))

    def op_conv_transpose1d(self, a, inplace):
        return self.op_conv_nd(a, inplace, 3, "conv_transpose1d", True)

    def op_conv_transpose2d(self, a, inplace):
        return self.op_conv_nd(a, inplace, 4, "conv_transpose2d", True)

    def op_conv_transpose3d(self, a, inplace):
        return self.op_conv_nd(a, inplace, 5, "conv_transpose3d", True)

    def op_conv3d(self, a, inplace):
        return self.op_conv_nd(a, inplace, 5, "conv3d", False)

    def example_norm_rule(self, m: nn.Module, name: str, kind: str) -> ExampleNormRule:
        cls = parametrize.type_before_parametrizations(m)
        if cls is nn.LayerNorm:
            return ExampleNormRule(name, kind, m.eps, normalized_shape=m.normalized_shape)
        if cls is nn.GroupNorm:
            return ExampleNormRule(name, kind, m.eps, groups=m.num_groups, channels=m.num_channels)
        if m.track_running_stats:
            self.fail(
                "track_running_stats=True (running statistics are not supported; the default, False, normalizes "
                "each example by its own statistics in train and eval mode)"
            )
        return ExampleNormRule(name, kind, m.eps, channels=m.num_features)

    def check_conv(self, padding_mode, padding, kernel_size, dilation):
        if padding_mode != "zeros":
            self.fail(f"padding_mode={padding_mode!r}; the fused engine supports 'zeros'")
        if padding == "same" and Geometry.same_is_asymmetric(kernel_size, dilation):
            self.fail("padding='same' with an even effective kernel (asymmetric padding)")

    def call(self, n: fx.Node):
        target = n.target
        source = self.env.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if isinstance(source, LayerOutput) and source.indexes_a_part():
            if target is operator.getitem and (source.layer is not None or isinstance(n.args[1], int)):
                return source.index(n.args[1])
            if target is getattr and source.layer is None and n.args[1] in ("values", "indices"):
                if n.args[1] == "indices":
                    self.fail(f"the indices {source.kind} returns are integers, which carry no gradient")
                return source.index("values")
        if self.pure(n):
            return self.param_expr(n)
        if self.host_only(n):
            return self.host_expr(n)
        if n.args and isinstance(n.args[0], fx.Node) and isinstance(self.env.get(n.args[0]), Mask):
            op = (_METHOD_NAMES if n.op == "call_method" else _FUNC_NAMES).get(target)
            if op in _MASK_SHAPE_OPS or target is operator.getitem:
                return self.mask_shape(n)
        if n.op == "call_method":
            if target in ("size", "dim") or (target == "__getattribute__"):
                return self.host_call(n)
            op = _METHOD_NAMES.get(target)
            inplace = target.endswith("_")
        else:
            if target is operator.getitem and isinstance(self.arg(n.args[0]), Value):
                return self.slice(self.arg(n.args[0]), n.args[1])
            if target is operator.getitem and isinstance(self.arg(n.args[0]), Parts):
                return self.part(self.arg(n.args[0]), n.args[1])
            if target is operator.getitem and isinstance(self.arg(n.args[0]), (Unbound, Permuted)):
                return self.select_part(self.arg(n.args[0]), self.arg(n.args[1]))
            if target is operator.getitem and isinstance(self.arg(n.args[0]), AttentionOutput):
                out = self.arg(n.args[0])
                return out.output if n.args[1] == 0 else out.weights
            if isinstance(self.arg(n.args[0]) if n.args else None, MaxOverDim) and (
                (target is operator.getitem and n.args[1] == 0) or (target is getattr and n.args[1] == "values")
            ):
                m = self.arg(n.args[0])
                return self.emit(MaxOverDimRule(self.name(), "max", m.dim, m.keepdim), [m.value])
            if target is getattr:  # of a value (of sizes, buffers and parameters: host_only, pure above)
                return self.host_call(n)
            op = _FUNC_NAMES.get(target)
            inplace = target in _INPLACE_FUNCS
            if getattr(target, "__name__", "") == "_assert_is_none":  # fx's guard of a None default argument
                return None
        if op is None:
            return self.function_call(n)
        if n.op == "call_method" and target in ("expand", "expand_as", "repeat"):
            return self.expand_or_repeat(n)
        if op == "cast":
            return self.cast(n)
        if op == "einsum":
            return self.einsum(n)
        if op == "flip":  # torch.flip(x, dims), x.flip(dims) or x.flip(2, 3)
            dims = self.arg(n.kwargs["dims"] if "dims" in n.kwargs else self.sizes_of(n))
            return self.op_flip(self.arg(n.args[0]), tuple(dims) if isinstance(dims, (list, tuple)) else (dims,))
        if op == "permute" and n.op == "call_method":  # x.permute(0, 2, 1) or x.permute((0, 2, 1))
            dims = n.kwargs["dims"] if "dims" in n.kwargs else self.sizes_of(n)
            return self.permute(self.arg(n.args[0]), tuple(dims))
        if op == "view":
            x = self.value(self.arg(n.args[0]))
            shape = self.arg(self.sizes_of(n) if "shape" not in n.kwargs else n.kwargs["shape"])
            return self.reshape(x, shape)
        try:
            a = bind_arguments(
                _SPECS[op], [self.arg(x) for x in n.args], {k: self.arg(v) for k, v in n.kwargs.items()}, op
            )
        except TypeError as e:
            self.fail(str(e))
        inplace = inplace or bool(a.get("inplace", False))
        if op not in _HOST_ARGUMENT_OPS:
            sized = [k for k, v in a.items() if k not in _TENSOR_ARGUMENTS and has_host(v)]
            if sized:
                self.fail(
                    f"{op}'s {sized[0]} is computed from tensor sizes when the model runs; the fused engine needs it "
                    "fixed (a number), e.g. F.adaptive_avg_pool2d(x, 1) for a global average pool"
                )
        if op in _MATH:
            return self._math(a, op)
        if op in COMPARISONS:
            return self.compare(a, op)
        if op in LOGICAL or op == "not":
            return self.logical(a, op)
        return getattr(self, f"op_{op}")(a, inplace)

    def host_call(self, n: fx.Node) -> Host:
        """`x.size()`, `x.size(d)`, `x.dim()`, `x.shape`, `x.dtype`, `x.device` of a value."""
        args = [self.arg(a) for a in n.args]
        target = n.target
        if n.op == "call_method" and target in ("size", "dim"):
            x = self.value(args[0])
            v = x.vid
            if target == "dim":
                return Host(lambda env: env[v].dim() - 1, (v,))
            if len(args) > 1 or "dim" in n.kwargs:
                d = self.host_value(args[1] if len(args) > 1 else self.arg(n.kwargs["dim"]))
                return Host(lambda env: env[v].shape[1:][d.fn(env)], (v,) + d.reads)
            return Host(lambda env: env[v].shape[1:], (v,))
        if target is getattr:
            obj, attr = args
            if isinstance(obj, Value) and attr == "shape":
                v = obj.vid
                return Host(lambda env: env[v].shape[1:], (v,))
            if isinstance(obj, Value) and attr == "dtype":
                return DtypeOf(obj)
            if isinstance(obj, Value) and attr == "device":  # every value is on the parameters' device
                return self.layout_dtype_device()[1]
            self.fail(f"attribute {attr!r} of a traced value")
        self.fail("no rule for this operation in the fused engine")

    def reshape(self, x: Value, shape) -> Value:
        shape = shape if isinstance(shape, (list, tuple)) else (shape,)
        if shape and isinstance(shape[0], int) and shape[0] != -1:
            self.fail(f"reshape to {tuple(shape)} fixes the number of examples; use x.view(x.size(0), ...)")
        host = self.host_value(tuple(shape))
        return self.emit(ReshapeRule(self.name(), "reshape"), [x], host=host)

    # -------------------------------------------------------------- operations (a: bound arguments)
    def op_alias(self, a, inplace):
        return a["input"] if isinstance(a["input"], Permuted) else self.value(a["input"])

    def op_relu(self, a, inplace):
        return self.emit(ReLURule(self.name(), "relu"), [self.value(a["input"])], inplace=inplace)

    def op_tanh(self, a, inplace):
        return self.emit(TanhRule(self.name(), "tanh"), [self.value(a["input"])], inplace=inplace)

    def op_sigmoid(self, a, inplace):
        return self.emit(SigmoidRule(self.name(), "sigmoid"), [self.value(a["input"])], inplace=inplace)

    def op_leaky_relu(self, a, inplace):
        return self.emit(
            LeakyReLURule(self.name(), "leaky_relu", float(a["negative_slope"])),
            [self.value(a["input"])],
            inplace=inplace,
        )

    def op_elu(self, a, inplace):
        return self.emit(ELURule(self.name(), "elu", float(a["alpha"])), [self.value(a["input"])], inplace=inplace)

    def op_selu(self, a, inplace):
        return self.emit(ELURule(self.name(), "selu", *_SELU), [self.value(a["input"])], inplace=inplace)

    def op_celu(self, a, inplace):
        alpha = float(a["alpha"])
        rule = ELURule(self.name(), "celu", alpha, 1.0, 1.0 / alpha)
        return self.emit(rule, [self.value(a["input"])], inplace=inplace)

    def op_gelu(self, a, inplace):
        if a["approximate"] != "none":
            self.fail(f"approximate={a['approximate']!r}; the fused engine supports 'none'")
        return self.emit(GELURule(self.name(), "gelu"), [self.value(a["input"])])

    def op_silu(self, a, inplace):
        return self.emit(SiLURule(self.name(), "silu"), [self.value(a["input"])], inplace=inplace)

    def _math(self, a, function: str, exponent: float = 1.0):
        return self.emit(MathRule(self.name(), function, function, exponent), [self.value(a["input"])])

    def op_square(self, a, inplace):
        return self._math(a, "pow", 2.0)

    def op_pow(self, a, inplace):
        c = a["exponent"]
        if not isinstance(a["input"], Value) or isinstance(c, bool) or not isinstance(c, (int, float)):
            self.fail("a power other than a value to a constant number (x ** 2, x.pow(0.5))")
        return self._math(a, "pow", float(c))

    def op_clamp(self, a, inplace):
        bounds = (a.get("min"), a.get("max"))
        if not all(b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)) for b in bounds):
            self.fail("clamp by bounds other than numbers (tensor bounds do not compile)")
        return self.emit(ClampRule(self.name(), "clamp", *bounds), [self.value(a["input"])], inplace=inplace)

    def op_clamp_min(self, a, inplace):
        return self.op_clamp(a, inplace)

    def op_clamp_max(self, a, inplace):
        return self.op_clamp(a, inplace)

    def op_hardtanh(self, a, inplace):
        rule = HardtanhRule(self.name(), "hardtanh", float(a["min_val"]), float(a["max_val"]))
        return self.emit(rule, [self.value(a["input"])], inplace=inplace)

    def op_relu6(self, a, inplace):
        return self.emit(HardtanhRule(self.name(), "relu6", 0.0, 6.0), [self.value(a["input"])], inplace=inplace)

    def op_hardswish(self, a, inplace):
        return self.emit(HardswishRule(self.name(), "hardswish"), [self.value(a["input"])], inplace=inplace)

    def op_hardsigmoid(self, a, inplace):
        return self.emit(HardsigmoidRule(self.name(), "hardsigmoid"), [self.value(a["input"])], inplace=inplace)

    def op_softplus(self, a, inplace):
        rule = SoftplusRule(self.name(), "softplus", float(a["beta"]), float(a["threshold"]))
        return self.emit(rule, [self.value(a["input"])])

    def op_max_pool2d(self, a, inplace):
        if a["return_indices"]:
            self.fail("return_indices=True (the output is a tuple)")
        rule = MaxPool2dRule(
            self.name(), "max_pool2d", a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]
        )
        return self.emit(rule, [self.value(a["input"])])

    def op_avg_pool2d(self, a, inplace):
        rule = AvgPool2dRule(
            self.name(),
            "avg_pool2d",
            a["kernel_size"],
            a["stride"],
            a["padding"],
            a["ceil_mode"],
            a["count_include_pad"],
            a["divisor_override"],
        )
        return self.emit(rule, [self.value(a["input"])])

    def op_adaptive_avg_pool2d(self, a, inplace):
        return self.emit(
            AdaptiveAvgPool2dRule(self.name(), "adaptive_avg_pool2d", a["output_size"]), [self.value(a["input"])]
        )

    def op_adaptive_max_pool2d(self, a, inplace):
        if a["return_indices"]:
            self.fail("return_indices=True (the output is a tuple)")
        return self.emit(
            AdaptiveMaxPool2dRule(self.name(), "adaptive_max_pool2d", a["output_size"]), [self.value(a["input"])]
        )

    def _feature_dims(self, what: str, dims) -> tuple:
        """dims (an int or a sequence of them) as a tuple of per-example dims, or the node fails naming `what`."""
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not dims or not all(isinstance(d, int) for d in dims) or 0 in dims:
            self.fail(f"{what} over dims {dims} includes the examples' dim 0 (give per-example dims)")
        return dims

    def op_mean(self, a, inplace):
        return self._reduce(a, "mean", MeanRule)

    def op_sum(self, a, inplace):
        return self._reduce(a, "sum", SumRule)

    def _reduce(self, a, what: str, rule):
        if a["dim"] is None or a["dtype"] is not None:
            self.fail(f"a {what} over all dimensions (or with a dtype) mixes the examples; give per-example dims")
        dims = self._feature_dims(what, a["dim"])
        return self.emit(rule(self.name(), what, dims, bool(a["keepdim"])), [self.value(a["input"])])

    def op_squeeze(self, a, inplace):
        if a["dim"] is None:
            self.fail("squeeze without dims would drop the examples' dim of a task with one example; give dims")
        dims = self._feature_dims("squeeze", a["dim"])
        return self.emit(SqueezeRule(self.name(), "squeeze", dims), [self.value(a["input"])])

    def op_unsqueeze(self, a, inplace):
        dims = self._feature_dims("unsqueeze", a["dim"])
        return self.emit(SqueezeRule(self.name(), "unsqueeze", dims, unsqueeze=True), [self.value(a["input"])])

    def op_flatten(self, a, inplace):
        if a["start_dim"] == 0:
            self.fail("flatten from dim 0 merges the examples; use start_dim=1 (torch.flatten(x, 1))")
        return self.emit(FlattenRule(self.name(), "flatten", a["start_dim"], a["end_dim"]), [self.value(a["input"])])

    def permute(self, x, dims):
        """`x.permute(dims)` of a value or a `Permuted`: a PermuteRule where the examples stay (or come back)
        first, else a `Permuted` for the nodes that bring them back."""
        if not isinstance(x, Permuted):
            x = Permuted(self.value(x), tuple(range(len(dims))))
        rank = len(x.dims)
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            self.fail(f"permute to {dims} of a tensor of {rank} dims (give every dim, as numbers)")
        if sorted(d % rank for d in dims) != list(range(rank)):
            self.fail(f"permute to {dims}: not a permutation of {rank} dims")
        return self.permuted(x.value, tuple(x.dims[d % rank] for d in dims))

    def permuted(self, x: Value, dims: Tuple[int, ...]):
        """x permuted to `dims` (all dims, none negative): x itself, a PermuteRule's value, or a `Permuted`."""
        if dims[0] != 0:
            return Permuted(x, dims)
        if dims == tuple(range(len(dims))):
            return x
        return self.emit(PermuteRule(self.name(), "permute", dims), [x])

    def op_permute(self, a, inplace):
        return self.permute(a["input"], tuple(a["dims"]))

    def op_transpose(self, a, inplace):
        x, d0, d1 = a["input"], a["dim0"], a["dim1"]
        if isinstance(x, Permuted) and isinstance(d0, int) and isinstance(d1, int):
            dims = list(range(len(x.dims)))
            dims[d0], dims[d1] = dims[d1], dims[d0]
            return self.permute(x, tuple(dims))
        if not isinstance(d0, int) or not isinstance(d1, int) or 0 in (d0, d1):
            self.fail(f"transpose of dims {d0} and {d1}: the examples' dim 0 stays first (transpose per-example dims)")
        return self.emit(TransposeRule(self.name(), "transpose", d0, d1), [self.value(x)])

    def op_select(self, a, inplace):
        return self.select(a["input"], a["dim"], a["index"], "select")

    def op_unbind(self, a, inplace):
        x, d = a["input"], a["dim"]
        self.check_part_dim(x, d, "unbind")
        return Unbound(x if isinstance(x, Permuted) else self.value(x), d)

    def check_part_dim(self, x, d, what: str) -> None:
        if not isinstance(d, int) or (d == 0 and not isinstance(x, Permuted)):
            self.fail(f"{what} along dim {d}, the examples' dim ({what} along a per-example dim)")

    def select_part(self, x, index):
        """`parts[i]` of an `Unbound`, or `x[i]` of a `Permuted` (its leading dim)."""
        if isinstance(index, tuple) and len(index) == 1:
            index = index[0]
        if isinstance(x, Unbound):
            return self.select(x.source, x.dim, index, "unbind")
        if not isinstance(index, int):
            self.fail(
                f"indexing by {index!r} a tensor whose examples' dim a permute moved to {x.dims.index(0)}: only x[i] "
                "of its leading dim compiles"
            )
        return self.select(x, 0, index, "getitem")

    def select(self, x, dim, index, kind: str):
        """`x.select(dim, index)` of a value or a `Permuted` (e.g. the leading dim of timm's qkv)."""
        self.check_part_dim(x, dim, kind)
        if not isinstance(index, int) or isinstance(index, bool):
            self.fail(f"{kind} of part {index!r}: the fused engine needs a number")
        if not isinstance(x, Permuted):
            where = (slice(None),) * dim + (index,) if dim > 0 else (Ellipsis, index) + (slice(None),) * (-dim - 1)
            return self.emit(SliceRule(self.name(), kind, where), [self.value(x)])
        taken = x.dims[dim % len(x.dims)]
        if taken == 0:
            self.fail(f"{kind} along the examples' dim (moved to dim {dim} by a permute)")
        part = self.emit(SliceRule(self.name(), kind, (slice(None),) * taken + (index,)), [x.value])
        return self.permuted(part, tuple(d - (d > taken) for d in x.dims if d != taken))

    def slice(self, x: Value, index) -> Value:
        """`x[index]` where index keeps every example (`x[:, 1:3]`, `x[:, 0]`, `x[..., :4]`, `x[:, None]`)."""
        index = index if isinstance(index, tuple) else (index,)

        def plain(i):
            if isinstance(i, slice):
                return all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)) and (i.step or 1) > 0
            return i is Ellipsis or i is None or (isinstance(i, int) and not isinstance(i, bool))

        first = index[0] if index else None
        if (
            (first is not Ellipsis and first != slice(None))
            or not all(plain(i) for i in index)
            or index.count(Ellipsis) > 1
        ):
            self.fail(
                "indexing that does not keep every example with `:` or `...` first, or with tensors, computed "
                "sizes or negative steps (slices, integers and None of per-example dims compile: x[:, 1:3], "
                "x[:, 0], x[..., :4], x[:, None])"
            )
        return self.emit(SliceRule(self.name(), "getitem", index), [x])

    def _parts(self, a, kind: str, chunks=None, sizes=None) -> Parts:
        d = a["dim"]
        if not isinstance(d, int) or d == 0:
            self.fail(f"{kind} along dim {d}, the examples' dim (cut a per-example dim)")
        return Parts(self.value(a["input"]), kind, d, chunks, sizes)

    def op_chunk(self, a, inplace):
        if not isinstance(a["chunks"], int) or a["chunks"] < 1:
            self.fail("chunk needs a number of chunks")
        return self._parts(a, "chunk", chunks=a["chunks"])

    def op_split(self, a, inplace):
        sizes = a["split_size_or_sections"]
        ok = isinstance(sizes, int) or (isinstance(sizes, (list, tuple)) and all(isinstance(k, int) for k in sizes))
        if not ok:
            self.fail("split needs a size or a list of sizes (numbers)")
        return self._parts(a, "split", sizes=sizes if isinstance(sizes, int) else tuple(sizes))

    def part(self, parts: Parts, index) -> Value:
        if not isinstance(index, int) or index < 0:
            self.fail("only single parts of chunk/split compile (a, b = x.chunk(2, -1), or x.chunk(2, -1)[1])")
        rule = PartRule(self.name(), parts.kind, parts.dim, index, parts.chunks, parts.sizes)
        return self.emit(rule, [parts.value])

    def op_glu(self, a, inplace):
        """F.glu(x, dim) = a · sigmoid(b), a, b the halves of x along dim."""
        parts = self._parts(a, "glu", chunks=2)
        first, second = (self.emit(PartRule(self.name(), "glu", parts.dim, i, chunks=2), [parts.value]) for i in (0, 1))
        gate = self.emit(SigmoidRule(self.name(), "sigmoid"), [second])
        return self.emit(ProductRule(self.name(), "mul"), [first, gate])

    def op_reshape(self, a, inplace):
        return self.reshape(self.value(a["input"]), a["shape"] if "shape" in a else a["input"])

    def dropout(
        self, x: Value, p, channels: int, kind: str, name: Optional[str] = None, inplace: bool = False
    ) -> Value:
        """Dropout of x with probability p (0: none), per entry or (`channels` dims of positions) per channel;
        `name`: where in the model (default: the node's); `inplace`: the model overwrites x."""
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            self.fail(f"dropout probability {p!r}: expected a number in [0, 1]")
        if p == 0:
            return x
        self.num_dropouts += 1
        rule = DropoutRule(name or self.name(), kind, p, self.num_dropouts - 1, channels)
        return self.emit(rule, [x], inplace=inplace)

    def op_dropout(self, a, inplace, channels: int = 0):
        kind = "dropout" if not channels else f"dropout{channels}d"
        p = a["p"] if a["training"] else 0.0
        return self.dropout(self.value(a["input"]), p, channels, kind, inplace=inplace)

    def op_dropout1d(self, a, inplace):
        return self.op_dropout(a, inplace, 1)

    def op_dropout2d(self, a, inplace):
        return self.op_dropout(a, inplace, 2)

    def op_dropout3d(self, a, inplace):
        return self.op_dropout(a, inplace, 3)

    def op_normalize(self, a, inplace):
        if a["p"] != 2 or a["out"] is not None or not isinstance(a["dim"], int):
            self.fail("F.normalize with p other than 2, an out= tensor or several dims (p=2 over one dim compiles)")
        x = a["input"]
        if isinstance(x, Ref):
            return NormalizedParam(x, a["dim"], float(a["eps"]))
        if a["dim"] == 0:
            self.fail("F.normalize over dim 0, the examples' dim (give a per-example dim, e.g. dim=1)")
        return self.emit(NormalizeRule(self.name(), "normalize", a["dim"], a["eps"]), [self.value(x)])

    def op_linear(self, a, inplace):
        if isinstance(a["weight"], NormalizedParam):
            return self.normalized_linear(a)
        w = self.param(a["weight"], "weight")
        if w is None or len(self.shape_of(w)) != 2:
            self.fail("F.linear needs a weight [out, in]")
        in_features = self.shape_of(w)[1]
        rule = LinearRule(self.name(), "linear", in_features)
        return self.emit(rule, [self.value(a["input"])], (w, self.param(a["bias"], "bias")))

    def op_softmax(self, a, inplace, log: bool = False):
        what = "log_softmax" if log else "softmax"
        if not isinstance(a["dim"], int) or a["dim"] == 0 or a["dtype"] is not None:
            self.fail(f"{what} needs a per-example dim (not 0, not implicit) and no dtype")
        return self.emit(SoftmaxRule(self.name(), what, a["dim"], log), [self.value(a["input"])])

    def op_log_softmax(self, a, inplace):
        return self.op_softmax(a, inplace, log=True)

    def op_softmax_t(self, a, inplace):
        return self.op_softmax(a, inplace)

    def op_log_softmax_t(self, a, inplace):
        return self.op_softmax(a, inplace, log=True)

    def op_matmul(self, a, inplace):
        x, w = a["input"], a["other"]
        if isinstance(x, Value) and isinstance(w, Value):
            return self.emit(ProductRule(self.name(), "matmul", matmul=True), [x, w])
        if isinstance(x, Value) and self._is_param(w):
            w = self.param(w, "other")
        if not isinstance(x, Value) or not isinstance(w, Ref) or len(self.shape_of(w)) != 2:
            self.fail(
                "a matrix product other than a value times a 2-D parameter or buffer (x @ W, W [in, out]; "
                "products of two values do not compile)"
            )
        rule = TransposedLinearRule(self.name(), "matmul", self.shape_of(w)[0])
        return self.emit(rule, [x], (w,))

    def normalized_linear(self, a):
        """F.linear(x, F.normalize(W, dim=1 or -1)): unit-norm weight rows (a cosine classifier)."""
        n = a["weight"]
        shape = self.shape_of(n.ref)
        if len(shape) != 2 or n.dim not in (1, -1) or n.ref.group == "c":
            self.fail("F.linear's weight is F.normalize of a tensor other than a parameter [out, in] over dim 1")
        rule = NormalizedLinearRule(self.name(), "linear(normalized weight)", shape[1], n.eps)
        return self.emit(rule, [self.value(a["input"])], (n.ref, self.param(a["bias"], "bias")))

    def op_conv2d(self, a, inplace):
        w = self.param(a["weight"], "weight")
        shape = self.shape_of(w)
        if len(shape) != 4:
            self.fail("F.conv2d needs a weight [out, in, kh, kw]")
        self.check_conv("zeros", a["padding"], shape[2:], a["dilation"])
        geometry = Geometry(shape[2:], a["stride"], a["padding"], a["dilation"], a["groups"])
        rule = ConvRule(self.name(), "conv2d", geometry, shape[1] * a["groups"])
        return self.emit(rule, [self.value(a["input"])], (w, self.param(a["bias"], "bias")))

    def op_conv1d(self, a, inplace):
        w = self.param(a["weight"], "weight")
        shape = self.shape_of(w)
        if len(shape) != 3:
            self.fail("F.conv1d needs a weight [out, in, k]")
        self.check_conv("zeros", a["padding"], shape[2:], a["dilation"])
        groups = a["groups"]
        rule = Conv1dRule(
            self.name(), "conv1d", shape[2], a["stride"], a["padding"], a["dilation"], shape[1] * groups, groups
        )
        return self.emit(rule, [self.value(a["input"])], (w, self.param(a["bias"], "bias")))

    def op_batch_norm(self, a, inplace):
        w, b = self.param(a["weight"], "weight"), self.param(a["bias"], "bias")
        if a["training"]:
            stats = None
        else:
            mean, var = self.param(a["running_mean"], "running_mean"), self.param(a["running_var"], "running_var")
            if mean is None or var is None or mean.group != "c" or var.group != "c":
                self.fail("F.batch_norm with training=False needs running statistics that are buffers")
            stats = (mean, var)
        ref = next((r for r in (w, b) if r is not None), None) or (stats[0] if stats else None)
        if ref is None:
            self.fail("F.batch_norm with batch statistics and no weight: the number of channels is unknown")
        rule = BatchNormRule(self.name(), "batch_norm", float(a["eps"]), self.shape_of(ref)[0])
        return self.emit(rule, [self.value(a["input"])], (w, b), stats)

    def norm_params(self, a, shape: Optional[Tuple[int, ...]]) -> Tuple[Optional[Ref], Optional[Ref]]:
        """The weight and bias of a functional norm, checked to be of `shape` (None: of one shape, 1-D)."""
        refs = self.param(a["weight"], "weight"), self.param(a["bias"], "bias")
        shapes = {self.shape_of(r) for r in refs if r is not None}
        if len(shapes) > 1 or (shape is None and shapes and len(next(iter(shapes))) != 1):
            self.fail(f"weight and bias of shapes {sorted(shapes)}; expected one shape, 1-D [C]")
        if shape is not None and shapes and shapes != {shape}:
            self.fail(f"weight and bias of shape {next(iter(shapes))}; expected the normalized shape {shape}")
        return refs

    def op_layer_norm(self, a, inplace):
        ns = a["normalized_shape"]
        ns = (ns,) if isinstance(ns, int) else tuple(ns) if isinstance(ns, (list, tuple, torch.Size)) else None
        if not ns or not all(isinstance(d, int) for d in ns):
            self.fail("normalized_shape must be a number or a list of numbers")
        rule = ExampleNormRule(self.name(), "layer_norm", a["eps"], normalized_shape=ns)
        return self.emit(rule, [self.value(a["input"])], self.norm_params(a, ns))

    def op_group_norm(self, a, inplace):
        if not isinstance(a["num_groups"], int) or a["num_groups"] < 1:
            self.fail("num_groups must be a positive number")
        params = self.norm_params(a, None)
        shapes = [self.shape_of(r) for r in params if r is not None]
        channels = shapes[0][0] if shapes else None
        rule = ExampleNormRule(self.name(), "group_norm", a["eps"], groups=a["num_groups"], channels=channels)
        return self.emit(rule, [self.value(a["input"])], params)

    def op_instance_norm(self, a, inplace):
        if not a["use_input_stats"] or a["running_mean"] is not None or a["running_var"] is not None:
            self.fail("F.instance_norm with running statistics (the fused engine normalizes by each input's own)")
        params = self.norm_params(a, None)
        shapes = [self.shape_of(r) for r in params if r is not None]
        rule = ExampleNormRule(self.name(), "instance_norm", a["eps"], channels=shapes[0][0] if shapes else None)
        return self.emit(rule, [self.value(a["input"])], params)

    def shape_of(self, ref: Ref) -> Tuple[int, ...]:
        if ref.group == "c":
            return tuple(ref.const.shape)
        if ref.group == "d":
            return self.derived[ref.index].shape
        layout_group = self.layout_groups[ref.group]
        return tuple(layout_group.slots[ref.index].shape)

    def constant(self, c) -> Any:
        """A Python number or a constant tensor operand (None if it is neither)."""
        if isinstance(c, Ref):
            if c.group != "c":
                self.fail(
                    "a parameter used in arithmetic other than a value times, plus or minus it (the fused engine "
                    "takes parameters through layers, F.linear, F.conv2d, the norms' functional forms and those)"
                )
            return c.const
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            return None
        return float(c)

    @staticmethod
    def _is_param(v) -> bool:
        """A parameter, or a tensor computed from parameters and buffers alone."""
        return (isinstance(v, Ref) and v.group != "c") or isinstance(v, (ParamExpr, NormalizedParam))

    def op_add(self, a, inplace, sign: float = 1.0):
        x, y = a["input"], a["other"]
        alpha = float(a["alpha"]) * sign
        if isinstance(x, Value) and isinstance(y, Host) and alpha in (1.0, -1.0):
            return self.host_operand(x, "add" if alpha == 1.0 else "sub", y, inplace=inplace)
        if isinstance(y, Value) and isinstance(x, Host) and alpha in (1.0, -1.0):
            return self.host_operand(y, "add" if alpha == 1.0 else "rsub", x)
        if isinstance(x, Value) and self._is_param(y):
            y = self.param(y, "other")
            rule = ParamAffineRule(self.name(), "add" if alpha > 0 else "sub", self.shape_of(y), False, 1.0, alpha)
            return self.emit(rule, [x], (y,), inplace=inplace)
        if isinstance(y, Value) and self._is_param(x):
            x = self.param(x, "input")
            rule = ParamAffineRule(self.name(), "add" if alpha > 0 else "sub", self.shape_of(x), False, alpha, 1.0)
            return self.emit(rule, [y], (x,))
        if isinstance(x, Value) and isinstance(y, Value):
            return self.emit(
                AddRule(self.name(), "add" if alpha == 1.0 else "sub" if alpha == -1.0 else "add", alpha),
                [x, y],
                inplace=inplace,
            )
        if isinstance(x, Value) and self.constant(y) is not None:
            return self.emit(AffineRule(self.name(), "add", 1.0, self.constant(y) * alpha), [x], inplace=inplace)
        if isinstance(y, Value) and self.constant(x) is not None:
            return self.emit(AffineRule(self.name(), "add", alpha, self.constant(x)), [y])
        self.fail("an addition the fused engine cannot follow")

    def op_sub(self, a, inplace):
        return self.op_add(a, inplace, -1.0)

    def op_mul(self, a, inplace):
        x, y = a["input"], a["other"]
        if isinstance(x, Mask) or isinstance(y, Mask):  # a value times a mask, as PyTorch promotes it
            m, v = (x, y) if isinstance(x, Mask) else (y, x)
            v = self.value(v, "other operand of a product with a mask")
            cast = self.emit(MaskCastRule(self.name(), "mul"), [m, v])
            return self.emit(ProductRule(self.name(), "mul"), [v, cast], inplace=inplace and v is x)
        if isinstance(y, Value) and not isinstance(x, Value):
            x, y = y, x
        if isinstance(x, Value) and isinstance(y, Value):
            return self.emit(ProductRule(self.name(), "mul"), [x, y], inplace=inplace)
        if isinstance(x, Value) and isinstance(y, Host):
            return self.host_operand(x, "mul", y, inplace=inplace)
        if isinstance(x, Value) and self._is_param(y):
            y = self.param(y, "other")
            return self.emit(ParamAffineRule(self.name(), "mul", self.shape_of(y), True), [x], (y,), inplace=inplace)
        c = self.constant(y)
        if not isinstance(x, Value) or c is None:
            self.fail("a multiplication the fused engine cannot follow")
        return self.emit(AffineRule(self.name(), "mul", c), [x], inplace=inplace)

    def op_div(self, a, inplace):
        x, y = a["input"], a["other"]
        if a["rounding_mode"] is None and isinstance(y, Value):  # times the value's reciprocal
            r = self.emit(MathRule(self.name(), "div", "reciprocal"), [y])
            if isinstance(x, Value):
                return self.emit(ProductRule(self.name(), "div"), [x, r], inplace=inplace)
            return self.op_mul({"input": r, "other": x}, False)
        if a["rounding_mode"] is not None or not isinstance(x, Value):
            self.fail("only division by a value, a number, a buffer or a parameter compiles (no rounding_mode)")
        if isinstance(y, Host):
            return self.host_operand(x, "div", y, inplace=inplace)
        if isinstance(y, (Ref, ParamExpr, NormalizedParam)):  # by its reciprocal, recomputed at every call
            inv = self.param(self.map_expr(y, torch.reciprocal, "1 / {}"), "other")
            return self.emit(
                ParamAffineRule(self.name(), "div", self.shape_of(inv), True), [x], (inv,), inplace=inplace
            )
        c = self.constant(y)
        if c is None:
            self.fail("only division by a value, a number, a buffer or a parameter compiles (no rounding_mode)")
        return self.emit(AffineRule(self.name(), "div", 1.0 / c), [x], inplace=inplace)

    def op_neg(self, a, inplace):
        return self.emit(AffineRule(self.name(), "neg", -1.0), [self.value(a["input"])])

    def expand_or_repeat(self, n: fx.Node):
        """x.expand(*sizes) / x.expand(sizes) / x.expand_as(y) / x.repeat(*counts); a parameter expanded (or
        repeated where that is an expand) over the examples becomes a value (`expanded_param`)."""
        if n.kwargs:
            self.fail(f"{n.target} with keyword arguments")
        if self._is_param(self.arg(n.args[0])):
            return self.expanded_param(n)
        x = self.value(self.arg(n.args[0]))
        if n.target == "expand_as":
            other = self.value(self.arg(n.args[1]), "argument")
            v = other.vid
            host = Host(lambda env: env[v].shape[1:], (v,))
            return self.emit(ExpandRule(self.name(), "expand"), [x], host=host)
        sizes = self.arg(tuple(self.sizes_of(n)))
        if n.target == "expand":
            return self.emit(ExpandRule(self.name(), "expand"), [x], host=self.host_value(sizes))
        if has_host(sizes) or not all(isinstance(k, int) for k in sizes):
            self.fail("repeat counts must be numbers")
        return self.emit(RepeatRule(self.name(), "repeat", sizes), [x])

    @staticmethod
    def sizes_of(n: fx.Node) -> tuple:
        """What follows the tensor in `x.expand(*sizes)` / `x.expand(sizes)` (and in repeat, permute, view)."""
        rest = n.args[1:]
        return rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest

    def expanded_param(self, n: fx.Node) -> Value:
        """`p.expand(N, *sizes)`, `p.expand_as(x)` or `p.repeat(N, 1, ...)` (counts of 1 but where p's dim is 1)
        of a parameter or derived tensor p, N the number of examples: an ExpandParamRule that reads N from the
        value it was measured on."""
        ref = self.param(self.arg(n.args[0]), "input")
        shape = self.shape_of(ref)
        if n.target == "expand_as":
            other = self.value(self.arg(n.args[1]), "argument")
            v = other.vid
            sizes = Host(lambda env: env[v].shape[1:], (v,))
            return self.emit(ExpandParamRule(self.name(), "expand", shape), [other], (ref,), host=sizes)
        sizes = self.arg(tuple(self.sizes_of(n)))
        first = sizes[0] if sizes else None
        if not isinstance(first, Host) or not first.reads:
            self.fail(
                f"a parameter {n.target}ed other than over the examples; the fused engine needs the number of "
                "examples first, from the input's size (p.expand(x.size(0), -1), as ViT's class token)"
            )
        if n.target == "repeat":
            aligned = (1,) * (len(sizes) - len(shape)) + shape
            if len(sizes) < len(shape) or any(c != 1 and d != 1 for c, d in zip(sizes[1:], aligned[1:])):
                self.fail("a parameter repeated (tiled) along a dim of size above 1; repeat it over the examples only")
            sizes = (first,) + tuple(c if d == 1 else -1 for c, d in zip(sizes[1:], aligned[1:]))
        x = Value(first.reads[0])
        return self.emit(ExpandParamRule(self.name(), n.target, shape), [x], (ref,), host=self.host_value(sizes))

    def _max_dim(self, a, what: str) -> int:
        d = a["dim"]
        if not isinstance(d, int) or d == 0 or isinstance(a["keepdim"], Value):
            self.fail(f"{what} over {'everything' if d is None else f'dim {d}'}: give one per-example dim")
        return d

    def op_amax(self, a, inplace):
        rule = MaxOverDimRule(self.name(), "amax", self._max_dim(a, "amax"), bool(a["keepdim"]))
        return self.emit(rule, [self.value(a["input"])])

    def op_max(self, a, inplace):
        if isinstance(a["dim"], Value):  # torch.max(a, b): the elementwise maximum
            return self.op_maximum({"input": a["input"], "other": a["dim"]}, inplace)
        return MaxOverDim(self.value(a["input"]), self._max_dim(a, "max"), bool(a["keepdim"]))

    def op_min(self, a, inplace):
        if not isinstance(a["dim"], Value):
            self.fail("torch.min over a dim has no rule (the elementwise minimum of two values has)")
        return self.op_minimum({"input": a["input"], "other": a["dim"]}, inplace)

    def op_maximum(self, a, inplace, minimum: bool = False):
        what = "minimum" if minimum else "maximum"
        x, y = self.value(a["input"]), self.value(a["other"], f"{what}'s other operand")
        return self.emit(MaximumRule(self.name(), what, minimum), [x, y])

    def op_minimum(self, a, inplace):
        return self.op_maximum(a, inplace, minimum=True)

    def op_var(self, a, inplace, std: bool = False):
        what = "std" if std else "var"
        if a["dim"] is None or isinstance(a["dim"], bool):
            self.fail(f"a {what} over all dimensions mixes the examples; give per-example dims")
        if a["unbiased"] is not None and a["correction"] is not None:
            self.fail(f"{what} with both unbiased and correction")
        correction = a["correction"] if a["correction"] is not None else 0 if a["unbiased"] is False else 1
        if not isinstance(correction, (int, float)):
            self.fail(f"{what}'s correction must be a number")
        dims = self._feature_dims(what, a["dim"])
        rule = VarRule(self.name(), what, dims, correction, bool(a["keepdim"]), std)
        return self.emit(rule, [self.value(a["input"])])

    def op_std(self, a, inplace):
        return self.op_var(a, inplace, std=True)

    def op_logsumexp(self, a, inplace):
        dims = self._feature_dims("logsumexp", a["dim"])
        return self.emit(LogSumExpRule(self.name(), "logsumexp", dims, bool(a["keepdim"])), [self.value(a["input"])])

    def op_norm(self, a, inplace, key: str = "p", euclidean=(2, "fro")):
        """The Euclidean norm over per-example dims: `p=2` or "fro" (`torch.norm`, `x.norm`), `ord=2`
        (`torch.linalg.vector_norm`), `ord=None` (`torch.linalg.norm`, whose ord=2 over two dims is not this)."""
        order = a[key]
        if not any(order is e or (not isinstance(order, bool) and order == e) for e in euclidean):
            self.fail(f"a norm with {key}={order!r}: the fused engine has the Euclidean norm")
        if a["dtype"] is not None or a["out"] is not None:
            self.fail("a norm with a dtype or out")
        if a["dim"] is None:
            self.fail("a norm over all dimensions mixes the examples; give per-example dims")
        dims = self._feature_dims("norm", a["dim"])
        return self.emit(NormRule(self.name(), "norm", dims, bool(a["keepdim"])), [self.value(a["input"])])

    def op_vector_norm(self, a, inplace):
        return self.op_norm(a, inplace, "ord", (2,))

    def op_linalg_norm(self, a, inplace):
        return self.op_norm(a, inplace, "ord", (None,))

    def op_prelu(self, a, inplace):
        w = self.param(a["weight"], "weight")
        shape = self.shape_of(w)
        if len(shape) != 1:
            self.fail(f"F.prelu's weight has shape {shape}; it takes one slope per channel, [C] or [1]")
        return self.emit(PReLURule(self.name(), "prelu", shape[0]), [self.value(a["input"])], (w,))

    def op_mish(self, a, inplace):
        return self.mish(self.value(a["input"]), "mish")

    def mish(self, x: Value, kind: str) -> Value:
        """x · tanh(softplus(x)), as PyTorch computes it (softplus threshold 20)."""
        t = self.emit(TanhRule(self.name(), kind), [self.emit(SoftplusRule(self.name(), kind, 1.0, 20.0), [x])])
        return self.emit(ProductRule(self.name(), kind), [x, t])

    # -------------------------------------------------------------- masks (mask.py)
    def mask(self, a, what: str) -> Mask:
        if not isinstance(a, Mask):
            self.fail(f"its {what} is not a mask computed from values (a comparison such as x > 0)")
        return a

    def mask_shape(self, n: fx.Node) -> Mask:
        """A shape operation (unsqueeze, view, expand, indexing, ...) of a mask: the value's rule, on the mask."""
        source = n.args[0]
        m = self.env[source]
        self.env[source] = Value(m.vid)
        try:
            out = self.call(n)
        finally:
            self.env[source] = m
        return Mask(self.value(out).vid)

    def compare(self, a, op: str) -> Mask:
        x, y = a["input"], a["other"]
        if not isinstance(x, Value) and isinstance(y, Value):
            x, y, op = y, x, _FLIPPED[op]
        if isinstance(x, Value) and isinstance(y, Value):
            return Mask(self.emit(CompareRule(self.name(), op, op), [x, y]).vid)
        if isinstance(x, Value) and isinstance(y, (int, float)) and not isinstance(y, bool):
            return Mask(self.emit(CompareRule(self.name(), op, op, other=y), [x]).vid)
        self.fail("a comparison the fused engine cannot follow: give two values, or a value and a number")

    def logical(self, a, op: str) -> Mask:
        masks = [self.mask(a["input"], "operand")] + ([] if op == "not" else [self.mask(a["other"], "operand")])
        return Mask(self.emit(LogicalRule(self.name(), op, op), masks).vid)

    def op_where(self, a, inplace):
        if self._made_on_host(a["condition"]):  # a condition made from sizes or a buffer: one value, one number
            x, y = a["input"], a["other"]
            numbers = [v for v in (x, y) if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numbers) != 1 or not any(isinstance(v, Value) for v in (x, y)):
                self.fail("torch.where with a condition made from sizes or buffers takes one value and one number")
            if isinstance(x, Value):
                return self.host_operand(x, "keep", a["condition"], float(y))
            return self.host_operand(y, "fill", a["condition"], float(x))
        m = self.mask(a["condition"], "condition")
        values, numbers = [], {}
        for key in ("input", "other"):
            v = a[key]
            if isinstance(v, Value):
                values.append(v)
                numbers[key] = None
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                numbers[key] = v
            else:
                self.fail(f"torch.where's {key} is neither a value nor a number")
        if not values:
            self.fail("torch.where of two numbers")
        return self.emit(WhereRule(self.name(), "where", numbers["input"], numbers["other"]), [m, *values])

    def op_masked_fill(self, a, inplace):
        x, fill = self.value(a["input"]), a["value"]
        if not isinstance(fill, (int, float)) or isinstance(fill, bool):
            self.fail("masked_fill's value must be a number")
        if self._made_on_host(a["mask"]):  # a buffer, or a mask the model makes from sizes
            return self.host_operand(x, "fill", a["mask"], float(fill))
        return self.emit(WhereRule(self.name(), "masked_fill", a=fill), [self.mask(a["mask"], "mask"), x])

    @staticmethod
    def _made_on_host(v) -> bool:
        """A tensor made from sizes and buffers as the model runs, or a buffer."""
        return isinstance(v, Host) or (isinstance(v, Ref) and v.group == "c")

    def host_operand(self, x: Value, op: str, c, fill: float = 0.0, inplace: bool = False) -> Value:
        """HostOperandRule: value x with a number or tensor c made as the model runs, or a buffer."""
        rule = HostOperandRule(self.name(), op, op, fill)
        return self.emit(rule, [x], host=self.host_value(c), inplace=inplace)

    def cast(self, n: fx.Node):
        """A mask converted to a floating-point value (`mask.float()`, `.to(dtype)`, `.to(x.dtype)`,
        `.type_as(x)`); a move to a device (`.to(x.device)`) keeps it a mask."""
        args = [self.arg(x) for x in n.args] + [self.arg(v) for v in n.kwargs.values()]
        m = args[0]
        if isinstance(m, Value):
            return self.cast_value(m, n.target, args[1:])
        if not isinstance(m, Mask):
            self.fail(f"{n.target}() of a tensor not computed from the input")
        name = self.name()
        if n.target in _CAST_DTYPES:
            return self.emit(MaskCastRule(name, n.target, _CAST_DTYPES[n.target]), [m])
        like = [v.value if isinstance(v, DtypeOf) else v for v in args[1:] if isinstance(v, (Value, DtypeOf))]
        if like:
            return self.emit(MaskCastRule(name, n.target), [m, like[0]])
        dtypes = [v for v in args[1:] if isinstance(v, torch.dtype)]
        if dtypes and dtypes[0] != torch.bool:
            if not dtypes[0].is_floating_point:
                self.fail(f"a mask converted to {dtypes[0]}; the fused engine takes floating-point values")
            return self.emit(MaskCastRule(name, n.target, dtypes[0]), [m])
        return m

    # -------------------------------------------------------------- einsum (einsum.py)
    def einsum(self, n: fx.Node) -> Value:
        """`torch.einsum(equation, *operands)` (or a list of operands) of one value, two values, or a value
        and a parameter, buffer or derived tensor; the examples' label (or "...") leads every value and the
        output. Labels one of two operands alone carries are summed out first."""
        args = [self.arg(a) for a in n.args]
        if n.kwargs or not args or not isinstance(args[0], str):
            self.fail("einsum with keyword arguments, or with an equation that is not a string")
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        try:
            eq = Equation.parse(args[0], len(operands))
        except ValueError as e:
            self.fail(str(e))
        if len(operands) > 2:
            self.fail("einsum of three or more tensors; write it as einsums of two")
        values = [i for i, o in enumerate(operands) if isinstance(o, Value)]
        for i, o in enumerate(operands):
            if i not in values and not isinstance(o, (Ref, ParamExpr, NormalizedParam)):
                self.value(o, "operand")  # fails: a mask, or a tensor not computed from the input
            letters = eq.inputs[i].replace(ELLIPSIS, "")
            if len(set(letters)) != len(letters):
                self.fail(f"einsum {args[0]!r} repeats a label within one operand (a diagonal)")
        lead = eq.inputs[values[0]][:1]
        if not lead or any(eq.inputs[i][:1] != lead for i in values) or eq.output[:1] != lead:
            self.fail(
                f"einsum {args[0]!r} does not keep the examples apart: the examples' label (or '...') must lead "
                "every operand computed from the input and the output"
            )
        if any(lead in eq.inputs[i] or ELLIPSIS in eq.inputs[i] for i in range(len(operands)) if i not in values):
            self.fail(f"einsum {args[0]!r} gives a parameter the examples' label or '...' (name its dims)")
        name = self.name()
        if len(operands) == 1:
            return self.emit(EinsumSumRule(name, "einsum", eq.inputs[0], eq.output, eq.task), operands)
        for i in range(2):  # labels operand i alone carries: summed out first
            drop = eq.summed_alone(i)
            if not drop:
                continue
            sub = eq.inputs[i]
            kept = "".join(c for c in sub if c not in drop)
            if i in values:
                operands[i] = self.emit(EinsumSumRule(name, "einsum", sub, kept, eq.task), [operands[i]])
            else:
                dims = tuple(sub.index(c) for c in drop)
                shape = tuple(k for d, k in enumerate(self.as_expr(operands[i]).shape) if d not in dims)
                operands[i] = self.map_expr(operands[i], lambda t, d=dims: t.sum(d), f"{{}}.sum({dims})", shape)
            eq = eq.reduced(i)
        if len(values) == 2:
            return self.emit(EinsumRule(name, "einsum", eq), operands)
        i = values[0]
        rule = EinsumParamRule(name, "einsum", Equation((eq.inputs[i], eq.inputs[1 - i]), eq.output))
        return self.emit(rule, [operands[i]], (self.param(operands[1 - i], "operand"),))

    def cast_value(self, x: Value, method: str, args) -> Value:
        """`x.float()`, `x.to(dtype or device)`, `x.type_as(y)` of a value: the fused engine computes every value
        in the parameters' dtype on their device, so a conversion to those is x itself; any other fails."""
        if method == "type" and not args:
            self.fail("x.type() without a dtype returns the type's name, not a tensor")
        dtype, device = self.layout_dtype_device()
        targets = [_CAST_DTYPES[method]] if method in _CAST_DTYPES else []
        for v in args:
            if isinstance(v, torch.dtype):
                targets.append(v)
            elif isinstance(v, (torch.device, str)):
                if torch.device(v).type != device.type or (torch.device(v).index not in (None, device.index)):
                    self.fail(f"{method}() moves a value to {v}; the model's parameters are on {device}")
        wrong = [t for t in targets if t != dtype]
        if wrong:
            self.fail(
                f"{method}() converts a value to {wrong[0]}; the fused engine computes in the parameters' dtype "
                f"({dtype}), so only conversions to it compile"
            )
        return x

    def layout_dtype_device(self) -> Tuple[torch.dtype, torch.device]:
        """The dtype and device of the model's parameters (where every value is computed)."""
        p = next(iter(self.layout.params.values()), None)
        if p is None:
            self.fail("a dtype conversion in a model without parameters")
        return p.dtype, p.device

    def op_stack(self, a, inplace):
        xs, d = a["tensors"], a["dim"]
        if not isinstance(xs, (list, tuple)) or not xs or not all(isinstance(x, Value) for x in xs):
            self.fail("torch.stack of values that are not all computed from the input")
        if not isinstance(d, int) or d == 0:
            self.fail(f"torch.stack along dim {d}, in front of the examples; stack along a per-example dim")
        parts = [self.emit(SqueezeRule(self.name(), "stack", (d,), unsqueeze=True), [x]) for x in xs]
        return self.emit(CatRule(self.name(), "stack", len(parts), d), parts)

    def op_pad(self, a, inplace):
        pad, value, mode = a["pad"], a["value"], a["mode"]
        plain = isinstance(pad, (list, tuple)) and len(pad) % 2 == 0 and all(isinstance(k, int) for k in pad)
        if not plain or not (value is None or isinstance(value, (int, float))):
            self.fail("F.pad other than padding by numbers (pad a list of ints, value a number)")
        if mode != "constant":  # reflect, replicate, circular
            return self.example_map(a["input"], "pad", F.pad, {"pad": pad, "mode": mode})
        return self.emit(PadRule(self.name(), "pad", pad, value or 0.0), [self.value(a["input"])])

    # -------------------------------------------------------------- per-example linear maps (example_maps.py)
    def example_map(self, x, kind: str, fn: Callable, args: dict, dims=(), min_rank: int = 0) -> Value:
        """ExampleMapRule of `fn(batch, **args)` on value x; arguments computed from sizes are evaluated per call."""
        x = self.value(x)
        if has_host(tuple(args.values())):
            keys, host = tuple(args), self.host_value(tuple(args.values()))
            rule = ExampleMapRule(self.name(), kind, lambda b, vals: fn(b, **dict(zip(keys, vals))), dims, min_rank)
            return self.emit(rule, [x], host=host)
        return self.emit(ExampleMapRule(self.name(), kind, lambda b, _: fn(b, **args), dims, min_rank), [x])

    def _map_dims(self, what: str, dims) -> tuple:
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims) or 0 in dims:
            self.fail(f"{what} along {dims}: give per-example dims (numbers, not the examples' dim 0)")
        return tuple(dims)

    def op_interpolate(self, a, inplace):
        return self.example_map(a["input"], "interpolate", F.interpolate, {k: v for k, v in a.items() if k != "input"})

    def op_flip(self, x, dims):
        dims = self._map_dims("flip", dims)
        return self.example_map(x, "flip", torch.flip, {"dims": dims}, dims)

    def op_roll(self, a, inplace):
        if a["dims"] is None:
            self.fail("torch.roll without dims rolls the flattened batch (give per-example dims)")
        dims = self._map_dims("roll", a["dims"])
        return self.example_map(a["input"], "roll", torch.roll, {"shifts": a["shifts"], "dims": a["dims"]}, dims)

    def op_cumsum(self, a, inplace):
        if a["dtype"] is not None:
            self.fail("cumsum with a dtype")
        dims = self._map_dims("cumsum", a["dim"])
        return self.example_map(a["input"], "cumsum", torch.cumsum, {"dim": a["dim"]}, dims)

    def op_tril(self, a, inplace, kind: str = "tril"):
        if not isinstance(a["diagonal"], int):
            self.fail(f"{kind}'s diagonal must be a number")
        fn = torch.tril if kind == "tril" else torch.triu
        return self.example_map(a["input"], kind, fn, {"diagonal": a["diagonal"]}, min_rank=2)

    def op_triu(self, a, inplace):
        return self.op_tril(a, inplace, "triu")

    def op_pixel_shuffle(self, a, inplace):
        return self.example_map(a["input"], "pixel_shuffle", F.pixel_shuffle, {"upscale_factor": a["upscale_factor"]})

    def op_pixel_unshuffle(self, a, inplace):
        args = {"downscale_factor": a["downscale_factor"]}
        return self.example_map(a["input"], "pixel_unshuffle", F.pixel_unshuffle, args)

    def op_unfold(self, a, inplace):
        return self.example_map(a["input"], "unfold", F.unfold, {k: v for k, v in a.items() if k != "input"})

    def op_fold(self, a, inplace):
        return self.example_map(a["input"], "fold", F.fold, {k: v for k, v in a.items() if k != "input"})

    def op_cat(self, a, inplace):
        xs = a["tensors"]
        if not isinstance(xs, (list, tuple)) or not xs or not all(isinstance(x, Value) for x in xs):
            if isinstance(xs, (list, tuple)) and any(isinstance(x, (Ref, ParamExpr)) for x in xs):
                self.fail(
                    "torch.cat of a parameter (or a tensor of parameters alone) with values: expand it over the "
                    "examples first, p.expand(x.size(0), ...)"
                )
            self.fail("torch.cat of values that are not all computed from the input")
        d = a["dim"]
        if not isinstance(d, int) or d == 0:
            self.fail(f"concatenation along dim {d}, the examples' dim; concatenate along a feature dim")
        return self.emit(CatRule(self.name(), "cat", len(xs), d), list(xs))

    # -------------------------------------------------------------- finish
    def finish(self, out: Value) -> Graph:
        """Dead nodes dropped, in-place writes checked, unused parameters listed, fusions applied."""
        live, needed = [], {out.vid}
        for node in reversed(self.nodes):
            if node.output in needed:
                live.append(node)
                needed.update(node.inputs)
                needed.update(node.keeps)
        live.reverse()
        alive = {id(node) for node in live}
        for i, node in enumerate(self.nodes):
            # an in-place write whose value is read again (by a live node, or returned) changes what eager
            # PyTorch computes there; the graph reads the value as it was, so such a model is refused. This
            # includes a write whose own result is unused (`x.add_(y)` as a statement: a dead node here)
            if node.inplace and node.inputs:
                v = node.inputs[0]
                later = (n for n in self.nodes[i + 1 :] if id(n) in alive)
                read_again = v == out.vid or any(v in n.inputs or v in n.keeps for n in later)
                if read_again or (v == 0 and id(node) in alive):
                    raise Unsupported(
                        node.rule.name,
                        node.rule.kind,
                        "an in-place operation overwrites a value that "
                        "is read again (or the input); write it out of place",
                        node.source,
                    )
        used = {(ref.group, ref.index) for node in live for ref in node.params if ref is not None}
        unused = tuple(
            Ref(g, k) for g, group in self.layout_groups.items() for k in range(len(group.slots)) if (g, k) not in used
        )
        # the derived tensors live nodes read, numbered in order
        kept = sorted(k for g, k in used if g == "d")
        renumber = {k: Ref("d", i) for i, k in enumerate(kept)}
        live = [
            dataclasses.replace(
                node, params=tuple(renumber[r.index] if r is not None and r.group == "d" else r for r in node.params)
            )
            for node in live
        ]
        derived = tuple(self.derived[k] for k in kept)
        return fuse(Graph(live, self.num_values, out.vid, unused, derived=derived))


def compile_model(model: nn.Module, layout=None, bn_layers=None) -> Graph:
    """The graph of rules of `model` for the parameter `layout` (default: every parameter adapted;
    `bn_layers`: the model's BatchNorm modules in `NormPlan` order, by default `batchnorm.bn_layers`).
    Raises `Unsupported` naming the culprit."""
    if layout is None:
        layout = ParamLayout(model)
    if bn_layers is None:
        bn_layers = [m for _, m in batchnorm.bn_layers(model)]
    for name, m in model.named_modules():
        if reparam.has_other_hooks(m):
            raise Unsupported(
                name or "<model>",
                type(m).__name__,
                "the module has forward or backward hooks, which the fused engine would skip",
            )
    wrapped = _Tracer().is_leaf_module(model, "")
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    try:
        graph = _Lowering(trace(model), layout, {id(m): i for i, m in enumerate(bn_layers)}, wrapped).run()
    except Unsupported as exc:
        exc.volatile = _restore(model, before)
        raise
    graph.volatile = _restore(model, before)
    return graph


def _restore(model: nn.Module, before: Dict[str, dict]) -> Dict[str, frozenset]:
    """Puts back the plain attributes that tracing `forward` changed (a call counter, say); returns
    {module name: those attribute names}."""
    changed = {}
    for n, m in model.named_modules():
        old = before.get(n, {})
        keys = frozenset(k for k, v in m.__dict__.items() if not k.startswith("_") and k in old and old[k] is not v)
        for k in keys:
            m.__dict__[k] = old[k]
        if keys:
            changed[n] = keys
    return changed
