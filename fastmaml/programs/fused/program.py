"""FusedProgram: a compiled model's loss, gradient and exact Hessian-vector products for all T
tasks at once, from hand-derived layer rules, with no autograd graph.

loss_grad: one forward sweep (saving what the backward needs), the loss rule, one backward sweep
writing every layer's per-task weight gradient into one flat `[T, Pa]` buffer (and `[T, Ps]` for
shared weights when asked). hvp: one forward sweep carrying the tangent (x, ẋ) with weight
directions from u, then one backward sweep carrying (g, ġ); ġ of every weight is H u.
Sweeps stop at the first layer whose weights need a gradient; tangents are None (zero) until the
first adapted layer. Tasks run in chunks sized by their activations (`_chunked`): all at once for
MLPs, one at a time for large conv activations (cache locality, and peak memory of one chunk).
`forward` uses the same rules with ordinary differentiable ops (for `adapt`).
"""
from __future__ import annotations

from typing import List

import torch

from ...layout import ParamLayout
from ...losses import Loss
from ...ops import layers as _layer_ops  # noqa: F401  (registers the layer ops)
from ...ops import registry
from ..base import HVP, LossGrad, Program
from .base import Rule
from .norm import BatchNormRule

class FusedProgram(Program):
    name = "fused"
    # activations per chunk of tasks, per device type (see `_chunked`): on the CPU a chunk that stays
    # in cache; on a GPU large enough to fill it (on an H200, 16 MB chunks of the 28×28 conv net ran
    # 1–10 tasks per launch and left the engine launch-bound)
    chunk_bytes = {"cpu": 16 << 20, "cuda": 1 << 30}

    def __init__(self, layout: ParamLayout, loss: Loss, rules: List[Rule], loss_rule):
        super().__init__(layout, loss)
        self.rules = rules
        self.loss_rule = loss_rule
        owner = {}  # full parameter name -> (rule index, position in rule.param_names)
        for i, rule in enumerate(rules):
            for k, pn in enumerate(rule.param_names):
                owner[f"{rule.path}.{pn}" if rule.path else pn] = (i, k)
        # per flat group, in slot order: (rule index, position, shape), and the slot sizes for split
        self.slots = {g: [(*owner[s.name], tuple(s.shape)) for s in group.slots]
                      for g, group in (("a", layout.adapted), ("s", layout.shared))}
        self.sizes = {g: [s.numel for s in group.slots] for g, group in (("a", layout.adapted), ("s", layout.shared))}
        self.first_adapted = min((i for i, _, _ in self.slots["a"]), default=len(rules))
        self.first_param = min((i for g in "as" for i, _, _ in self.slots[g]), default=len(rules))
        self.norms = [(i, r) for i, r in enumerate(rules) if isinstance(r, BatchNormRule)]
        self._tables = {}
        self._task_bytes = {}  # activation bytes of one task, per (kind, input shape)

    # ------------------------------------------------------------------ binding
    def _ops(self, device: torch.device, differentiable: bool = False):
        backend = "torch" if differentiable else self.backend
        key = (device.type, backend)
        table = self._tables.get(key)
        if table is None:
            table = registry.resolve(backend, device)
            self._tables[key] = table
        return table

    def _bind(self, flats: dict) -> List[list]:
        """{group: flat `[*batch, P_group]` or None} -> per rule, a list of parameter views
        `[*batch, *shape]` in `param_names` order (None: absent or its group's flat is None)."""
        bound = [[None] * len(r.param_names) for r in self.rules]
        for g, flat in flats.items():
            if flat is None or not self.slots[g]:
                continue
            batch = flat.shape[:-1]
            for (i, k, shape), chunk in zip(self.slots[g], flat.split(self.sizes[g], -1)):
                bound[i][k] = chunk.view(*batch, *shape)
        return bound

    def _params(self, phi, shared, bn_stats) -> List[list]:
        if bn_stats is not None and len(bn_stats) != len(self.norms):
            raise ValueError(f"bn_stats: expected statistics for {len(self.norms)} BatchNorm layers, "
                             f"got {len(bn_stats)}")
        params = self._bind({"a": phi, "s": shared})
        for i, rule in self.norms:
            params[i].append(None if bn_stats is None else bn_stats[rule.index])
        return params

    def _stop(self, shared_grad: bool) -> int:
        return self.first_param if shared_grad else self.first_adapted

    # ------------------------------------------------------------------ task chunks
    def _chunked(self, kind: str, x, run) -> None:
        """Runs `run(tasks: slice) -> activation bytes` over chunks of tasks sized to `chunk_bytes` of
        activations for the device type (on the CPU all tasks at once for small activations, e.g. MLPs,
        and one task at a time for large conv activations, which keeps peak memory and the cache
        working set to one chunk). The size per
        task is measured once per input shape by running task 0 alone (then run again in its chunk), so
        the chunks depend only on the shapes: a computation is bitwise the same whenever it runs."""
        T = x.shape[0]
        key = (kind, tuple(x.shape[1:]), x.dtype, x.device)
        per_task = self._task_bytes.get(key)
        if per_task is None:
            per_task = self._task_bytes[key] = max(run(slice(0, 1)), 1)
        budget = self.chunk_bytes.get(x.device.type, self.chunk_bytes["cpu"])
        size = max(1, budget // per_task)
        for start in range(0, T, size):
            run(slice(start, min(T, start + size)))

    @staticmethod
    def _rows(t, sl):
        """Tasks `sl` of a per-task tensor `[T, ...]`; a common `[P]` (or None) stays as it is."""
        return t if t is None or t.dim() == 1 else t[sl]

    # ------------------------------------------------------------------ Program
    def loss_grad(self, phi, shared, x, y, *, shared_grad=False, bn_stats=None) -> LossGrad:
        T = x.shape[0]
        ops = self._ops(x.device)
        stop = self._stop(shared_grad)
        loss = phi.new_empty(T)
        grad = phi.new_empty(T, self.layout.adapted.size)
        grad_s = phi.new_empty(T, self.layout.shared.size) if shared_grad else None
        result = {}

        def run(sl):
            params = self._params(self._rows(phi, sl), shared, bn_stats)
            h, saved, nbytes = x[sl], [], 0
            for i, (rule, p) in enumerate(zip(self.rules, params)):
                h, s = rule.forward(ops, h, p, i >= stop)
                saved.append(s)
                nbytes += h.numel() * h.element_size()
            loss[sl], g, _ = self.loss_rule.grad(ops, h, y[sl])
            self._store(result, "output", h, sl, T)
            outs = self._bind({"a": grad[sl], "s": self._rows(grad_s, sl)})
            for i in range(len(self.rules) - 1, stop - 1, -1):
                g = self.rules[i].backward(ops, g, saved[i], params[i], i > stop, outs[i])
            return nbytes

        with torch.no_grad():
            self._chunked("loss_grad", x, run)
        return LossGrad(loss, grad, grad_s, result["output"])

    def hvp(self, phi, shared, x, y, u, *, shared_grad=False, need_grad=True, bn_stats=None) -> HVP:
        T = x.shape[0]
        ops = self._ops(x.device)
        stop = self._stop(shared_grad)
        Pa, Ps = self.layout.adapted.size, self.layout.shared.size
        grad = phi.new_empty(T, Pa) if need_grad else None  # None: no weight gradients, only their tangents
        hu = phi.new_empty(T, Pa)
        grad_s = phi.new_empty(T, Ps) if shared_grad and need_grad else None
        hu_s = phi.new_empty(T, Ps) if shared_grad else None

        def run(sl):
            params = self._params(self._rows(phi, sl), shared, bn_stats)
            dirs = self._bind({"a": u[sl]})
            h, hd, saved, nbytes = x[sl], None, [], 0
            for i, (rule, p) in enumerate(zip(self.rules, params)):
                if i < stop:
                    h, s = rule.forward(ops, h, p, False)
                else:
                    h, hd, s = rule.tangent_forward(ops, h, hd, p, dirs[i])
                saved.append(s)
                nbytes += 2 * h.numel() * h.element_size()
            _, g, ls = self.loss_rule.grad(ops, h, y[sl])
            gd = self.loss_rule.grad_tangent(ops, ls, hd) if hd is not None else torch.zeros_like(g)
            outs = self._bind({"a": self._rows(grad, sl), "s": self._rows(grad_s, sl)})
            touts = self._bind({"a": hu[sl], "s": self._rows(hu_s, sl)})
            for i in range(len(self.rules) - 1, stop - 1, -1):
                g, gd = self.rules[i].tangent_backward(ops, g, gd, saved[i], params[i], dirs[i], i > stop,
                                                       outs[i], touts[i])
            return nbytes

        with torch.no_grad():
            self._chunked("hvp", x, run)
        return HVP(grad, hu, hu_s)

    @staticmethod
    def _store(result: dict, name: str, value, sl: slice, T: int) -> None:
        """Writes a chunk `[Tc, ...]` into result[name] `[T, ...]` (allocated at the first chunk)."""
        if sl.start == 0 and sl.stop == T:
            result[name] = value
            return
        if name not in result:
            result[name] = value.new_empty(T, *value.shape[1:])
        result[name][sl] = value

    def forward(self, phi, shared, x, *, bn_stats=None):
        differentiable = torch.is_grad_enabled() and (phi.requires_grad or shared.requires_grad or x.requires_grad)
        ops = self._ops(x.device, differentiable)
        h = x
        for rule, p in zip(self.rules, self._params(phi, shared, bn_stats)):
            h, _ = rule.forward(ops, h, p, False)
        return h

    def batch_stats(self, phi, shared, x):
        ops = self._ops(x.device)
        stats = []
        with torch.no_grad():
            h = x
            for rule, p in zip(self.rules, self._params(phi, shared, None)):
                if isinstance(rule, BatchNormRule):
                    x4 = rule.as_channels(h)
                    var, mean = torch.var_mean(x4, (1, 3), correction=0)
                    stats.append((mean, var, x4.shape[1] * x4.shape[3]))
                h, _ = rule.forward(ops, h, p, False)
        return stats

    def evaluate(self, phi, shared, x, y, *, bn_stats=None):
        """(loss `[T]`, output) without gradients, in chunks of tasks like `loss_grad`."""
        T = x.shape[0]
        ops = self._ops(x.device)
        result = {}

        def run(sl):
            h, nbytes = x[sl], 0
            for rule, p in zip(self.rules, self._params(self._rows(phi, sl), shared, bn_stats)):
                h, _ = rule.forward(ops, h, p, False)
                nbytes += h.numel() * h.element_size()
            self._store(result, "output", h, sl, T)
            return nbytes

        with torch.no_grad():
            self._chunked("loss_grad", x, run)
            out = result["output"]
            return self.loss_rule.value(out, y), out
