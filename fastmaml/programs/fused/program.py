"""FusedProgram: a compiled model's loss, gradient and exact Hessian-vector products for all T tasks at
once, from hand-derived rules over its graph (graph.py), with no autograd graph.

loss_grad: the forward sweep in topological order (each node saving what its backward needs), the loss
rule, then the backward sweep in reverse order, writing every parameter's per-task gradient into one
flat `[T, Pa]` buffer (and `[T, Ps]` for shared weights when asked). hvp: a forward sweep carrying the
tangent (x, ẋ), with weight directions from u, then a backward sweep carrying (g, ġ); ġ of every weight
is H u. A value read by several nodes gets the sum of their gradients (and tangents); a weight read by
several nodes (tied) gets the sum of their weight gradients. Only nodes downstream of a parameter that
needs a gradient run backward; tangents are None (zero) until the first adapted parameter. A value is
dropped once its last reader has run, a node's saved tensors once its backward has. Tasks run in chunks
sized by their activations (`_chunked`).

The activation tape: `loss_grad(activations=d)` keeps in d, for every rule that `reuses_primal` (the
convolutions), its output `[T, N, ...]` and the gradient it sent to its input; `hvp(activations=d)` at the
same point passes them to the rules instead of recomputing them (a convolution's tangent sweeps then cost
4 convolutions instead of 6). An `hvp` given an empty d fills it, for later HVPs at the same point (the
implicit order's conjugate-gradient iterations). `forward` uses the same rules with differentiable reference ops
(for `adapt`).

BatchNorm statistics from a convolution's epilogue: where a Conv2d node's output is read only by a
BatchNorm rule on batch statistics (`stats_to`), the sweeps run the convolution's `forward_stats` /
`tangent_forward_stats` and give the statistics they return (strategy "triton"; None otherwise) to the
BatchNorm's forward (`given`), which then does not reduce x again. The activation tape keeps the value's
statistics beside y, so that an HVP that reuses y normalizes with the same statistics as the pass that
computed it.

Derived tensors (derived.py: what the model computes from parameters alone, read as a parameter
`Ref("d", k)`) are computed per chunk of tasks from the chunk's φ rows and ψ; the rules write their
gradient (and its tangent) into `[Tc, *shape]` buffers, which the program pulls back to the parameter
slots after the backward sweep (`_pull`, `_pull_tangent`). A slot only derived tensors read is listed
in `Graph.unused`, zeroed before the sweep, then added to.

Image activations run in the memory format of memory_format.py (channels-last on the CPU for large maps):
`_forward` brings its input to it, the rules keep it.

Every method takes the op table of the call (`ops`: `fastmaml.ops.resolve(backend, device)`); the program
holds no backend and no reference to the model.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch

from ...layout import ParamLayout
from ...losses import Loss
from ...ops import registry
from ..base import HVP, LossGrad, Program
from . import memory_format as mf
from .conv import Conv1dRule, ConvRule
from .conv_block import ConvBlockRule
from .conv_nd import ConvNdRule
from .dense import LinearRule
from .dropout import DropoutRule
from .example_norm import ExampleNormRule
from .graph import Graph
from .joins import ProductRule
from .norm import BatchNormRule, fused_batch_norm


def _moments(rule, x):
    """(mean `[T, C]`, biased var `[T, C]`, values per task and channel) of x `[T, N, C, ...]` as the BatchNorm
    rule sees it; two passes (torch.var_mean over these dimensions runs about 3x slower on the CPU)."""
    x4 = rule.as_channels(x)
    mean = x4.mean((1, 3), keepdim=True)
    var = (x4 - mean).square_().mean((1, 3))
    return mean[:, 0, :, 0], var, x4.shape[1] * x4.shape[3]


class _Plan:
    """Which nodes run backward when the parameter groups `groups` need gradients: `active[i]`, and per
    node which of its inputs need a gradient (`need[i]`)."""

    def __init__(self, graph: Graph, groups: Tuple[str, ...]):
        needs = [False] * graph.num_values
        self.active: List[bool] = []
        self.need: List[tuple] = []
        # the derived tensors computed from a parameter of `groups`
        self.derived = tuple(bool(d.groups() & set(groups)) for d in graph.derived)
        for node in graph.nodes:
            own = any(
                r is not None and (r.group in groups or (r.group == "d" and self.derived[r.index])) for r in node.params
            )
            need = tuple(needs[v] for v in node.inputs)
            self.active.append((own or any(need)) and node.rule.differentiable)
            self.need.append(need)
            needs[node.output] = self.active[-1]


class FusedProgram(Program):
    name = "fused"
    # activations per chunk of tasks, per device type (see `_chunked`): on the CPU a chunk that stays in
    # cache; on a GPU large enough to fill it (small chunks left the engine launch-bound on a GPU)
    chunk_bytes = {"cpu": 16 << 20, "cuda": 1 << 30}
    # on the CPU, a model of more matrix products (Linear layers on tokens, attention) than convolutions
    # takes chunks this many times larger: its batched GEMMs and per-op costs gain from more tasks at once
    # (benchmarks/RESULTS.md, twelfth session)
    gemm_chunk_scale = 16

    def __init__(self, layout: ParamLayout, loss: Loss, graph: Graph, loss_rule):
        super().__init__(layout, loss)
        self.graph = graph
        self.nodes = graph.nodes
        self.loss_rule = loss_rule
        self.groups = {"a": layout.adapted, "s": layout.shared}
        self.sizes = {g: [s.numel for s in group.slots] for g, group in self.groups.items()}
        self.shapes = {g: [tuple(s.shape) for s in group.slots] for g, group in self.groups.items()}
        self.derived = graph.derived
        self.readers = graph.readers()
        self.plans = {False: _Plan(graph, ("a",)), True: _Plan(graph, ("a", "s"))}
        self.norms = [(i, n.rule) for i, n in enumerate(self.nodes) if isinstance(n.rule, BatchNormRule)]
        self.example_norms = any(isinstance(n.rule, ExampleNormRule) for n in self.nodes)  # no channels-last variant
        # the first node reading a parameter slot writes its gradient in place; later readers (tied weights)
        # write into their own buffers, added afterwards
        first, self.extra = set(), []
        for i, node in enumerate(self.nodes):
            for k, ref in enumerate(node.params):
                if ref is not None and ref.group != "c":
                    key = (ref.group, ref.index)
                    if key in first:
                        self.extra.append((i, k, ref))
                    first.add(key)
        self._task_bytes: Dict[tuple, int] = {}
        self.taped = frozenset(i for i, n in enumerate(self.nodes) if n.rule.reuses_primal)
        self.keeps_activations = bool(self.taped)
        self.draws_masks = any(isinstance(n.rule, DropoutRule) for n in self.nodes)
        convs = sum(isinstance(n.rule, (ConvRule, Conv1dRule, ConvNdRule, ConvBlockRule)) for n in self.nodes)
        gemms = sum(
            isinstance(n.rule, LinearRule) or (isinstance(n.rule, ProductRule) and n.rule.matmul) for n in self.nodes
        )
        self.gemm_bound = gemms > convs  # (see `gemm_chunk_scale`)
        self.stats_to = self._stats_pairs()
        self.memory_format: Optional[str] = None  # of image activations; None: mf.FORMAT[device type]

    def _stats_pairs(self) -> Dict[int, int]:
        """{convolution node: BatchNorm node} where a rule that `takes_stats` is the only reader of a Conv2d
        node's output (not the model's output)."""
        pairs = {}
        for i, node in enumerate(self.nodes):
            v = node.output
            if not isinstance(node.rule, ConvRule) or self.readers[v] != 1 or v == self.graph.output:
                continue
            j = next(j for j in range(i + 1, len(self.nodes)) if v in self.nodes[j].inputs or v in self.nodes[j].keeps)
            if self.nodes[j].rule.takes_stats and self.nodes[j].inputs == (v,):
                pairs[i] = j
        return pairs

    def describe(self) -> List[str]:
        """One line per node: `out <- rule(inputs)`."""
        lines = [f"d{k} = {d.text}" for k, d in enumerate(self.derived)]
        for node in self.nodes:
            args = ", ".join("x" if v == 0 else f"v{v}" for v in node.inputs)
            reads = [f"d{r.index}" for r in node.params if r is not None and r.group == "d"]
            lines.append(f"v{node.output} = {node.describe()}({args})" + (f" with {', '.join(reads)}" if reads else ""))
        return lines

    # ------------------------------------------------------------------ binding
    def _views(self, flat: Optional[torch.Tensor], g: str) -> Optional[list]:
        """flat `[*batch, P_g]` -> one view `[*batch, *shape]` per slot of group g (None: no flat)."""
        if flat is None or not self.sizes[g]:
            return None
        batch = flat.shape[:-1]
        return [c.view((*batch, *s)) for c, s in zip(flat.split(self.sizes[g], -1), self.shapes[g])]

    def _slots(self, phi, shared) -> dict:
        """{"a": views of φ's slots, "s": of ψ's} (per task `[T, *shape]` or common `[*shape]`)."""
        return {"a": self._views(phi, "a"), "s": self._views(shared, "s")}

    @staticmethod
    def _leaves(d, slots: dict, g: Optional[str] = None) -> list:
        """The tensors of derived tensor d's leaves in `slots` (g: only those of group g, None for the others)."""
        return [slots[r.group][r.index] if g is None or r.group == g else None for r in d.leaves]

    def _params(self, phi, shared, bn_stats) -> List[tuple]:
        """Per node, its parameters (views of φ / ψ rows, derived tensors, constants, None), BatchNorm
        statistics appended."""
        if bn_stats is not None and any(
            rule.index is not None and rule.index >= len(bn_stats) for _, rule in self.norms
        ):
            raise ValueError(f"bn_stats: got statistics for {len(bn_stats)} BatchNorm layers, fewer than the model has")
        views = self._slots(phi, shared)
        views["c"] = None
        views["d"] = [d.value(self._leaves(d, views)) for d in self.derived]
        out = []
        for node in self.nodes:
            p = tuple(
                None if r is None else r.const if r.group == "c" else views[r.group][r.index] for r in node.params
            )
            if isinstance(node.rule, BatchNormRule):
                if node.rule.index is not None:
                    stats = None if bn_stats is None else bn_stats[node.rule.index]
                else:
                    stats = None if node.stats is None else tuple(r.const for r in node.stats)
                p = p + (stats,)
            out.append(p)
        return out

    def _outs(self, flats: dict) -> Tuple[List[tuple], list]:
        """Per node, where each parameter's gradient goes (views of `flats[g]` `[Tc, P_g]` or None), and the
        (own buffer, slot view) pairs of the later readers of tied slots, to add once the sweep is done."""
        views = {g: f if g == "d" else self._views(f, g) for g, f in flats.items()}
        outs = [
            tuple(
                None if r is None or r.group == "c" or views.get(r.group) is None else views[r.group][r.index]
                for r in node.params
            )
            for node in self.nodes
        ]
        pending = []
        for i, k, ref in self.extra:
            slot = views.get(ref.group)
            if slot is not None and slot[ref.index] is not None:
                own = torch.empty_like(slot[ref.index])
                outs[i] = outs[i][:k] + (own,) + outs[i][k + 1 :]
                pending.append((own, slot[ref.index]))
        for ref in self.graph.unused:
            slot = views.get(ref.group)
            if slot is not None:
                slot[ref.index].zero_()
        return outs, pending

    def _dirs(self, u, slots: dict) -> Tuple[List[tuple], list]:
        """(per node, the directions of its parameters from u `[T, Pa]`, None where zero; per derived tensor its
        leaves' directions, for `_pull_tangent`)."""
        views = {"a": self._views(u, "a")}
        leaf_dirs = [self._leaves(d, views, "a") for d in self.derived]
        derived = [
            d.tangent(self._leaves(d, slots), ld) if any(v is not None for v in ld) else None
            for d, ld in zip(self.derived, leaf_dirs)
        ]
        dirs = [
            tuple(
                views["a"][r.index]
                if r is not None and r.group == "a"
                else derived[r.index]
                if r is not None and r.group == "d"
                else None
                for r in node.params
            )
            for node in self.nodes
        ]
        return dirs, leaf_dirs

    def _derived_buffers(self, plan: _Plan, like: torch.Tensor, T: int) -> Optional[list]:
        """Per derived tensor, a buffer `[T, *shape]` for what the rules send it, where `plan` needs it (else
        None); None when the graph has none."""
        if not self.derived:
            return None
        return [like.new_empty(T, *d.shape) if need else None for d, need in zip(self.derived, plan.derived)]

    def _pull(self, slots: dict, bufs: Optional[list], flats: dict) -> None:
        """Adds Jᵀ ḡ of every derived tensor (ḡ in `bufs`) to its leaves' gradients in `flats[g]` `[Tc, P_g]`."""
        views = {g: self._views(f, g) for g, f in flats.items()}
        for d, g in zip(self.derived, bufs or ()):
            if g is None:
                continue
            for r, gr in zip(d.leaves, d.pullback(self._leaves(d, slots), g)):
                if views.get(r.group) is not None:
                    views[r.group][r.index].add_(gr)

    def _pull_tangent(
        self, slots: dict, leaf_dirs: list, bufs: Optional[list], tbufs: Optional[list], flats: dict, tflats: dict
    ) -> None:
        """`_pull` in the HVP: Jᵀ ḡ into `flats`, Jᵀ ḡ' + (∂θ(J v))ᵀ ḡ into `tflats` (ḡ' in `tbufs`)."""
        views = {g: self._views(f, g) for g, f in flats.items()}
        tviews = {g: self._views(f, g) for g, f in tflats.items()}
        for d, ld, g, gd in zip(self.derived, leaf_dirs, bufs or (), tbufs or ()):
            if gd is None:
                continue
            grads, tangents = d.pullback_tangent(self._leaves(d, slots), ld, g, gd)
            for r, gr, tr in zip(d.leaves, grads, tangents):
                if views.get(r.group) is not None:
                    views[r.group][r.index].add_(gr)
                if tviews.get(r.group) is not None:
                    tviews[r.group][r.index].add_(tr)

    @staticmethod
    def _rows(t, sl):
        """Tasks `sl` of a per-task tensor `[T, ...]`; a common `[P]` (or None) stays as it is."""
        return t if t is None or t.dim() == 1 else t[sl]

    # ------------------------------------------------------------------ task chunks
    def _chunked(self, kind: str, x, run) -> None:
        """Runs `run(tasks: slice) -> activation bytes` over chunks of tasks sized to `chunk_bytes` of
        activations for the device type (on the CPU all tasks at once for small activations, e.g. MLPs,
        and one task at a time for large conv activations, which keeps peak memory and the cache working
        set to one chunk; `gemm_chunk_scale` times more for a model of matrix products on the CPU). The
        size per task is measured once per input shape by running task 0 alone (then run again in its
        chunk), so the chunks depend only on the shapes: a computation is bitwise the same whenever it runs."""
        T = x.shape[0]
        key = (kind, tuple(x.shape[1:]), x.dtype, x.device)
        per_task = self._task_bytes.get(key)
        if per_task is None:
            per_task = self._task_bytes[key] = max(run(slice(0, 1)), 1)
        budget = self.chunk_bytes.get(x.device.type, self.chunk_bytes["cpu"])
        if self.gemm_bound and x.device.type == "cpu":
            budget *= self.gemm_chunk_scale
        size = max(1, budget // per_task)
        for start in range(0, T, size):
            run(slice(start, min(T, start + size)))

    # ------------------------------------------------------------------ sweeps
    def _forward(
        self,
        ops,
        x,
        params,
        active,
        tangents=None,
        dirs=None,
        watch=None,
        known=None,
        known_stats=None,
        stats=None,
        moments=None,
    ):
        """Forward sweep from x; with `tangents` (a list, filled per value), the tangent sweep too; `watch`
        {value id: None} gets those values; `known` {node: output} gives outputs not to recompute (the
        activation tape; a node absent from it computes its own), `known_stats` {node: `[2, T, O]`} the
        BatchNorm statistics kept with them; `stats` {} gets {node: `[2, T, O]`} of the convolutions that
        gave statistics; `moments` {value id: BatchNorm rule} gets {value id: (mean `[T, C]`, biased var
        `[T, C]`, count)} of those values as the rule sees them, measured when each is computed (nothing is
        kept alive for it), and {("in", node): the same} of the value inside a rule that normalizes one
        (`normalized_input`). Returns (output, its tangent, saved per node, host arguments per node, activation
        bytes)."""
        nodes, readers, out_v = self.nodes, self.readers, self.graph.output
        env: List[Optional[torch.Tensor]] = [None] * self.graph.num_values
        fmt = self.memory_format or mf.FORMAT.get(x.device.type, "contiguous")
        norm_kernels = not self.example_norms and (not self.norms or fused_batch_norm(ops))
        x = mf.to_format(x, mf.choose(fmt, x, norm_kernels=norm_kernels))
        env[0] = x
        if watch is not None and 0 in watch:
            watch[0] = x
        if moments is not None and 0 in moments:
            moments[0] = _moments(moments[0], x)
        left = list(readers)
        saved, hosts, nbytes = [None] * len(nodes), [None] * len(nodes), 0
        given: Dict[int, torch.Tensor] = {}  # value id -> its BatchNorm statistics, from the conv that wrote it
        for i, node in enumerate(nodes):
            rule = node.rule
            p = params[i] if node.host is None else params[i] + (node.host(env),)
            hosts[i] = p
            xs = env[node.inputs[0]] if rule.arity == 1 else [env[v] for v in node.inputs]
            y = None if known is None else known.get(i)
            kw = {"given": given.pop(node.inputs[0])} if node.inputs[0] in given else {}
            # a convolution whose only reader is a BatchNorm on batch statistics (its statistics slot None)
            pair = i in self.stats_to and params[self.stats_to[i]][-1] is None
            st = None if known_stats is None else known_stats.get(i)
            if moments is not None and ("in", i) in moments:
                moments[("in", i)] = _moments(rule, rule.normalized_input(ops, xs, p))
            if tangents is not None and active[i]:
                xds = tangents[node.inputs[0]] if rule.arity == 1 else [tangents[v] for v in node.inputs]
                if pair:
                    y, yd, saved[i], st = rule.tangent_forward_stats(ops, xs, xds, p, dirs[i], y=y, stats=st)
                elif y is None:
                    y, yd, saved[i] = rule.tangent_forward(ops, xs, xds, p, dirs[i], **kw)
                else:
                    y, yd, saved[i] = rule.tangent_forward(ops, xs, xds, p, dirs[i], y=y)
                tangents[node.output] = yd
            elif y is None or active[i]:
                if pair:
                    y, saved[i], st = rule.forward_stats(ops, xs, p, active[i])
                else:
                    y, saved[i] = rule.forward(ops, xs, p, active[i], **kw)
            if pair and st is not None:
                given[node.output] = st
                if stats is not None:
                    stats[i] = st[:2]
            env[node.output] = y
            if watch is not None and node.output in watch:
                watch[node.output] = y
            if moments is not None and node.output in moments:
                moments[node.output] = _moments(moments[node.output], y)
            nbytes += y.numel() * y.element_size()
            for v in set(node.inputs) | set(node.keeps):
                left[v] -= 1
                if left[v] == 0 and v != out_v:
                    env[v] = None
                    if tangents is not None:
                        tangents[v] = None
        yd = None if tangents is None else tangents[out_v]
        return env[out_v], yd, saved, hosts, nbytes

    @staticmethod
    def _add(slots, v, g):
        if g is not None:
            slots[v] = g if slots[v] is None else slots[v] + g

    def loss_grad(
        self, ops, phi, shared, x, y, *, shared_grad=False, bn_stats=None, activations=None, record_stats=False
    ) -> LossGrad:
        T = x.shape[0]
        plan = self.plans[bool(shared_grad)]
        grad = phi.new_empty(T, self.layout.adapted.size)
        grad_s = phi.new_empty(T, self.layout.shared.size) if shared_grad else None
        result = {}
        norm_inputs = self._norm_inputs() if record_stats else {}
        recorded = {}  # per statistics slot: the count, and the chunks' rows in `result`

        def run(sl):
            params = self._params(self._rows(phi, sl), shared, bn_stats)
            watch = self._watch(activations is not None)
            stats = {} if activations is not None else None
            moments = self._norm_moments(norm_inputs) if record_stats else None
            out, _, saved, hosts, nbytes = self._forward(
                ops, x[sl], params, plan.active, watch=watch, stats=stats, moments=moments
            )
            self._keep_outputs(activations, watch, sl, T, stats)
            if record_stats:
                for j, st in enumerate(self._stats_of(norm_inputs, moments)):
                    if st is not None:
                        self._store(result, ("mean", j), st[0], sl, T)
                        self._store(result, ("var", j), st[1], sl, T)
                        recorded[j] = st[2]
            loss, g, _ = self.loss_rule.grad(ops, out, y[sl])
            self._store(result, "loss", loss, sl, T)
            self._store(result, "output", out, sl, T)
            flats = {"a": grad[sl], "s": self._rows(grad_s, sl)}
            dbufs = self._derived_buffers(plan, grad, flats["a"].shape[0])
            outs, pending = self._outs({**flats, "d": dbufs})
            grads: List[Optional[torch.Tensor]] = [None] * self.graph.num_values
            grads[self.graph.output] = g
            for i in range(len(self.nodes) - 1, -1, -1):
                if not plan.active[i]:
                    continue
                node = self.nodes[i]
                gy, grads[node.output] = grads[node.output], None
                p = params[i] if node.host is None else hosts[i]
                if node.rule.arity == 1:
                    gx = node.rule.backward(ops, gy, saved[i], p, plan.need[i][0], outs[i])
                    if activations is not None and i in self.taped and gx is not None:
                        self._store(activations, ("gx", i), gx, sl, T)
                    self._add(grads, node.inputs[0], gx)
                else:
                    for v, gx in zip(node.inputs, node.rule.backward(ops, gy, saved[i], p, plan.need[i], outs[i])):
                        self._add(grads, v, gx)
                saved[i] = None
            for own, slot in pending:
                slot.add_(own)
            self._pull(self._slots(self._rows(phi, sl), shared), dbufs, flats)
            return nbytes

        with torch.no_grad():
            self._chunked("loss_grad", x, run)
        stats = None
        if record_stats:
            stats = [
                (result[("mean", j)], result[("var", j)], recorded[j]) if j in recorded else None
                for j in range(self._stat_slots())
            ]
        return LossGrad(result["loss"], grad, grad_s, result["output"], stats)

    def hvp(
        self, ops, phi, shared, x, y, u, *, shared_grad=False, need_grad=True, bn_stats=None, activations=None
    ) -> HVP:
        T = x.shape[0]
        plan = self.plans[bool(shared_grad)]
        Pa, Ps = self.layout.adapted.size, self.layout.shared.size
        grad = phi.new_empty(T, Pa) if need_grad else None  # None: no weight gradients, only their tangents
        hu = phi.new_empty(T, Pa)
        grad_s = phi.new_empty(T, Ps) if shared_grad and need_grad else None
        hu_s = phi.new_empty(T, Ps) if shared_grad else None
        record = activations is not None and not activations  # an empty tape: filled by this HVP

        def run(sl):
            params = self._params(self._rows(phi, sl), shared, bn_stats)
            slots = self._slots(self._rows(phi, sl), shared)
            dirs, leaf_dirs = self._dirs(u[sl], slots)
            tangents: List[Optional[torch.Tensor]] = [None] * self.graph.num_values
            known, known_gx, known_stats = self._known(None if record else activations, sl)
            watch = self._watch(record)
            stats = {} if record else None
            out, outd, saved, hosts, nbytes = self._forward(
                ops, x[sl], params, plan.active, tangents, dirs, watch, known, known_stats, stats
            )
            self._keep_outputs(activations if record else None, watch, sl, T, stats)
            _, g, ls = self.loss_rule.grad(ops, out, y[sl])
            gd = self.loss_rule.grad_tangent(ops, ls, outd) if outd is not None else torch.zeros_like(g)
            flats = {"a": self._rows(grad, sl), "s": self._rows(grad_s, sl)}
            tflats = {"a": hu[sl], "s": self._rows(hu_s, sl)}
            Tc = tflats["a"].shape[0]
            dbufs, tbufs = self._derived_buffers(plan, hu, Tc), self._derived_buffers(plan, hu, Tc)
            outs, pending = self._outs({**flats, "d": dbufs})
            touts, tpending = self._outs({**tflats, "d": tbufs})
            grads: List[Optional[torch.Tensor]] = [None] * self.graph.num_values
            tgrads: List[Optional[torch.Tensor]] = [None] * self.graph.num_values
            grads[self.graph.output], tgrads[self.graph.output] = g, gd
            for i in range(len(self.nodes) - 1, -1, -1):
                if not plan.active[i]:
                    continue
                node = self.nodes[i]
                gy, grads[node.output] = grads[node.output], None
                gyd, tgrads[node.output] = tgrads[node.output], None
                p = params[i] if node.host is None else hosts[i]
                if node.rule.arity == 1:
                    args = (ops, gy, gyd, saved[i], p, dirs[i], plan.need[i][0], outs[i], touts[i])
                    if i in known_gx:
                        gx, gxd = node.rule.tangent_backward(*args, gx=known_gx[i])
                    else:
                        gx, gxd = node.rule.tangent_backward(*args)
                        if record and i in self.taped and gx is not None:
                            self._store(activations, ("gx", i), gx, sl, T)
                    self._add(grads, node.inputs[0], gx)
                    self._add(tgrads, node.inputs[0], gxd)
                else:
                    pairs = node.rule.tangent_backward(
                        ops, gy, gyd, saved[i], p, dirs[i], plan.need[i], outs[i], touts[i]
                    )
                    for v, (gx, gxd) in zip(node.inputs, pairs):
                        self._add(grads, v, gx)
                        self._add(tgrads, v, gxd)
                saved[i] = None
            for own, slot in pending + tpending:
                slot.add_(own)
            self._pull_tangent(slots, leaf_dirs, dbufs, tbufs, flats, tflats)
            return nbytes * 2

        with torch.no_grad():
            self._chunked("hvp", x, run)
        return HVP(grad, hu, hu_s)

    def _watch(self, keep: bool) -> Optional[dict]:
        """The `_forward` watch list of the taped nodes' outputs (None: nothing to keep)."""
        return {self.nodes[i].output: None for i in self.taped} if keep and self.taped else None

    def _keep_outputs(
        self, activations: Optional[dict], watch: Optional[dict], sl: slice, T: int, stats: Optional[dict]
    ) -> None:
        """Writes the watched outputs of tasks `sl` into the activation tape (when there is one), and the
        BatchNorm statistics `[2, Tc, O]` of those that gave them (kept as `[Tc, 2, O]`)."""
        if activations is None or watch is None:
            return
        for i in self.taped:
            self._store(activations, ("y", i), watch[self.nodes[i].output], sl, T)
        for i, st in (stats or {}).items():
            self._store(activations, ("stats", i), st.transpose(0, 1), sl, T)

    def _known(self, activations: Optional[dict], sl: slice) -> Tuple[dict, dict, dict]:
        """From an activation tape, tasks `sl` of each taped node's output, input gradient and BatchNorm
        statistics: ({node: y}, {node: gx}, {node: `[2, Tc, O]`})."""
        if not activations:
            return {}, {}, {}
        known = {i: activations[("y", i)][sl] for i in self.taped if ("y", i) in activations}
        known_gx = {i: activations[("gx", i)][sl] for i in self.taped if ("gx", i) in activations}
        known_stats = {
            i: activations[("stats", i)][sl].transpose(0, 1) for i in self.taped if ("stats", i) in activations
        }
        return known, known_gx, known_stats

    @staticmethod
    def _store(result: dict, name, value, sl: slice, T: int) -> None:
        """Writes a chunk `[Tc, ...]` into result[name] `[T, ...]` (allocated at the first chunk)."""
        if sl.start == 0 and sl.stop == T:
            result[name] = value
            return
        if name not in result:
            result[name] = value.new_empty(T, *value.shape[1:])
        result[name][sl] = value

    def forward(self, ops, phi, shared, x, *, bn_stats=None):
        differentiable = torch.is_grad_enabled() and (phi.requires_grad or shared.requires_grad or x.requires_grad)
        if differentiable:
            ops = registry.resolve("torch", x.device)
        inactive = [False] * len(self.nodes)
        return self._forward(ops, x, self._params(phi, shared, bn_stats), inactive)[0]

    def batch_stats(self, ops, phi, shared, x):
        """Per BatchNorm module (in `NormPlan` order), the per-task batch statistics of its input at its
        first call (None for a module the forward never calls)."""
        inputs = self._norm_inputs()
        if not inputs:
            return [None] * self._stat_slots()
        with torch.no_grad():
            moments = self._norm_moments(inputs)
            self._forward(ops, x, self._params(phi, shared, None), [False] * len(self.nodes), moments=moments)
            return self._stats_of(inputs, moments)

    def _norm_inputs(self) -> Dict[int, Union[int, tuple]]:
        """{node: the value id of its input} of the BatchNorm nodes with a statistics slot; ("in", node) for a
        rule whose BatchNorm normalizes a value inside it (`input_is_normalized` False: the first block)."""
        return {
            i: node.inputs[0] if node.rule.input_is_normalized else ("in", i)
            for i, node in enumerate(self.nodes)
            if isinstance(node.rule, BatchNormRule) and node.rule.index is not None
        }

    def _stat_slots(self) -> int:
        """The length of `batch_stats`'s list (one slot per BatchNorm module, in `NormPlan` order)."""
        return 1 + max((r.index for _, r in self.norms if r.index is not None), default=-1)

    def _norm_moments(self, inputs: Dict[int, int]) -> dict:
        """The `_forward` `moments` request of the BatchNorm inputs `inputs` ({node: value id or ("in", node)})."""
        return {v: self.nodes[i].rule for i, v in inputs.items()}

    def _stats_of(self, inputs: Dict[int, int], moments: dict) -> list:
        """`batch_stats`'s list from the moments a forward measured ({value id: (mean, var, count)})."""
        stats = [None] * self._stat_slots()
        for i, v in inputs.items():
            index = self.nodes[i].rule.index
            if stats[index] is None:
                stats[index] = moments[v]
        return stats

    def evaluate(self, ops, phi, shared, x, y, *, bn_stats=None):
        """(loss `[T]`, output) without gradients, in chunks of tasks like `loss_grad`."""
        T = x.shape[0]
        result = {}
        inactive = [False] * len(self.nodes)

        def run(sl):
            out, _, _, _, nbytes = self._forward(
                ops, x[sl], self._params(self._rows(phi, sl), shared, bn_stats), inactive
            )
            self._store(result, "output", out, sl, T)
            return nbytes

        with torch.no_grad():
            self._chunked("loss_grad", x, run)
            out = result["output"]
            return self.loss_rule.value(out, y), out
