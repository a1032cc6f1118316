"""The training jobs data-parallel under torchrun: 2 CPU ranks (gloo, 1 thread each), launched the way a
user launches them (`python -m torch.distributed.run --standalone --nproc_per_node 2 -m fastmaml train ...`).

What "the same parameters as 1 process" means here, and the bound. Every rank draws the whole meta-batch
from the same seeded stream and keeps its share, so both runs see the same tasks and the same RNG states
(those are compared bit for bit). What differs is the order of the float32 sums over tasks: one process
averages T per-task gradients inside `meta_step`; two ranks average their shares, then the all-reduce
combines (T_r / T)·mean_r. The meta-gradients therefore differ by float32 rounding, a relative δ of about
1e-7 (a few units of 2^-23, more where the per-task terms cancel). Adam's step lr·m̂/(√v̂ + ε) is a ratio of
gradient moments, so a relative δ in the gradient changes a step by about lr·δ (1e-3 · 1e-6 = 1e-9), and the
subtraction θ − step rounds differently by at most one unit of θ's last place (|θ|·2^-23 ≈ 1.2e-7·|θ|).
The trajectory is not chaotic over a few steps (lr × curvature ≪ 1), so after n steps
|θ₂ − θ₁| ≲ n·(1.2e-7·|θ| + 1e-9): for sinusoid's 20 steps 2.4e-6·|θ| + 2e-8, for fewshot-demo's 3 steps
less. The tests assert |θ₂ − θ₁| ≤ 5e-6·|θ| + 2e-7 (measured on this machine: at most 6e-8, one unit in
the last place at |θ| ≈ 1).

One exception, in the conv nets: a convolution's bias in front of a BatchNorm has an exact meta-gradient of
zero (the BatchNorm subtracts the batch mean), so its float32 gradient is pure rounding noise, which Adam
normalizes into steps of about ±lr in a direction the noise picks: it drifts differently in any two runs
that sum in another order, without changing what the network computes. Those biases are left out of the
parameter comparison, and the two networks' outputs are compared instead (to 1e-5). So are the running means
of the BatchNorm layers after them, which `meta_step` updates from the support sets (mean of W x + b: the drift
of b).

Validation and test episodes are split over the ranks and gathered, so the reported accuracies and CIs
are those of the whole episode set (compared to 1e-6). The resume tests: a checkpoint of 2 ranks goes on
with 1 and one of 1 with 2, to the same end (same bound); resumed with the same world size, the run is bit
for bit the uninterrupted one (`slow`). A killed rank makes the other stop within 60 s, naming it. Longer
variants (the same-world-size resume, one process under torchrun, an even meta-batch, a rank that raises,
SIGINT to torchrun, torch.multiprocessing) are marked `slow`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmaml
from fastmaml.cli import main
from fastmaml.train import common, fewshot

REPO = Path(fastmaml.__file__).resolve().parent.parent
WAIT = 300  # seconds: a generous bound for one launch on a busy 2-core machine
RTOL, ATOL = 5e-6, 2e-7  # |θ₂ − θ₁| ≤ RTOL·|θ₁| + ATOL (module docstring)
# meta-batch 5: shares of 3 and 2 tasks (uneven); 7 held-out tasks: 4 and 3
SINUSOID = [
    "train",
    "sinusoid",
    "--meta-batch",
    "5",
    "--shots",
    "5",
    "--eval-tasks",
    "7",
    "--eval-query",
    "8",
    "--eval-steps",
    "1",
    "--threads",
    "1",
    "--quiet",
]
# validation on 5 episodes (3 + 2) in batches of 2: rank 0 has 2 batches, rank 1 one
DEMO = [
    "train",
    "fewshot-demo",
    "--meta-batch",
    "4",
    "--hidden",
    "4",
    "--query",
    "1",
    "--val-every",
    "3",
    "--val-episodes",
    "5",
    "--eval-batch",
    "2",
    "--test-episodes",
    "5",
    "--threads",
    "1",
    "--quiet",
]
LAUNCH_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
)

# Runs `fastmaml` with argv (as torchrun's script). FASTMAML_TEST_PIDS=PREFIX: each rank writes its pid to
# PREFIX.<rank>; FASTMAML_TEST_RAISE="RANK:N": that rank raises a ValueError in its N-th meta_step.
WRAPPER = """
import os, sys
import fastmaml
from fastmaml import cli

