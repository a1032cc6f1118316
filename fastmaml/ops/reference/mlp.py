"""The whole-inner-loop MLP meta-step in plain PyTorch: backend "torch" of op `mlp_meta_step` (contract in
ops/mlp.py; the C++/CUDA kernel is its "cpp" backend).

All K inner steps, the query loss and the exact reverse sweep of an MLP (Linear, act, ..., Linear with ReLU
or Tanh; MSE) for all T tasks at once: per layer one GEMM (θ, common to all tasks at step 0) or one batched
GEMM (fast weights), hand-derived backward and Hessian-vector rules (forward-over-reverse), no autograd graph.
Against the general fused engine it saves the per-layer dispatch and parameter binding, and "second" order
keeps each step's activations instead of recomputing them in the Hessian-vector product: at sinusoid sizes
those are most of the time.

Shapes: x `[T, N, d0]`, y `[T, N, dL]`, θ `[P]` in nn.Linear order (W1 `[d1, d0]`, b1, ..., WL, bL), fast
weights φ_j `[T, P]`, α_j 0-dim or `[P]`. A layer's weight is `[o, i]` (θ) or `[T, o, i]` (φ_j).
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ...schedule import checkpoint_steps, replay_phis
from ..mlp import MlpStepResult
from ..registry import register
from .batchnorm import _relu_mask
from .linear import _addmm, _back
from .loss import mse_grad, mse_grad_tangent

Tensor = torch.Tensor


class _Pass(NamedTuple):
    """A forward (and backward) of the MLP at some weights."""

    acts: List[Tensor]  # the Linear layers' inputs: a_0 = x, a_k = σ(h_{k−1}) `[T, N, d_k]`
    slopes: List[Optional[Tensor]]  # σ'(h_{k−1}) beside each a_k: 1 − a_k² for Tanh, None for ReLU (a_k > 0)
    gh: List[Tensor]  # ∂loss/∂h_k of each layer's output `[T, N, d_{k+1}]` (empty without backward)
    loss: Tensor  # [T]
    grad: Optional[Tensor]  # ∂(scale · loss)/∂φ `[T, P]` (None without backward)


@lru_cache(maxsize=None)
def _numels(sizes: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(n for i, o in zip(sizes, sizes[1:]) for n in (o * i, o))


def _weights(flat: Tensor, sizes: Tuple[int, ...]) -> List[Tuple[Tensor, Tensor]]:
    """flat `[*B, P]` -> per layer (W `[*B, o, i]`, b `[*B, o]`), views."""
    chunks = torch.split_with_sizes(flat, _numels(sizes), -1)
    batch = flat.shape[:-1]
    return [(chunks[2 * k].view(*batch, o, i), chunks[2 * k + 1]) for k, (i, o) in enumerate(zip(sizes, sizes[1:]))]


def _slope(g: Tensor, a: Tensor, slope: Optional[Tensor]) -> Tensor:
    """g ⊙ σ'(h), a = σ(h)."""
    return g * slope if slope is not None else _relu_mask(g, a)


def _pass(ws, x: Tensor, y: Tensor, tanh: bool, *, backward: bool = True, scale: float = 1.0) -> _Pass:
    """Forward, the MSE loss per task (mean over N·dL) and, with `backward`, every weight's gradient of
    `scale` × that loss."""
    T, L = x.shape[0], len(ws)
    acts, slopes, h = [x], [None], x
    for k, (w, b) in enumerate(ws):
        h = _addmm(b, h, w)
        if k < L - 1:
            h = torch.tanh_(h) if tanh else torch.relu_(h)
            acts.append(h)
            slopes.append(1 - h * h if tanh else None)
    value, g = mse_grad(h, y)
    if not backward:
        return _Pass(acts, slopes, [], value, None)
    if scale != 1.0:
        g = g.mul_(scale)
    gh, pieces = [None] * L, [None] * (2 * L)
    for k in range(L - 1, -1, -1):
        gh[k] = g
        pieces[2 * k] = torch.bmm(g.transpose(1, 2), acts[k]).view(T, -1)
        pieces[2 * k + 1] = g.sum(1)
        if k:
            g = _slope(_back(g, ws[k][0]), acts[k], slopes[k])
    return _Pass(acts, slopes, gh, value, torch.cat(pieces, 1))


