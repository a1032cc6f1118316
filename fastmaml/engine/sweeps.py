"""The inner loop: K SGD steps on every task's support set (forward sweep) and the exact reverse
sweep that turns v = ∂L/∂φ_K into ∂L/∂θ, ∂L/∂ψ (shared weights) and ∂L/∂α_j.

    forward:  φ_0 = θ;  g_j = ∇L_s(φ_j);  φ_{j+1} = φ_j − α_j ⊙ g_j
    reverse:  ∂L/∂α_j = −Σ_t g_j ⊙ v;  ∂L/∂ψ −= Σ_t H_sa,j (α_j ⊙ v);  v ← v − H_aa,j (α_j ⊙ v)
              ∂L/∂θ = Σ_t v

Orders: "second" keeps φ_j and g_j; "checkpoint" keeps θ and `schedule.checkpoint_slots(K)` fast weights
(max(2, ⌈log2 K⌉): memory grows as log K) and replays the inner steps between them in the reverse sweep
(`schedule.replay_phis`, about (K/2)·log2 K replayed steps),
getting g_j again from the HVP pass (forward-over-reverse yields both); "first" keeps only
what the α-gradient needs and lets v pass through unchanged; "implicit" (iMAML) runs the K steps on
the proximal objective L_s(φ) + λ/2 ‖φ − θ‖², keeps only φ_K, and solves (I + H/λ) u = v by
conjugate gradient with the same Hessian-vector product: ∂L/∂θ = Σ_t u.

`InnerLoop` wraps both sweeps as one autograd Function (the surface for `adapt` and for other
libraries); `meta_step` calls the sweeps directly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch.autograd.function import once_differentiable

from ..batchnorm import NormPlan
from ..errors import NonFiniteError
from ..ops import OpTable
from ..programs import Program
from ..schedule import checkpoint_steps, replay_phis

ORDERS = ("second", "checkpoint", "first", "implicit")


@dataclass(frozen=True)
class Implicit:
    """Settings of the "implicit" order (iMAML): proximal weight λ and conjugate-gradient iterations."""

    lam: float = 1.0
    cg_steps: int = 5


@dataclass
class Tape:
    """What the forward sweep keeps for the reverse sweep. φ_0 is θ `[Pa]`; later φ_j are `[T, Pa]`.
    phis[j] is None for a step whose fast weights are replayed ("checkpoint")."""

    order: str
    phis: List[torch.Tensor] = field(default_factory=list)
    grads: List[Optional[torch.Tensor]] = field(default_factory=list)
    implicit: Optional[Implicit] = None

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in self.phis + self.grads if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _first_bad(flags: List[torch.Tensor]) -> Optional[int]:
    if not flags:
        return None
    ok = torch.stack(flags).cpu()
    bad = (~ok).nonzero()
    return int(bad[0]) if len(bad) else None


def forward_sweep(program: Program, ops: OpTable, theta_a, theta_s, alphas, sx, sy, *, order: str,
                  keep_grads: bool, check_finite: bool, norm: Optional[NormPlan] = None,
                  recorded: Optional[list] = None, implicit: Optional[Implicit] = None, keep_phis: bool = False):
    """Runs the K inner steps. Returns (φ_K `[T, Pa]`, tape, support loss at θ `[T]` or None).

    keep_grads: keep g_j in "first" order (needed only for the α-gradient). keep_phis: keep φ_j in
    "first" order too (the multi-step loss needs the query loss at each φ_j). norm: which BatchNorm
    statistics step j uses (None: batch statistics). recorded: if a list, gets each step's per-task
    BatchNorm batch statistics (for per-step running statistics). implicit: settings of the
    "implicit" order (its step gradient is g_j + λ (φ_j − θ)).
    """
    T = sx.shape[0]
    if order == "implicit" and implicit is None:
        implicit = Implicit()
    tape = Tape(order, implicit=implicit if order == "implicit" else None)
    prox = tape.implicit.lam if tape.implicit is not None else 0.0
    phi, loss0, flags = theta_a, None, []
    kept = set(checkpoint_steps(len(alphas))) if order == "checkpoint" else None
    for j, alpha in enumerate(alphas):
        bn_stats = norm.stats(j) if norm is not None else None
        lg = program.loss_grad(ops, phi, theta_s, sx, sy, bn_stats=bn_stats)
        if recorded is not None:
            recorded.append(program.batch_stats(ops, phi, theta_s, sx))
        if j == 0:
            loss0 = lg.loss
        if order == "second" or (order == "first" and keep_phis):
            tape.phis.append(phi)
        elif order == "checkpoint":
            tape.phis.append(phi if j in kept else None)
        tape.grads.append(lg.grad if order == "second" or (order == "first" and keep_grads) else None)
        if check_finite:
            flags.append(torch.isfinite(lg.loss).all() & torch.isfinite(lg.grad).all())
        g = lg.grad if not prox or j == 0 else torch.add(lg.grad, phi - theta_a, alpha=prox)
        phi = ops.inner_update(phi.expand_as(g), g, alpha)
    if check_finite:
        bad = _first_bad(flags)
        if bad is not None:
            raise NonFiniteError(
                f"non-finite support loss or gradient at inner step {bad} (of {len(alphas)}); "
                "lower inner_lr or check the inputs",
                where="support loss/gradient", step=bad,
            )
    if phi.dim() == 1:
        phi = phi.expand(T, -1)
    if order == "implicit":
        tape.phis.append(phi)
    return phi, tape, loss0


def implicit_solve(program: Program, ops: OpTable, tape: Tape, v, theta_s, sx, sy, *, shared_grad: bool,
                   check_finite: bool, bn_stats=None):
    """iMAML's backward: u = (I + H/λ)⁻¹ v per task by `cg_steps` of conjugate gradient, H the support
    Hessian at φ_K. Returns (∂L/∂θ = Σ_t u `[Pa]`, ∂L/∂ψ = −Σ_t H_sa u / λ `[Ps]` or None)."""
    phi, lam = tape.phis[-1], tape.implicit.lam

    def apply(p):
        return p + program.hvp(ops, phi, theta_s, sx, sy, p, need_grad=False, bn_stats=bn_stats).hu / lam

    u = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    tiny = torch.finfo(v.dtype).tiny
    for _ in range(tape.implicit.cg_steps):  # per task in parallel; a converged task's step becomes 0
        ap = apply(p)
        curvature = (p * ap).sum(1)
        step = torch.where(curvature > 0, rs / curvature.clamp_min(tiny), torch.zeros_like(rs))
        u.addcmul_(step[:, None], p)
        r.addcmul_(step[:, None], ap, value=-1.0)
        rs_new = (r * r).sum(1)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = torch.addcmul(r, beta[:, None], p)
        rs = rs_new
    if check_finite and not bool(torch.isfinite(u).all()):
        raise NonFiniteError("non-finite meta-gradient in the implicit (conjugate gradient) solve; "
                             "raise implicit_lambda or check the inputs", where="implicit solve")
    d_shared = None
    if shared_grad:
        d_shared = -program.hvp(ops, phi, theta_s, sx, sy, u, shared_grad=True, need_grad=False,
                                bn_stats=bn_stats).hu_shared.sum(0) / lam
    return u.sum(0), d_shared


def reverse_sweep(program: Program, ops: OpTable, tape: Tape, v, theta_s, alphas, sx, sy, *,
                  shared_grad: bool, lr_grad: List[bool], check_finite: bool, norm: Optional[NormPlan] = None,
                  step_loss_grad=None):
    """v `[T, Pa]` = ∂L/∂φ_K. Returns (∂L/∂θ `[Pa]`, ∂L/∂ψ `[Ps]` or None, [∂L/∂α_j or None]).

    step_loss_grad(j, φ_j) -> `[T, Pa]` or None: ∂L/∂φ_j of a loss term on φ_j itself, 0 < j < K (the
    multi-step loss: the weighted query loss after step j); added to v once step j's update is undone.
    In "first" order it needs the tape's φ_j (`forward_sweep(keep_phis=True)`)."""
    K = len(alphas)
    if tape.order == "implicit":
        d_a, d_s = implicit_solve(program, ops, tape, v, theta_s, sx, sy, shared_grad=shared_grad,
                                  check_finite=check_finite, bn_stats=norm.stats(K) if norm is not None else None)
        return d_a, d_s, [None] * K
    d_shared = theta_s.new_zeros(theta_s.shape) if shared_grad else None
    d_alphas: List[Optional[torch.Tensor]] = [None] * K
    flags = []

    def stats(j):
        return norm.stats(j) if norm is not None else None

    def advance(phi, a, b):
        for j in range(a, b):
            phi = ops.inner_update(phi.expand(sx.shape[0], -1),
                                   program.loss_grad(ops, phi, theta_s, sx, sy, bn_stats=stats(j)).grad, alphas[j])
        return phi

    if tape.order == "first":
        steps = ((j, tape.phis[j] if tape.phis else None) for j in reversed(range(K)))
    elif tape.order == "checkpoint":
        steps = replay_phis(tape.phis, advance)
    else:
        steps = ((j, tape.phis[j]) for j in reversed(range(K)))
    for j, phi in steps:
        alpha = alphas[j]
        if tape.order == "first":
            v, d_alphas[j] = ops.adjoint_update(v, None, tape.grads[j], alpha, lr_grad[j])
        else:
            h = program.hvp(ops, phi, theta_s, sx, sy, alpha * v, shared_grad=shared_grad,
                            need_grad=tape.grads[j] is None, bn_stats=stats(j))
            g = tape.grads[j] if tape.grads[j] is not None else h.grad
            if shared_grad:
                d_shared -= h.hu_shared.sum(0)
            v, d_alphas[j] = ops.adjoint_update(v, h.hu, g, alpha, lr_grad[j])
        if step_loss_grad is not None and j > 0:
            extra = step_loss_grad(j, phi)
            if extra is not None:
                v = v + extra
        if check_finite:
            flags.append(torch.isfinite(v).all())
    if check_finite:
        bad = _first_bad(flags)
        if bad is not None:
            step = K - 1 - bad
            raise NonFiniteError(
                f"non-finite meta-gradient in the reverse sweep at inner step {step} (of {K}): the "
                "Hessian-vector product overflowed or produced NaN; lower inner_lr or check the inputs",
                where="reverse sweep", step=step,
            )
    return v.sum(0), d_shared, d_alphas


