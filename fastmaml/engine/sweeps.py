"""The inner loop: K SGD steps on every task's support set (forward sweep) and the exact reverse
sweep that turns v = ∂L/∂φ_K into ∂L/∂θ, ∂L/∂ψ (shared weights) and ∂L/∂α_j.

    forward:  φ_0 = θ;  g_j = ∇L_s(φ_j);  φ_{j+1} = φ_j − α_j ⊙ g_j
    reverse:  ∂L/∂α_j = −Σ_t g_j ⊙ v;  ∂L/∂ψ −= Σ_t H_sa,j (α_j ⊙ v);  v ← v − H_aa,j (α_j ⊙ v)
              ∂L/∂θ = Σ_t v

Orders: "second" keeps φ_j and g_j, and within `activation_budget` bytes each step's activations (what
`Program.loss_grad(activations=)` keeps, so that step j's HVP reuses them); "checkpoint" keeps θ and
`schedule.checkpoint_slots(K)` fast weights (max(2, ⌈log2 K⌉): memory grows as log K) and replays the inner
steps between them in the reverse sweep (`schedule.replay_phis`, about (K/2)·log2 K replayed steps), getting
g_j again from the HVP pass (forward-over-reverse yields both); "first" keeps only what the α-gradient needs
and lets v pass through unchanged; "implicit" (iMAML) runs the K steps on the proximal objective
L_s(φ) + λ/2 ‖φ − θ‖², keeps only φ_K, and solves (I + H/λ) u = v by conjugate gradient with the same
Hessian-vector product (its HVPs at φ_K share one set of activations within the budget): ∂L/∂θ = Σ_t u.
That meta-gradient depends only on where the steps end, not on the path, so the implicit order may take
its steps with a safeguard (`Implicit.solver`, `backtracking_steps`).

`InnerLoop` wraps both sweeps as one autograd Function (the surface for `adapt` and for other
libraries); `meta_step` calls the sweeps directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..batchnorm import NormPlan
from ..errors import NonFiniteError
from ..ops import OpTable
from ..programs import Program
from ..programs.draws import Draws, at
from ..schedule import checkpoint_steps, replay_phis

ORDERS = ("second", "checkpoint", "first", "implicit")
INNER_SOLVERS = ("sgd", "backtracking")
# `backtracking_steps`: a step must decrease the proximal objective by ARMIJO times the decrease its
# linearization predicts (Armijo's sufficient-decrease constant as Nocedal & Wright use it), up to rounding
# (ROUNDING machine epsilons of the objective); a task's rate factor halves at most MAX_HALVINGS times
ARMIJO = 1e-4
ROUNDING = 16
MAX_HALVINGS = 30


@dataclass(frozen=True)
class Implicit:
    """Settings of the "implicit" order (iMAML): proximal weight λ, conjugate-gradient iterations, and the
    inner solver: "sgd" (K steps at α_j) or "backtracking" (`backtracking_steps`)."""

    lam: float = 1.0
    cg_steps: int = 5
    solver: str = "sgd"


@dataclass
class Tape:
    """What the forward sweep keeps for the reverse sweep. φ_0 is θ `[Pa]`; later φ_j are `[T, Pa]`.
    phis[j] is None for a step whose fast weights are replayed ("checkpoint"). activations[j]: what step
    j's `loss_grad` kept for its HVP (a dict), or None; the list may be shorter than the steps."""

    order: str
    phis: List[torch.Tensor] = field(default_factory=list)
    grads: List[Optional[torch.Tensor]] = field(default_factory=list)
    implicit: Optional[Implicit] = None
    activations: List[Optional[dict]] = field(default_factory=list)
    activation_budget: int = 0  # "implicit": bytes its HVPs at φ_K may keep for one another

    def tensors(self) -> List[torch.Tensor]:
        acts = [t for d in self.activations if d is not None for t in d.values()]
        return [t for t in self.phis + self.grads if t is not None] + acts

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _first_bad(flags: List[torch.Tensor]) -> Optional[int]:
    if not flags:
        return None
    ok = torch.stack(flags).cpu()
    bad = (~ok).nonzero()
    return int(bad[0]) if len(bad) else None


