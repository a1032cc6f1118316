"""TorchFuncProgram: any `nn.Module`, through torch.func.

functional_call runs the model with per-task weights, `vmap` maps over tasks (a loop over tasks for a
model whose control flow depends on tensor values), `grad` gives the support gradient and
forward-over-reverse `jvp(grad)` the exact Hessian-vector product. No
`create_graph=True`: the HVP recomputes step j's forward with a tangent instead of keeping a graph.

BatchNorm layers run through `BatchStatsNorm`: on the batch statistics of the current support or
query set (the MAML convention) or on fixed statistics handed in per call (`bn_stats`, see
fastmaml/batchnorm.py). It normalizes and then applies `x̂ * w + b` as separate ops: PyTorch's vmap
batching rule for the second derivative of affine `F.batch_norm` is wrong (see
docs/architecture.md). Running statistics are never updated here.

Threads: `torch.func.jvp` keeps its forward-AD levels per process, so two threads inside it at once
fail; calls of this program are serialized by `MODEL_CALL_LOCK` (one runs at a time).

The program holds the model weakly (its buffers are read at every call), so the program cache does not
keep models alive; tied parameters (one tensor under two names) are passed under every name.
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..layout import ParamLayout
from ..losses import Loss
from .base import HVP, MODEL_CALL_LOCK, LossGrad, Program, without_fused_rnn_kernels
from .reparam import copyable, use_exact_weight_norm

# what vmap says of a model it cannot batch (which then runs task by task)
_UNBATCHABLE = ("data-dependent control flow", "Batching rule not implemented")


class BatchStatsNorm(nn.Module):
    """BatchNorm{1,2,3}d, vmap- and double-differentiation-safe. x `[N, C, *]`.

    Normalizes with the batch statistics, or with `fixed = (mean [C], var [C])` when set; stores
    (mean [C], var [C], count) in `capture[index]` when `capture` is a dict (the first call only).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, index: int):
        super().__init__()
        self.index = index  # position among the model's BatchNorm layers (NormPlan order)
        self.eps = bn.eps
        self.num_features = bn.num_features
        if bn.affine:
            self.weight = bn.weight
            self.bias = bn.bias
        else:
            self.weight = self.bias = None
        self.fixed = None
        self.capture = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm: expected input [N, {self.num_features}, ...], got {tuple(x.shape)}")
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.fixed is None:
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dims, keepdim=True)
            centered = x - mean
            var = (centered * centered).mean(dims, keepdim=True)
            if self.capture is not None and self.index not in self.capture:
                self.capture[self.index] = (mean.reshape(-1), var.reshape(-1), x.numel() // x.shape[1])
        else:
            mean, var = (t.view(shape) for t in self.fixed)
            centered = x - mean
        y = centered * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def stateless_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device with BatchNorm replaced by BatchStatsNorm (same names) and
    weight normalization computed as its definition (reparam.py: PyTorch's has no forward-mode derivative)."""
    with copyable(model):
        clone = copy.deepcopy(model)
    use_exact_weight_norm(clone)
    index = 0
    for name, module in list(clone.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            replacement = BatchStatsNorm(module, index)
            index += 1
            if name == "":
                clone = replacement
            else:
                parent_name, _, child = name.rpartition(".")
                parent = clone.get_submodule(parent_name) if parent_name else clone
                setattr(parent, child, replacement)
    return clone.to("meta")


class TorchFuncProgram(Program):
    name = "torch.func"

    def __init__(self, model: nn.Module, layout: ParamLayout, loss: Loss):
        super().__init__(layout, loss)
        self._model = weakref.ref(model)
        self.module = stateless_copy(model)
        self.norms = [m for m in self.module.modules() if isinstance(m, BatchStatsNorm)]
        self.per_task = False  # set when the model's control flow depends on tensor values (no vmap)
        self.recurrent = any(
            isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in model.modules()
        )  # without oneDNN, cuDNN
        first = {}  # every name of a tied parameter -> its canonical (first) name
        self.aliases = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canonical = first.setdefault(id(p), name)
            if canonical != name:
                self.aliases[name] = canonical

    def _buffers(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this program was freed; fastmaml holds models weakly")
        return dict(model.named_buffers())

    @contextlib.contextmanager
    def _stats(self, bn_stats):
        """BatchNorm layers normalize with `bn_stats` (None: batch statistics) inside the block."""
        if bn_stats is not None and len(bn_stats) != len(self.norms):
            raise ValueError(
                f"bn_stats: expected statistics for {len(self.norms)} BatchNorm layers, got {len(bn_stats)}"
            )
        for i, m in enumerate(self.norms):
            m.fixed = None if bn_stats is None else bn_stats[i]
        try:
            yield
        finally:
            for m in self.norms:
                m.fixed = None

    # one task: pa [Pa], ps [Ps], x [N, *in]
    def _call(self, pa, ps, x):
        params = self.layout.adapted.unflatten(pa)
        params.update(self.layout.shared.unflatten(ps))
        for name, canonical in self.aliases.items():
            params[name] = params[canonical]
        params.update(self._buffers())
        out = functional_call(self.module, params, (x,), tie_weights=False)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: forward returned {type(out).__name__}; fastmaml needs one tensor [N, ...]")
        return out

    def _task_loss(self, pa, ps, x, y):
        out = self._call(pa, ps, x)
        return self.loss.fn(out, y), out

    def _run(self, fn, phi, shared, *batched):
        """vmap `fn(pa, ps, *batched)` over tasks; phi `[Pa]` (same weights for all tasks) is not mapped. A
        model whose control flow depends on tensor values, or that calls an op vmap cannot batch (the
        recurrent layers' `aten::lstm`, `aten::gru`), cannot run under vmap: it runs task by task."""
        if self.per_task:
            return self._loop(fn, phi, shared, *batched)
        in_dims = (0 if phi.dim() == 2 else None, None) + (0,) * len(batched)
        mapped = vmap(fn, in_dims=in_dims, randomness="error")
        try:
            with MODEL_CALL_LOCK, without_fused_rnn_kernels(self.recurrent):
                return mapped(phi, shared, *batched)
        except RuntimeError as e:
            if "randomness" in str(e):
                raise ValueError(
                    "model: it calls a random op (e.g. Dropout in training mode) inside the inner loop, on the "
                    "torch.func program (the model does not compile: fastmaml.explain says why), which cannot "
                    "draw the same masks again for the Hessian-vector products; make the rest of the model compile "
                    "(dropout in training mode runs on the fused engine), or call .eval() on those modules"
                ) from e
            if not any(why in str(e) for why in _UNBATCHABLE):
                raise
        self.per_task = True
        return self._loop(fn, phi, shared, *batched)

    def _loop(self, fn, phi, shared, *batched):
        """`fn` per task, results stacked (what vmap would return)."""
        outs = []
        with MODEL_CALL_LOCK, without_fused_rnn_kernels(self.recurrent):
            for t in range(batched[0].shape[0]):
                outs.append(fn(phi[t] if phi.dim() == 2 else phi, shared, *(b[t] for b in batched)))
        flat = [tree_flatten(o) for o in outs]
        spec = flat[0][1]
        return tree_unflatten([torch.stack(xs) for xs in zip(*(leaves for leaves, _ in flat))], spec)

    def loss_grad(
        self, ops, phi, shared, x, y, *, shared_grad=False, bn_stats=None, activations=None, record_stats=False
    ) -> LossGrad:
        argnums = (0, 1) if shared_grad else 0
        f = grad_and_value(self._task_loss, argnums=argnums, has_aux=True)
        with self._stats(bn_stats):
            grads, (loss, out) = self._run(f, phi, shared, x, y)
        ga, gs = grads if shared_grad else (grads, None)
        return LossGrad(loss, ga, gs, out)

    def hvp(
        self, ops, phi, shared, x, y, u, *, shared_grad=False, need_grad=True, bn_stats=None, activations=None
    ) -> HVP:
        argnums = (0, 1) if shared_grad else 0

        def one(pa, ps, x1, y1, u1):
            g = grad(lambda a, s: self._task_loss(a, s, x1, y1)[0], argnums=argnums)
            return jvp(lambda a: g(a, ps), (pa,), (u1,))

        # F.scaled_dot_product_attention as its math definition: PyTorch's fused attention kernels (flash on
        # CPU) have no forward-mode derivative, which the HVP takes
        with self._stats(bn_stats), sdpa_kernel(SDPBackend.MATH):
            primal, tangent = self._run(one, phi, shared, x, y, u)
        if shared_grad:
            return HVP(primal[0], tangent[0], tangent[1])
        return HVP(primal, tangent, None)

    def forward(self, ops, phi, shared, x, *, bn_stats=None):
        with self._stats(bn_stats):
            return self._run(lambda pa, ps, x1: self._call(pa, ps, x1), phi, shared, x)

    def batch_stats(self, ops, phi, shared, x):
        counts = {}

        def stats(pa, ps, x1):
            captured = {}
            for m in self.norms:
                m.capture = captured
            try:
                self._call(pa, ps, x1)
            finally:
                for m in self.norms:
                    m.capture = None
            counts.clear()
            counts.update({i: n for i, (_, _, n) in captured.items()})
            return {i: (mean, var) for i, (mean, var, _) in captured.items()}

        with torch.no_grad():
            mv = self._run(stats, phi, shared, x)
        return [(mv[i][0], mv[i][1], counts[i]) if i in mv else None for i in range(len(self.norms))]
