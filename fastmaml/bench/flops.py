"""The floor: an analytic FLOP count of one meta-step, the machine's measured matmul rate, and the
datasheet peaks of the GPUs the suite has run on (`card_peaks`).

Counting rule (the work any exact implementation must do; elementwise ops not counted):
- Only Linear and Conv2d layers and attention's products count, 2 FLOPs per multiply-add. Forward of a
  layer on N examples: F = 2·N·rows·in·out (Linear on `rows` tokens per example), 2·N·c_out·H_out·W_out·c_in·k²
  (Conv2d), 2·N·m·k·n (a product of two activations `[m, k] @ [k, n]`, bilinear as a Linear layer is).
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
from typing import Dict, Optional

import torch

from .workloads import Workload


def forward_flops(w: Workload, examples: int) -> int:
    """FLOPs of one forward pass of `w`'s model on `examples` inputs (Linear, Conv2d, attention's products)."""
    total = 0
    for layer in w.layers:
        if layer[0] == "linear":
            fan_in, fan_out = layer[1:3]
            rows = layer[3] if len(layer) > 3 else 1
            total += 2 * examples * rows * fan_in * fan_out
        elif layer[0] == "matmul":
            _, m, k, n = layer
            total += 2 * examples * m * k * n
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


# Dense peak FLOP/s by GPU name (as torch.cuda.get_device_name reports it), from NVIDIA's datasheets: FP32
# on CUDA cores, TF32 on tensor cores without sparsity (the datasheets quote TF32 with 2:4 sparsity, twice
# these). Sources: "NVIDIA H100 Tensor Core GPU" datasheet (SXM5: 67 / 494.5 TFLOP/s; PCIe: 51 / 378; NVL:
# 60 / 417.5) and "NVIDIA H200 Tensor Core GPU" datasheet (SXM: 67 / 494.5; NVL: 60 / 417.5). The first
# name fragment found in the device name decides.
CARD_PEAKS = (
    ("H100 PCIe", 51.0e12, 378.0e12),
    ("H100 NVL", 60.0e12, 417.5e12),
    ("H100", 67.0e12, 494.5e12),
    ("H200 NVL", 60.0e12, 417.5e12),
    ("H200", 67.0e12, 494.5e12),
)
PEAKS_SOURCE = "NVIDIA H100 / H200 datasheets, dense (no sparsity)"


def card_peaks(name: str) -> Optional[Dict[str, float]]:
    """{"fp32": FLOP/s, "tf32": FLOP/s} of the GPU named `name` (dense datasheet peaks), or None."""
    for fragment, fp32, tf32 in CARD_PEAKS:
        if fragment in name:
            return {"fp32": fp32, "tf32": tf32}
    return None


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
