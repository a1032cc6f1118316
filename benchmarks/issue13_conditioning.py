"""Issue 13: why the float32 meta-gradient of the C++ block-tail path lands far from float64 on an
ill-conditioned 84×84 instance, measured.

The instance: conv-BN-ReLU-MaxPool(2) ×4, 32 filters, BatchNorm2d(32, track_running_stats=False),
Flatten, Linear(800, 5), built right after torch.manual_seed(0); support `randn(T, 5, 3, 84, 84)` then
query `randn(T, 75, 3, 84, 84)` from Generator().manual_seed(1); inner lr 0.01, exact second order.
Errors are ‖g − g*‖/‖g*‖ against the float64 autograd loop, without the conv biases that feed a
BatchNorm (their true gradient is 0).

Sections:
1. errors of the float32 rows (the suite's implementations) and the problem's sensitivity: how far the
   float64 meta-gradient moves when every weight is multiplied by (1 + ε·noise);
2. decisions: per pass of the fused engine, the max-pool picks (where the true pooled value is > 0) and
   pooled ReLU masks that differ from the float64 run of the same call sequence; and whether each
   step's forward in the forward sweep and its recomputation in the Hessian-vector product pass pick
   the same elements (they must: otherwise g_j and H_j belong to different linear pieces);
3. the first support-pass pick at step 0 where the C++ run and float64 disagree: its window, the
   margin between the two candidates, and the float64 meta-gradient of the neighbouring problem in
   which that one convolution output is nudged across the tie (by 1.5× the margin, less than float32
   resolves there); every row's error against both truths;
4. (--dither N) the same rows on N problems that float32 cannot tell apart from this one: every float32
   weight moved by at most one ulp (up, down or not, at random; draw 0 is the instance itself), each
   against its own float64 truth: how often each row lands on the far side of a near-tie.

    python benchmarks/issue13_conditioning.py [--steps 1 5] [--tasks 2] [--threads 2] [--dither 10]

Uses fastmaml internals to watch the block-tail ops (the op table of `fastmaml.ops.registry`, the
chunk sizes of the fused program); the numbers are in benchmarks/RESULTS.md ("Issue 13").
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Dict, List

import torch
from torch import nn

from fastmaml.bench import impls
from fastmaml.bench.measure import Runner
from fastmaml.bench.workloads import Workload
from fastmaml.ops import registry
from fastmaml.tasks import TaskBatch

ROWS = ["autograd-loop", "torch.func-vmap", "fastmaml[torch,second]", "fastmaml[cpp,second]", "fastmaml[auto,second]"]
EPS_LIST = (1e-7, 1e-6, 1e-5)
DEV = torch.device("cpu")


def instance_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers, c = [], 3
    for _ in range(4):
        layers += [
            nn.Conv2d(c, 32, 3, padding=1),
            nn.BatchNorm2d(32, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        c = 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(800, 5))


def instance_tasks(T: int) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(T, 5, 3, 84, 84, generator=g)
    qx = torch.randn(T, 75, 3, 84, 84, generator=g)
    sy = torch.arange(5).repeat_interleave(1).expand(T, -1).contiguous()
    qy = torch.arange(5).repeat_interleave(15).expand(T, -1).contiguous()
    return TaskBatch(sx, sy, qx, qy)


def instance_workload(T: int, K: int) -> Workload:
    config = dict(ways=5, shots=1, query_per_class=15, channels=3, size=84, filters=32)
    return Workload(
        f"issue13-K{K}", f"issue 13 instance, T={T}, K={K}", "conv", T, K, 0.01, "cross_entropy", 5, 75, config
    )


def kept_mask(model: nn.Module) -> torch.Tensor:
    """True for every parameter entry but the biases of convolutions followed by a BatchNorm."""
    mods = list(model)
    skip = {
        f"{i}.bias"
        for i, m in enumerate(mods[:-1])
        if isinstance(m, nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d)
    }
    return torch.cat([torch.full((p.numel(),), n not in skip) for n, p in model.named_parameters()])


def rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    a, b = a.double()[mask], b.double()[mask]
    return float((a - b).norm() / b.norm())


def meta_grad(impl_name: str, model: nn.Module, w: Workload, tasks: TaskBatch, dtype=torch.float32, hook=None):
    impl = {i.name: i for i in impls.implementations()}[impl_name]
    r = Runner(impl, model, w, tasks, DEV, dtype=dtype)
    if hook is not None:
        hook(r.model)
    r.step()
    return r.flat_grad()


def perturbed(model: nn.Module, eps: float, seed: int) -> nn.Module:
    """A float64 copy with every weight multiplied by (1 + eps·n), n ~ N(0, 1)."""
    m = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


# ------------------------------------------------------------------ decisions of the fused engine


def record_decisions(backend: str, model: nn.Module, w: Workload, tasks: TaskBatch, dtype) -> List[Dict]:
    """Runs meta_step twice on one model and returns, per call of a block-tail forward op (the forward
    and the tangent forward) in the second, its kind, x's shape, the picks, the pooled ReLU mask and
    (support calls) x. The first run measures each pass's activation size on one task (calls that the
    engine repeats in the chunk after); the second reuses the sizes and runs the same computation."""
    from fastmaml.programs.fused.program import FusedProgram
    from fastmaml.schedule import TASK_STATE_BYTES

    table = registry.resolve(backend, DEV)
    fwd, tan = table.bn_relu_maxpool_train_fwd, table.bn_relu_maxpool_tangent_fwd
    calls: List[Dict] = []
    impl = {i.name: i for i in impls.implementations()}[f"fastmaml[{backend},second]"]

    def keep(kind, x, z, idx):
        calls.append(
            dict(
                kind=kind,
                shape=tuple(x.shape),
                idx=idx.to(torch.int32),
                on=z > 0,
                x=x.clone() if x.shape[1] == w.support else None,
            )
        )

    def fwd_(x, wt, b, eps, k):
        out = fwd(x, wt, b, eps, k)
        keep("fwd", x, out[0], out[1])
        return out

    def tan_(x, xd, wt, b, wd, bd, eps, k):
        out = tan(x, xd, wt, b, wd, bd, eps, k)
        keep("tan", x, out[0], out[2])
        return out

    # float64 runs with doubled byte budgets, so that their task chunks equal the float32 run's
    scale = 2 if dtype == torch.float64 else 1
    saved = dict(FusedProgram.chunk_bytes), dict(TASK_STATE_BYTES)
    FusedProgram.chunk_bytes["cpu"] = saved[0]["cpu"] * scale
    TASK_STATE_BYTES["cpu"] = saved[1]["cpu"] * scale
    try:
        runner = Runner(impl, model, w, tasks, DEV, dtype=dtype)
        runner.step()
        table.bn_relu_maxpool_train_fwd, table.bn_relu_maxpool_tangent_fwd = fwd_, tan_
        runner.step()
    finally:
        table.bn_relu_maxpool_train_fwd, table.bn_relu_maxpool_tangent_fwd = fwd, tan
        FusedProgram.chunk_bytes.update(saved[0])
        TASK_STATE_BYTES.update(saved[1])
    return calls


def phase(call: Dict, w: Workload) -> str:
    if call["kind"] == "tan":
        return "support, HVP pass"
    return "support, forward sweep" if call["shape"][1] == w.support else "query"


def flips(call: Dict, truth: Dict):
    """(max-pool picks that differ where the true pooled value is > 0, pooled ReLU masks that differ)."""
    return int(((call["idx"] != truth["idx"]) & truth["on"]).sum()), int((call["on"] != truth["on"]).sum())


def sweep_vs_hvp(calls: List[Dict], w: Workload) -> List[str]:
    """Forward sweep against the HVP pass's recomputation of the same step, per block and task: the
    lines that say where they differ (none: identical, bit for bit). The sweep runs every task of a
    step in one call ([T, ...]), the HVP pass one task per call, steps K−1..0."""
    T, K = w.tasks, w.steps
    sweep = [c for c in calls if c["kind"] == "fwd" and c["shape"][1] == w.support]
    hvp = [c for c in calls if c["kind"] == "tan"]
    if (
        any(c["shape"][0] != T for c in sweep)
        or any(c["shape"][0] != 1 for c in hvp)
        or len(sweep) != 4 * K
        or len(hvp) != 4 * T * K
    ):
        return [f"(chunking not recognized: {len(sweep)} sweep calls, {len(hvp)} HVP calls; skipped)"]
    out, differ, triples, dx_max = [], 0, 0, 0.0
    for j in range(K):
        for blk in range(4):
            a = sweep[4 * j + blk]
            for t in range(T):
                b = hvp[((K - 1 - j) * T + t) * 4 + blk]
                dx = float((a["x"][t] - b["x"][0]).abs().max())
                dp = int(((a["idx"][t] != b["idx"][0]) & a["on"][t]).sum())
                dr = int((a["on"][t] != b["on"][0]).sum())
                triples += 1
                differ += dx > 0
                dx_max = max(dx_max, dx)
                if dp or dr:
                    out.append(
                        f"step {j} block {blk + 1} task {t}: picks differ {dp}, masks differ {dr} "
                        f"(max |x_sweep − x_hvp| {dx:.1e})"
                    )
    if differ:
        out.insert(0, f"x differs in {differ} of {triples} (step, block, task) (max {dx_max:.1e})")
    return out


# ------------------------------------------------------------------ the near-tie


def ulp_dithered(model: nn.Module, seed: int) -> nn.Module:
    """A copy whose every float32 weight moved one ulp up, one down, or not at all (uniformly)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            u = torch.randint(-1, 2, p.shape, generator=g)
            up = torch.nextafter(p, torch.full_like(p, float("inf")))
            down = torch.nextafter(p, torch.full_like(p, -float("inf")))
            p.copy_(torch.where(u > 0, up, torch.where(u < 0, down, p)))
    return m


