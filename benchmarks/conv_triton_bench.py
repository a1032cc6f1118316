"""Triton task-batched convolutions (the Conv2d rule's strategy "triton", kernels/conv.py) against grouped
cuDNN (strategy "grouped", today's choice on CUDA), on every conv layer shape of the standard nets:
conv4-64 at 28×28 (1 input channel) and 84×84 (3), ResNet-12 64-160-320-640 at 84×84 (3×3 convolutions
and the 1×1 shortcuts), T = 4 tasks with per-task weights, N = 5 and N = 75 images per task.

Passes, as the fused engine calls them (`fastmaml/programs/fused/conv.py`):
    fwd        y = conv(x, w) + b
    dgrad      gx = ∂x(gy, w)
    wgrad      gw = ∂w(x, gy), gb = Σ gy
    tan_fwd    y and ẏ = conv(ẋ, w) + conv(x, ẇ) + ḃ          (the R-op's forward)
    tan_dgrad  gx and ġx = ∂x(ġy, w) + ∂x(gy, ẇ)               (the R-op's backward, input part)
    tan_wgrad  gw, gb and ġw = ∂w(x, ġy) + ∂w(ẋ, gy), ġb       (the R-op's backward, weight part)
Each time is the median of round-robin repeats (CUDA events), after one warm-up call (Triton's compile);
"vs cuDNN" is grouped / Triton (above 1: Triton faster); TFLOP/s counts 2 flops per multiply-add of the
products a pass computes (tangent passes: three products). The agreement column is Triton's largest
relative difference from grouped over a layer's passes.

BatchNorm statistics of the output (a following BatchNorm on batch statistics, per task and channel), Triton
only, unfused / fused:
    fwd_stats      y, then mean and variance of y by `torch.var_mean`  /  the forward with `bn_stats`
    tan_fwd_stats  y, ẏ, then also mean(ẏ) and mean((y − mean) ẏ) by PyTorch reductions (several passes)
                   /  the value-and-tangent forward with `bn_stats` (the statistics in its epilogue)
with the largest relative difference between the two sets of statistics.

Precisions: fp32 (true FP32: cuDNN without TF32, Triton's tl.dot in IEEE), tf32 (both on TF32), bf16
(bfloat16 tensors, float32 accumulation). Needs CUDA.

    python benchmarks/conv_triton_bench.py --out /tmp/conv_triton [--precisions fp32 tf32 bf16] [--budget 60]
writes conv_triton.json and conv_triton.md into --out (with --budget: the layers reached in that many
seconds, the rest listed as not reached).
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

try:
    import fastmaml  # noqa: F401
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastmaml.ops.backends import triton_conv
from fastmaml.precision import math_mode, resolve_precision
from fastmaml.programs.fused import conv

PASSES = ("fwd", "dgrad", "wgrad", "tan_fwd", "tan_dgrad", "tan_wgrad")
PRODUCTS = {"fwd": 1, "dgrad": 1, "wgrad": 1, "tan_fwd": 3, "tan_dgrad": 3, "tan_wgrad": 3}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def layer_shapes() -> List[tuple]:
    """(net, C, O, k, H) of every distinct conv layer of the standard nets (padding k // 2, stride 1)."""
    out = []
    for net, c_in, side in (("conv4-64 28", 1, 28), ("conv4-64 84", 3, 84)):
        c, h = c_in, side
        for _ in range(4):
            out.append((net, c, 64, 3, h))
            c, h = 64, h // 2
    c, h = 3, 84
    for width in (64, 160, 320, 640):  # ResNet-12 block: 3×3 (c→w), 3×3 (w→w) twice, 1×1 shortcut (c→w)
        out += [("resnet12", c, width, 3, h), ("resnet12", width, width, 3, h), ("resnet12", c, width, 1, h)]
        c, h = width, h // 2
    return out


def passes(strategy: str, t: dict, geo: conv.Geometry) -> Dict[str, Callable[[], object]]:
    """The six passes of one layer with `strategy`, on the tensors `t`."""
    rule = conv.ConvRule("bench", "Conv2d", geo, t["x"].shape[2])
    rule.strategy = strategy
    x, xd, w, wd, b, bd, gy, gyd = (t[k] for k in ("x", "xd", "w", "wd", "b", "bd", "gy", "gyd"))
    gw, gb, gwd, gbd = (torch.empty_like(v) for v in (w, b, wd, bd))
    return {
        "fwd": lambda: conv.conv_forward(x, w, b, geo, strategy),
        "dgrad": lambda: conv.conv_backward(gy, x, w, geo, strategy, True, None),
        "wgrad": lambda: (conv.conv_backward(gy, x, w, geo, strategy, False, gw, gb), gw, gb),
        "tan_fwd": lambda: rule.tangent_forward(None, x, xd, (w, b), (wd, bd))[:2],
        "tan_dgrad": lambda: rule.tangent_backward(
            None, gy, gyd, (x, xd), (w, b), (wd, bd), True, (None,) * 2, (None,) * 2
        ),
        "tan_wgrad": lambda: (
            rule.tangent_backward(None, gy, gyd, (x, xd), (w, b), (wd, bd), False, (gw, gb), (gwd, gbd)),
            gw,
            gwd,
            gb,
            gbd,
        ),
    }


STATS_PASSES = ("fwd_stats", "tan_fwd_stats")


def _stats(y: torch.Tensor, yd=None) -> torch.Tensor:
    """Mean and biased variance of y (and mean(ẏ), mean((y − mean) ẏ)) per task and channel, by PyTorch
    reductions: the unfused way."""
    var, mean = torch.var_mean(y, (1, 3, 4), correction=0)
    if yd is None:
        return torch.stack([mean, var])
    cov = torch.mean((y - mean[:, None, :, None, None]) * yd, (1, 3, 4))
    return torch.stack([mean, var, yd.mean((1, 3, 4)), cov])


def stats_passes(t: dict, geo: conv.Geometry) -> Dict[str, Dict[str, Callable[[], object]]]:
    """Per statistics pass, its unfused and fused forms on the tensors `t`; each returns the statistics."""
    x, xd, w, wd, b, bd = (t[k] for k in ("x", "xd", "w", "wd", "b", "bd"))
    g = (geo.stride, geo.padding, geo.dilation)

    def tan_unfused():
        y, yd = triton_conv.conv_value_tangent(x, xd, w, b, wd, bd, *g)
        return _stats(y, yd)

    return {
        "fwd_stats": {
            "unfused": lambda: _stats(triton_conv.conv_forward(x, w, b, *g)),
            "fused": lambda: triton_conv.conv_forward(x, w, b, *g, bn_stats=True)[1],
        },
        "tan_fwd_stats": {
            "unfused": tan_unfused,
            "fused": lambda: triton_conv.conv_value_tangent(x, xd, w, b, wd, bd, *g, bn_stats=True)[2],
        },
    }


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def agreement(a, b) -> float:
    """Largest relative difference (‖a − b‖ / ‖b‖) over the tensors two calls return."""
    worst = 0.0
    for u, v in zip(_tensors(a), _tensors(b)):
        v = v.float()
        worst = max(worst, float((u.float() - v).norm() / v.norm().clamp_min(1e-30)))
    return worst


def median_ms(fns: Dict[str, Callable], repeats: int) -> Dict[str, float]:
    """Median milliseconds of each function, round-robin, after one warm-up call each."""
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}


