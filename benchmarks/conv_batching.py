"""How to batch per-task convolutions over tasks: the measurement behind `conv.STRATEGY`.

Per-task weights make every task its own convolution. Three ways to run T of them:
    loop      one convolution per task (`conv.conv_forward` / `conv_backward`, strategy "loop");
    grouped   tasks folded into channels, one grouped convolution (strategy "grouped");
    unfold    im2col (`F.unfold`) and one batched GEMM per pass; backward by GEMMs and `F.fold`
              (measured here only: the engine does not implement it).
Part 1 times forward + backward (input, weight and bias gradients) of each layer of the 4-block conv
nets, at the support and query sizes. Part 2 times whole second-order meta-steps with
`conv.STRATEGY[device]` set to each engine strategy ("auto": grouped when a task's N·H·W is at most
`GROUPED_MAX_POSITIONS`, else the loop). Every timing is the median of round-robin repeats.

    python benchmarks/conv_batching.py --device cuda --out /tmp/conv
writes `conv_batching.json` and `conv_batching.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

try:
    import fastmaml
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastmaml

from fastmaml.bench.workloads import select
from fastmaml.programs.fused import conv

CONV4_LAYER = conv.Geometry(3, stride=1, padding=1)  # the conv4 layers


def unfold_forward(x, w, b):
    """x `[T, N, C, H, W]`, w `[T, O, C, 3, 3]`, b `[T, O]` -> (y `[T, N, O, H, W]`, cols)."""
    T, N, C, H, W = x.shape
    Cout = w.shape[1]
    cols = F.unfold(x.reshape(T * N, C, H, W), 3, padding=1)  # [T·N, C·9, H·W]
    cols = cols.view(T, N, C * 9, H * W).transpose(1, 2).reshape(T, C * 9, N * H * W)
    y = torch.baddbmm(b[:, :, None], w.reshape(T, Cout, C * 9), cols)  # [T, O, N·H·W]
    return y.view(T, Cout, N, H, W).transpose(1, 2).contiguous(), cols


def unfold_backward(gy, cols, w, shape):
    """-> gx `[T, N, C, H, W]`, gw `[T, O, C, 3, 3]`, gb `[T, O]`."""
    T, N, C, H, W = shape
    Cout = w.shape[1]
    g = gy.transpose(1, 2).reshape(T, Cout, N * H * W)
    gw = torch.bmm(g, cols.transpose(1, 2)).view_as(w)
    gcols = torch.bmm(w.reshape(T, Cout, C * 9).transpose(1, 2), g)  # [T, C·9, N·H·W]
    gcols = gcols.view(T, C * 9, N, H * W).transpose(1, 2).reshape(T * N, C * 9, H * W)
    gx = F.fold(gcols, (H, W), 3, padding=1).view(shape)
    return gx, gw, g.sum(2)


def layer_pass(strategy: str, x, w, b, gy) -> Callable[[], object]:
    """One layer's forward + backward (gx, gw, gb) with `strategy`."""
    if strategy == "unfold":

        def run():
            y, cols = unfold_forward(x, w, b)
            return unfold_backward(gy, cols, w, x.shape)

        return run
    gw, gb = torch.empty_like(w), torch.empty_like(b)

    def run():
        conv.conv_forward(x, w, b, CONV4_LAYER, strategy)
        return conv.conv_backward(gy, x, w, CONV4_LAYER, strategy, True, gw, gb)

    return run


def check_layer(x, w, b, gy) -> float:
    """Largest relative difference of the three strategies' gx against the loop's."""
    ref = layer_pass("loop", x, w, b, gy)()
    worst = 0.0
    for s in ("grouped", "unfold"):
        out = layer_pass(s, x, w, b, gy)()
        gx = out[0] if isinstance(out, tuple) else out
        worst = max(worst, ((gx - ref).abs().max() / ref.abs().max()).item())
    return worst


