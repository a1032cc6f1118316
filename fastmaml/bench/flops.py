"""The floor: an analytic FLOP count of one meta-step, and the machine's measured matmul rate.

Counting rule (the work any exact implementation must do; elementwise ops not counted):
- Only Linear and Conv2d layers count, 2 FLOPs per multiply-add. Forward of a layer on N examples:
  F = 2·N·in·out (Linear), 2·N·c_out·H_out·W_out·c_in·k² (Conv2d).
- Backward = 2F (input gradient + weight gradient), every layer counted in full.
- Hessian-vector product, forward-over-reverse with the primal activations reused = 6F:
  tangent forward ẏ = ẋWᵀ + xVᵀ (2F) and tangent backward ġx = ġyW + gyV, ġW = ġyᵀx + gyᵀẋ (4F).
- Second-order meta-step for T tasks, K steps, support forward F_s and query forward F_q:
  T·(K·(3 + 6)·F_s + 3·F_q)  (K support forward+backward, query forward+backward, K HVPs).
  First-order: T·(3K·F_s + 3·F_q). BatchNorm, ReLU, pooling, the loss and the updates are not counted.
"""

from __future__ import annotations

import statistics
import time
from typing import Dict

import torch

from .workloads import Workload


def forward_flops(w: Workload, examples: int) -> int:
    """FLOPs of one forward pass of `w`'s model on `examples` inputs (Linear and Conv2d only)."""
    total = 0
    for layer in w.layers:
        if layer[0] == "linear":
            _, fan_in, fan_out = layer
            total += 2 * examples * fan_in * fan_out
        else:
            _, c_in, c_out, k, h, wd = layer
            total += 2 * examples * c_out * h * wd * c_in * k * k
    return total


def meta_step_flops(w: Workload, order: str) -> int:
    """FLOPs of one meta-step under the counting rule above; order "second" or "first"."""
    if order not in ("second", "first"):
        raise ValueError(f"order: expected 'second' or 'first', got {order!r}")
    fs, fq = forward_flops(w, w.support), forward_flops(w, w.query)
    per_step = 9 if order == "second" else 3
    return w.tasks * (w.steps * per_step * fs + 3 * fq)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 10) -> Dict[str, float]:
    """FLOP/s of an `n`×`n` float32 matrix multiply (median over `repeats` after one warm-up)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    flops = 2.0 * n**3
    return {
        "n": n,
        "median_s": statistics.median(times),
        "flops_per_s": flops / statistics.median(times),
        "best_flops_per_s": flops / min(times),
    }