def dither(base: nn.Module, w: Workload, tasks: TaskBatch, mask: torch.Tensor, draws: int) -> None:
    rows = [r for r in ROWS if r != "fastmaml[auto,second]"]  # auto runs the cpp kernels on the CPU
    errs: Dict[str, List[float]] = {r: [] for r in rows}
    for d in range(draws):
        model = base if d == 0 else ulp_dithered(base, d)
        truth = meta_grad("autograd-loop", model, w, tasks, torch.float64)
        for r in rows:
            try:
                errs[r].append(rel(meta_grad(r, model, w, tasks), truth, mask))
            except Exception:  # torch.func may run out of memory
                errs[r].append(float("nan"))
        print(f"    draw {d}: " + ", ".join(f"{r} {errs[r][-1]:.1e}" for r in rows), flush=True)
    for r in rows:
        v = sorted(errs[r])
        print(
            f"    {r:24s} median {v[len(v) // 2]:.1e}, max {v[-1]:.1e}, above 1e-2 in "
            f"{sum(e > 1e-2 for e in v)} of {len(v)}"
        )


def first_step0_support_flip(calls: List[Dict], truth: List[Dict], w: Workload):
    """(block, call index, position [task, n, c, oh, ow]) of the first pick at step 0 of the forward sweep that
    differs from float64, or None."""
    sweep = [
        i for i, c in enumerate(calls) if c["kind"] == "fwd" and c["shape"][1] == w.support and c["shape"][0] == w.tasks
    ]
    for blk, i in enumerate(sweep[:4]):
        c, t = calls[i], truth[i]
        bad = ((c["idx"] != t["idx"]) & t["on"]).nonzero()
        if len(bad):
            return blk, i, bad[0].tolist()
    return None


