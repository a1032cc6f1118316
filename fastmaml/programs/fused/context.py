"""Rules of the context layers (`fastmaml.context`): CAVIA's context vector concatenated to the features,
and FiLM. Both read a parameter that is broadcast over a task's examples, which the generic joins refuse.

Per call a parameter is common `[*shape]` (φ_0 = θ, or a shared parameter) or per task `[T, *shape]`;
a direction (from u) is per task or None (a shared parameter: zero). Values are `[T, N, ...]`.

ContextConcat, y = [x, φ] (φ repeated for every example and position), is linear in (x, φ):
    ẏ = [ẋ, φ̇];  gx = gy[..., :I],  gφ = Σ_{n,…} gy[..., I:];  the tangent backward is the same map on ġy
    (no second-order term).

FiLM, y = γ ⊙ h + β with z = [γ; β] = W φ + b, per channel c, summed over examples n and positions s:
    forward     y = h γ + β
    backward    gγ = Σ gy h,  gβ = Σ gy,  gz = [gγ; gβ];  gh = gy γ
                gb = gz,  gW = gz φᵀ,  gφ = Wᵀ gz
    tangent     ż = Ẇ φ + W φ̇ + ḃ;  ẏ = ḣ γ + h γ̇ + β̇
    tangent     ġγ = Σ (ġy h + gy ḣ),  ġβ = Σ ġy;  ġh = ġy γ + gy γ̇
    backward    ġb = ġz,  ġW = ġz φᵀ + gz φ̇ᵀ,  ġφ = Wᵀ ġz + Ẇᵀ gz
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import Rule


def _per_task(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A parameter (or direction) of per-parameter rank `rank`, common or per task, as `[T or 1, *shape]`."""
    return t if t.dim() == rank + 1 else t.unsqueeze(0)


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a + b


