"""What the fx nodes of a traced model lower to, beside graph values of rules: masks, tensors computed from
parameters alone (derived tensors), Python values computed from sizes and buffers as the model runs, and
the intermediate results some calls return (the parts of a chunk, torch.max's pair, an attention layer's
pair); and the binding of a call's arguments by name. The compiler (compiler.py) and its attention lowering
(attention.py) share them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from .graph import Ref

_REQUIRED = object()


def bind_arguments(spec: Tuple[Tuple[str, Any], ...], args, kwargs, what: str) -> Dict[str, Any]:
    """fx call arguments -> {name: value} by `spec`, (name, default) pairs (`_REQUIRED`: no default)."""
    names = [name for name, _ in spec]
    if len(args) > len(names) or set(kwargs) - set(names):
        raise TypeError(f"{what}: arguments the fused engine does not know")
    out = dict(zip(names, args))
    out.update(kwargs)
    for name, default in spec:
        if name not in out:
            if default is _REQUIRED:
                raise TypeError(f"{what}: missing argument {name!r}")
            out[name] = default
    return out


def argument_spec(*entries) -> Tuple[Tuple[str, Any], ...]:
    """("input", ("inplace", False), ...) -> ((name, default), ...)."""
    return tuple(e if isinstance(e, tuple) else (e, _REQUIRED) for e in entries)


class Value:
    """A tensor value of the graph (value id)."""

    def __init__(self, vid: int):
        self.vid = vid


class Mask:
    """A boolean mask computed from values (mask.py): only `torch.where`, `masked_fill`, logical operations
    and a cast to a floating-point value read it."""

    def __init__(self, vid: int):
        self.vid = vid


class DtypeOf:
    """`x.dtype` of a value (what `mask.to(x.dtype)` converts to)."""

    def __init__(self, value: "Value"):
        self.value = value


class NormalizedParam:
    """`F.normalize(parameter, dim=dim, eps=eps)`: only a Linear layer's weight (a cosine classifier) takes it."""

    def __init__(self, ref, dim: int, eps: float):
        self.ref, self.dim, self.eps = ref, dim, eps


class ParamExpr:
    """A tensor the model computes from parameters and buffers alone: `fn(leaves)` of the parameter slots
    `leaves` (Refs "a"/"s"), `text` how the model writes it, `shape` its shape. A rule takes it as a
    parameter (derived.py)."""

    def __init__(self, fn: Callable[[list], Any], leaves: Tuple[Ref, ...], text: str, shape: Tuple[int, ...]):
        self.fn, self.leaves, self.text, self.shape = fn, leaves, text, shape


class Permuted:
    """`x.permute(dims)` of a value x that moves the examples' dim from first (`dims` per example, all of them,
    none negative): timm's attention, `qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)`. Only what brings the
    examples first again reads it: selecting its leading dim (`unbind(0)`, `[i]`), another permute or
    transpose, `.contiguous()`."""

    def __init__(self, value: "Value", dims: Tuple[int, ...]):
        self.value, self.dims = value, dims


class Unbound:
    """`x.unbind(dim)` of a value or a `Permuted`: indexing one part (`q, k, v = qkv.unbind(0)`) selects it."""

    def __init__(self, source, dim: int):
        self.source, self.dim = source, dim


class Parts:
    """The parts of `x.chunk(...)` / `x.split(...)`: indexing one (`a, b = x.chunk(2, -1)`) makes a PartRule."""

    def __init__(self, value: "Value", kind: str, dim: int, chunks=None, sizes=None):
        self.value, self.kind, self.dim, self.chunks, self.sizes = value, kind, dim, chunks, sizes


class AttentionOutput:
    """What nn.MultiheadAttention returns, (output, weights): `output` the value; `weights` the attention
    weights `[N, L, S]` averaged over the heads, or per head `[N, H, L, S]`, or None (need_weights=False)."""

    def __init__(self, output: "Value", weights: Optional["Value"]):
        self.output, self.weights = output, weights


class MaxOverDim:
    """`torch.max(x, dim)`: (values, indices); its values (`[0]`, `.values`) make a MaxOverDimRule."""

    def __init__(self, value: "Value", dim: int, keepdim: bool):
        self.value, self.dim, self.keepdim = value, dim, keepdim


class Host:
    """A Python value the model computes from tensor sizes: `fn(values) -> value`, reading `reads`."""

    def __init__(self, fn: Callable[[list], Any], reads: Tuple[int, ...]):
        self.fn, self.reads = fn, reads


def has_host(v) -> bool:
    """Whether v (or a part of it) is a `Host`: a value the model computes from sizes as it runs."""
    return isinstance(v, Host) or (isinstance(v, (list, tuple)) and any(has_host(x) for x in v))


class LayerOutput:
    """What a recurrent layer without a rule returns before it is read: (output, h_n) (RNN, GRU), (output,
    (h_n, c_n)) (LSTM), or (h, c) (LSTMCell); or (`layer` None) what a function without a rule returns, a
    tensor or a tuple of them (`torch.sort`'s values and indices). Indexing (or a field: `.values`) extends
    `path`; the parts read (`output`, `h_n[i]`, `c_n[i]`, `h`, `c`; a function's result or one part of it)
    become FunctionalRules (functional.py) of `call(x, *weights)` picked along their path. `layer`: the
    layer's class name; `weights`: its Refs."""

    def __init__(
        self, call: Callable, weights: tuple, x: "Value", name: str, kind: str, layer: Optional[str], path: tuple = ()
    ):
        self.call, self.weights, self.x, self.name, self.kind = call, weights, x, name, kind
        self.layer, self.path = layer, path
        self.value: Optional[Value] = None  # the rule's output, once read

    def indexes_a_part(self) -> bool:
        """Whether indexing picks a part (of the tuples, or a layer of h_n / c_n) rather than the output's own."""
        if self.layer is None or self.layer == "LSTMCell":
            return self.path == ()
        return self.path in ((), (1,)) or (self.layer == "LSTM" and self.path in ((1, 0), (1, 1)))

    def readable(self) -> bool:
        """Whether `path` is a part with the examples first: output, one layer's h_n[i] / c_n[i], h or c."""
        path = self.path
        if self.layer is None:
            return len(path) <= 1
        if self.layer == "LSTMCell":
            return path in ((0,), (1,))
        if path == (0,):
            return True
        depth = 3 if self.layer == "LSTM" else 2
        return len(path) == depth and path[0] == 1 and isinstance(path[-1], int) and (depth == 2 or path[1] in (0, 1))

    def index(self, k) -> "LayerOutput":
        return LayerOutput(self.call, self.weights, self.x, self.name, self.kind, self.layer, self.path + (k,))