def forward_sweep(
    program: Program,
    ops: OpTable,
    theta_a,
    theta_s,
    alphas,
    sx,
    sy,
    *,
    order: str,
    keep_grads: bool,
    check_finite: bool,
    norm: Optional[NormPlan] = None,
    recorded: Optional[list] = None,
    record_first_only: bool = False,
    implicit: Optional[Implicit] = None,
    keep_phis: bool = False,
    activation_budget: int = 0,
    draws: Optional[Draws] = None,
):
    """Runs the K inner steps. Returns (φ_K `[T, Pa]`, tape, support loss at θ `[T]` or None).

    keep_grads: keep g_j in "first" order (needed only for the α-gradient). keep_phis: keep φ_j in
    "first" order too (the multi-step loss needs the query loss at each φ_j). norm: which BatchNorm
    statistics step j uses (None: batch statistics). recorded: if a list, gets each step's per-task
    BatchNorm batch statistics (for per-step running statistics), or with `record_first_only` step 0's
    alone (the support sets' at θ, for the running statistics), taken from the steps' own forwards
    where the program can (`Program.record_stats_of`). implicit: settings of the
    "implicit" order (its step gradient is g_j + λ (φ_j − θ)). activation_budget: bytes of activations
    the "second" order may keep for the reverse sweep; the steps from the first one that would exceed
    it keep none (their HVPs recompute); the "implicit" order's HVPs at φ_K (the conjugate-gradient
    iterations) may keep as much for one another. draws: the dropout masks (`programs/draws.py`; None: the
    program draws none), step j's wherever step j is computed.
    """
    T = sx.shape[0]
    if order == "implicit" and implicit is None:
        implicit = Implicit()
    tape = Tape(order, implicit=implicit if order == "implicit" else None)
    prox = tape.implicit.lam if tape.implicit is not None else 0.0
    phi, loss0, flags = theta_a, None, []
    kept = set(checkpoint_steps(len(alphas))) if order == "checkpoint" else None
    budget = activation_budget if order == "second" and program.keeps_activations else 0
    if order == "implicit" and program.keeps_activations:
        tape.activation_budget = activation_budget
    if order == "implicit" and tape.implicit.solver == "backtracking":
        phi, loss0 = backtracking_steps(
            program,
            ops,
            theta_a,
            theta_s,
            alphas,
            sx,
            sy,
            lam=prox,
            norm=norm,
            recorded=recorded,
            record_first_only=record_first_only,
            check_finite=check_finite,
            draws=draws,
        )
        tape.phis.append(phi)
        return phi, tape, loss0
    for j, alpha in enumerate(alphas):
        bn_stats = norm.stats(j) if norm is not None else None
        kept_acts = {} if budget > 0 else None
        record = recorded is not None and (j == 0 or not record_first_only)
        with at(draws, j):
            lg = program.loss_grad(
                ops,
                phi,
                theta_s,
                sx,
                sy,
                bn_stats=bn_stats,
                activations=kept_acts,
                record_stats=record and bn_stats is None,
            )
            if record:
                recorded.append(program.record_stats_of(lg, ops, phi, theta_s, sx))
        if kept_acts is not None:
            size = sum(t.numel() * t.element_size() for t in kept_acts.values())
            fits = size <= budget
            budget = budget - size if fits else 0
            tape.activations.append(kept_acts if fits else None)
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
                where="support loss/gradient",
                step=bad,
            )
    if phi.dim() == 1:
        phi = phi.expand(T, -1)
    if order == "implicit":
        tape.phis.append(phi)
    return phi, tape, loss0