class ContextConcatRule(Rule):
    """y = [x, φ] along the last dim; p = (φ,) with φ `[C]` or `[T, C]`."""

    param_names = ("context",)

    def __init__(self, name: str, kind: str, num_context: int):
        super().__init__(name, kind)
        self.num_context = num_context

    def _spread(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """φ `[C]` | `[T, C]` broadcast to `x.shape[:-1] + (C,)` (an expanded view)."""
        c = _per_task(c, 1)
        return c.view(c.shape[0], *([1] * (x.dim() - 2)), self.num_context).expand(*x.shape[:-1], self.num_context)

    def _sum(self, g: torch.Tensor, out: torch.Tensor) -> None:
        """Σ over everything but tasks and the context dim of g `[T, ..., C]`, written into out `[T, C]`."""
        torch.sum(g.reshape(g.shape[0], -1, self.num_context), 1, out=out)

    def forward(self, ops, x, p, save):
        if x.dim() < 3:
            raise ValueError(
                f"model layer {self.describe()}: expected per-task inputs [T, N, ..., features], got "
                f"shape {tuple(x.shape)}"
            )
        return torch.cat([x, self._spread(p[0], x)], -1), (x.shape[-1] if save else None)

    def backward(self, ops, gy, saved, p, need_x, outs):
        features = saved
        if outs[0] is not None:
            self._sum(gy[..., features:], outs[0])
        return gy[..., :features].contiguous() if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        y, features = self.forward(ops, x, p, True)
        if xd is None and v[0] is None:
            return y, None, features
        xd = x.new_zeros(()).expand(x.shape) if xd is None else xd
        cd = self._spread(v[0], x) if v[0] is not None else x.new_zeros(()).expand(*x.shape[:-1], self.num_context)
        return y, torch.cat([xd, cd], -1), features

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        features = saved
        if outs[0] is not None:
            self._sum(gy[..., features:], outs[0])
        if touts[0] is not None:
            self._sum(gyd[..., features:], touts[0])
        if not need_x:
            return None, None
        return gy[..., :features].contiguous(), gyd[..., :features].contiguous()


class FiLMRule(Rule):
    """y = γ ⊙ h + β per channel (dim 2 of `[T, N, C, *spatial]`), [γ; β] = W φ + b; p = (φ, W, b)."""

    param_names = ("context", "weight", "bias")

    def __init__(self, name: str, kind: str, num_channels: int, num_context: int):
        super().__init__(name, kind)
        self.num_channels = num_channels
        self.num_context = num_context

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """`[T, N, C, *spatial]` -> `[T, N, C, S]` (checked)."""
        if x.dim() < 3 or x.shape[2] != self.num_channels:
            raise ValueError(
                f"model layer {self.describe()}: expected per-task inputs [T, N, {self.num_channels}, "
                f"...], got shape {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], x.shape[1], self.num_channels, -1)

    @staticmethod
    def _linear(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """W φ `[T or 1, 2C]` for W `[2C, D]` | `[T, 2C, D]` and φ `[D]` | `[T, D]`."""
        return torch.matmul(_per_task(w, 2), _per_task(c, 1).unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def _transposed(gz: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Wᵀ gz `[T, D]` for gz `[T, 2C]`."""
        return torch.matmul(gz.unsqueeze(1), _per_task(w, 2)).squeeze(1)

    def _z(self, p) -> torch.Tensor:
        c, w, b = p
        return self._linear(w, c) + _per_task(b, 1)

    def _zdot(self, p, v) -> Optional[torch.Tensor]:
        """ż = Ẇ φ + W φ̇ + ḃ `[T, 2C]`, None when every direction is zero."""
        (c, w, _), (cd, wd, bd) = p, v
        zd = None if wd is None else self._linear(wd, c)
        zd = _add(zd, None if cd is None else self._linear(w, cd))
        return _add(zd, bd)

    def _split(self, z: torch.Tensor):
        """z `[T', 2C]` -> (γ, β), each `[T', 1, C, 1]` to broadcast against `[T, N, C, S]`."""
        C = self.num_channels
        return z[:, :C].reshape(-1, 1, C, 1), z[:, C:].reshape(-1, 1, C, 1)

    def _weight_grads(self, gz: torch.Tensor, p, outs) -> None:
        c, w, _ = p
        go, gw, gb = outs
        if gb is not None:
            gb.copy_(gz)
        if gw is not None:
            gw.copy_(gz.unsqueeze(2) * _per_task(c, 1).unsqueeze(1))
        if go is not None:
            go.copy_(self._transposed(gz, w))

    def forward(self, ops, x, p, save):
        h = self._channels(x)
        gamma, beta = self._split(self._z(p))
        y = torch.addcmul(beta, h, gamma)
        return y.view(x.shape), ((h, gamma, x.shape) if save else None)

    def backward(self, ops, gy, saved, p, need_x, outs):
        h, gamma, shape = saved
        gy = gy.reshape(h.shape)
        if any(o is not None for o in outs):
            gz = torch.cat([(gy * h).sum((1, 3)), gy.sum((1, 3))], 1)
            self._weight_grads(gz, p, outs)
        return (gy * gamma).view(shape) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        h = self._channels(x)
        gamma, beta = self._split(self._z(p))
        y = torch.addcmul(beta, h, gamma).view(x.shape)
        hd = None if xd is None else xd.reshape(h.shape)
        zd = self._zdot(p, v)
        yd = None if hd is None else hd * gamma
        if zd is not None:
            gamma_d, beta_d = self._split(zd)
            yd = _add(yd, torch.addcmul(beta_d, h, gamma_d))
        return y, (None if yd is None else yd.view(x.shape)), (h, hd, gamma, zd, x.shape)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        h, hd, gamma, zd, shape = saved
        gy, gyd = gy.reshape(h.shape), gyd.reshape(h.shape)
        if any(o is not None for o in outs) or any(o is not None for o in touts):
            gz = torch.cat([(gy * h).sum((1, 3)), gy.sum((1, 3))], 1)
            gz_gamma_d = gyd * h if hd is None else torch.addcmul(gyd * h, gy, hd)
            gzd = torch.cat([gz_gamma_d.sum((1, 3)), gyd.sum((1, 3))], 1)
            self._weight_grads(gz, p, outs)
            c, w, _ = p
            cd, wd, _ = v
            go, gw, gb = touts
            if gb is not None:
                gb.copy_(gzd)
            if gw is not None:
                ggw = gzd.unsqueeze(2) * _per_task(c, 1).unsqueeze(1)
                if cd is not None:
                    ggw = ggw.addcmul_(gz.unsqueeze(2), cd.unsqueeze(1))
                gw.copy_(ggw)
            if go is not None:
                ggo = self._transposed(gzd, w)
                if wd is not None:
                    ggo = ggo + self._transposed(gz, wd)
                go.copy_(ggo)
        if not need_x:
            return None, None
        gx = gy * gamma
        gxd = gyd * gamma
        if zd is not None:
            gxd = gxd.addcmul_(gy, self._split(zd)[0])
        return gx.view(shape), gxd.view(shape)
