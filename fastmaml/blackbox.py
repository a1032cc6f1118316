"""Black-box meta-learners: a network h_θ(D_train, x) that reads a task's support set and predicts for its
query points, trained by maximum likelihood over tasks, with no inner optimization. They are the baseline
every optimization-based method (MAML and its relatives) is compared with.

- `NeuralProcess` (regression): a conditional neural process (Garnelo et al. 2018) with an attentive
  deterministic path (as in Kim et al. 2019): an encoder MLP maps each (x_i, y_i) pair to r_i; a query x*
  reads the mean of the r_i and a multi-head cross-attention over them (keys from x_i, values r_i); a
  decoder MLP maps (x*, both summaries) to a Gaussian N(μ, σ²). Trained on the negative log-likelihood.
- `SnailClassifier` (few-shot classification): a SNAIL-style model (Mishra et al. 2018): the episode is a
  sequence of (image embedding, one-hot label) pairs, each query last with a zero label, processed by
  self-attention blocks; a query attends to the whole support set and to itself only (never to another
  query), so every query is classified from the support as if it were the last element of its own
  sequence. The embedding is the conv4 feature extractor of the MAML paper with GroupNorm in place of
  BatchNorm, so that every image is embedded on its own: no statistics are shared across the tasks of a
  meta-batch, between training and evaluation, or between the ranks of a distributed run. Trained on
  cross-entropy.

Both take whole meta-batches, tasks first: support `[T, Ns, ...]`, query `[T, Nq, ...]`, and are ordinary
`nn.Module`s trained with autograd (no `meta_step`): dropout is off, so a training run is deterministic.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NeuralProcess", "SnailClassifier"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _mlp(sizes: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NeuralProcess(nn.Module):
    """A conditional neural process with an attentive deterministic path, for regression tasks.

    Args:
        x_dim: input features.
        y_dim: output features.
        hidden: width of every hidden layer and of the representation r.
        heads: attention heads of the cross-attention (`hidden` must be a multiple).
        min_std: the predicted standard deviation is `min_std + (1 − min_std) · softplus(·)`.
    """

    def __init__(self, x_dim: int = 1, y_dim: int = 1, hidden: int = 64, heads: int = 4, min_std: float = 0.01):
        super().__init__()
        self.x_dim, self.y_dim = _positive_int(x_dim, "x_dim"), _positive_int(y_dim, "y_dim")
        hidden, heads = _positive_int(hidden, "hidden"), _positive_int(heads, "heads")
        if hidden % heads:
            raise ValueError(f"hidden: expected a multiple of heads={heads}, got {hidden}")
        self.min_std = float(min_std)
        self.encoder = _mlp([self.x_dim + self.y_dim, hidden, hidden, hidden])
        self.keys = _mlp([self.x_dim, hidden, hidden])  # embeds x_i (keys) and x* (queries) alike
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.decoder = _mlp([self.x_dim + 2 * hidden, hidden, hidden, 2 * self.y_dim])

    def forward(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The predictive distribution at the query points.

        Args:
            support_x: `[T, Ns, x_dim]`.
            support_y: `[T, Ns, y_dim]`.
            query_x: `[T, Nq, x_dim]`.

        Returns:
            (mean, std), each `[T, Nq, y_dim]`.
        """
        r = self.encoder(torch.cat([support_x, support_y], -1))  # [T, Ns, H]
        pooled = r.mean(1, keepdim=True).expand(-1, query_x.shape[1], -1)
        attended, _ = self.attention(self.keys(query_x), self.keys(support_x), r, need_weights=False)
        out = self.decoder(torch.cat([query_x, pooled, attended], -1))
        mean, raw = out.split(self.y_dim, -1)
        return mean, self.min_std + (1 - self.min_std) * F.softplus(raw)

    def nll(self, support_x, support_y, x, y) -> torch.Tensor:
        """The mean Gaussian negative log-likelihood of targets y `[T, N, y_dim]` at x `[T, N, x_dim]`.

        Args:
            support_x: `[T, Ns, x_dim]`.
            support_y: `[T, Ns, y_dim]`.
            x: target inputs `[T, N, x_dim]`.
            y: target outputs `[T, N, y_dim]`.

        Returns:
            A scalar: −log N(y; μ, σ²), averaged over tasks, points and output features.
        """
        mean, std = self(support_x, support_y, x)
        return (torch.log(std) + 0.5 * ((y - mean) / std) ** 2).mean() + 0.5 * math.log(2 * math.pi)


def _conv_embedding(in_channels: int, hidden: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    channels = in_channels
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(1, hidden), nn.ReLU(), nn.MaxPool2d(2)]
        channels = hidden
    return nn.Sequential(*layers, nn.Flatten())


class SnailClassifier(nn.Module):
    """A SNAIL-style black-box few-shot classifier (see the module docstring).

    Args:
        in_channels: image channels.
        ways: classes per episode (N).
        hidden: filters of the conv4 embedding (GroupNorm with one group per layer).
        image_size: the side of the square images (at least 16).
        d_model: width of the attention blocks.
        heads: attention heads (`d_model` must be a multiple).
        layers: self-attention blocks.
    """

    def __init__(
        self,
        in_channels: int,
        ways: int,
        hidden: int = 32,
        image_size: int = 28,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
    ):
        super().__init__()
        self.ways = _positive_int(ways, "ways")
        hidden, d_model = _positive_int(hidden, "hidden"), _positive_int(d_model, "d_model")
        heads, layers = _positive_int(heads, "heads"), _positive_int(layers, "layers")
        side = _positive_int(image_size, "image_size") // 16
        if side < 1:
            raise ValueError(f"image_size: four 2×2 max-poolings need a side of at least 16 pixels, got {image_size}")
        if d_model % heads:
            raise ValueError(f"d_model: expected a multiple of heads={heads}, got {d_model}")
        self.embedding = _conv_embedding(_positive_int(in_channels, "in_channels"), hidden)
        self.tokens = nn.Linear(hidden * side * side + self.ways, d_model)
        block = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, self.ways)

    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Query logits from the labelled support set.

        Args:
            support_x: `[T, Ns, C, H, W]`.
            support_y: `[T, Ns]` int64 labels in [0, ways).
            query_x: `[T, Nq, C, H, W]`.

        Returns:
            Logits `[T, Nq, ways]`.
        """
        T, ns, nq = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        images = torch.cat([support_x, query_x], 1)
        emb = self.embedding(images.reshape(T * (ns + nq), *images.shape[2:])).view(T, ns + nq, -1)
        labels = torch.cat([F.one_hot(support_y, self.ways).to(emb.dtype), emb.new_zeros(T, nq, self.ways)], 1)
        h = self.blocks(self.tokens(torch.cat([emb, labels], -1)), mask=self._mask(ns, nq, emb.device))
        return self.head(h[:, ns:])

    @staticmethod
    def _mask(ns: int, nq: int, device) -> torch.Tensor:
        """`[L, L]` bool, True where attention is not allowed: support attends to support, a query to the
        support and to itself."""
        n = ns + nq
        allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
        allowed[:, :ns] = True
        allowed[torch.arange(ns, n), torch.arange(ns, n)] = True
        return ~allowed
