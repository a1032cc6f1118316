"""Which memory format for the fused engine's image activations: the measurement behind
`memory_format.FORMAT` and `CHANNELS_LAST_MIN_POSITIONS`.

Part 1 times one convolution forward and its backward (input and weight gradients) of every layer shape
of the standard nets (ResNet-12 at the CPU widths 16-32-64-128), on one task's query (75 images) and
support (5), with NCHW operands and with channels-last ones (the conversions not timed: the engine keeps
one format end to end). Part 2 times
whole second-order meta-steps of `fastmaml bench` workloads with `memory_format.FORMAT[device]` set to
"contiguous" and to "channels_last", in alternation. Every timing is the median of round-robin repeats.

    python benchmarks/conv_layout.py --threads 2 --workloads resnet12-84-K5 conv84-1shot-K5
    python benchmarks/conv_layout.py --device cuda --workloads resnet12w-84-K5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

try:
    import fastmaml
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastmaml

from fastmaml.bench.workloads import workloads
from fastmaml.programs.fused import memory_format

aten = torch.ops.aten

# (net, C_in, C_out, H = W) of each 3×3 layer shape
LAYERS = [
    ("conv4-64 28×28", 1, 64, 28),
    ("conv4-64 28×28", 64, 64, 14),
    ("conv4-64 32×32", 3, 64, 32),
    ("conv4-64 32×32", 64, 64, 16),
    ("conv4-32 84×84", 3, 32, 84),
    ("conv4-32 84×84", 32, 32, 42),
    ("conv4-32 84×84", 32, 32, 21),
    ("ResNet-12 16-32-64-128", 3, 16, 84),
    ("ResNet-12 16-32-64-128", 16, 16, 84),
    ("ResNet-12 16-32-64-128", 16, 32, 42),
    ("ResNet-12 16-32-64-128", 32, 32, 42),
    ("ResNet-12 16-32-64-128", 64, 64, 21),
    ("ResNet-12 16-32-64-128", 128, 128, 10),
]


def _median_times(runs: Dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for run in runs.values():  # warm-up
        run()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _conv_pass(x, w, gy) -> Callable[[], None]:
    """A 3×3 convolution's forward and its input and weight gradients."""

    def run():
        torch.conv2d(x, w, None, 1, 1)
        aten.convolution_backward(gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])

    return run


def _meta_step_in(fmt: str, device: torch.device, model, tasks, w) -> Callable[[], None]:
    """One second-order `meta_step` of workload w with `memory_format.FORMAT[device type]` set to fmt."""

    def run():
        default = memory_format.FORMAT[device.type]
        memory_format.FORMAT[device.type] = fmt
        try:
            model.zero_grad(set_to_none=True)
            fastmaml.meta_step(model, tasks, inner_lr=w.inner_lr, steps=w.steps, loss=w.loss, evaluate_before=False)
        finally:
            memory_format.FORMAT[device.type] = default

    return run


def layers(repeats: int, device: torch.device) -> None:
    print("| net | layer | images | NCHW fwd+bwd (ms) | channels-last (ms) | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for net, cin, cout, side in LAYERS:
        for n in (75, 5):
            x = torch.randn(n, cin, side, side, device=device)
            w = torch.randn(cout, cin, 3, 3, device=device)
            gy = torch.randn(n, cout, side, side, device=device)
            xc, gyc = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))

            runs = {"nchw": _conv_pass(x, w, gy), "cl": _conv_pass(xc, w, gyc)}
            t = _median_times(runs, repeats, device)
            print(
                f"| {net} | {cin}→{cout} at {side}×{side} | {n} | {t['nchw'] * 1e3:.2f} | {t['cl'] * 1e3:.2f} "
                f"| {t['nchw'] / t['cl']:.2f}× |"
            )


def meta_steps(names: List[str], repeats: int, device: torch.device, quick: bool = False) -> None:
    print("\n| workload | contiguous (s) | channels-last (s) | speed-up |")
    print("|---|---:|---:|---:|")
    table = workloads(quick)
    for name in names:
        w = table[name]
        model = w.make_model().to(device)
        tasks = tuple(t.to(device) for t in w.make_tasks())
        runs = {fmt: _meta_step_in(fmt, device, model, tasks, w) for fmt in ("contiguous", "channels_last")}
        t = _median_times(runs, repeats, device)
        a, b = t["contiguous"], t["channels_last"]
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}× |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="per layer (part 1)")
    parser.add_argument("--step-repeats", type=int, default=3, help="per workload (part 2)")
    parser.add_argument("--workloads", nargs="*", default=[], help="`fastmaml bench` workloads for part 2")
    parser.add_argument("--no-layers", action="store_true", help="skip part 1")
    parser.add_argument("--quick", action="store_true", help="part 2 on the workloads' quick sizes (fewer tasks)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    threads = f"CPU, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    print(f"torch {torch.__version__}, {where}")
    if not args.no_layers:
        layers(args.repeats, device)
    if args.workloads:
        meta_steps(args.workloads, args.step_repeats, device, args.quick)


if __name__ == "__main__":
    main()