def backtracking_steps(
    program: Program,
    ops: OpTable,
    theta_a,
    theta_s,
    alphas,
    sx,
    sy,
    *,
    lam: float,
    norm: Optional[NormPlan] = None,
    recorded: Optional[list] = None,
    record_first_only: bool = False,
    check_finite: bool = True,
    draws: Optional[Draws] = None,
):
    """The implicit order's K steps with a per-task safeguard: gradient descent on every task's proximal
    objective F_t(φ) = L_s,t(φ) + λ/2 ‖φ − θ‖² at rates s_t α_j, where the factor s_t `[T]` starts at 1 and
    halves (for the rest of the call) while task t's step gives a non-finite value or fails Armijo's
    condition F_t(φ − s_t α_j ⊙ ∇F_t) ≤ F_t(φ) − ARMIJO s_t ⟨∇F_t, α_j ⊙ ∇F_t⟩. A step still refused at
    s_t = 2^−MAX_HALVINGS is skipped. A refused step re-evaluates only the tasks that refused it.

    Returns (φ_K `[T, Pa]`, the support loss at θ `[T]`). With `check_finite`, a non-finite loss or gradient
    at θ raises `NonFiniteError` (no step can repair it).
    """
    T = sx.shape[0]
    per_step_stats = norm is not None and norm.mode == "per_step" and norm.stats(0) is not None

    def stats(j):
        return norm.stats(j) if norm is not None else None

    with at(draws, 0):
        first = program.loss_grad(
            ops, theta_a, theta_s, sx, sy, bn_stats=stats(0), record_stats=recorded is not None and stats(0) is None
        )
    if check_finite and not bool(torch.isfinite(first.loss).all() & torch.isfinite(first.grad).all()):
        raise NonFiniteError(
            f"non-finite support loss or gradient at inner step 0 (of {len(alphas)}), at θ; check the inputs",
            where="support loss/gradient",
            step=0,
        )
    phi = theta_a.expand(T, -1).clone()
    loss, grad = first.loss, first.grad
    scale = theta_a.new_ones(T)
    rounding = ROUNDING * torch.finfo(theta_a.dtype).eps
    for j, alpha in enumerate(alphas):
        with at(draws, j):
            if recorded is not None and j == 0:
                recorded.append(program.record_stats_of(first, ops, theta_a, theta_s, sx))
            elif recorded is not None and not record_first_only:
                recorded.append(program.batch_stats(ops, phi, theta_s, sx))
        if (per_step_stats or draws is not None) and j > 0:  # step j's objective: its statistics, its masks
            with at(draws, j):
                again = program.loss_grad(ops, phi, theta_s, sx, sy, bn_stats=stats(j))
            loss, grad = again.loss, again.grad
        delta = phi - theta_a
        value = loss + 0.5 * lam * (delta * delta).sum(1)
        direction = torch.add(grad, delta, alpha=lam)
        step = alpha * direction
        predicted = (direction * step).sum(1)
        new_phi, new_loss, new_grad = phi.clone(), loss.clone(), grad.clone()
        todo = torch.arange(T, device=phi.device)
        while todo.numel():
            s = scale[todo]
            candidate = phi[todo] - s[:, None] * step[todo]
            with at(draws, j, todo):
                out = program.loss_grad(ops, candidate, theta_s, sx[todo], sy[todo], bn_stats=stats(j))
            moved = candidate - theta_a
            cand_value = out.loss + 0.5 * lam * (moved * moved).sum(1)
            bound = value[todo] - ARMIJO * s * predicted[todo] + rounding * value[todo].abs()
            ok = torch.isfinite(cand_value) & torch.isfinite(out.grad).all(1) & (cand_value <= bound)
            done = todo[ok]
            new_phi[done], new_loss[done], new_grad[done] = candidate[ok], out.loss[ok], out.grad[ok]
            refused = todo[~ok]
            todo = refused[scale[refused] > 2.0**-MAX_HALVINGS]
            scale[todo] *= 0.5
        phi, loss, grad = new_phi, new_loss, new_grad
    return phi, first.loss