def run_layer(net, C, OC, k, H, N, T, precision, repeats, device) -> dict:
    dtype = DTYPES[precision]
    g = torch.Generator(device=device).manual_seed(C * 1000 + OC + N)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    geo = conv.Geometry(k, 1, k // 2, 1)
    t = dict(x=r(T, N, C, H, H), xd=r(T, N, C, H, H), w=r(T, OC, C, k, k, scale=0.1), wd=r(T, OC, C, k, k, scale=0.1))
    t.update(b=r(T, OC), bd=r(T, OC), gy=r(T, N, OC, H, H), gyd=r(T, N, OC, H, H))
    policy = resolve_precision("tf32" if precision == "tf32" else "fp32", torch.float32)
    with torch.no_grad(), math_mode(policy, device):  # cuDNN and the Triton kernels: TF32 exactly for tf32
        grouped, triton = passes("grouped", t, geo), passes("triton", t, geo)
        row = dict(net=net, C=C, O=OC, k=k, H=H, N=N, T=T, precision=precision)
        worst = 0.0
        for name in PASSES:
            times = median_ms({"grouped": grouped[name], "triton": triton[name]}, repeats)
            worst = max(worst, agreement(triton[name](), grouped[name]()))
            flops = 2.0 * PRODUCTS[name] * T * N * H * H * OC * C * k * k
            row[name] = dict(
                grouped_ms=times["grouped"], triton_ms=times["triton"], triton_tflops=flops / times["triton"] / 1e9
            )
        row["agreement"] = worst
        worst = 0.0
        for name, fns in stats_passes(t, geo).items():
            times = median_ms(fns, repeats)
            worst = max(worst, agreement(fns["fused"](), fns["unfused"]()))
            row[name] = dict(unfused_ms=times["unfused"], fused_ms=times["fused"])
        row["stats_agreement"] = worst
    return row


def markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}; torch {results['torch']}; triton {results['triton']}; T = {results['T']}; "
        f"median of {results['repeats']} round-robin repeats; ms per pass, grouped cuDNN / Triton "
        "(above 1: Triton faster), Triton TFLOP/s",
        "",
    ]
    for precision in results["precisions"]:
        rows = [r for r in results["rows"] if r["precision"] == precision]
        lines += [
            f"### {precision}",
            "",
            "| net | C→O | k | H | N | " + " | ".join(PASSES) + " | agreement |",
            "|---|---|---:|---:|---:|" + "---:|" * len(PASSES) + "---:|",
        ]
        for r in rows:
            cells = [
                f"{r[p]['grouped_ms']:.3f} / {r[p]['triton_ms']:.3f} = {r[p]['grouped_ms'] / r[p]['triton_ms']:.2f}× "
                f"({r[p]['triton_tflops']:.1f})"
                for p in PASSES
            ]
            lines.append(
                f"| {r['net']} | {r['C']}→{r['O']} | {r['k']} | {r['H']} | {r['N']} | "
                + " | ".join(cells)
                + f" | {r['agreement']:.1e} |"
            )
        lines.append("")
        lines += [
            f"BatchNorm statistics ({precision}): ms, unfused / fused (above 1: the epilogue pays)",
            "",
            "| net | C→O | k | H | N | " + " | ".join(STATS_PASSES) + " | agreement |",
            "|---|---|---:|---:|---:|" + "---:|" * len(STATS_PASSES) + "---:|",
        ]
        for r in rows:
            cells = [
                f"{r[p]['unfused_ms']:.3f} / {r[p]['fused_ms']:.3f} = {r[p]['unfused_ms'] / r[p]['fused_ms']:.2f}×"
                for p in STATS_PASSES
            ]
            lines.append(
                f"| {r['net']} | {r['C']}→{r['O']} | {r['k']} | {r['H']} | {r['N']} | "
                + " | ".join(cells)
                + f" | {r['stats_agreement']:.1e} |"
            )
        lines.append("")
    if results["not_reached"]:
        lines += [
            f"Not reached within the budget ({results['budget']} s): "
            + "; ".join(f"{p} {net} {C}→{OC} k{k} H{H} N{N}" for p, net, C, OC, k, H, N in results["not_reached"]),
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--images", type=int, nargs="*", default=[5, 75])
    p.add_argument("--precisions", nargs="*", default=["fp32", "tf32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=0, help="seconds; layers not started by then are skipped")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "conv_triton_bench: needs CUDA (the Triton convolution kernels are timed against cuDNN on a GPU; "
            "on the CPU they run only under the Triton interpreter, in tests/test_kernels_conv_triton.py)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    import triton

    start = time.time()
    rows, not_reached = [], []
    for precision in args.precisions:
        for N in args.images:
            for net, C, OC, k, H in layer_shapes():
                if args.budget and time.time() - start > args.budget:
                    not_reached.append((precision, net, C, OC, k, H, N))
                    continue
                row = run_layer(net, C, OC, k, H, N, args.tasks, precision, args.repeats, device)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    results = dict(
        device=torch.cuda.get_device_name(device),
        torch=torch.__version__,
        triton=triton.__version__,
        T=args.tasks,
        repeats=args.repeats,
        precisions=args.precisions,
        budget=args.budget,
        rows=rows,
        not_reached=not_reached,
        seconds=time.time() - start,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conv_triton.json").write_text(json.dumps(results, indent=2))
    (args.out / "conv_triton.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
