"""An embedding looked up at indices the model makes as it runs, the same for every example: GPT-2's learned
positions, `self.wpe(torch.arange(L, device=x.device))` (nn.Embedding or `F.embedding`).

y = W[idx] for every example, `[T, N, *S, D]` (a view), idx `[*S]` integers; linear in W:
    ẏ = Ẇ[idx];   gW = Σ_n scatter-add of gy over idx (rows at `padding_idx` get none, as PyTorch's);
    the tangent backward is the same map on ġy (no second-order term).
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import Rule


class HostEmbeddingRule(Rule):
    """p = (W, idx): W `[V, D]` or per task `[T, V, D]`, idx the node's host argument (evaluated per call).
    The node's input x only gives the tasks' and examples' counts (no gradient flows to it)."""

    param_names = ("weight",)

    def __init__(self, name: str, kind: str, num_embeddings: int, padding_idx: Optional[int]):
        super().__init__(name, kind)
        self.num_embeddings = num_embeddings
        self.padding_idx = padding_idx

    def _indices(self, idx) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"model layer {self.describe()}: expected integer indices, got {idx!r}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_embeddings):
            raise ValueError(
                f"model layer {self.describe()}: indices in [{int(idx.min())}, {int(idx.max())}] for "
                f"{self.num_embeddings} embeddings"
            )
        return idx

    def _lookup(self, w, x, idx):
        """W[idx] for every example of x `[T, N, ...]`: `[T, N, *S, D]`."""
        T, N = x.shape[0], x.shape[1]
        rows = w[:, idx] if w.dim() == 3 else w[idx].unsqueeze(0)  # [T or 1, *S, D]
        return rows.unsqueeze(1).expand(T, N, *rows.shape[1:])

    def _scatter(self, g, idx, out) -> None:
        """out `[T, V, D]` = Σ over the examples of g `[T, N, *S, D]`, added at the rows idx."""
        if out is None:
            return
        T, D = g.shape[0], g.shape[-1]
        rows = g.sum(1).reshape(T, -1, D)
        out.zero_().index_add_(1, idx.reshape(-1).to(out.device), rows)
        if self.padding_idx is not None:
            out[:, self.padding_idx] = 0

    def forward(self, ops, x, p, save):
        idx = self._indices(p[1])
        return self._lookup(p[0], x, idx), idx

    def backward(self, ops, gy, idx, p, need_x, outs):
        self._scatter(gy, idx, outs[0])
        return None

    def tangent_forward(self, ops, x, xd, p, v):
        idx = self._indices(p[1])
        yd = None if v[0] is None else self._lookup(v[0], x, idx)
        return self._lookup(p[0], x, idx), yd, idx

    def tangent_backward(self, ops, gy, gyd, idx, p, v, need_x, outs, touts):
        self._scatter(gy, idx, outs[0])
        self._scatter(gyd, idx, touts[0])
        return None, None