def implicit_solve(
    program: Program,
    ops: OpTable,
    tape: Tape,
    v,
    theta_s,
    sx,
    sy,
    *,
    shared_grad: bool,
    check_finite: bool,
    bn_stats=None,
):
    """iMAML's backward: u = (I + H/λ)⁻¹ v per task by `cg_steps` of conjugate gradient, H the support
    Hessian at φ_K. Returns (∂L/∂θ = Σ_t u `[Pa]`, ∂L/∂ψ = −Σ_t H_sa u / λ `[Ps]` or None).

    Conjugate gradient needs I + H/λ positive definite. A task whose system is not (a direction of
    non-positive curvature while its residual is not zero: λ below the magnitude of a negative Hessian
    eigenvalue) has such directions skipped, and its u is not the solution; with `check_finite` (its one
    device sync, skipped inside CUDA-graph capture) that is reported by a `RuntimeWarning` naming
    `implicit_lambda`."""
    phi, lam = tape.phis[-1], tape.implicit.lam
    kept = {} if tape.activation_budget > 0 else None  # the first HVP's activations, for the others

    def hvp(p, **kwargs):
        nonlocal kept
        h = program.hvp(ops, phi, theta_s, sx, sy, p, need_grad=False, bn_stats=bn_stats, activations=kept, **kwargs)
        if kept is not None and sum(t.numel() * t.element_size() for t in kept.values()) > tape.activation_budget:
            kept = None
        return h

    def apply(p):
        return p + hvp(p).hu / lam

    u = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    tiny = torch.finfo(v.dtype).tiny
    # a task not yet converged (residual above float precision's share of v) meeting non-positive curvature
    unsolved = rs * torch.finfo(v.dtype).eps
    indefinite = torch.zeros_like(rs, dtype=torch.bool)
    for _ in range(tape.implicit.cg_steps):  # per task in parallel; a converged task's step becomes 0
        ap = apply(p)
        curvature = (p * ap).sum(1)
        indefinite |= (curvature <= 0) & (rs > unsolved)
        step = torch.where(curvature > 0, rs / curvature.clamp_min(tiny), torch.zeros_like(rs))
        u.addcmul_(step[:, None], p)
        r.addcmul_(step[:, None], ap, value=-1.0)
        rs_new = (r * r).sum(1)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = torch.addcmul(r, beta[:, None], p)
        rs = rs_new
    if check_finite and not bool(torch.isfinite(u).all()):
        raise NonFiniteError(
            "non-finite meta-gradient in the implicit (conjugate gradient) solve; "
            "raise implicit_lambda or check the inputs",
            where="implicit solve",
        )
    if check_finite:
        bad = int(indefinite.sum())
        if bad:
            warnings.warn(
                f"order='implicit': I + H/λ is not positive definite at φ_K for {bad} of {len(indefinite)} "
                f"tasks (implicit_lambda={lam:g} is below the magnitude of a negative eigenvalue of their "
                "support Hessian); conjugate gradient skipped directions of non-positive curvature, so their "
                "meta-gradient is not the implicit one. Raise implicit_lambda.",
                RuntimeWarning,
                stacklevel=2,
            )
    d_shared = None
    if shared_grad:
        d_shared = -hvp(u, shared_grad=True).hu_shared.sum(0) / lam
    return u.sum(0), d_shared


