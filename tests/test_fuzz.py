"""Seeded random cases over `meta_step` / `adapt` inputs and module attributes: every case ends either in a
clear error that names the argument (ValueError / TypeError / MemoryError, message starting with the
argument's name) or in a meta-gradient equal to the float64 per-task autograd oracle.

500 cases per run (tiny models, seconds); FASTMAML_FUZZ_CASES changes the count, FASTMAML_FUZZ_SEED
the seed.
"""

import os
import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml

from oracle import assert_grads_close, autograd_meta_grad, rel_err

CASES = int(os.environ.get("FASTMAML_FUZZ_CASES", "500"))
SEED = int(os.environ.get("FASTMAML_FUZZ_SEED", "0"))
ARGUMENTS = (
    "model",
    "tasks",
    "support_x",
    "support_y",
    "inner_lr",
    "steps",
    "order",
    "loss",
    "inner_params",
    "backend",
    "batch_norm",
    "implicit_lambda",
    "cg_steps",
    "task_chunk",
    "step_weights",
    "x",
)
D = torch.float64


class Tempered(nn.Module):
    def __init__(self, din, dout):
        super().__init__()
        self.lin = nn.Linear(din, 5)
        self.act = nn.LeakyReLU(0.1)
        self.out = nn.Linear(5, dout)
        self.temperature = 1.0

    def forward(self, x):
        h = self.act(self.lin(x)) / self.temperature
        return self.out(h) + self.out(h.tanh()) * 0.5


class SmallCNN(nn.Module):
    def __init__(self, ways, track):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2, track_running_stats=track)
        self.act = nn.ReLU()
        self.head = nn.Linear(2 * 3 * 3, ways)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.bn(self.conv(x))), 2)
        return self.head(x.view(x.size(0), -1))


class Softsigned(nn.Module):  # no rule for softsign: the torch.func program
    def __init__(self, din, dout):
        super().__init__()
        self.a, self.b = nn.Linear(din, 4), nn.Linear(4, dout)

    def forward(self, x):
        return self.b(F.softsign(self.a(x)))


def make_model(rng, kind, din, dout, ways):
    torch.manual_seed(rng.randrange(1 << 30))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(din, 4), rng.choice([nn.ReLU, nn.Tanh])(), nn.Linear(4, dout)).to(D)
    if kind == "tempered":
        return Tempered(din, dout).to(D)
    if kind == "softsign":
        return Softsigned(din, dout).to(D)
    return SmallCNN(ways, track=rng.random() < 0.5).to(D)


def make_tasks(rng, kind, T, din, dout, ways):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    ns, nq = rng.choice([2, 3]), rng.choice([2, 4])
    if kind == "cnn":
        sx = torch.randn(T, ns, 1, 6, 6, generator=g, dtype=D)
        qx = torch.randn(T, nq, 1, 6, 6, generator=g, dtype=D)
        sy = torch.randint(0, ways, (T, sx.shape[1]), generator=g)
        qy = torch.randint(0, ways, (T, nq), generator=g)
        return [sx, sy, qx, qy]
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    return [r(T, ns, din), r(T, ns, dout), r(T, nq, din), r(T, nq, dout)]


