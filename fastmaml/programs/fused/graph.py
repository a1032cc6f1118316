"""The compiled model: a DAG of rule nodes over values, in topological order.

Value 0 is the model's input `[T, N, *in]`; node i reads `inputs` (value ids) and writes value `output`.
A value may be read by several nodes (fan-out: residual branches, a tensor read twice); the program adds
the gradients its readers send back. An `nn.Sequential` compiles into a chain: one reader per value.

Parameters are referenced, not held: `Ref("a", k)` / `Ref("s", k)` is slot k of the adapted / shared
flat group (`ParamLayout`), so a weight used by two nodes (tied weights, a layer called twice) is one
slot read twice, and its gradient is the sum of both uses. `Ref("c", tensor)` is a constant (a buffer).
`Ref("d", k)` is the graph's derived tensor k (derived.py): one the model computes from parameters alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .base import Rule
from .conv import ConvRule
from .conv_block import ConvBlockRule
from .norm import BatchNormRule
from .norm_act import BatchNormLeakyReLURule, BatchNormReLUMaxPoolRule, BatchNormReLURule
from .pointwise import LeakyReLURule, ReLURule
from .pooling import MaxPool2dRule, ReLUMaxPool2dRule


@dataclass(frozen=True, eq=False)
class Ref:
    """A parameter slot (`group` "a" or "s", `index` into the group's slots), a derived tensor (`group` "d",
    `index` into `Graph.derived`) or a constant (`group` "c")."""

    group: str
    index: int = -1
    const: Optional[torch.Tensor] = None


@dataclass
class Node:
    """One rule applied to values.

    params: per `rule.param_names`, a Ref or None (absent). stats: for BatchNorm rules without a module
    index, the fixed (mean, var) constants of `F.batch_norm(training=False)`, else None. host: for rules
    that read runtime sizes (reshapes), `host(values)`, bound after the parameters; `keeps`: the values it
    reads for that.
    inplace: the model wrote it as an in-place op (checked: the overwritten value has no later reader).
    source: where the model code makes this node (file:line), when known."""

    rule: Rule
    inputs: Tuple[int, ...]
    output: int
    params: Tuple[Optional[Ref], ...] = ()
    stats: Optional[Tuple[Ref, Ref]] = None
    host: Optional[Callable[[list], tuple]] = None
    keeps: Tuple[int, ...] = ()
    inplace: bool = False
    source: str = ""

    def describe(self) -> str:
        return self.rule.describe()


@dataclass
class Graph:
    nodes: List[Node]
    num_values: int
    output: int  # the value the model returns
    unused: Tuple[Ref, ...] = field(default=())  # parameter slots no node reads (zeroed; derived tensors add)
    derived: tuple = field(default=())  # derived.Derived per Ref("d", k)
    volatile: Dict[str, frozenset] = field(default_factory=dict)  # module attributes forward changes

    def readers(self) -> List[int]:
        """How many nodes read each value (host reads included)."""
        count = [0] * self.num_values
        for node in self.nodes:
            for v in set(node.inputs) | set(node.keeps):
                count[v] += 1
        return count

    def chain_rules(self) -> Optional[List[Rule]]:
        """The rules in order when the graph is a chain (each node reads the previous node's output), else
        None."""
        last = 0
        for node in self.nodes:
            if node.inputs != (last,) or node.keeps:
                return None
            last = node.output
        return [n.rule for n in self.nodes] if last == self.output else None


def fuse(graph: Graph) -> Graph:
    """BatchNorm followed by ReLU (and a non-overlapping MaxPool2d) or by LeakyReLU (slope > 0) becomes one
    rule where the intermediate value has no other reader and is not the model's output; a BatchNorm + ReLU +
    MaxPool2d whose input is a Conv2d of the model's input takes that convolution in too (`ConvBlockRule`).
    Any other ReLU followed by a MaxPool2d becomes `ReLUMaxPool2dRule` on the same terms."""
    readers = graph.readers()
    nodes = list(graph.nodes)
    gone = set()

    def sole_reader(i: int) -> Optional[int]:
        """The index of the one node reading node i's output, if only one does."""
        v = nodes[i].output
        if readers[v] != 1 or v == graph.output:
            return None
        for j in range(i + 1, len(nodes)):
            if j not in gone and v in nodes[j].inputs:
                return j
        return None

    def first_conv(i: int) -> Optional[int]:
        """The index of the Conv2d node that writes node i's input, if it reads the model's input, has only
        node i as reader and the first-block kernels take it."""
        v = nodes[i].inputs[0]
        for j in range(i):
            node = nodes[j]
            if j not in gone and node.output == v:
                ok = type(node.rule) is ConvRule and node.inputs == (0,) and ConvBlockRule.fusable(node.rule)
                return j if ok and sole_reader(j) == i else None
        return None

    def merge(i: int, j: int, rule: Rule) -> None:
        nodes[i] = Node(rule, nodes[i].inputs, nodes[j].output, nodes[i].params, nodes[i].stats, source=nodes[i].source)
        gone.add(j)

    for i, node in enumerate(nodes):
        if i in gone or type(node.rule) is not BatchNormRule:
            continue
        j = sole_reader(i)
        if j is None:
            continue
        act = nodes[j].rule
        if type(act) is ReLURule:
            merge(i, j, BatchNormReLURule(node.rule, act))
            k = sole_reader(i)
            if (
                k is not None
                and type(nodes[k].rule) is MaxPool2dRule
                and BatchNormReLUMaxPoolRule.fusable(nodes[i].rule, nodes[k].rule)
            ):
                merge(i, k, BatchNormReLUMaxPoolRule(nodes[i].rule, nodes[k].rule))
                c = first_conv(i)
                if c is not None:
                    conv = nodes[c]
                    block = ConvBlockRule(conv.rule, nodes[i].rule)
                    params = conv.params + nodes[i].params
                    nodes[i] = Node(block, conv.inputs, nodes[i].output, params, nodes[i].stats, source=conv.source)
                    gone.add(c)
        elif type(act) is LeakyReLURule and act.slope > 0:
            merge(i, j, BatchNormLeakyReLURule(node.rule, act))
    for i, node in enumerate(nodes):
        if i in gone or type(node.rule) is not ReLURule:
            continue
        j = sole_reader(i)
        if j is not None and type(nodes[j].rule) is MaxPool2dRule:
            merge(i, j, ReLUMaxPool2dRule(node.rule, nodes[j].rule))
    kept = [n for i, n in enumerate(nodes) if i not in gone]
    return Graph(kept, graph.num_values, graph.output, graph.unused, derived=graph.derived)