def _top_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # torch < 2.5 cannot read the hooks back: leave them (torch.func may then refuse)
        return None
    try:
        return top(False)
    except TypeError:  # no `ignore_is_tracing` argument
        return top()


@contextlib.contextmanager
def suspended_saved_tensors_hooks():
    """Lifts the user's `saved_tensors_hooks` (e.g. `save_on_cpu`) while the sweeps run.

    torch.func.grad refuses to run under such hooks, and the sweeps put nothing into autograd's
    graph: what InnerLoop keeps goes through `save_for_backward`, where the hooks do apply.
    """
    stack = []
    while (top := _top_hooks()) is not None:
        stack.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(stack):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


class InnerLoop(torch.autograd.Function):
    """φ_K = InnerLoop.apply(spec, theta_a, theta_s, *alphas) with an exact backward.

    spec: an `InnerLoopSpec` (program, ops, support set, order, flags). theta_a `[Pa]`,
    theta_s `[Ps]`, alphas: K tensors (0-dim or `[Pa]`). Returns φ_K `[T, Pa]` and the support
    loss at θ `[T]` (not differentiable).
    """

    @staticmethod
    def forward(ctx, spec, theta_a, theta_s, *alphas):
        keep = any(a.requires_grad for a in alphas)
        with suspended_saved_tensors_hooks():
            phi, tape, loss0 = forward_sweep(spec.program, spec.ops, theta_a.detach(), theta_s.detach(),
                                             [a.detach() for a in alphas], spec.sx, spec.sy, order=spec.order,
                                             keep_grads=keep, check_finite=spec.check_finite, norm=spec.norm,
                                             recorded=spec.recorded, implicit=spec.implicit)
        ctx.spec = spec
        ctx.layout = ([t is not None for t in tape.phis], [t is not None for t in tape.grads])
        ctx.save_for_backward(theta_s, *alphas, *[t for t in tape.tensors()])
        ctx.num_alphas = len(alphas)
        if loss0 is None:
            loss0 = theta_a.new_full((spec.sx.shape[0],), float("nan"))
        ctx.mark_non_differentiable(loss0)
        return phi, loss0

    @staticmethod
    @once_differentiable
    def backward(ctx, v, _unused):
        spec = ctx.spec
        saved = ctx.saved_tensors
        theta_s, alphas = saved[0], list(saved[1:1 + ctx.num_alphas])
        rest = iter(saved[1 + ctx.num_alphas:])
        has_phi, has_grad = ctx.layout
        tape = Tape(spec.order, implicit=spec.implicit)
        tape.phis = [next(rest) if h else None for h in has_phi]
        tape.grads = [next(rest) if h else None for h in has_grad]
        needs = ctx.needs_input_grad
        shared_grad = needs[2] and theta_s.numel() > 0
        lr_grad = list(needs[3:3 + ctx.num_alphas])
        with suspended_saved_tensors_hooks():
            d_a, d_s, d_alphas = reverse_sweep(spec.program, spec.ops, tape, v.contiguous(), theta_s, alphas,
                                               spec.sx, spec.sy, shared_grad=shared_grad, lr_grad=lr_grad,
                                               check_finite=spec.check_finite, norm=spec.norm)
        return (None, d_a, d_s, *d_alphas)


@dataclass
class InnerLoopSpec:
    """Everything `InnerLoop` needs besides its differentiable inputs."""

    program: Program
    ops: OpTable
    sx: torch.Tensor
    sy: torch.Tensor
    order: str
    check_finite: bool = True
    norm: Optional[NormPlan] = None
    recorded: Optional[list] = None  # gets each step's BatchNorm batch statistics when recording
    implicit: Optional[Implicit] = None