def one_case(rng):
    """(model, tasks, kwargs, expected error argument or None, oracle settings, loss_fn)."""
    kind = rng.choice(["mlp", "tempered", "softsign", "cnn"])
    din, dout, ways, T = rng.choice([1, 3]), rng.choice([1, 2]), 3, rng.choice([1, 2, 3])
    model = make_model(rng, kind, din, dout, ways)
    tasks = make_tasks(rng, kind, T, din, dout, ways)
    classification = kind == "cnn"
    names = [n for n, _ in model.named_parameters()]
    kw = dict(
        steps=rng.choice([0, 1, 2, 3]),
        order=rng.choice(["second", "checkpoint", "first"]),
        loss="cross_entropy" if classification else "mse",
        inner_lr=rng.choice([0.05, 0.1, 0.3]),
    )
    bad = None
    oracle = dict(train=True)

    # module attributes changed between calls (the cache must follow)
    if kind == "tempered" and rng.random() < 0.5:
        model.temperature = rng.choice([0.5, 2.0])
        model.act.negative_slope = rng.choice([0.01, 0.3])
    if kind == "cnn" and rng.random() < 0.3:
        model.bn.eps = rng.choice([1e-3, 0.1])

    def invalid(arg, **changes):
        nonlocal bad
        if bad is None:
            bad = arg
            kw.update(changes)

    roll = rng.random()
    if roll < 0.05:
        invalid("steps", steps=rng.choice([-1, 1.5, True, "2"]))
    elif roll < 0.10:
        invalid("order", order=rng.choice(["third", "", None]))
    elif roll < 0.15:
        invalid("inner_lr", inner_lr=rng.choice([0.0, -0.1, float("inf"), float("nan"), "0.1", True]))
    elif roll < 0.20:
        invalid("inner_lr", inner_lr={n: (0.0 if i == 0 else 0.1) for i, n in enumerate(names)})
    elif roll < 0.23:
        invalid("inner_lr", inner_lr=[0.1] * (kw["steps"] + 1))
    elif roll < 0.28:
        invalid("inner_params", inner_params=rng.choice([[], ["nope"], [3], lambda n, p: False]))
    elif roll < 0.32:
        invalid("loss", loss=rng.choice(["l1", 3]))
    elif roll < 0.36:
        invalid("task_chunk", task_chunk=rng.choice([0, -2, 1.5, "1"]))
    elif roll < 0.40 and kw["steps"] > 0:
        invalid(
            "step_weights",
            step_weights=rng.choice([[1.0] * (kw["steps"] + 1), [-1.0] * kw["steps"], [float("nan")] * kw["steps"]]),
        )
    elif roll < 0.44:
        invalid("batch_norm", batch_norm=rng.choice(["running", "per_step"] if kind == "cnn" else ["running"]))
    elif roll < 0.48:
        invalid("backend", backend=rng.choice(["gpu", "jax"]))
    elif roll < 0.56:  # broken task tensors
        i = rng.randrange(4)
        what = rng.choice(["T", "dtype", "dims", "shots"])
        if what == "T":
            tasks[i] = tasks[i][:1] if T > 1 else torch.cat([tasks[i], tasks[i]])
        elif what == "dtype":
            tasks[i] = tasks[i].float() if tasks[i].is_floating_point() else tasks[i].double()
        elif what == "dims":
            tasks[i] = tasks[i][:, 0]
        else:  # one example where its partner has more
            tasks[i] = tasks[i][:, :1]
        invalid("tasks")
    elif roll < 0.60 and classification:
        y = tasks[1].clone()
        y[0, 0] = rng.choice([ways, ways + 4, -1, -100])
        tasks[1] = y
        invalid("tasks")
    elif roll < 0.64 and kind == "cnn" and not model.bn.track_running_stats:
        invalid("batch_norm", batch_norm="frozen")

    # valid variations
    if bad is None:
        if rng.random() < 0.3:
            inner = names[-2:] if kind != "cnn" else ["head"]
            kw["inner_params"] = inner
            oracle["inner_params"] = [n for n in names if any(n == w or n.startswith(w + ".") for w in inner)]
        if rng.random() < 0.25:
            adapted = oracle.get("inner_params", names)
            kw["inner_lr"] = {
                n: torch.full_like(dict(model.named_parameters())[n], rng.choice([0.02, 0.1])) for n in adapted
            }
        if rng.random() < 0.2 and kw["steps"] > 0:
            kw["step_weights"] = [rng.choice([0.0, 0.5, 1.0]) for _ in range(kw["steps"])]
            oracle["step_weights"] = kw["step_weights"]
        if rng.random() < 0.2:
            kw["task_chunk"] = 1
        if kind == "cnn" and model.bn.track_running_stats and rng.random() < 0.3:
            with torch.no_grad():
                model.bn.running_mean.normal_(0, 0.3)
                model.bn.running_var.uniform_(0.5, 1.5)
            kw["batch_norm"] = "frozen"
            oracle["train"] = False
    return model, tasks, kw, bad, oracle, (F.cross_entropy if classification else F.mse_loss)


def run_case(i):
    rng = random.Random(SEED * 100003 + i)
    model, tasks, kw, bad, oracle, loss_fn = one_case(rng)
    use_adapt = bad is None and rng.random() < 0.15 and "step_weights" not in kw and "task_chunk" not in kw
    try:
        if use_adapt:
            adapted = fastmaml.adapt(model, tasks[0], tasks[1], **kw)
            per_task = [loss_fn(out, y) for out, y in zip(adapted(tasks[2]), tasks[3])]
            torch.stack(per_task).mean().backward()
        else:
            res = fastmaml.meta_step(model, tasks, **kw)
    except (ValueError, TypeError, MemoryError) as exc:
        msg = str(exc)
        assert bad is not None, f"case {i}: a valid call raised {type(exc).__name__}: {msg} ({kw})"
        assert re.split(r"[\s:\[.=]", msg, maxsplit=1)[0] in ARGUMENTS, f"case {i}: unclear error: {msg!r}"
        return "error"
    assert bad is None, f"case {i}: invalid {bad!r} accepted ({kw})"
    lr = kw["inner_lr"]
    ref_loss, ref, _ = autograd_meta_grad(
        model, tasks, inner_lr=lr, steps=kw["steps"], order=kw["order"], loss_fn=loss_fn, **oracle
    )
    got = {n: p.grad for n, p in model.named_parameters()}
    assert_grads_close(got, ref, 1e-8)
    if not use_adapt:
        assert rel_err(res.meta_loss, ref_loss) < 1e-9
    return "oracle"


@pytest.mark.parametrize("block", range(10))
def test_fuzz(block):
    per = (CASES + 9) // 10
    outcomes = [run_case(i) for i in range(block * per, min(CASES, (block + 1) * per))]
    assert outcomes.count("oracle") > len(outcomes) // 4 and outcomes.count("error") > len(outcomes) // 10
