"""Per-op benchmark of every backend of the fused engine's ops, on the arguments a real meta-step
passes them (speed and agreement with the reference; the decision data for `auto`).

For each workload, one second-order `meta_step` with backend "torch" (and one more without the whole-loop
MLP op, for the fused engine's ops) runs with every reference op wrapped so that the first call of each
distinct argument signature (shapes, dtypes, flags) is recorded (tensors cloned). Each recorded call is
then replayed on every backend that implements the op on the device (the `auto=False` ones included), on
fresh clones of the arguments:
    - the outputs (returned tensors and tensors written in place) against the reference's:
      max |a - b| / max |ref| over the floating-point outputs, and the fraction of integer outputs
      (max-pool indices) that differ: a rounding-level tie in a pooling window (two values within
      an ulp, or ReLU's zeros) may pick another index, which changes no gradient beyond rounding;
    - the time: median of `triton.testing.do_bench` on CUDA, of repeated calls on the CPU.

    python benchmarks/op_bench.py --device cuda --workloads sinusoid-K1 conv28-1shot-K1 --out /tmp/ops
writes `op_bench.json` and `op_bench.md` (`op_bench_learned_lr.*` with --learned-lr) into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

try:
    import fastmaml
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastmaml

import fastmaml.engine
from fastmaml.bench.workloads import select
from fastmaml.ops import registry


def _map(obj, fn):
    """fn applied to every tensor inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple result
        return type(obj)(*(_map(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _tensors(obj) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    _map(obj, lambda t: out.append(t) or t)
    return out


def signature(args, kwargs) -> str:
    def one(o):
        if isinstance(o, torch.Tensor):
            return "x".join(map(str, o.shape)) or "scalar"
        if isinstance(o, (list, tuple)):
            return "(" + ",".join(one(x) for x in o) + ")"
        return repr(o) if not callable(o) else getattr(o, "__name__", "fn")

    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


def record_calls(workload, device, learned_lr: bool) -> Dict[str, Dict[str, tuple]]:
    """{op: {signature: (args, kwargs)}} of one second-order meta-step on the reference ops (with a
    learned scalar inner learning rate when `learned_lr`: the adjoint update then reduces its gradient)."""
    calls: Dict[str, Dict[str, tuple]] = {}
    saved = {name: impls["torch"] for name, impls in registry._IMPLS.items()}
    mlp_plan = fastmaml.engine.mlp_plan

    def wrap(name, fn):
        def recording(*args, **kwargs):
            sig = signature(args, kwargs)
            seen = calls.setdefault(name, {})
            if sig not in seen:
                seen[sig] = (_map(args, torch.Tensor.clone), _map(kwargs, torch.Tensor.clone))
            return fn(*args, **kwargs)

        return recording

    try:
        for name, fn in saved.items():
            registry._IMPLS[name]["torch"] = wrap(name, fn)
        registry._CACHE.clear()
        tasks = workload.make_tasks().to(device)
        lr = torch.tensor(workload.inner_lr, device=device, requires_grad=True) if learned_lr else workload.inner_lr
        for whole_loop_op in (True, False):  # an MLP runs as one op (mlp_meta_step); record the fused ops too
            if not whole_loop_op:
                fastmaml.engine.mlp_plan = lambda program, loss: (None, "recording the fused ops")
            model = workload.make_model().to(device)  # a new model: meta_step's plan of the last one is cached
            fastmaml.meta_step(
                model,
                tasks,
                inner_lr=lr,
                steps=workload.steps,
                loss=workload.loss,
                backend="torch",
                evaluate_before=False,
            )
    finally:
        fastmaml.engine.mlp_plan = mlp_plan
        for name, fn in saved.items():
            registry._IMPLS[name]["torch"] = fn
        registry._CACHE.clear()
    return calls


def implementations(name: str, device) -> Dict[str, Callable]:
    """Every backend's implementation of op `name` that runs on `device` (reference first)."""
    out = {}
    for backend, fn in registry._IMPLS[name].items():
        if not registry.spec(name, backend).runs_on(device.type):
            continue
        if registry.availability(backend, device)[0]:
            out[backend] = fn
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "torch"))


def run_once(fn, args, kwargs):
    """(outputs: every tensor returned or written in place, in a fixed order)."""
    args, kwargs = _map(args, torch.Tensor.clone), _map(kwargs, torch.Tensor.clone)
    result = fn(*args, **kwargs)
    return _tensors(result) + _tensors(args) + _tensors(kwargs)


def discrepancy(outs, refs) -> Tuple[float, float]:
    """(largest relative difference over the floating-point outputs, fraction of integer output
    elements that differ); the first is inf where shapes differ or a value is not finite where the
    reference's is."""
    if len(outs) != len(refs):
        return float("inf"), 0.0
    worst, differ, count = 0.0, 0, 0
    for a, b in zip(outs, refs):
        if a.shape != b.shape:
            return float("inf"), 0.0
        if not a.is_floating_point():
            differ += int((a != b).sum())
            count += a.numel()
            continue
        a, b = a.double(), b.double()
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return float("inf"), 0.0
        scale = b[torch.isfinite(b)].abs().max().item() if b.numel() else 0.0
        diff = (a - b)[torch.isfinite(b)].abs().max().item() if b.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst, differ / max(count, 1)


def time_call(fn, args, kwargs, device, repeats: int) -> float:
    """Median seconds of one call (the arguments are reused: in-place ops keep rewriting them)."""
    args, kwargs = _map(args, torch.Tensor.clone), _map(kwargs, torch.Tensor.clone)
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(lambda: fn(*args, **kwargs), warmup=25, rep=100, return_mode="median") / 1e3
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(workloads, device, repeats: int, learned_lr: bool = False) -> dict:
    auto = registry.resolve("auto", device).chosen
    rows = []
    for w in workloads:
        for name, sigs in sorted(record_calls(w, device, learned_lr).items()):
            impls = implementations(name, device)
            for sig, (args, kwargs) in sigs.items():
                refs = run_once(impls["torch"], args, kwargs)
                base = None
                for backend, fn in impls.items():
                    supports = registry.spec(name, backend).supports
                    if supports is not None and supports(*args, **kwargs) is not None:
                        continue  # the registry gives these arguments the reference
                    row = dict(workload=w.name, op=name, args=sig, backend=backend, auto=auto[name][0] == backend)
                    try:
                        row["error"], row["index_mismatch"] = (
                            (0.0, 0.0) if backend == "torch" else discrepancy(run_once(fn, args, kwargs), refs)
                        )
                        row["seconds"] = time_call(fn, args, kwargs, device, repeats)
                    except Exception as exc:  # reported in the table, not hidden
                        row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    if backend == "torch":
                        base = row.get("seconds")
                    if base and row.get("seconds"):
                        row["speedup"] = base / row["seconds"]
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "rows": rows}


def markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}; torch {results['torch']}; float32; median per call; "
        "error: max |out - ref| / max |ref| over the floating-point outputs; index mismatch: fraction "
        "of integer outputs (max-pool indices) that differ",
        "",
        "| workload | op | arguments | backend | auto now | µs | vs torch | error | index mismatch |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        args = r["args"] if len(r["args"]) <= 60 else r["args"][:57] + "..."
        if "failed" in r:
            lines.append(f"| {r['workload']} | {r['op']} | {args} | {r['backend']} | | FAILED: {r['failed']} | | | |")
            continue
        lines.append(
            f"| {r['workload']} | {r['op']} | `{args}` | {r['backend']} | {'yes' if r['auto'] else ''} | "
            f"{r['seconds'] * 1e6:.1f} | {r.get('speedup', 0):.2f}× | {r['error']:.1e} | "
            f"{r['index_mismatch']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workloads", nargs="*", default=["sinusoid-K1", "conv28-1shot-K1"])
    p.add_argument("--quick", action="store_true", help="the CI-sized workloads (fewer tasks)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per row on the CPU")
    p.add_argument("--learned-lr", action="store_true", help="a learned scalar inner learning rate")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = bench(select(args.workloads, args.quick), device, args.repeats, args.learned_lr)
    results["learned_lr"] = args.learned_lr
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "op_bench_learned_lr" if args.learned_lr else "op_bench"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
