"""`MetaStep(..., cuda_graph="auto")` on the CPU: `GraphChoice`'s measurement protocol with a fake clock, the
plan's dispatch through it with a stand-in for the CUDA graph (every call still bit for bit the unplanned
`meta_step`; the graph dropped when uncaptured wins or capture fails), the option's validation, and "auto"
off CUDA. The real capture is tested on CUDA in tests/test_meta_step_graphs.py."""

import copy

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml import graphs
from fastmaml import plan as plans

from models import regression_tasks
from unplanned import reference

UNTIMED_CAPTURED = graphs.WARMUP_CALLS + 1
CALLS_TO_DECIDE = 1 + graphs.TIMED_CALLS + UNTIMED_CAPTURED + graphs.TIMED_CALLS


def sinusoid():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))


def tasks(seed):
    return tuple(t.float() for t in regression_tasks(T=4, ns=6, nq=6, seed=seed))


class FakeClock:
    """Each call of kind k takes `cost[k]` seconds of fake time (the clock advances when a call runs)."""

    def __init__(self, cost):
        self.cost, self.now = cost, 0.0

    def __call__(self):
        return self.now

    def spend(self, kind):
        self.now += self.cost[kind]


def drive(choice, clock, calls):
    """Runs `calls` calls through `choice`; returns the kinds run, in order."""
    kinds = []
    for _ in range(calls):
        kind = choice.mode()
        choice.run(kind, lambda k=kind: clock.spend(k))
        kinds.append(kind)
    return kinds


@pytest.mark.parametrize("faster", ["captured", "uncaptured"])
def test_choice_times_both_kinds_then_keeps_the_faster(faster):
    slower = "uncaptured" if faster == "captured" else "captured"
    clock = FakeClock({faster: 0.001, slower: 0.003})
    choice = graphs.GraphChoice(sync=lambda: None, clock=clock)
    kinds = drive(choice, clock, CALLS_TO_DECIDE)
    assert kinds == ["uncaptured"] * (1 + graphs.TIMED_CALLS) + ["captured"] * (UNTIMED_CAPTURED + graphs.TIMED_CALLS)
    assert choice.decision == faster
    assert len(choice.seconds["uncaptured"]) == len(choice.seconds["captured"]) == graphs.TIMED_CALLS
    assert choice.seconds[faster] == pytest.approx([0.001] * graphs.TIMED_CALLS)
    assert "1.000 ms" in choice.reason and "3.000 ms" in choice.reason
    assert drive(choice, clock, 3) == [faster] * 3
    assert len(choice.seconds[faster]) == graphs.TIMED_CALLS  # nothing timed once decided


def test_choice_is_undecided_until_the_last_timed_replay():
    clock = FakeClock({"captured": 0.001, "uncaptured": 0.002})
    choice = graphs.GraphChoice(sync=lambda: None, clock=clock)
    drive(choice, clock, CALLS_TO_DECIDE - 1)
    assert choice.decision is None and choice.reason == "measuring"
    drive(choice, clock, 1)
    assert choice.decision == "captured"


def test_choice_synchronizes_around_each_timed_call_only():
    syncs = []
    clock = FakeClock({"captured": 0.001, "uncaptured": 0.002})
    choice = graphs.GraphChoice(sync=lambda: syncs.append(clock.now), clock=clock)
    drive(choice, clock, CALLS_TO_DECIDE + 2)
    assert len(syncs) == 2 * 2 * graphs.TIMED_CALLS


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "True"])
def test_bad_cuda_graph_option_names_the_argument(bad):
    with pytest.raises(ValueError, match="cuda_graph: expected True, False or 'auto'"):
        fastmaml.MetaStep(sinusoid(), tasks(0), cuda_graph=bad)


def test_auto_on_cpu_runs_uncaptured_and_says_why():
    a, c = sinusoid(), sinusoid()
    step = fastmaml.MetaStep(a, tasks(0), cuda_graph="auto", steps=2)
    assert step.graph_choice.decision == "uncaptured" and "cpu" in step.graph_choice.reason
    for seed in range(3):
        r = step(tasks(seed))
        want = reference(c, tasks(seed), steps=2)
        assert torch.equal(r.meta_loss, want.meta_loss)
        for p, q in zip(a.parameters(), c.parameters()):
            assert torch.equal(p.grad, q.grad)
    assert fastmaml.MetaStep(a, tasks(0)).graph_choice is None


