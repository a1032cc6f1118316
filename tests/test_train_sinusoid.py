"""`fastmaml train sinusoid`: the task sampler, the evaluation against a plain autograd SGD loop,
an end-to-end CLI run, bit-identical `--resume`, and clear errors for bad options."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastmaml.cli import main
from fastmaml.train import common
from fastmaml.train import sinusoid as job

TINY = ["--eval-tasks", "4", "--eval-query", "8", "--quiet"]


def cli(out, *options):
    return main(["train", "sinusoid", "--out", str(out), *TINY, *map(str, options)])


def test_sampler_shapes_ranges_and_targets():
    batch, amplitude, phase = job.SinusoidSampler(3).sample_with_params(500, 7, 13)
    assert batch.support_x.shape == batch.support_y.shape == (500, 7, 1)
    assert batch.query_x.shape == batch.query_y.shape == (500, 13, 1)
    assert all(t.dtype == torch.float32 for t in batch)
    assert amplitude.shape == phase.shape == (500,)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and amplitude.max() - amplitude.min() > 4.5
    assert 0.0 <= phase.min() and phase.max() <= math.pi and phase.max() - phase.min() > 3.0
    for x in (batch.support_x, batch.query_x):
        assert -5.0 <= x.min() and x.max() <= 5.0 and x.max() - x.min() > 9.5
    expected = amplitude[:, None, None] * torch.sin(batch.query_x - phase[:, None, None])
    torch.testing.assert_close(batch.query_y, expected, rtol=0, atol=0)


def test_sampler_is_deterministic_and_resumable():
    a, b, c = job.SinusoidSampler(5), job.SinusoidSampler(5), job.SinusoidSampler(6)
    first = a.sample(4, 10, 10)
    assert all(torch.equal(x, y) for x, y in zip(first, b.sample(4, 10, 10)))
    assert not torch.equal(first.support_x, c.sample(4, 10, 10).support_x)
    saved = a.state_dict()
    nxt = a.sample(4, 10, 10)
    assert not torch.equal(nxt.support_x, first.support_x)
    fresh = job.SinusoidSampler(123)
    fresh.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(nxt, fresh.sample(4, 10, 10)))


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"support: expected an int >= 1, got 0"):
        job.SinusoidSampler(0).sample(3, 0, 5)


def test_eval_set_is_fixed_and_independent_of_the_training_seed():
    one, two = job.eval_set(6, 10, 20), job.eval_set(6, 10, 20)
    assert all(torch.equal(x, y) for x, y in zip(one.batch, two.batch))
    assert one.batch.support_x.shape == (6, 10, 1) and one.batch.query_x.shape == (6, 20, 1)


def test_evaluate_matches_plain_per_task_sgd():
    torch.manual_seed(0)
    model = job.sinusoid_mlp().double()
    tasks = job.eval_set(3, 5, 9)
    tasks = job.EvalSet(tasks.batch.to(torch.float64), tasks.amplitude, tasks.phase)
    lr = 0.05
    got = job.evaluate(model, tasks, inner_lr=lr, eval_steps=[1, 3])
    assert set(got) == {"before", "after_1", "after_3"}
    sx, sy, qx, qy = tasks.batch
    for t in range(3):
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        for k in range(4):
            pred = torch.func.functional_call(model, params, (qx[t],))
            key = "before" if k == 0 else f"after_{k}"
            if key in got:
                want = F.mse_loss(pred, qy[t]).item()
                assert abs(got[key][t] - want) <= 1e-12 * max(1.0, want), (key, t)
            loss = F.mse_loss(torch.func.functional_call(model, params, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {n: (p - lr * g).detach().requires_grad_() for (n, p), g in zip(params.items(), grads)}


def test_cli_end_to_end_writes_metrics_figures_and_checkpoint(tmp_path):
    assert cli(tmp_path, "--iterations", 20, "--checkpoint-every", 7) == 0
    metrics = json.loads((tmp_path / common.METRICS).read_text())
    assert {"config", "eval", "history", "iteration", "eval_description"} <= set(metrics)
    assert metrics["iteration"] == 20 and metrics["config"]["meta_batch"] == 25
    assert len(metrics["history"]["meta_loss"]) == 20 == len(metrics["history"]["baseline_loss"])
    assert all(math.isfinite(v) for v in metrics["history"]["meta_loss"])
    for model in ("MAML", "pretrained"):
        row = metrics["eval"][model]
        assert set(row) == {"before", "after_1", "after_10"}
        assert all(math.isfinite(c["mean"]) and c["ci95"] > 0 for c in row.values())
    for name in (job.FIGURE, job.LEARNING_CURVE):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(tmp_path / name).ndim == 3
    ckpt = common.load_checkpoint(tmp_path / common.CHECKPOINT)
    assert ckpt["iteration"] == 20 and len(ckpt["history"]["meta_loss"]) == 20
    model = job.sinusoid_mlp()
    model.load_state_dict(ckpt["model"])
    assert {"optimizer", "baseline", "baseline_optimizer", "sampler", "baseline_sampler", "rng"} <= set(ckpt)
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes left a temporary file behind"


def test_resume_is_bit_identical_to_a_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli(straight, "--iterations", 20, "--order", "checkpoint", "--steps", 2)
    cli(split, "--iterations", 10, "--order", "checkpoint", "--steps", 2)
    torch.manual_seed(999)  # resume must not depend on the process's RNG state
    cli(split, "--iterations", 20, "--order", "checkpoint", "--steps", 2, "--resume")
    a = common.load_checkpoint(straight / common.CHECKPOINT)
    b = common.load_checkpoint(split / common.CHECKPOINT)
    assert b["iteration"] == 20
    for key in ("model", "baseline"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["history"] == b["history"]
    metrics = json.loads((split / common.METRICS).read_text())
    assert metrics["resumed_from"] == 10
    assert metrics["eval"] == json.loads((straight / common.METRICS).read_text())["eval"]


def error_line(capsys) -> str:
    """The single line a user error prints on stderr."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_resume_refuses_changed_options_and_fewer_iterations(tmp_path, capsys):
    assert cli(tmp_path / "missing", "--iterations", 3, "--resume") == 2
    line = error_line(capsys)
    assert line.startswith("fastmaml train sinusoid: error: --resume: the folder") and "does not exist" in line
    assert cli(tmp_path, "--iterations", 3, "--resume") == 2
    assert f"--resume: no checkpoint in {tmp_path}" in error_line(capsys)
    assert cli(tmp_path, "--iterations", 3) == 0
    capsys.readouterr()
    assert cli(tmp_path, "--iterations", 5, "--order", "first", "--resume") == 2
    assert "--order first (checkpoint: second)" in error_line(capsys)
    assert cli(tmp_path, "--iterations", 2, "--resume") == 2
    assert "--iterations 2: below the 3 iterations of the checkpoint" in error_line(capsys)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--inner-lr", "-0.1", "expected a positive number, got '-0.1'"),
        ("--meta-lr", "nan", "expected a positive number, got 'nan'"),
        ("--iterations", "-3", "expected a non-negative integer, got '-3'"),
        ("--meta-batch", "0", "expected a positive integer, got '0'"),
        ("--shots", "ten", "expected a positive integer, got 'ten'"),
        ("--eval-tasks", "1", "expected at least 2 tasks"),
        ("--order", "third", "invalid choice: 'third'"),
        ("--device", "gpu0", "expected a torch device"),
    ],
)
def test_bad_options_name_the_option(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", "sinusoid", "--out", str(tmp_path), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and message in err


def test_moving_average_of_a_history():
    assert common.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [(1, 1.0), (2, 1.5), (3, 2.5), (4, 3.5)]
    assert common.moving_average([], 5) == []