def reverse_sweep(
    program: Program,
    ops: OpTable,
    tape: Tape,
    v,
    theta_s,
    alphas,
    sx,
    sy,
    *,
    shared_grad: bool,
    lr_grad: List[bool],
    check_finite: bool,
    norm: Optional[NormPlan] = None,
    step_loss_grad=None,
    draws: Optional[Draws] = None,
):
    """v `[T, Pa]` = ∂L/∂φ_K. Returns (∂L/∂θ `[Pa]`, ∂L/∂ψ `[Ps]` or None, [∂L/∂α_j or None]).

    step_loss_grad(j, φ_j) -> `[T, Pa]` or None: ∂L/∂φ_j of a loss term on φ_j itself, 0 < j < K (the
    multi-step loss: the weighted query loss after step j); added to v once step j's update is undone.
    In "first" order it needs the tape's φ_j (`forward_sweep(keep_phis=True)`). draws: the forward sweep's
    dropout masks (step j's HVP and replays draw step j's; the implicit order's HVPs at φ_K draw step K's)."""
    K = len(alphas)
    if tape.order == "implicit":
        with at(draws, K):
            d_a, d_s = implicit_solve(
                program,
                ops,
                tape,
                v,
                theta_s,
                sx,
                sy,
                shared_grad=shared_grad,
                check_finite=check_finite,
                bn_stats=norm.stats(K) if norm is not None else None,
            )
        return d_a, d_s, [None] * K
    d_shared = theta_s.new_zeros(theta_s.shape) if shared_grad else None
    d_alphas: List[Optional[torch.Tensor]] = [None] * K
    flags = []

    def stats(j):
        return norm.stats(j) if norm is not None else None

    def advance(phi, a, b):
        for j in range(a, b):
            with at(draws, j):
                g = program.loss_grad(ops, phi, theta_s, sx, sy, bn_stats=stats(j)).grad
            phi = ops.inner_update(phi.expand(sx.shape[0], -1), g, alphas[j])
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
            with at(draws, j):
                h = program.hvp(
                    ops,
                    phi,
                    theta_s,
                    sx,
                    sy,
                    alpha * v,
                    shared_grad=shared_grad,
                    need_grad=tape.grads[j] is None,
                    bn_stats=stats(j),
                    activations=tape.activations[j] if j < len(tape.activations) else None,
                )
            if j < len(tape.activations):
                tape.activations[j] = None  # step j's activations are used up
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
                where="reverse sweep",
                step=step,
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
    """(φ_K, loss_0, *tape) = InnerLoop.apply(spec, theta_a, theta_s, support_x, support_y, *alphas), with an
    exact backward.

    spec: an `InnerLoopSpec` (program, ops, order, flags). theta_a `[Pa]`, theta_s `[Ps]`, support_x
    `[T, Ns, *in]`, support_y `[T, Ns, *out]`, alphas: K tensors (0-dim or `[Pa]`). Returns φ_K `[T, Pa]`, the
    support loss at θ `[T]` (not differentiable) and the tensors the reverse sweep needs (not differentiable;
    drop them: autograd keeps them for backward).

    Backward: the reverse sweep of `spec.order` (no autograd graph), for ∂L/∂θ, ∂L/∂ψ and ∂L/∂α_j. When the
    backward itself must be differentiable (`create_graph=True`: double backward, hypergradients), the
    support set needs a gradient, or the cotangent is batched by `vmap` (`torch.func.jacrev`), it runs the K
    inner steps again unrolled over all tasks and takes the vector-Jacobian product with `torch.func.vjp`
    (exact, orders "second" and "checkpoint" only; the memory of a create_graph loop).

    torch.func: `setup_context` form, so `torch.func.grad` / `vjp` / `jacrev` compose with it; `vmap` runs
    one inner loop per vmapped slice (`InnerLoop.vmap`). Forward-mode AD (`jvp`, `jacfwd`) is not supported.
    """

    @staticmethod
    def forward(spec, theta_a, theta_s, sx, sy, *alphas):
        keep = spec.keep_grads if spec.keep_grads is not None else any(a.requires_grad for a in alphas)
        theta = theta_a.detach()
        with suspended_saved_tensors_hooks():
            phi, tape, loss0 = forward_sweep(
                spec.program,
                spec.ops,
                theta,
                theta_s.detach(),
                [a.detach() for a in alphas],
                sx.detach(),
                sy.detach(),
                order=spec.order,
                keep_grads=keep,
                check_finite=spec.check_finite,
                norm=spec.norm,
                recorded=spec.recorded,
                implicit=spec.implicit,
                draws=spec.draws,
            )
        if loss0 is None:
            loss0 = theta.new_full((sx.shape[0],), float("nan"))
        slots, kept = [], []  # where each tape entry is found again in backward: θ, φ_K or a returned tensor
        for t in tape.phis + tape.grads:
            if t is None:
                slots.append(None)
            elif t is theta:
                slots.append("theta")
            elif t is phi:
                slots.append("phi")
            else:
                slots.append(len(kept))
                kept.append(t)
        spec.tape_slots = (len(tape.phis), tuple(slots))
        return (phi, loss0, *kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, theta_a, theta_s, sx, sy, *alphas = inputs
        phi, loss0, *kept = output
        ctx.spec = spec
        ctx.num_alphas = len(alphas)
        ctx.tape_slots = spec.tape_slots
        ctx.saves_phi = "phi" in spec.tape_slots[1]
        ctx.save_for_backward(theta_a, theta_s, sx, sy, *alphas, *([phi] if ctx.saves_phi else []), *kept)
        ctx.mark_non_differentiable(loss0, *kept)

    @staticmethod
    def backward(ctx, v, *_unused):
        spec, n = ctx.spec, ctx.num_alphas
        saved = ctx.saved_tensors
        theta_a, theta_s, sx, sy = saved[:4]
        alphas = list(saved[4 : 4 + n])
        phi = saved[4 + n] if ctx.saves_phi else None
        kept = saved[4 + n + (1 if ctx.saves_phi else 0) :]
        needs = ctx.needs_input_grad
        v, theta_a, theta_s, sx, sy, *alphas = [_live(t) for t in (v, theta_a, theta_s, sx, sy, *alphas)]
        inputs = (theta_a, theta_s, sx, sy, *alphas)
        if needs[3] or needs[4] or _differentiated_further((v, *inputs)):
            return (None, *_unrolled_backward(spec, v, *inputs[:4], alphas, needs[1:]))
        plain = [_plain(t) for t in (v, *inputs, *([phi] if phi is not None else []), *kept)]
        if any(t is None for t in plain):  # batched by torch.func.vmap (jacrev): the sweep's ops take no batch dim
            return (None, *_unrolled_backward(spec, v, *inputs[:4], alphas, needs[1:]))
        v, theta_a, theta_s, sx, sy = plain[:5]
        alphas, rest = plain[5 : 5 + n], plain[5 + n :]
        phi = rest[0] if ctx.saves_phi else None
        kept = rest[1:] if ctx.saves_phi else rest
        num_phis, slots = ctx.tape_slots
        entries = [None if s is None else theta_a if s == "theta" else phi if s == "phi" else kept[s] for s in slots]
        tape = Tape(spec.order, implicit=spec.implicit)
        tape.phis, tape.grads = entries[:num_phis], entries[num_phis:]
        shared_grad = needs[2] and theta_s.numel() > 0
        lr_grad = list(needs[5 : 5 + n])
        with suspended_saved_tensors_hooks():
            d_a, d_s, d_alphas = reverse_sweep(
                spec.program,
                spec.ops,
                tape,
                v.contiguous(),
                theta_s,
                alphas,
                sx,
                sy,
                shared_grad=shared_grad,
                lr_grad=lr_grad,
                check_finite=spec.check_finite,
                norm=spec.norm,
                draws=spec.draws,
            )
        return (None, d_a if needs[1] else None, d_s, None, None, *d_alphas)

    @staticmethod
    def vmap(info, in_dims, spec, *args):
        """torch.func.vmap over any input: one inner loop per slice (the tasks of a slice stay batched).
        Per-step BatchNorm statistics are not recorded under vmap; each slice draws dropout masks of its own."""
        outs = []
        for b in range(info.batch_size):
            draws = None if spec.draws is None else Draws.fresh()
            sub = dataclasses.replace(spec, recorded=None, draws=draws)
            sliced = [a if d is None else a.select(d, b) for a, d in zip(args, in_dims[1:])]
            outs.append(InnerLoop.apply(sub, *sliced))
        spec.tape_slots = sub.tape_slots
        stacked = tuple(torch.stack(parts) for parts in zip(*outs))
        return stacked, (0,) * len(stacked)


def _functorch():
    return getattr(torch._C, "_functorch", None)


def _live(t: torch.Tensor) -> torch.Tensor:
    """`t` without the gradient-tracking wrappers of torch.func levels that have ended (a level's wrappers
    outlive it in saved tensors: `torch.func.jacrev` runs the backward of `vjp`'s level under `vmap`, after the
    level exited); such a wrapper tracks nothing."""
    ft = _functorch()
    while ft is not None and ft.is_gradtrackingtensor(t) and ft.maybe_get_level(t) < 0:
        t = ft.get_unwrapped(t)
    return t


def _plain(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor under torch.func's gradient-tracking wrappers, detached; None when a vmap batch dimension is
    under them."""
    ft = _functorch()
    if ft is not None:
        while ft.is_gradtrackingtensor(t) or ft.is_functionaltensor(t):
            t = ft.get_unwrapped(t)
        if ft.is_batchedtensor(t):
            return None
    return t.detach()


def _differentiated_further(tensors) -> bool:
    """Whether the gradients a backward returns will be differentiated again: `create_graph=True` with an input
    or the cotangent requiring grad, or (inside torch.func) a tensor tracked by a gradient transform below the
    one running this backward (`torch.func.grad` of a gradient). torch.func runs every backward with grad mode
    on, for its own level; that alone asks for nothing more."""
    if not torch.is_grad_enabled():
        return False
    ft = _functorch()
    level = ft.maybe_current_level() if ft is not None else None
    for t in tensors:
        while ft is not None and ft.is_functorch_wrapped_tensor(t):
            own = ft.maybe_get_level(t)
            if level is not None and own < level and ft.is_gradtrackingtensor(t) and t.requires_grad:
                return True
            t = ft.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def _unrolled_backward(spec: "InnerLoopSpec", v, theta_a, theta_s, sx, sy, alphas, needs):
    """The backward of `InnerLoop` as a differentiable computation: the K inner steps again, unrolled over all
    tasks (`Program.forward` with plain PyTorch ops, each step's gradient by `torch.func.grad`), then the
    vector-Jacobian product of φ_K with v (`torch.func.vjp`). Differentiable again (double backward) when grad
    mode is on; also gives the support set's gradient. needs: whether θ, ψ, x_s, y_s and each α_j need a
    gradient."""
    if spec.order not in ("second", "checkpoint"):
        what = (
            "differentiable backward (create_graph=True, double backward, torch.func.grad of a gradient)"
            if not (needs[2] or needs[3])
            else "gradient with respect to the support set"
        )
        raise NotImplementedError(
            f"adapt(order={spec.order!r}) has no {what}: the {spec.order} meta-gradient is not the derivative "
            "of the adapted weights; use order='second' or 'checkpoint'"
        )
    T = sx.shape[0]
    inputs = [theta_a, theta_s, sx, sy, *alphas]
    wanted = [i for i, t in enumerate(inputs) if needs[i] and t.is_floating_point()]

    def unrolled(*diff):
        """φ_K from the inputs in `wanted` (the others held fixed): one argument per input, so that an α used by
        every step gets each step's share."""
        args = list(inputs)
        for i, t in zip(wanted, diff):
            args[i] = t
        theta, shared, x, y, *rates = args
        phi = theta.expand(T, -1)
        for j, alpha in enumerate(rates):
            bn_stats = spec.norm.stats(j) if spec.norm is not None else None

            def support_loss(p, j=j, bn_stats=bn_stats):
                out = spec.program.forward(spec.ops, p, shared, x, bn_stats=bn_stats)
                return sum(spec.program.loss.fn(out[t], y[t]) for t in range(T))

            with at(spec.draws, j):
                phi = phi - alpha * torch.func.grad(support_loss)(phi)
        return phi

    # torch.func's vjp: it composes with an outer autograd graph (double backward), with torch.func.grad of a
    # gradient, and with a cotangent batched by vmap (torch.func.jacrev), where autograd.grad cannot make leaves
    _, pullback = torch.func.vjp(unrolled, *[inputs[i] for i in wanted])
    out = [None] * len(inputs)
    for i, g in zip(wanted, pullback(v)):
        out[i] = g
    return out


@dataclass
class InnerLoopSpec:
    """Everything `InnerLoop` needs besides its differentiable inputs."""

    program: Program
    ops: OpTable
    order: str
    check_finite: bool = True
    norm: Optional[NormPlan] = None
    recorded: Optional[list] = None  # gets each step's BatchNorm batch statistics when recording
    implicit: Optional[Implicit] = None
    keep_grads: Optional[bool] = None  # keep g_j for the α-gradient (None: whether an α requires grad)
    draws: Optional[Draws] = None  # the dropout masks of the call (None: the program draws none)
    tape_slots: Optional[tuple] = None  # set by forward: where backward finds each tape entry