rank = int(os.environ.get("RANK", "0"))
prefix = os.environ.get("FASTMAML_TEST_PIDS")
if prefix:
    with open(f"{prefix}.{rank}.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(f"{prefix}.{rank}.tmp", f"{prefix}.{rank}")
fail = os.environ.get("FASTMAML_TEST_RAISE")
if fail and int(fail.split(":")[0]) == rank:
    real, calls = fastmaml.meta_step, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(fail.split(":")[1]):
            raise ValueError(f"injected failure in meta_step call {calls[0]}")
        return real(*args, **kwargs)

    fastmaml.meta_step = failing
sys.exit(cli.main(sys.argv[1:]))
"""


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def torchrun(argv, *, nproc=2, script=None, env=None) -> subprocess.Popen:
    """Starts `torchrun --standalone --nproc_per_node N -m fastmaml ARGV` (or the script)."""
    target = ["-m", "fastmaml"] if script is None else [str(script)]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *target,
            *map(str, argv),
        ],
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=WAIT):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_ok(argv, **kwargs):
    code, out, err = finish(torchrun(argv, **kwargs))
    assert code == 0, err[-3000:]
    return out, err


def checkpoint(folder):
    return common.load_checkpoint(Path(folder) / common.CHECKPOINT)


def metrics(folder):
    return json.loads((Path(folder) / common.METRICS).read_text())


def same(a, b, where="") -> None:
    """Bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def close(a, b, where="") -> None:
    """Nested values equal up to the float32 summation-order bound (RTOL, ATOL); ints and strings exactly."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            err = float(((a - b).abs() - RTOL * a.abs()).max()) if a.numel() else 0.0
            assert err <= ATOL, f"{where}: |Δ| beyond the bound by {err:.3g}"
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    else:
        assert a == b, where


def same_stream(a, b) -> None:
    """The episode streams and every RNG state are global: bit for bit the same whatever the world size."""
    for key in ("rng", "sampler", "baseline_sampler", "episodes_rng"):
        if key in a:
            same(a[key], b[key], key)
    assert a["iteration"] == b["iteration"]


def sinusoid_close(reference, run) -> None:
    """Two sinusoid runs: the same streams, parameters and optimizer states within the bound, the same
    evaluation and history within float rounding."""
    a, b = checkpoint(reference), checkpoint(run)
    same_stream(a, b)
    for key in ("model", "baseline", "optimizer", "baseline_optimizer"):
        close(a[key], b[key], key)
    ma, mb = metrics(reference), metrics(run)
    close(ma["eval"], mb["eval"], "eval")
    close(ma["history"], mb["history"], "history")


def only_rank0_wrote(folder, expected) -> None:
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted(expected)


SINUSOID_FILES = ["checkpoint.pt", "metrics.json", "learning_curve.png", "sinusoid.png"]


@pytest.fixture(scope="module")
def sinusoid_reference(tmp_path_factory):
    """One process, 20 iterations."""
    out = tmp_path_factory.mktemp("sinusoid") / "one"
    assert main([*SINUSOID, "--iterations", "20", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sinusoid_two_ranks(tmp_path_factory):
    """Two ranks, 20 iterations, with progress lines (to check that only rank 0 prints)."""
    out = tmp_path_factory.mktemp("sinusoid") / "two"
    argv = [a for a in SINUSOID if a != "--quiet"]
    stdout, _ = run_ok([*argv, "--iterations", "20", "--log-every", "1000", "--out", out])
    return out, stdout


def test_sinusoid_two_ranks_end_like_one_process(sinusoid_reference, sinusoid_two_ranks):
    """20 iterations, meta-batch 5 over 2 ranks (3 + 2 tasks): the parameters and Adam states of both
    networks (MAML and the pretrained baseline) end within the bound of one process's; the held-out MSEs
    (7 tasks, 4 + 3 per rank, gathered) and the history match; only rank 0 printed and wrote files."""
    out, stdout = sinusoid_two_ranks
    sinusoid_close(sinusoid_reference, out)
    only_rank0_wrote(out, SINUSOID_FILES)
    assert stdout.count("sinusoid: starting at iteration 0 of 20 on 2 processes (gloo") == 1
    assert stdout.count("held-out tasks") == 2 and metrics(out)["processes"] == 2  # one table, one summary line


@pytest.fixture(scope="module")
def sinusoid_two_ranks_half(tmp_path_factory):
    """Two ranks, stopped at iteration 10 of 20 (--iterations 10)."""
    out = tmp_path_factory.mktemp("sinusoid") / "half2"
    run_ok([*SINUSOID, "--iterations", "10", "--out", out])
    assert checkpoint(out)["iteration"] == 10
    return out


def test_sinusoid_resumes_across_world_sizes(tmp_path, sinusoid_reference, sinusoid_two_ranks_half):
    """A 2-rank checkpoint at iteration 10 goes on with 1 process, a 1-process one with 2 ranks: both end
    where one process ends (within the bound)."""
    one_more = tmp_path / "2then1"
    shutil.copytree(sinusoid_two_ranks_half, one_more)
    assert main([*SINUSOID, "--iterations", "20", "--out", str(one_more), "--resume"]) == 0
    sinusoid_close(sinusoid_reference, one_more)

    one = tmp_path / "1then2"
    assert main([*SINUSOID, "--iterations", "10", "--out", str(one)]) == 0
    run_ok([*SINUSOID, "--iterations", "20", "--out", one, "--resume"])
    sinusoid_close(sinusoid_reference, one)
    assert metrics(one)["resumed_from"] == 10


@pytest.mark.slow
def test_resumed_with_the_same_world_size_is_bit_identical(tmp_path, sinusoid_two_ranks, sinusoid_two_ranks_half):
    """The 2-rank checkpoint of iteration 10 resumed with 2 ranks ends bit for bit where the uninterrupted
    2-rank run ends (weights, optimizers, streams, RNG states, history, evaluation)."""
    two_straight, _ = sinusoid_two_ranks
    out = tmp_path / "run"
    shutil.copytree(sinusoid_two_ranks_half, out)
    run_ok([*SINUSOID, "--iterations", "20", "--out", out, "--resume"])
    a, b = checkpoint(two_straight), checkpoint(out)
    for key in sorted(set(a) - {"config"}):
        same(a[key], b[key], key)
    assert metrics(out)["eval"] == metrics(two_straight)["eval"]
    assert metrics(out)["history"] == metrics(two_straight)["history"]


@pytest.mark.slow
def test_one_process_under_torchrun_is_the_single_process_run(tmp_path, sinusoid_reference):
    """torchrun with 1 process (the code path of a 1-GPU NCCL launch): bit for bit the plain run."""
    out = tmp_path / "one"
    run_ok([*SINUSOID, "--iterations", "20", "--out", out], nproc=1)
    a, b = checkpoint(sinusoid_reference), checkpoint(out)
    # timing and step memory are measurements, not state: a single process takes them, ranks do not
    for key in sorted(set(a) - {"config", "timing", "step_memory"}):
        same(a[key], b[key], key)
    assert metrics(out)["eval"] == metrics(sinusoid_reference)["eval"]
    assert metrics(out)["history"] == metrics(sinusoid_reference)["history"]


def test_example_script_runs_on_two_ranks():
    """examples/distributed_maml.py, launched as its docstring says (its arithmetic: tests/test_distributed.py)."""
    out, _ = run_ok(["--iterations", "3", "--meta-batch", "5"], script=REPO / "examples" / "distributed_maml.py")
    line = out.strip().splitlines()[-1]
    assert line.startswith("iteration 3: meta-loss ") and "(all 5 tasks, 2 ranks)" in line, out


def _function(state):
    """The conv4 of DEMO with `state`, on fixed glyph-like inputs (batch statistics): `[N, ways]` logits."""
    cfg = {"model": "conv4", "ways": 5, "hidden": 4, "bn": "batch", "steps": 1, "widths": [64, 160, 320, 640]}
    model = fewshot.build_model(cfg, (1, 28, 28))
    model.load_state_dict(state)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.train()(x)


def _fewshot_close(reference, run) -> None:
    a, b = checkpoint(reference), checkpoint(run)
    same_stream(a, b)
    for weights in ("model", "best_model"):
        dead = {f"{k.split('.')[0]}.bias" for k in a[weights] if k.endswith("running_mean")}
        dead = {f"{int(k.split('.')[0]) - 1}.bias" for k in dead}  # conv biases in front of a BatchNorm
        assert dead, "expected conv4's biases in front of its BatchNorm layers"
        dead |= {k for k in a[weights] if k.endswith("running_mean")}  # they track those biases' drift
        close(
            {k: v for k, v in a[weights].items() if k not in dead},
            {k: v for k, v in b[weights].items() if k not in dead},
            weights,
        )
        assert torch.allclose(_function(a[weights]), _function(b[weights]), rtol=1e-5, atol=1e-5), weights
    ma, mb = metrics(reference), metrics(run)
    for key in ("best", "test", "random_init_baseline", "history"):
        close(ma[key], mb[key], key)


DEMO_FILES = ["checkpoint.pt", "best.pt", "metrics.json", "loss.png", "accuracy.png"]


def test_fewshot_demo_two_ranks_end_like_one_process(tmp_path):
    """fewshot-demo, 3 iterations of meta-batch 4 (2 + 2 tasks), validation at 3 on 5 episodes and a test on
    5 (split 3 + 2 and gathered): the same parameters (within the bound; see the module docstring for the
    conv biases in front of BatchNorm), validation and test accuracies and CIs as one process."""
    reference, out = tmp_path / "one", tmp_path / "two"
    assert main([*DEMO, "--iterations", "3", "--out", str(reference)]) == 0
    run_ok([*DEMO, "--iterations", "3", "--out", out])
    _fewshot_close(reference, out)
    only_rank0_wrote(out, DEMO_FILES)
    assert metrics(out)["test"]["episodes"] == 5 and metrics(out)["processes"] == 2


def _wait_for(path: Path, proc, timeout=WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the launch ended before {path} appeared: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} within {timeout} s")
        time.sleep(0.05)


def test_killed_rank_stops_the_other_within_60s(tmp_path):
    """SIGKILL to rank 1 in the middle of training: rank 0 stops within 60 s (at once, on gloo) with one
    line naming rank 1 and the intact checkpoint, and the launch fails."""
    wrapper = tmp_path / "run_fastmaml.py"
    wrapper.write_text(WRAPPER)
    out, pids = tmp_path / "run", tmp_path / "pid"
    proc = torchrun(
        [*SINUSOID, "--iterations", "100000", "--checkpoint-every", "5", "--out", out],
        script=wrapper,
        env={"FASTMAML_TEST_PIDS": str(pids)},
    )
    _wait_for(out / common.CHECKPOINT, proc)
    os.kill(int(Path(f"{pids}.1").read_text()), signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = finish(proc, timeout=60)
    assert time.monotonic() - killed < 60
    assert code != 0
    line = next(line for line in err.splitlines() if "fastmaml train sinusoid: error: rank 0 of 2" in line)
    assert "rank 1 stopped responding" in line and "resume with --resume" in line, line
    assert checkpoint(out)["iteration"] % 5 == 0


@pytest.mark.slow
def test_raising_rank_is_named_by_the_others(tmp_path):
    """Rank 1 raises in its 4th meta_step: its traceback, and rank 0 stops with its error message."""
    wrapper = tmp_path / "run_fastmaml.py"
    wrapper.write_text(WRAPPER)
    code, _, err = finish(
        torchrun(
            [*SINUSOID, "--iterations", "50", "--out", tmp_path / "run"],
            script=wrapper,
            env={"FASTMAML_TEST_RAISE": "1:4"},
        ),
        timeout=120,
    )
    assert code != 0
    line = next(
        line for line in err.splitlines() if "error: rank 0 of 2 stopped in the all-reduce of iteration 4" in line
    )
    assert "rank 1 failed: ValueError: injected failure in meta_step call 4" in line, line


def _fake_launch(monkeypatch, rank, size, local_size=None):
    for key, value in dict(
        RANK=rank,
        WORLD_SIZE=size,
        LOCAL_RANK=rank,
        LOCAL_WORLD_SIZE=local_size or size,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
    ).items():
        monkeypatch.setenv(key, str(value))


def test_bad_launches_are_one_line_printed_by_rank_0(tmp_path, monkeypatch, capsys):
    """A meta-batch smaller than the world size, more processes per machine than GPUs, an explicit GPU with
    several processes per machine: one line from rank 0, nothing from the others, before joining the group."""
    monkeypatch.setattr(
        torch.distributed,
        "init_process_group",
        lambda *a, **k: pytest.fail("joined the group before checking the launch"),
    )
    argv = [*SINUSOID, "--iterations", "1", "--out", str(tmp_path / "run"), "--meta-batch", "2"]
    _fake_launch(monkeypatch, 0, 4)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "fastmaml train sinusoid: error: --meta-batch 2: fewer tasks than the 4 processes (every rank "
        "needs at least one task of each meta-batch); pass --meta-batch 4 or more, or launch fewer "
        "processes"
    )
    _fake_launch(monkeypatch, 3, 4)
    assert main(argv) == 2 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as stop:  # an option error: rank 0 says it
        main([*argv, "--meta-batch", "x"])
    assert stop.value.code == 2 and capsys.readouterr().err == ""
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr(common, "resolve_device", lambda text: torch.device(text))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _fake_launch(monkeypatch, 0, 4, local_size=4)
    assert main([*argv, "--meta-batch", "8", "--device", "cuda"]) == 2
    assert "--nproc_per_node 4: more processes than the 2 CUDA devices of this machine" in capsys.readouterr().err
    _fake_launch(monkeypatch, 0, 2, local_size=2)
    assert main([*argv, "--meta-batch", "8", "--device", "cuda:1"]) == 2
    assert (
        "--device cuda:1: with 2 processes per machine each uses the GPU of its LOCAL_RANK; pass --device cuda"
        in capsys.readouterr().err
    )


@pytest.mark.slow
def test_even_meta_batch_and_uneven_fewshot(tmp_path):
    """The other halves: sinusoid with meta-batch 4 (2 + 2) and fewshot-demo with meta-batch 3 (2 + 1)."""
    argv = [*SINUSOID, "--iterations", "20", "--meta-batch", "4"]
    assert main([*argv, "--out", str(tmp_path / "s1")]) == 0
    run_ok([*argv, "--out", tmp_path / "s2"])
    sinusoid_close(tmp_path / "s1", tmp_path / "s2")
    argv = [*DEMO, "--iterations", "3", "--meta-batch", "3"]
    assert main([*argv, "--out", str(tmp_path / "f1")]) == 0
    run_ok([*argv, "--out", tmp_path / "f2"])
    _fewshot_close(tmp_path / "f1", tmp_path / "f2")


@pytest.mark.slow
def test_sigint_to_torchrun_stops_every_rank_at_one_iteration_and_resumes_bit_identical(tmp_path, sinusoid_two_ranks):
    """Ctrl-C to torchrun (SIGINT, which it forwards to every rank): the ranks agree on the iteration to stop
    after, rank 0 writes the checkpoint and the resume line; the resumed run (2 ranks) ends bit for bit where
    the uninterrupted one ends."""
    two_straight, _ = sinusoid_two_ranks
    out = tmp_path / "run"
    proc = torchrun([*SINUSOID, "--iterations", "20", "--checkpoint-every", "1", "--out", out])
    _wait_for(out / common.CHECKPOINT, proc)
    proc.send_signal(signal.SIGINT)
    _, stdout, err = finish(proc)
    done = checkpoint(out)["iteration"]
    if done < 20:
        assert "stopped by SIGINT" in stdout and "Resume with: torchrun" in stdout, (stdout, err[-2000:])
    run_ok([*SINUSOID, "--iterations", "20", "--out", out, "--resume"])
    a, b = checkpoint(two_straight), checkpoint(out)
    for key in sorted(set(a) - {"config"}):
        same(a[key], b[key], key)


def _mp_rank(rank, argv, port, codes):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    codes[rank] = main(argv)


@pytest.mark.slow
def test_torch_multiprocessing_launch_with_the_same_environment(tmp_path, sinusoid_reference):
    """torch.multiprocessing with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT instead of torchrun."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    codes = mp.Manager().dict()
    out = tmp_path / "run"
    mp.spawn(_mp_rank, args=([*SINUSOID, "--iterations", "20", "--out", str(out)], port, codes), nprocs=2)
    assert dict(codes) == {0: 0, 1: 0}
    sinusoid_close(sinusoid_reference, out)
