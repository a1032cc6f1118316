"""The implementations compared: each builds, for one model and workload, a `step(tasks)` that
accumulates the meta-gradient of the mean-over-tasks query loss into the model's `p.grad`.

    autograd-loop        per-task loop, torch.autograd.grad(create_graph=True) (THE baseline)
    autograd-loop-first  the same loop without create_graph (first-order MAML)
    fastmaml[B,order]    fastmaml.meta_step with ops backend B (auto | torch | triton | cpp),
                         order second | checkpoint | first
    fastmaml-plan[auto,order]  a fastmaml.MetaStep plan (built at the first step, on that step's tasks),
                         backend auto, order second | checkpoint | first
    fastmaml-graph[auto,second]  the same plan with cuda_graph=True: the step captured in a CUDA graph
                         (the first step warms up, the second captures, later steps replay; CUDA only)
    fastmaml-P           fastmaml.meta_step, backend auto, order second, precision policy P (fp32 | tf32 |
                         bf16); compared with autograd-loop-P
    autograd-loop-P      the autograd loop under policy P: TF32 flags of fastmaml.precision.math_mode
                         (fp32, tf32) or torch.autocast (bf16, float32 weights)
    torch.func-vmap      vmap over tasks of grad(query loss ∘ K inner grad steps) (grad of grad)
    learn2learn          l2l.algorithms.MAML(model, lr).clone().adapt(loss), per task
    higher               higher.innerloop_ctx(model, SGD), per task
    torchopt             torchopt.MetaSGD(model, lr) with extract/recover_state_dict, per task

Peers and backends that cannot run report `available() -> (False, reason)` and become table rows
with that reason.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call

from .. import MetaStep, meta_step
from ..ops import registry
from ..precision import PRECISIONS, math_mode, resolve_precision
from . import peers
from .workloads import Workload

Step = Callable[[tuple], None]
BASELINE = "autograd-loop"
FASTMAML_ORDERS = ("second", "checkpoint", "first")
# the families that differentiate through PyTorch's own backward (autograd double backward): the
# benchmark judges every row's error against the worst of these (suite.verdict)
AUTOGRAD_BASED = frozenset({"autograd", "torch.func", "learn2learn", "higher", "torchopt"})


@dataclass(frozen=True)
class Impl:
    """name: the row label; family: the library; order: "second" or "first" (the gradient computed;
    "checkpoint" computes the second-order one); build(model, workload, device) -> step; precision: the
    policy of fastmaml/precision.py it runs under ("": PyTorch's settings), compared only with rows of the
    same policy."""

    name: str
    family: str
    order: str
    build: Callable[[nn.Module, Workload, torch.device], Step]
    available: Callable[[torch.device], Tuple[bool, str]]
    mode: str = ""  # the library's own name for the mode (e.g. "checkpoint")
    precision: str = ""


def _always(device) -> Tuple[bool, str]:
    return True, ""


def _policy(precision: str, device: torch.device):
    """The context of a precision policy for PyTorch code: autocast for bf16, the TF32 flags otherwise."""
    if not precision:
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return math_mode(resolve_precision(precision, torch.float32), device)


def _autograd_loop(create_graph: bool, precision: str = ""):
    def build(model: nn.Module, w: Workload, device) -> Step:
        names = [n for n, _ in model.named_parameters()]

        def step(tasks):
            with _policy(precision, torch.device(device)):
                loop(tasks)

        def loop(tasks):
            sx, sy, qx, qy = tasks
            T = sx.shape[0]
            params = dict(model.named_parameters())
            for t in range(T):
                fast = params
                for _ in range(w.steps):
                    loss = w.loss_fn(functional_call(model, fast, (sx[t],)), sy[t])
                    grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph)
                    fast = {n: fast[n] - w.inner_lr * g for n, g in zip(names, grads)}
                (w.loss_fn(functional_call(model, fast, (qx[t],)), qy[t]) / T).backward()

        return step

    return build


def _fastmaml(backend: str, order: str, precision: str = ""):
    def build(model: nn.Module, w: Workload, device) -> Step:
        def step(tasks):
            # the meta-gradient only, like every other row (no extra query pass at θ for the result)
            meta_step(
                model,
                tasks,
                inner_lr=w.inner_lr,
                steps=w.steps,
                order=order,
                loss=w.loss,
                backend=backend,
                evaluate_before=False,
                precision=precision or None,
            )

        return step

    def available(device) -> Tuple[bool, str]:
        """(ok, reason); for "auto", the reason says which backend runs how many ops."""
        if backend != "auto":
            ok, why = registry.availability(backend, device)
            if not ok:
                return False, f"fastmaml backend {backend!r}: {why}"
        try:
            table = registry.resolve(backend, device)
        except Exception as e:
            return False, f"fastmaml backend {backend!r}: {e}"
        used = [b for b, _, _ in table.chosen.values()]
        return True, "ops: " + ", ".join(f"{b} {used.count(b)}" for b in registry.BACKENDS[1:] if b in used)

    return build, available


def _fastmaml_plan(order: str, cuda_graph: bool = False):
    def build(model: nn.Module, w: Workload, device) -> Step:
        plans = []

        def step(tasks):
            if not plans:  # the plan needs the tasks' shapes, dtype and device: the first (untimed) step's
                plans.append(
                    MetaStep(
                        model,
                        tasks,
                        inner_lr=w.inner_lr,
                        steps=w.steps,
                        order=order,
                        loss=w.loss,
                        evaluate_before=False,
                        cuda_graph=cuda_graph,
                    )
                )
            plans[0](tasks)

        return step

    return build


def _on_cuda(device) -> Tuple[bool, str]:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False, "CUDA graphs capture CUDA work: --device cuda only"
    return _fastmaml("auto", "second")[1](device)


def _torch_func(model: nn.Module, w: Workload, device) -> Step:
    from torch.func import grad, replace_all_batch_norm_modules_, vmap

    replace_all_batch_norm_modules_(model)  # batch statistics, no running-stat updates under vmap
    params = dict(model.named_parameters())

    def support_loss(p, x, y):
        return w.loss_fn(functional_call(model, p, (x,)), y)

    def task_loss(p, sx, sy, qx, qy):
        fast = p
        for _ in range(w.steps):
            g = grad(support_loss)(fast, sx, sy)
            fast = {n: fast[n] - w.inner_lr * g[n] for n in fast}
        return w.loss_fn(functional_call(model, fast, (qx,)), qy)

    per_task = vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0))

    def step(tasks):
        grads = per_task({n: p.detach() for n, p in params.items()}, *tasks)
        for n, p in params.items():
            g = grads[n].mean(0)
            p.grad = g if p.grad is None else p.grad + g

    return step


def _quiet_load(name: str):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return peers.load(name)


def _peer_available(name: str):
    def available(device) -> Tuple[bool, str]:
        module, info = _quiet_load(name)
        return (module is not None), info

    return available


def _learn2learn(model: nn.Module, w: Workload, device) -> Step:
    l2l, _ = _quiet_load("learn2learn")
    maml = l2l.algorithms.MAML(model, lr=w.inner_lr, first_order=False)

    def step(tasks):
        sx, sy, qx, qy = tasks
        T = sx.shape[0]
        for t in range(T):
            learner = maml.clone()
            for _ in range(w.steps):
                learner.adapt(w.loss_fn(learner(sx[t]), sy[t]))
            (w.loss_fn(learner(qx[t]), qy[t]) / T).backward()

    return step


def _higher(model: nn.Module, w: Workload, device) -> Step:
    higher, _ = _quiet_load("higher")
    inner_opt = torch.optim.SGD(model.parameters(), lr=w.inner_lr)

    def step(tasks):
        sx, sy, qx, qy = tasks
        T = sx.shape[0]
        for t in range(T):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(w.steps):
                    diffopt.step(w.loss_fn(fmodel(sx[t]), sy[t]))
                (w.loss_fn(fmodel(qx[t]), qy[t]) / T).backward()

    return step


def _torchopt(model: nn.Module, w: Workload, device) -> Step:
    torchopt, _ = _quiet_load("torchopt")
    inner_opt = torchopt.MetaSGD(model, lr=w.inner_lr)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")

    def step(tasks):
        sx, sy, qx, qy = tasks
        T = sx.shape[0]
        for t in range(T):
            for _ in range(w.steps):
                inner_opt.step(w.loss_fn(model(sx[t]), sy[t]))
            (w.loss_fn(model(qx[t]), qy[t]) / T).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)

    return step


def implementations() -> List[Impl]:
    """Every implementation, in table order (the baseline first)."""
    out = [
        Impl(BASELINE, "autograd", "second", _autograd_loop(True), _always),
        Impl("autograd-loop-first", "autograd", "first", _autograd_loop(False), _always),
    ]
    for backend in registry.BACKENDS:  # "auto" (what users get), then each backend alone
        for order in FASTMAML_ORDERS:
            build, available = _fastmaml(backend, order)
            out.append(
                Impl(
                    f"fastmaml[{backend},{order}]",
                    "fastmaml",
                    "first" if order == "first" else "second",
                    build,
                    available,
                    mode=order,
                )
            )
    for order in FASTMAML_ORDERS:  # the same as fastmaml[auto,order], validated and planned once
        out.append(
            Impl(
                f"fastmaml-plan[auto,{order}]",
                "fastmaml",
                "first" if order == "first" else "second",
                _fastmaml_plan(order),
                _fastmaml("auto", order)[1],
                mode=order,
            )
        )
    graph = _fastmaml_plan("second", cuda_graph=True)
    out.append(Impl("fastmaml-graph[auto,second]", "fastmaml", "second", graph, _on_cuda, mode="second"))
    for precision in PRECISIONS:  # each policy against the autograd loop under the same policy
        loop = _autograd_loop(True, precision)
        out.append(Impl(f"autograd-loop-{precision}", "autograd", "second", loop, _always, precision=precision))
        build, available = _fastmaml("auto", "second", precision)
        out.append(Impl(f"fastmaml-{precision}", "fastmaml", "second", build, available, "second", precision))
    out.append(Impl("torch.func-vmap", "torch.func", "second", _torch_func, _always))
    for name, build in (("learn2learn", _learn2learn), ("higher", _higher), ("torchopt", _torchopt)):
        out.append(Impl(name, name, "second", build, _peer_available(name)))
    return out


def select(names: Optional[List[str]]) -> List[Impl]:
    """The implementations named (all when None); a name may be a prefix ("fastmaml" selects all its
    rows). The autograd loops (both orders) are always included: ratios are taken against them; a row of a
    precision policy brings the autograd loop of its policy. By default, every row but the precision
    policies' (named: `--impls fastmaml-bf16`)."""
    table = implementations()
    if not names:
        return [i for i in table if not i.precision]
    chosen = [i for i in table if i.family == "autograd" and not i.precision]
    for name in names:
        exact = [i for i in table if i.name == name]
        hits = exact or [i for i in table if i.name.startswith(name)]
        if not hits:
            raise ValueError(
                f"--impls: unknown implementation {name!r}; expected one of {[i.name for i in table]} or a prefix"
            )
        for hit in hits:
            loop = [i for i in table if hit.precision and i.family == "autograd" and i.precision == hit.precision]
            chosen += [i for i in loop + [hit] if i not in chosen]
    return chosen