def window(x: torch.Tensor, pos, k: int = 2) -> torch.Tensor:
    t, n, c, oh, ow = pos
    return x[t, n, c, k * oh : k * oh + k, k * ow : k * ow + k].reshape(-1)


def nudge_hook(block: int, task: int, pos_nchw, delta: float, K: int):
    """A hook installer: adds `delta` to one output element of the block's convolution in the autograd
    loop, on task `task`'s support pass at step 0 (the loop runs K support passes and one query pass
    per task)."""

    def install(model):
        state = {"calls": 0}

        def hook(mod, inp, out):
            i = state["calls"]
            state["calls"] += 1
            if i == task * (K + 1):
                d = torch.zeros_like(out)
                d[tuple(pos_nchw)] = delta
                return out + d

        model[4 * block].register_forward_hook(hook)

    return install


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dither", type=int, default=0, metavar="N", help="section 4 with N draws (0: skipped)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = instance_model()
    mask = kept_mask(base)
    tasks = instance_tasks(args.tasks)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={args.tasks}")
    for K in args.steps:
        w = instance_workload(args.tasks, K)
        start = time.time()
        truth = meta_grad("autograd-loop", base, w, tasks, torch.float64)
        print(f"\n== K={K} (float64 truth {time.time() - start:.0f} s)")
        sens = {
            eps: [
                rel(meta_grad("autograd-loop", perturbed(base, eps, 100 + d), w, tasks, torch.float64), truth, mask)
                for d in range(2)
            ]
            for eps in EPS_LIST
        }
        print("sensitivity (2 draws): " + "; ".join(f"ε={eps:.0e}: {s[0]:.2e}, {s[1]:.2e}" for eps, s in sens.items()))
        grads = {}
        for name in ROWS:
            try:
                grads[name] = meta_grad(name, base, w, tasks)
            except Exception as e:  # torch.func may run out of memory
                print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        for name, g in grads.items():
            print(f"  {name:24s} error {rel(g, truth, mask):.2e}")

        ref = record_decisions("torch", base, w, tasks, torch.float64)
        recs = {}
        for backend in ("torch", "cpp"):
            calls = record_decisions(backend, base, w, tasks, torch.float32)
            assert [c["shape"] for c in calls] == [c["shape"] for c in ref], "call sequences differ"
            recs[backend] = calls
            total: Dict[str, List[int]] = {}
            for c, t in zip(calls, ref):
                p, r = flips(c, t)
                s = total.setdefault(phase(c, w), [0, 0, 0])
                s[0], s[1], s[2] = s[0] + p, s[1] + r, s[2] + 1
            print(
                f"  decisions, {backend} vs float64 (picks, masks, calls): "
                + "; ".join(f"{k}: {v[0]}, {v[1]}, {v[2]}" for k, v in total.items())
            )
            lines = sweep_vs_hvp(calls, w)
            print(f"  {backend}: forward sweep vs HVP recomputation: " + ("identical" if not lines else ""))
            for line in lines:
                print("    " + line)

        hit = first_step0_support_flip(recs["cpp"], ref, w)
        if hit is None:
            print("  no pick at step 0 of the C++ run's forward sweep differs from float64")
        else:
            near_tie(hit, recs, ref, base, w, tasks, mask, truth, grads, K)
        if args.dither:
            print(f"  float32 weights moved by at most one ulp, {args.dither} draws:")
            dither(base, w, tasks, mask, args.dither)