def _hvp(ws, p: _Pass, u: Tensor, sizes: Tuple[int, ...], tanh: bool) -> Tensor:
    """H u `[T, P]`: the support loss's Hessian at the weights of pass `p`, direction u `[T, P]`."""
    T, L = u.shape[0], len(ws)
    us = _weights(u, sizes)
    hds, ads, ad = [], [None], None  # ḣ_l; ȧ_l, the tangent of a_l (zero for x)
    for k, ((w, _), (uw, ub)) in enumerate(zip(ws, us)):
        hd = torch.baddbmm(ub.unsqueeze(1), p.acts[k], uw.transpose(1, 2))  # ḣ = ȧ wᵀ + a uᵀ + u_b
        if ad is not None:
            hd = hd.baddbmm_(ad, w.transpose(1, 2)) if w.dim() == 3 else hd.add_(torch.matmul(ad, w.t()))
        hds.append(hd)
        if k < L - 1:
            ad = _slope(hd, p.acts[k + 1], p.slopes[k + 1])
            ads.append(ad)
    gd = mse_grad_tangent(hds[-1])  # the tangent of ∂loss/∂out
    pieces = [None] * (2 * L)
    for k in range(L - 1, -1, -1):
        hw = torch.bmm(gd.transpose(1, 2), p.acts[k])  # ġW = ġhᵀ a + ghᵀ ȧ
        if ads[k] is not None:
            hw.baddbmm_(p.gh[k].transpose(1, 2), ads[k])
        pieces[2 * k], pieces[2 * k + 1] = hw.view(T, -1), gd.sum(1)
        if k:
            gad = _back(gd, ws[k][0]).baddbmm_(p.gh[k], us[k][0])  # ġa = ġh W + gh U
            gd = _slope(gad, p.acts[k], p.slopes[k])
            if tanh:  # + σ''(h) ḣ ⊙ ∂loss/∂a, with σ'' = −2 a σ'
                gd.addcmul_(p.acts[k] * hds[k - 1], p.gh[k - 1], value=-2.0)
    return torch.cat(pieces, 1)


@register("mlp_meta_step", "torch")
def mlp_meta_step(
    plan,
    theta: Tensor,
    sx,
    sy,
    qx,
    qy,
    alphas: Union[Sequence[Tensor], Tensor],
    order: str,
    lr_grad: Sequence[bool],
    need_before: bool,
):
    """The meta-step of the MLP `plan` (see ops/mlp.py) -> `MlpStepResult`: per-task losses, the
    meta-gradient `[P]` of mean_t L_query_t and ∂/∂α_j (α_j's shape) where `lr_grad[j]`.

    order "second" keeps each step's pass; "checkpoint" keeps φ_j of the steps `schedule.checkpoint_steps`
    names and replays the others (memory grows as log K); "first" keeps g_j where its α-gradient is asked for."""
    sizes, tanh, K, T = plan.sizes, plan.activation == 1, len(alphas), sx.shape[0]
    kept = set(checkpoint_steps(K)) if order == "checkpoint" else set()
    phi, tape, support_before = theta, [], None
    for j, alpha in enumerate(alphas):
        ws = _weights(phi, sizes)
        p = _pass(ws, sx, sy, tanh)
        if j == 0:
            support_before = p.loss
        tape.append(
            (ws, p) if order == "second" else phi if j in kept else p.grad if order == "first" and lr_grad[j] else None
        )
        phi = torch.addcmul(phi, alpha, p.grad, value=-1.0)
    q = _pass(_weights(phi, sizes), qx, qy, tanh, scale=1.0 / T)
    v = q.grad  # ∂(mean_t L_query_t)/∂φ_K

    def advance(phi, a, b):
        for j in range(a, b):
            phi = torch.addcmul(phi, alphas[j], _pass(_weights(phi, sizes), sx, sy, tanh).grad, value=-1.0)
        return phi

    def replayed():
        for j, phi_j in replay_phis(tape, advance):
            ws = _weights(phi_j, sizes)
            yield j, ws, _pass(ws, sx, sy, tanh)

    if order == "second":
        steps = ((j, *tape[j]) for j in reversed(range(K)))
    elif order == "checkpoint":
        steps = replayed() if K else iter(())
    else:
        steps = ((j, None, tape[j]) for j in reversed(range(K)))
    d_alphas: List[Optional[Tensor]] = [None] * K
    for j, ws, p in steps:  # p: the pass at φ_j, or g_j (first order)
        alpha = alphas[j]
        if lr_grad[j]:
            d = ((p if order == "first" else p.grad) * v).sum(0).neg_()  # −Σ_t g_j ⊙ v
            d_alphas[j] = d.sum() if alpha.dim() == 0 else d
        if order != "first":
            v = v - _hvp(ws, p, v * alpha, sizes, tanh)
    before = None
    if need_before:
        before = q.loss if K == 0 else _pass(_weights(theta, sizes), qx, qy, tanh, backward=False).loss
    return MlpStepResult(q.loss, v.sum(0), d_alphas, before, support_before)