def median_times(fns: Dict[str, Callable], device, repeats: int, warmup: int = 2) -> Dict[str, float]:
    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns.values():
        for _ in range(warmup):
            once(fn)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(once(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def layer_shapes(T: int):
    """(net, T, N, C, O, H) for every conv layer of both nets at support and query sizes."""
    out = []
    for net, c_in, filters, side in (("conv28", 1, 64, 28), ("conv84", 3, 32, 84)):
        for n in (5, 25, 75):
            c, h = c_in, side
            for _ in range(4):
                out.append((net, T, n, c, filters, h))
                c, h = filters, h // 2
    return out


def part_layers(device, T: int, repeats: int) -> List[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for net, T_, N, C, Cout, H in layer_shapes(T):
        x = torch.randn(T_, N, C, H, H, device=device, generator=g)
        w = torch.randn(T_, Cout, C, 3, 3, device=device, generator=g) * 0.1
        b = torch.randn(T_, Cout, device=device, generator=g)
        gy = torch.randn(T_, N, Cout, H, H, device=device, generator=g)
        fns = {s: layer_pass(s, x, w, b, gy) for s in ("loop", "grouped", "unfold")}
        times = median_times(fns, device, repeats)
        row = dict(
            net=net,
            T=T_,
            N=N,
            C=C,
            O=Cout,
            H=H,
            positions=N * H * H,
            error=check_layer(x, w, b, gy),
            auto=conv.choose("auto", x),
            **{f"{s}_s": t for s, t in times.items()},
        )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def part_meta_steps(device, names: List[str], quick: bool, repeats: int) -> List[dict]:
    rows = []
    saved = conv.STRATEGY.get(device.type)
    try:
        for w in select(names, quick):
            model, tasks = w.make_model().to(device), w.make_tasks().to(device)

            def step(strategy, model=model, tasks=tasks, w=w):
                def run():
                    conv.STRATEGY[device.type] = strategy
                    fastmaml.meta_step(
                        model, tasks, inner_lr=w.inner_lr, steps=w.steps, loss=w.loss, evaluate_before=False
                    )

                return run

            times = median_times({s: step(s) for s in ("loop", "grouped", "auto")}, device, repeats)
            row = dict(workload=w.name, **{f"{s}_s": t for s, t in times.items()})
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        conv.STRATEGY[device.type] = saved
    return rows


def markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}; torch {results['torch']}; float32; median of round-robin repeats",
        "",
        "Forward + backward of one conv layer (3×3, padding 1), all T tasks, ms; "
        "error: unfold/grouped gx against the loop's",
        "",
        "| net | T | N | C→O | H×W | N·H·W | loop | grouped | unfold | fastest | auto picks | error |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results["layers"]:
        t = {s: r[f"{s}_s"] for s in ("loop", "grouped", "unfold")}
        best = min(t, key=t.get)
        lines.append(
            f"| {r['net']} | {r['T']} | {r['N']} | {r['C']}→{r['O']} | {r['H']}×{r['H']} | "
            f"{r['positions']} | "
            + " | ".join(f"{t[s] * 1e3:.2f}" for s in t)
            + f" | {best} | {r['auto']} | {r['error']:.1e} |"
        )
    lines += [
        "",
        "Whole second-order meta-steps (`auto` ops), ms, by `conv.STRATEGY`",
        "",
        "| workload | loop | grouped | auto | loop / grouped |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["meta_steps"]:
        lines.append(
            f"| {r['workload']} | {r['loop_s'] * 1e3:.1f} | {r['grouped_s'] * 1e3:.1f} | "
            f"{r['auto_s'] * 1e3:.1f} | {r['loop_s'] / r['grouped_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tasks", type=int, default=32, help="T of the per-layer part")
    p.add_argument("--workloads", nargs="*", default=["conv28-1shot-K1", "conv28-5shot-K1", "conv84-1shot-K5"])
    p.add_argument("--quick", action="store_true", help="the CI-sized meta-step workloads")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = {
        "device": name,
        "torch": torch.__version__,
        "layers": part_layers(device, args.tasks, args.repeats),
        "meta_steps": part_meta_steps(device, args.workloads, args.quick, args.repeats),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conv_batching.json").write_text(json.dumps(results, indent=2))
    (args.out / "conv_batching.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