def near_tie(hit, recs, ref, base, w, tasks, mask, truth, grads, K) -> None:
    """Section 3 for the first differing pick `hit` of the C++ run."""
    blk, at, pos = hit
    c, t = recs["cpp"][at], ref[at]
    i64, i32 = int(t["idx"][tuple(pos)]), int(c["idx"][tuple(pos)])
    tk, n, ch, oh, ow = pos
    W_ = c["shape"][4]
    bn = base[4 * blk + 1]
    x64 = t["x"]
    xs = x64[tk, :, ch]
    mu, var = float(xs.mean()), float(xs.var(unbiased=False))
    scale = float(bn.weight[ch].detach()) / (var + bn.eps) ** 0.5
    y = lambda v: (v - mu) * scale + float(bn.bias[ch].detach())  # noqa: E731
    e64, e32 = (i64 // W_, i64 % W_), (i32 // W_, i32 % W_)
    margin = y(float(x64[tk, n, ch, e64[0], e64[1]])) - y(float(x64[tk, n, ch, e32[0], e32[1]]))
    xval = float(x64[tk, n, ch, e32[0], e32[1]])
    ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(abs(xval)))  # float32 spacing there
    print(
        f"  first step-0 support pick that differs (C++ run): block {blk + 1}, task {tk}, image {n}, "
        f"channel {ch}, window ({oh}, {ow}): float64 picks {e64}, C++ run {e32}"
    )
    print(f"    conv output, {'float64:':11s} " + ", ".join(f"{v:.10f}" for v in window(x64, pos).tolist()))
    for backend in ("torch", "cpp"):
        xw = window(recs[backend][at]["x"], pos)
        print(f"    conv output, {backend + ' run:':11s} " + ", ".join(f"{v:.10f}" for v in xw.tolist()))
    print(
        f"    margin in BN output {margin:.2e}; in conv output "
        f"{abs(float(x64[tk, n, ch, e64[0], e64[1]]) - xval):.2e} ≈ "
        f"{abs(float(x64[tk, n, ch, e64[0], e64[1]]) - xval) / ulp:.1f} float32 ulps"
    )
    delta = 1.5 * margin / scale  # lifts the C++ run's pick above the true one
    nudged = meta_grad(
        "autograd-loop", base, w, tasks, torch.float64, hook=nudge_hook(blk, tk, (n, ch, e32[0], e32[1]), delta, K)
    )
    print(
        f"    neighbour problem: that conv output moved by {delta:+.2e}; its float64 meta-gradient is "
        f"{rel(nudged, truth, mask):.2e} from g*"
    )
    for name, g in grads.items():
        print(f"    {name:24s} vs g* {rel(g, truth, mask):.2e}   vs the neighbour's g* {rel(g, nudged, mask):.2e}")


if __name__ == "__main__":
    main()