def test_auto_with_backtracking_runs_uncaptured_and_true_raises():
    model = sinusoid()
    step = fastmaml.MetaStep(model, tasks(0), cuda_graph="auto", inner_solver="backtracking", order="implicit")
    assert step.graph_choice.decision == "uncaptured" and "backtracking" in step.graph_choice.reason
    with pytest.raises(ValueError, match="cuda_graph=True: inner_solver='backtracking'"):
        fastmaml.MetaStep(model, tasks(0), cuda_graph=True, inner_solver="backtracking", order="implicit")


class StandIn:
    """Stands in for `CapturedStep` on the CPU: counts its calls, runs the plan's uncaptured step and spends a
    replay's fake time (or raises `CaptureError` at its capturing call, when told to)."""

    def __init__(self, clock, fail):
        self.clock, self.fail = clock, fail
        self.calls, self.resets = 0, 0
        self.uncaptured = None  # the plan's untimed uncaptured step, set by the fixture

    def reset(self):
        self.resets += 1

    def run(self, *args):
        self.calls += 1
        if self.fail and self.calls == graphs.WARMUP_CALLS + 1:
            try:
                raise RuntimeError("operation not permitted when stream is capturing (stand-in)")
            except RuntimeError as exc:
                raise graphs.CaptureError("cuda_graph=True: capturing the meta-step failed") from exc
        out = self.uncaptured(*args)
        self.clock.spend("captured")
        return out


@pytest.fixture
def stand_in(monkeypatch):
    """make(model, fail) -> (MetaStep with "auto", its `StandIn`): the CPU treated as capturable, a fake clock
    on which replays take 1 ms and uncaptured calls `clock.cost["uncaptured"]` (set by the test)."""
    clock = FakeClock({"captured": 0.001, "uncaptured": 0.002})
    monkeypatch.setattr(plans, "why_not_capturable", lambda device, solver: None)
    monkeypatch.setattr(plans, "_measuring", lambda device: graphs.GraphChoice(sync=lambda: None, clock=clock))

    def make(model, fail=False):
        graph = StandIn(clock, fail)
        monkeypatch.setattr(plans, "CapturedStep", lambda device: graph)
        step = fastmaml.MetaStep(model, tasks(0), cuda_graph="auto", steps=2)
        graph.uncaptured = untimed = step._uncaptured

        def uncaptured(*args):
            out = untimed(*args)
            clock.spend("uncaptured")
            return out

        step._uncaptured = uncaptured
        return step, graph

    return make, clock


@pytest.mark.parametrize("uncaptured_ms, decision", [(2.0, "captured"), (0.5, "uncaptured")])
def test_plan_dispatches_through_the_choice(stand_in, uncaptured_ms, decision):
    make, clock = stand_in
    clock.cost["uncaptured"] = uncaptured_ms / 1e3
    a = sinusoid()
    c = copy.deepcopy(a)
    step, graph = make(a)
    for seed in range(CALLS_TO_DECIDE + 3):
        r = step(tasks(seed))
        want = reference(c, tasks(seed), steps=2)
        assert torch.equal(r.meta_loss, want.meta_loss)
        for p, q in zip(a.parameters(), c.parameters()):
            assert torch.equal(p.grad, q.grad)
    assert step.graph_choice.decision == decision
    after = 3 if decision == "captured" else 0
    assert graph.calls == UNTIMED_CAPTURED + graphs.TIMED_CALLS + after
    assert (step._graph is None) == (decision == "uncaptured")


def test_failed_capture_decides_uncaptured_and_the_call_still_runs(stand_in):
    make, _ = stand_in
    a = sinusoid()
    c = copy.deepcopy(a)
    step, graph = make(a, fail=True)
    for seed in range(1 + graphs.TIMED_CALLS + UNTIMED_CAPTURED + 2):
        r = step(tasks(seed))
        want = reference(c, tasks(seed), steps=2)
        assert torch.equal(r.meta_loss, want.meta_loss)
        for p, q in zip(a.parameters(), c.parameters()):
            assert torch.equal(p.grad, q.grad)
    reason = step.graph_choice.reason
    assert step.graph_choice.decision == "uncaptured" and reason.startswith("capture failed (RuntimeError: ")
    assert "not permitted when stream is capturing" in reason and "cuda_graph=True" not in reason
    assert step._graph is None and graph.calls == graphs.WARMUP_CALLS + 1


def test_a_rebuild_while_measuring_measures_again(stand_in):
    make, _ = stand_in
    a = sinusoid()
    step, graph = make(a)
    for seed in range(1 + graphs.TIMED_CALLS + 1):
        step(tasks(seed))
    first = step.graph_choice
    a[0].weight = nn.Parameter(a[0].weight.detach().clone())  # a replaced parameter: the plan is built again
    step(tasks(9))
    assert step.rebuilds == 1 and graph.resets == 1
    assert step.graph_choice is not first and step.graph_choice.decision is None
